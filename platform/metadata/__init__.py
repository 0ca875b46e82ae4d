"""The meta-model: document schemas, validation, table building, migration plans.

Pure by design: this package builds SQLAlchemy ``Table`` and expression objects
but never opens a connection, reads settings or imports Flask or Celery, so its
tests run in milliseconds.
"""
