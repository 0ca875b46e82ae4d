"""Sign-in screens: password, second factor, tenant choice, sign-out, account security.

The steps are one server-side session that gains privileges in order, and
its id is replaced at each gain (password, second factor, tenant), so an id
known before a step is useless after it. A person in several tenants chooses
one; nothing in a URL, cookie or form switches it afterwards except making
that choice again, and a session for tenant A asking for /t/B/ gets a 404.

Every refusal of the password step says the same thing and costs the same
password hash whether the email exists, the password is wrong or sign-in is
locked, so the page tells an attacker nothing.
"""

from __future__ import annotations

import functools
import logging
import secrets
from typing import Any

import sqlalchemy as sa
from flask import Blueprint, Response, redirect, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from metacrm.runtime import audittrail, mfa, notifications, passwords, sessions, throttle
from metacrm.runtime.control import KnownIp, LoginSession, Membership, Tenant, User, utcnow
from metacrm.runtime.platform import Platform
from metacrm.runtime.web import page, text
from metacrm.runtime.web.auth import SignedIn, current_login, forget, platform, remember

bp = Blueprint(
    "signin",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static/web",
)
log = logging.getLogger(__name__)

MAX_EMAIL = 254
MAX_PASSWORD = passwords.MAX_LENGTH
MAX_CODE = 40


@functools.cache
def _dummy_hash() -> str:
    """Return a hash no password matches; unknown emails are checked against it."""
    return passwords.hash_password(secrets.token_urlsafe(24))


@bp.after_request
def _protect(response: Response) -> Response:
    """Never cache or frame sign-in pages; allow only this site's resources."""
    return page.protect(response, referrer="same-origin")


def _page(template: str, status: int = 200, **values: Any) -> Response:
    return page.render(template, text.TEXT, status, **values)


def _message(title: str, message: str, status: int) -> Response:
    return _page("signin/message.html", status, title=title, message=message)


def _not_found() -> Response:
    """Answer a tenant that does not exist, or is not this session's, the same way."""
    words = text.strings(text.language())
    return _message(words["not_found_title"], words["not_found"], 404)


def _field(name: str, limit: int) -> str | None:
    """Return a form field, or None when it is missing, too long or not plain text."""
    value = request.form.get(name)
    if value is None or len(value) > limit or "\x00" in value:
        return None
    return value


def _ip() -> str | None:
    return request.remote_addr


# -- audit and alerts ---------------------------------------------------------------------------


def _append(
    p: Platform, tenant: Tenant, action: str, user: User | None, ip: str | None, **detail: Any
) -> None:
    """Append a sign-in event to a tenant's audit trail (needs no request context)."""
    with p.store(tenant).begin() as connection:
        audittrail.append(
            connection,
            action=f"auth.{action}",
            actor_id=user.id if user else None,
            actor_name=user.email if user else None,
            detail=detail or None,
            ip=ip,
        )


def _audit(tenant: Tenant, action: str, user: User | None, **detail: Any) -> None:
    """Append a sign-in event of this request to a tenant's audit trail."""
    _append(platform(), tenant, action, user, _ip(), **detail)


def _member_tenants(p: Platform, user_id: Any) -> list[tuple[Tenant, Membership]]:
    with p.session() as session:
        rows = session.execute(
            sa.select(Tenant, Membership)
            .join(Membership, Membership.tenant_id == Tenant.id)
            .where(Membership.user_id == user_id, Membership.is_active.is_(True))
            .order_by(Tenant.name)
        ).all()
    return [(row.Tenant, row.Membership) for row in rows]


def _failed(
    response: BaseResponse, user: User | None, factor: str, locked_now: bool
) -> BaseResponse:
    """Record a failed attempt in the audit trail of each tenant the account belongs to.

    The entries are written once the response has been sent: writing them
    first would make a known email's refusal measurably slower than an
    unknown one's, and the timing would tell which emails exist.
    """
    p, ip = platform(), _ip()
    if user is None:
        log.info("failed sign-in for an unknown email from %s", ip)
        return response

    def write() -> None:
        try:
            for tenant, _ in _member_tenants(p, user.id):
                _append(p, tenant, "login_failed", user, ip, factor=factor)
                if locked_now:
                    _append(p, tenant, "lockout", user, ip, factor=factor)
        except Exception:  # the response is gone; a lost entry must at least be logged
            log.exception("could not audit a failed sign-in of %s", user.email)

    response.call_on_close(write)
    return response


