"""Who the browser is: the login session behind the cookie, CSRF, cookie flags.

Flask-Login's request loader turns the cookie's session id into a
``SignedIn`` (the server-side row, the user, the tenant chosen and that
tenant's sign-in rules); everything else asks ``current_login()``. A session
is usable for a tenant's pages and API only at the ``ready`` stage: password
checked, second factor checked, tenant chosen, and enrolled in MFA when the
tenant requires it of the member's roles.

CSRF: every state-changing request that does not carry a bearer token needs
a valid token (a form field ``csrf_token`` or the ``X-CSRFToken`` header).
A bearer-token request is exempt because a browser never adds that header on
its own, so it is no ambient credential a forged request could borrow.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from flask import Flask, Request, Response, current_app, g, render_template, request
from flask import session as cookie
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionMixin
from flask_login import LoginManager, UserMixin
from flask_wtf.csrf import CSRFError, CSRFProtect

from metacrm.runtime import mfa, sessions
from metacrm.runtime.api.context import bearer_token
from metacrm.runtime.api.problem import ProblemError
from metacrm.runtime.control import LoginSession, Membership, Tenant, User
from metacrm.runtime.platform import Platform
from metacrm.runtime.sessions import Security
from metacrm.runtime.web import text

#: The key of the session id inside Flask's signed cookie.
SID = "sid"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
COOKIE_NAME = "metacrm_session"


@dataclass
class SignedIn(UserMixin):
    """A browser's login session and what it is for."""

    row: LoginSession
    user: User
    tenant: Tenant | None
    membership: Membership | None
    security: Security
    mfa_enabled: bool

    @property
    def stage(self) -> str:
        """Return what the session still lacks: mfa, tenant, enrol, or ready."""
        if not self.row.mfa_passed:
            return "mfa"
        if self.tenant is None or self.membership is None:
            return "tenant"
        if self.security.requires_mfa(self.membership.roles) and not self.mfa_enabled:
            return "enrol"
        return "ready"

    @property
    def is_authenticated(self) -> bool:  # type: ignore[override]
        return self.stage == "ready"

    def get_id(self) -> str:
        return str(self.row.id)


def platform() -> Platform:
    """Return the application's platform object."""
    return current_app.extensions["metacrm"]


def has_bearer() -> bool:
    """Tell whether the request carries an Authorization: Bearer header."""
    return bearer_token() is not None


def current_login() -> SignedIn | None:
    """Return the request's open, unexpired login session (any stage), or None."""
    if "metacrm_login" in g:
        return g.metacrm_login
    result: SignedIn | None = None
    secret = cookie.get(SID)
    if secret is not None:
        p = platform()
        with p.session() as session:
            row = sessions.find(session, secret)
            if row is not None:
                result = _load(p, session, row)
    g.metacrm_login = result
    return result


def _load(p: Platform, session: sa.orm.Session, row: LoginSession) -> SignedIn | None:
    user = session.get(User, row.user_id)
    tenant = session.get(Tenant, row.tenant_id) if row.tenant_id else None
    membership = None
    if tenant is not None:
        membership = session.scalar(
            sa.select(Membership).where(
                Membership.tenant_id == tenant.id, Membership.user_id == row.user_id
            )
        )
    if (
        user is None
        or not user.is_active
        or (tenant is not None and (membership is None or not membership.is_active))
    ):
        sessions.revoke(session, row)
        return None
    security = (
        sessions.tenant_security(p, tenant) if tenant is not None else sessions.default_security(p)
    )
    if sessions.expired(row, security):
        sessions.revoke(session, row)
        return None
    sessions.touch(session, row)
    return SignedIn(row, user, tenant, membership, security, mfa.enabled(session, user.id))


def forget() -> None:
    """Drop the cookie's state (after logout or revocation) and the per-request cache."""
    cookie.clear()
    g.pop("metacrm_login", None)


def remember(secret: str) -> None:
    """Put a new session id in the cookie, dropping everything the old cookie held."""
    lang = cookie.get("lang")
    cookie.clear()
    cookie[SID] = secret
    if lang:
        cookie["lang"] = lang
    cookie.permanent = False
    g.pop("metacrm_login", None)


def _is_api() -> bool:
    parts = request.path.split("/", 4)
    return len(parts) > 3 and parts[1] == "t" and parts[3] == "api"


def _csrf_refused(error: CSRFError) -> object:
    if _is_api():
        return ProblemError(
            403,
            "csrf_failed",
            "CSRF token missing or wrong",
            "a request made with the login cookie must send the page's CSRF token "
            "in the X-CSRFToken header",
        ).response()
    lang = text.language()
    body = render_template(
        "signin/message.html",
        t=text.strings(lang),
        lang=lang,
        title=text.strings(lang)["form_expired_title"],
        message=text.strings(lang)["form_expired"],
    )
    return body, 400


class CookieSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, without a signer for requests that bring no cookie.

    API requests carry a bearer token and no cookie, yet Flask builds an
    itsdangerous serializer to open their empty session and looks up the cookie
    settings again to save it: a tenth of a read by id's Python time. A request
    without the cookie gets a new empty session straight away, and an empty
    session nobody touched is not saved; everything else is Flask's own code.
    """

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if "HTTP_COOKIE" not in request.environ:  # no cookie at all: nothing to parse either
            return self.session_class()
        if self.get_cookie_name(app) not in request.cookies:
            return self.session_class()
        return super().open_session(app, request)

    def is_null_session(self, obj: object) -> bool:
        # Flask's isinstance check goes through ABCMeta (sessions are mappings): an exact
        # type check answers the same, since only make_null_session makes null sessions.
        return type(obj) is self.null_session_class

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        if not session and not session.modified and not session.accessed:
            return
        super().save_session(app, session, response)


class Logins(LoginManager):
    """Flask-Login, with its remember-me cookie left alone on requests without cookies.

    metacrm has no remember-me cookie (the server-side session row is the login),
    but Flask-Login looks for one in the session after every request, which
    opens it (``Vary: Cookie``) and has it saved on a bearer-token API call.
    """

    def _update_remember_cookie(self, response: Response) -> Response:
        if "HTTP_COOKIE" not in request.environ:
            return response
        return super()._update_remember_cookie(response)  # type: ignore[no-any-return]


def init_app(app: Flask) -> None:
    """Install cookie flags, Flask-Login and CSRF protection."""
    settings = app.config["METACRM_SETTINGS"]
    app.config.update(
        SESSION_COOKIE_NAME=COOKIE_NAME,
        # Secure everywhere but the embedded development server, which speaks plain http.
        SESSION_COOKIE_SECURE=settings.env == "production",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        WTF_CSRF_CHECK_DEFAULT=False,
        WTF_CSRF_TIME_LIMIT=settings.session_absolute_minutes * 60,
        WTF_CSRF_HEADERS=["X-CSRFToken", "X-CSRF-Token"],
    )
    app.session_interface = CookieSessions()
    csrf = CSRFProtect(app)
    manager = Logins(app)
    manager.session_protection = None  # the server-side row is the protection
    manager.request_loader(lambda _request: _ready_or_none())

    @app.before_request
    def _check_csrf() -> None:
        if request.method in SAFE_METHODS or has_bearer():
            return
        if _is_api() and COOKIE_NAME not in request.cookies:
            return  # no credential at all: the API answers 401 on its own
        csrf.protect()

    app.register_error_handler(CSRFError, _csrf_refused)


def _ready_or_none() -> SignedIn | None:
    login = current_login()
    return login if login is not None and login.stage == "ready" else None
