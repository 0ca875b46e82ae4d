"""The REST API: blueprints under ``/t/<tenant>/api/v1/``."""
