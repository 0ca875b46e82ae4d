"""Service endpoints outside any tenant: an index of the API and a health check."""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, Response, jsonify

from metacrm.runtime.api.context import platform
from metacrm.runtime.api.problem import abort

bp = Blueprint("service", __name__)


@bp.get("/")
def index() -> Response:
    """Describe the service and where a tenant's API lives."""
    return jsonify(
        {
            "service": "metacrm",
            "metadata_api": "/t/{tenant}/api/v1/meta/",
            "health": "/healthz",
        }
    )


@bp.get("/healthz")
def health() -> Response:
    """Answer 200 when the control database answers, for load balancers."""
    try:
        with platform().control_engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError:
        abort(503, "unavailable", "Service Unavailable", "the control database does not answer")
    return jsonify({"status": "ok"})