def _note_ip(user: User) -> bool:
    """Remember the address a user signed in from; tell whether it is new for a known user."""
    ip = _ip()
    if not ip:
        return False
    now = utcnow()
    with platform().session() as session:
        known = session.scalar(
            sa.select(KnownIp).where(KnownIp.user_id == user.id, KnownIp.ip == ip)
        )
        if known is not None:
            known.last_seen_at = now
            return False
        # The very first sign-in has nothing to compare with: no alert for it.
        seen_before = session.scalar(
            sa.select(sa.func.count()).select_from(KnownIp).where(KnownIp.user_id == user.id)
        )
        session.add(KnownIp(user_id=user.id, ip=ip, first_seen_at=now, last_seen_at=now))
    return bool(seen_before)


def _alert_new_ip(tenant: Tenant, user: User) -> None:
    ip = _ip() or "?"
    _audit(tenant, "new_ip_login", user)
    store = platform().store(tenant)
    with store.begin() as connection:
        notifications.notify_admins(
            connection,
            kind="security.new_ip_login",
            message={
                "en": f"{user.email} signed in from a new address: {ip}",
                "zh-CN": f"{user.email} 从新的地址登录：{ip}",
            },
        )


# -- steps -------------------------------------------------------------------------------------


def _next_step(login: SignedIn) -> BaseResponse:
    stage = login.stage
    if stage == "mfa":
        return redirect(url_for("signin.login_mfa"))
    if stage == "tenant":
        return redirect(url_for("signin.login_tenant"))
    if stage == "enrol":
        return redirect(url_for("signin.security"))
    assert login.tenant is not None
    return redirect(url_for("signin.landing", tenant=login.tenant.slug))


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse:
    """Check email and password; open a session that still needs its next steps."""
    current = current_login()
    if request.method == "GET":
        if current is not None:
            return _next_step(current)
        return _page("signin/login.html", email="", error=None)
    email = _field("email", MAX_EMAIL)
    password = _field("password", MAX_PASSWORD)
    p = platform()
    policy = throttle.Policy.from_settings(p.settings)
    normal = (email or "").strip().lower()
    user: User | None = None
    ok = False
    locked_now = False
    with p.session() as session:
        if email is not None and password is not None and normal:
            user = session.scalar(sa.select(User).where(User.email == normal))
        stored = user.password_hash if user is not None and user.password_hash else None
        # One argon2 verification on every path, so timing does not tell them apart.
        matched = passwords.verify_password(stored or _dummy_hash(), password or "")
        blocked = bool(normal) and throttle.locked(session, normal, _ip())
        ok = matched and stored is not None and user is not None and user.is_active
        ok = ok and not blocked
        if not ok and normal:
            locked_now = throttle.record_failure(session, normal, _ip(), policy)
    if not ok:
        page = _page("signin/login.html", 401, email=normal[:MAX_EMAIL], error="bad_login")
        return _failed(page, user if user and user.is_active else None, "password", locked_now)
    assert user is not None
    with p.session() as session:
        throttle.clear_account(session, normal)
        if current is not None:
            old = session.get(LoginSession, current.row.id)
            if old is not None:
                sessions.revoke(session, old)
        mfa_on = mfa.enabled(session, user.id)
        _, secret = sessions.start(
            session,
            user.id,
            ip=_ip(),
            user_agent=request.headers.get("User-Agent"),
            mfa_passed=not mfa_on,
        )
    remember(secret)
    return redirect(url_for("signin.login_mfa" if mfa_on else "signin.login_tenant"))


@bp.route("/login/mfa", methods=["GET", "POST"])
def login_mfa() -> BaseResponse:
    """Check the second factor (a TOTP code or a recovery code)."""
    current = current_login()
    if current is None:
        return redirect(url_for("signin.login"))
    if current.stage != "mfa":
        return _next_step(current)
    if request.method == "GET":
        return _page("signin/mfa.html", error=None)
    code = _field("code", MAX_CODE)
    p = platform()
    policy = throttle.Policy.from_settings(p.settings)
    user = current.user
    locked_now = False
    with p.session() as session:
        blocked = throttle.locked(session, user.email, _ip())
        factor = None if blocked or code is None else mfa.verify(session, p.cipher, user.id, code)
        if factor is None:
            locked_now = throttle.record_failure(session, user.email, _ip(), policy)
            if locked_now:
                # A locked account starts again from the password.
                row = session.get(LoginSession, current.row.id)
                if row is not None:
                    sessions.revoke(session, row)
        else:
            throttle.clear_account(session, user.email)
            row = session.get(LoginSession, current.row.id)
            assert row is not None
            _, secret = sessions.rotate(session, row, mfa_passed=True)
    if factor is None:
        if locked_now:
            forget()
            return _failed(redirect(url_for("signin.login")), user, "mfa", locked_now)
        return _failed(_page("signin/mfa.html", 401, error="bad_code"), user, "mfa", locked_now)
    remember(secret)
    return redirect(url_for("signin.login_tenant"))


