"""RFC 9457 problem documents: every API error, with a stable ``code``.

Clients branch on ``code``, people read ``title`` and ``detail``; validation
problems add ``errors`` (``{pointer, message, hint}``). Nothing internal — no
stack trace, no SQL — ever reaches a response.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import sqlalchemy as sa
from flask import Flask, Response, json, request
from werkzeug.exceptions import HTTPException

from metacrm.metadata import jsondoc

MEDIA_TYPE = "application/problem+json"
log = logging.getLogger(__name__)


class ProblemError(Exception):
    """Raise to answer the request with a problem document."""

    def __init__(
        self, status: int, code: str, title: str, detail: str | None = None, **extra: Any
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.extra = extra

    def response(self) -> Response:
        """Return the problem as an HTTP response."""
        body: dict[str, Any] = {
            "type": f"https://metacrm.dev/problems/{self.code.replace('_', '-')}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
        }
        if self.detail:
            body["detail"] = self.detail
        body["instance"] = request.path if request else None
        body.update(self.extra)
        response = Response(json.dumps(body, ensure_ascii=False), self.status, mimetype=MEDIA_TYPE)
        if self.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="metacrm"'
        return response


def abort(status: int, code: str, title: str, detail: str | None = None, **extra: Any) -> NoReturn:
    """Stop the request with a problem document."""
    raise ProblemError(status, code, title, detail, **extra)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def pointer_token(name: object) -> str:
    """Escape one JSON Pointer reference token (RFC 6901)."""
    return str(name).replace("~", "~0").replace("/", "~1")


def invalid_query(parameter: str, message: str) -> NoReturn:
    """Answer a bad query parameter: ``400 invalid_query`` pointing at the parameter."""
    abort(
        400,
        "invalid_query",
        "Invalid query",
        f"{parameter}: {message}",
        errors=[{"pointer": f"/{pointer_token(parameter)}", "message": message}],
    )


def read_json(max_bytes: int | None = None) -> Any:
    """Decode the request body strictly, or answer with a precise 4xx problem."""
    if request.mimetype != "application/json":
        abort(
            415,
            "unsupported_media_type",
            "Send JSON",
            f"the body must be application/json, not {request.mimetype or 'nothing'}",
        )
    data = request.get_data(cache=True)
    if max_bytes is not None and len(data) > max_bytes:
        abort(
            413,
            "payload_too_large",
            "Payload Too Large",
            f"the body is {len(data)} bytes; this endpoint accepts at most {max_bytes}",
        )
    try:
        return jsondoc.loads(data, max_bytes=max_bytes or len(data) + 1)
    except jsondoc.DocumentError as exc:
        abort(400, "malformed_json", "The body is not acceptable JSON", str(exc))


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    code = _HTTP_CODES.get(status, "http_error")
    detail = error.description
    if status == 413:
        detail = "the request body is larger than this server accepts"
    response = ProblemError(status, code, error.name, detail).response()
    for name, value in error.get_headers():
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response


def _lost_connection(error: Exception) -> Response | None:
    """Answer a statement that failed because its database connection was gone, or None.

    The pool has been invalidated by then, so a retry gets a fresh connection.
    """
    if not isinstance(error, sa.exc.DBAPIError) or not error.connection_invalidated:
        return None
    log.warning("database connection lost on %s %s: %s", request.method, request.path, error)
    response = ProblemError(
        503,
        "unavailable",
        "Service Unavailable",
        "the connection to the database was lost; retry (a write sent with an "
        "Idempotency-Key is safe to send again)",
    ).response()
    response.headers["Retry-After"] = "1"
    return response


def _internal_error(error: Exception) -> Response:
    lost = _lost_connection(error)
    if lost is not None:
        return lost
    log.exception("unhandled error on %s %s", request.method, request.path)
    return ProblemError(
        500,
        "internal_error",
        "Internal Server Error",
        "the server failed to answer; the error was logged",
    ).response()


def init_app(app: Flask) -> None:
    """Answer every error with a problem document."""
    app.register_error_handler(ProblemError, lambda e: e.response())
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal_error)
