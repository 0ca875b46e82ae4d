"""Service endpoints outside any tenant: an index of the API and a health check."""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, Response, jsonify, redirect, request

from metacrm.runtime.api.context import platform
from metacrm.runtime.api.problem import abort

bp = Blueprint("service", __name__)


@bp.get("/")
def index() -> Response:
    """Send a browser to the sign-in page; describe the service to an API client."""
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    if best == "text/html" and request.accept_mimetypes["text/html"] > 0:
        return redirect("/login")  # type: ignore[return-value]
    return jsonify(
        {
            "service": "metacrm",
            "sign_in": "/login",
            "metadata_api": "/t/{tenant}/api/v1/meta/",
            "records_api": "/t/{tenant}/api/v1/records/{entity}",
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
