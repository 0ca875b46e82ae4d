"""WSGI entry point for gunicorn: ``gunicorn metacrm.wsgi:app``."""

from metacrm.app import create_app

app = create_app()