@bp.route("/login/tenant", methods=["GET", "POST"])
def login_tenant() -> BaseResponse:
    """Let a signed-in person choose the tenant this session is for."""
    current = current_login()
    if current is None:
        return redirect(url_for("signin.login"))
    if current.stage == "mfa":
        return redirect(url_for("signin.login_mfa"))
    p = platform()
    choices = _member_tenants(p, current.user.id)
    if request.method == "POST":
        slug = _field("tenant", 63)
        chosen = next((t for t, _ in choices if t.slug == slug), None)
        if chosen is None:
            return _not_found()
        return _choose(current, chosen)
    if len(choices) == 1 and current.tenant is None:
        return _choose(current, choices[0][0])
    if not choices:
        lang = text.language()
        return _message(text.strings(lang)["tenant_title"], text.strings(lang)["no_tenant"], 403)
    return _page("signin/tenant.html", choices=choices, current=current.tenant)


def _choose(current: SignedIn, tenant: Tenant) -> BaseResponse:
    p = platform()
    security = sessions.tenant_security(p, tenant, fresh=True)  # authoritative at sign-in
    if not security.allows(_ip()):
        lang = text.language()
        words = text.strings(lang)
        return _message(words["ip_refused_title"], words["ip_refused"], 403)
    with p.session() as session:
        row = session.get(LoginSession, current.row.id)
        assert row is not None
        new, secret = sessions.rotate(session, row, tenant_id=tenant.id)
    remember(secret)
    _audit(tenant, "login", current.user, mfa=current.mfa_enabled)
    if _note_ip(current.user):
        _alert_new_ip(tenant, current.user)
    login = current_login()
    assert login is not None
    return _next_step(login)


@bp.route("/logout", methods=["POST"])
def logout() -> BaseResponse:
    """End the session on the server, so its cookie opens nothing any more."""
    current = current_login()
    if current is not None:
        with platform().session() as session:
            row = session.get(LoginSession, current.row.id)
            if row is not None:
                sessions.revoke(session, row)
        if current.tenant is not None:
            _audit(current.tenant, "logout", current.user)
    forget()
    return redirect(url_for("signin.login"))


def _ready(tenant: str) -> SignedIn | BaseResponse:
    """Return the ready session for this tenant's pages, or the response to send instead."""
    current = current_login()
    if current is None:
        return redirect(url_for("signin.login"))
    if current.stage != "ready":
        return _next_step(current)
    if current.tenant is None or current.tenant.slug != tenant:
        # Another tenant's pages look exactly like a tenant that does not exist.
        return _not_found()
    if not current.security.allows(_ip()):
        words = text.strings(text.language())
        return _message(words["ip_refused_title"], words["ip_refused"], 403)
    return current


@bp.route("/t/<tenant>/")
def landing(tenant: str) -> BaseResponse:
    """Show who is signed in, to which tenant, and where to go next."""
    current = _ready(tenant)
    if not isinstance(current, SignedIn):
        return current
    many = len(_member_tenants(platform(), current.user.id)) > 1
    return _page("signin/landing.html", login=current, many=many)


# -- account security --------------------------------------------------------------------------


def _security_login() -> SignedIn | BaseResponse:
    current = current_login()
    if current is None:
        return redirect(url_for("signin.login"))
    if current.stage not in ("ready", "enrol"):
        return _next_step(current)
    if not current.security.allows(_ip()):
        words = text.strings(text.language())
        return _message(words["ip_refused_title"], words["ip_refused"], 403)
    return current


def _security_page(current: SignedIn, status: int = 200, **values: Any) -> Response:
    p = platform()
    with p.session() as session:
        pending = mfa.pending_secret(session, p.cipher, current.user.id)
        left = mfa.recovery_codes_left(session, current.user.id)
    qr = key = None
    if pending is not None and not current.mfa_enabled:
        qr = mfa.qr_svg(mfa.provisioning_uri(pending, current.user.email))
        key = pending
    values.setdefault("error", None)
    values.setdefault("notice", None)
    return _page("signin/security.html", status, login=current, qr=qr, key=key, left=left, **values)


@bp.route("/account/security")
def security() -> BaseResponse:
    """Show the person's sign-in settings: two-step sign-in and password."""
    current = _security_login()
    if not isinstance(current, SignedIn):
        return current
    return _security_page(current)


