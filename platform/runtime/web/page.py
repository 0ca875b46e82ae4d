"""What every server-rendered page shares: its language, its headers, its form check.

Sign-in, account and operator pages differ in words and flows, not in how a
page is rendered or protected; one module keeps the three from drifting apart
(a page that forgot ``no-store`` or the frame ban would be the weak one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Response, render_template, request
from flask_wtf.csrf import CSRFError, generate_csrf, validate_csrf
from wtforms.validators import ValidationError

from metacrm.runtime.web import text

#: Pages load only this site's styles, scripts and images (QR codes are data: URLs).
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def render(
    template: str, words: Mapping[str, Mapping[str, str]], status: int = 200, **values: Any
) -> Response:
    """Render a page in the visitor's language with a fresh CSRF token for its forms."""
    lang = text.language()
    body = render_template(template, t=words[lang], lang=lang, csrf_token=generate_csrf(), **values)
    return Response(body, status, mimetype="text/html")


def protect(response: Response, referrer: str = "no-referrer") -> Response:
    """Never cache or frame a page, and allow only this site's resources.

    ``referrer`` is ``no-referrer`` for pages whose URL holds a secret
    (invitation and reset links), ``same-origin`` elsewhere.
    """
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = referrer
    response.headers["Content-Security-Policy"] = CSP
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


def form_ok() -> bool:
    """Check a posted form's CSRF token (also where no global CSRF protection is installed)."""
    try:
        validate_csrf(request.form.get("csrf_token", ""))
    except (ValidationError, CSRFError):
        return False
    return True
