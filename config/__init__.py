"""Shipped defaults: settings, and later the Casbin model and Celery/gunicorn settings (package ``metacrm.defaults``)."""