def _renew(current: SignedIn) -> None:
    """End every session of the user and give this browser a fresh one."""
    with platform().session() as session:
        sessions.revoke_all(session, current.user.id)
        row = session.get(LoginSession, current.row.id)
        assert row is not None
        _, secret = sessions.rotate(session, row, mfa_passed=True)
    remember(secret)


def _audited(current: SignedIn, action: str, **detail: Any) -> None:
    if current.tenant is not None:
        _audit(current.tenant, action, current.user, **detail)


@bp.route("/account/security/mfa/start", methods=["POST"])
def mfa_start() -> BaseResponse:
    """Create a new TOTP secret waiting for its first code."""
    current = _security_login()
    if not isinstance(current, SignedIn):
        return current
    p = platform()
    if current.mfa_enabled:
        return _security_page(current, 409)
    with p.session() as session:
        mfa.begin_enrolment(session, p.cipher, current.user.id)
    return redirect(url_for("signin.security"))


@bp.route("/account/security/mfa/confirm", methods=["POST"])
def mfa_confirm() -> BaseResponse:
    """Turn two-step sign-in on with a first code; show the recovery codes once."""
    current = _security_login()
    if not isinstance(current, SignedIn):
        return current
    p = platform()
    code = _field("code", MAX_CODE)
    try:
        with p.session() as session:
            codes = mfa.confirm_enrolment(session, p.cipher, current.user.id, code)
    except mfa.MfaError:
        return _security_page(current, 400, error="bad_code")
    _renew(current)
    _audited(current, "mfa_enabled")
    return _page("signin/recovery.html", codes=codes, login=current)


@bp.route("/account/security/mfa/disable", methods=["POST"])
def mfa_disable() -> BaseResponse:
    """Turn two-step sign-in off, with the password and a current code."""
    current = _security_login()
    if not isinstance(current, SignedIn):
        return current
    if current.membership is not None and current.security.requires_mfa(current.membership.roles):
        return _security_page(current, 409, error="mfa_still_required")
    p = platform()
    password = _field("password", MAX_PASSWORD) or ""
    code = _field("code", MAX_CODE)
    with p.session() as session:
        user = session.get(User, current.user.id)
        assert user is not None
        good = passwords.verify_password(user.password_hash, password)
        good = good and mfa.verify(session, p.cipher, user.id, code) is not None
    if not good:
        return _security_page(current, 400, error="bad_code")
    with p.session() as session:
        mfa.disable(session, current.user.id)
    _renew(current)
    _audited(current, "mfa_disabled")
    login = current_login()
    assert login is not None
    return _security_page(login, notice="mfa_disabled")


@bp.route("/account/security/recovery", methods=["POST"])
def recovery_codes() -> BaseResponse:
    """Replace the recovery codes (password and a current code); show the new ones once."""
    current = _security_login()
    if not isinstance(current, SignedIn):
        return current
    if not current.mfa_enabled:
        return _security_page(current, 409)
    p = platform()
    password = _field("password", MAX_PASSWORD) or ""
    code = _field("code", MAX_CODE)
    with p.session() as session:
        user = session.get(User, current.user.id)
        assert user is not None
        good = passwords.verify_password(user.password_hash, password)
        good = good and mfa.verify(session, p.cipher, user.id, code) is not None
        codes = mfa.new_recovery_codes(session, user.id) if good else []
    if not good:
        return _security_page(current, 400, error="bad_code")
    _audited(current, "mfa_recovery_codes_renewed")
    return _page("signin/recovery.html", codes=codes, login=current)


@bp.route("/account/security/password", methods=["POST"])
def change_password() -> BaseResponse:
    """Change the password; every other session of the person ends."""
    current = _security_login()
    if not isinstance(current, SignedIn):
        return current
    old = _field("current_password", MAX_PASSWORD) or ""
    new = _field("new_password", MAX_PASSWORD + 1) or ""
    again = _field("confirm_password", MAX_PASSWORD + 1) or ""
    p = platform()
    with p.session() as session:
        user = session.get(User, current.user.id)
        assert user is not None
        good = passwords.verify_password(user.password_hash, old)
    if not good:
        return _security_page(current, 400, error="wrong_password")
    if new != again:
        return _security_page(current, 400, error="mismatch")
    problem = passwords.password_problem(new, current.user.email)
    if problem is not None:
        return _security_page(current, 400, error="weak_password", problem=problem)
    with p.session() as session:
        session.execute(
            sa.update(User)
            .where(User.id == current.user.id)
            .values(password_hash=passwords.hash_password(new))
        )
    _renew(current)
    _audited(current, "password_changed")
    login = current_login()
    assert login is not None
    return _security_page(login, notice="password_changed")
