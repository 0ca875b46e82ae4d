"""Sign-in over HTTP, on SQLite and PostgreSQL: sessions, CSRF, MFA, throttling, allowlist.

Every flow goes through Flask's test client as a browser would: the form's
CSRF token is read from the page, the cookie jar is the client's. Each test
uses its own people and its own client address, so the module's two shared
tenants (per backend) can serve every test without counts leaking between
them; a test that changes a tenant's settings publishes them back.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from metacrm.runtime import metastore, mfa, sessions, tenancy, tokens
from metacrm.runtime.control import KnownIp, LoginSession, LoginThrottle, Membership, User
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import audit
from metacrm.runtime.web import auth

from ...conftest import BACKENDS, make_settings
from ..runtime.test_api_meta import (
    CHEAP_HASHER,
    Api,
    build_app,
    make_tenant,
    private_control_database,
)

PASSWORD = "correct horse battery staple 42"
_addresses = itertools.count(1)


@dataclass
class World:
    app: Flask
    platform: Platform
    a: Api
    b: Api


@pytest.fixture(scope="module", params=BACKENDS)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """Two tenants per backend, with low throttling limits so lockouts come quickly."""
    with private_control_database(request.param) as database:
        folder = tmp_path_factory.mktemp("signin")
        settings = make_settings(
            request.param,
            folder,
            request,
            login_max_failures=4,
            login_ip_max_failures=8,
            login_rate_limit="40 per minute",
            **database,
        )
        p = Platform(settings)
        p.init_control()
        try:
            with build_app(settings) as the_app:
                yield World(the_app, p, make_tenant(p, the_app), make_tenant(p, the_app))
        finally:
            for item in tenancy.list_tenants(p):
                tenancy.delete_tenant(p, item.slug)
            p.close()


def new_ip() -> str:
    n = next(_addresses)
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def browser(world: World, ip: str | None = None) -> FlaskClient:
    """Return a test client that comes from its own address."""
    client = world.app.test_client()
    client.environ_base["REMOTE_ADDR"] = ip or new_ip()
    return client


def person(world: World, *apis: Api, roles: tuple[str, ...] = ("sales_rep",)) -> User:
    """Create a login with PASSWORD, a member of each given tenant."""
    with world.platform.session() as session:
        user = User(
            email=f"p{uuid.uuid4().hex[:10]}@example.com",
            display_name="Pat Person",
            password_hash=CHEAP_HASHER.hash(PASSWORD),
        )
        session.add(user)
        session.flush()
        for api in apis:
            session.add(Membership(tenant_id=api.tenant.id, user_id=user.id, roles=list(roles)))
    return user


def csrf(client: FlaskClient, path: str = "/login") -> str:
    page = client.get(path)
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True))
    assert found, f"no CSRF token on {path}: {page.status}"
    return found.group(1)


def post(
    client: FlaskClient, path: str, form: dict[str, str], page: str = "/login"
) -> TestResponse:
    """Post a form with the page's CSRF token, and finish the response as a server does.

    Closing runs what the app deferred until the response was sent (the audit
    entries of a failed sign-in), as werkzeug and gunicorn do after sending.
    """
    answer = client.post(path, data={"csrf_token": csrf(client, page), **form})
    answer.get_data()
    answer.close()
    return answer


def sign_in(client: FlaskClient, email: str, password: str = PASSWORD) -> TestResponse:
    return post(client, "/login", {"email": email, "password": password})


def cookie(client: FlaskClient) -> str | None:
    found = client.get_cookie(auth.COOKIE_NAME)
    return found.value if found else None


def audit_actions(api: Api, actor: str | None = None) -> list[str]:
    with api.platform.store(api.tenant).connect() as connection:
        query = sa.select(audit.c.action).order_by(audit.c.seq)
        if actor is not None:
            query = query.where(audit.c.actor_name == actor)
        return list(connection.execute(query).scalars())


def open_sessions(world: World, user: User) -> int:
    with world.platform.session() as session:
        return (
            session.scalar(
                sa.select(sa.func.count())
                .select_from(LoginSession)
                .where(LoginSession.user_id == user.id, LoginSession.revoked_at.is_(None))
            )
            or 0
        )


def api_get(client: FlaskClient, api: Api, path: str = "meta/") -> TestResponse:
    return client.get(f"/t/{api.slug}/api/v1/{path}")


@contextmanager
def security_settings(api: Api, **values: Any) -> Iterator[None]:
    """Publish a tenant's settings with a security section, and publish the old ones back."""
    store = api.platform.store(api.tenant)
    with store.connect() as connection:
        current = metastore.current(connection)
    doc = copy.deepcopy(current.bundle)
    doc.setdefault("settings", {})["security"] = values
    version = metastore.publish(store, doc, expected_version=current.version)
    sessions.forget_security()  # rules are reused for SECURITY_TTL; apply them now
    try:
        yield
    finally:
        metastore.publish(store, current.bundle, expected_version=version.version)
        sessions.forget_security()


def enrol(world: World, client: FlaskClient, user: User) -> tuple[str, list[str]]:
    """Turn MFA on through the security page; return the secret and the recovery codes."""
    assert post(client, "/account/security/mfa/start", {}, "/account/security").status_code == 302
    page = client.get("/account/security").get_data(as_text=True)
    assert "<svg" in page
    key = re.search(r'id="mfa-key">([A-Z2-7]+)<', page)
    assert key is not None
    secret = key.group(1)
    done = post(
        client,
        "/account/security/mfa/confirm",
        {"code": mfa.current_code(secret)},
        "/account/security",
    )
    assert done.status_code == 200, done.get_data(as_text=True)
    codes = re.findall(r"<code>([a-z2-9]{5}-[a-z2-9]{5})</code>", done.get_data(as_text=True))
    assert len(codes) == mfa.RECOVERY_CODES
    return secret, codes


def wait_for_next_step(world: World, user: User) -> None:
    """Let a later code be accepted by moving the stored last step back (no sleeping)."""
    with world.platform.session() as session:
        session.execute(
            sa.update(mfa.UserMfa)
            .where(mfa.UserMfa.user_id == user.id)
            .values(last_step=mfa.UserMfa.last_step - 2)
        )


# -- password step, cookie, landing -----------------------------------------------------------


def test_login_lands_on_tenant_with_hardened_cookie(world: World) -> None:
    user = person(world, world.a)
    client = browser(world)
    answer = sign_in(client, user.email)
    assert answer.status_code == 302
    set_cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
    assert "Secure" not in set_cookie  # the development server speaks http
    final = client.get("/login/tenant", follow_redirects=True)
    page = final.get_data(as_text=True)
    assert final.request.path == f"/t/{world.a.slug}/"
    assert user.email in page and world.a.tenant.name in page
    assert f"/t/{world.a.slug}/api/v1/docs" in page
    # The reference page itself opens with the login cookie.
    assert client.get(f"/t/{world.a.slug}/api/v1/docs").status_code == 200
    assert api_get(client, world.a).status_code == 200
    assert "auth.login" in audit_actions(world.a, user.email)


def test_production_cookie_is_secure(world: World) -> None:
    settings = world.platform.settings
    from dataclasses import fields

    overrides = {f.name: getattr(settings, f.name) for f in fields(settings)}
    overrides["env"] = "production"
    with build_app(settings.__class__(**overrides)) as app:
        assert app.config["SESSION_COOKIE_SECURE"] is True
        assert app.config["SESSION_COOKIE_HTTPONLY"] is True
        assert app.config["SESSION_COOKIE_SAMESITE"] == "Lax"


def test_session_id_rotates_at_each_step(world: World) -> None:
    user = person(world, world.a, world.b)
    client = browser(world)
    sign_in(client, user.email)
    after_password = cookie(client)
    post(client, "/login/tenant", {"tenant": world.a.slug}, "/login/tenant")
    after_tenant = cookie(client)
    assert after_password and after_tenant and after_password != after_tenant
    # The id from before the tenant step is dead: replaying it opens nothing.
    replay = browser(world)
    replay.set_cookie(auth.COOKIE_NAME, after_password)
    assert replay.get(f"/t/{world.a.slug}/").status_code == 302
    assert api_get(replay, world.a).status_code == 401


def test_planted_session_is_replaced_at_login(world: World) -> None:
    user = person(world, world.a)
    client = browser(world)
    csrf(client)
    planted = cookie(client)
    sign_in(client, user.email)
    assert cookie(client) != planted
    attacker = browser(world)
    attacker.set_cookie(auth.COOKIE_NAME, planted or "")
    assert attacker.get(f"/t/{world.a.slug}/").status_code == 302


def test_logout_revokes_replayed_cookie(world: World) -> None:
    user = person(world, world.a)
    client = browser(world)
    sign_in(client, user.email)
    client.get("/login/tenant")
    captured = cookie(client)
    assert api_get(client, world.a).status_code == 200
    out = post(client, "/logout", {}, f"/t/{world.a.slug}/")
    assert out.status_code == 302 and out.headers["Location"].endswith("/login")
    thief = browser(world)
    thief.set_cookie(auth.COOKIE_NAME, captured or "")
    assert thief.get(f"/t/{world.a.slug}/").headers["Location"].endswith("/login")
    refused = api_get(thief, world.a)
    assert refused.status_code == 401 and refused.json["code"] == "unauthorized"
    assert "auth.logout" in audit_actions(world.a, user.email)
    assert open_sessions(world, user) == 0


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v: v[:-2] + ("AA" if not v.endswith("AA") else "BB"),
        lambda v: "x" + v,
        lambda v: v.split(".")[0],
        lambda v: "eyJzaWQiOiJhYmMifQ.Zz.Zz",
        lambda v: "A" * 4000,
    ],
)
def test_tampered_cookie_is_anonymous(world: World, tamper: Any) -> None:
    user = person(world, world.a)
    client = browser(world)
    sign_in(client, user.email)
    client.get("/login/tenant")
    forged = browser(world)
    forged.set_cookie(auth.COOKIE_NAME, tamper(cookie(client)))
    assert forged.get(f"/t/{world.a.slug}/").status_code == 302
    assert api_get(forged, world.a).status_code == 401


def test_session_for_one_tenant_is_404_on_another(world: World) -> None:
    user = person(world, world.a)
    client = browser(world)
    sign_in(client, user.email)
    client.get("/login/tenant")
    assert client.get(f"/t/{world.b.slug}/").status_code == 404
    answer = api_get(client, world.b)
    assert answer.status_code == 404 and answer.json["code"] == "not_found"
    assert client.get("/t/no-such-tenant/").status_code == 404


def test_person_in_two_tenants_chooses_and_switches(world: World) -> None:
    user = person(world, world.a, world.b)
    client = browser(world)
    sign_in(client, user.email)
    page = client.get("/login/tenant").get_data(as_text=True)
    assert world.a.slug in page and world.b.slug in page
    # Not ready yet: no tenant pages, no API.
    assert client.get(f"/t/{world.a.slug}/").status_code == 302
    assert api_get(client, world.a).status_code == 401
    chosen = post(client, "/login/tenant", {"tenant": world.b.slug}, "/login/tenant")
    assert chosen.headers["Location"].endswith(f"/t/{world.b.slug}/")
    assert api_get(client, world.b).status_code == 200
    assert api_get(client, world.a).status_code == 404
    # A tenant the person is not a member of cannot be chosen.
    outsider = post(
        client, "/login/tenant", {"tenant": "a" + uuid.uuid4().hex[:8]}, "/login/tenant"
    )
    assert outsider.status_code == 404
    post(client, "/login/tenant", {"tenant": world.a.slug}, "/login/tenant")
    assert api_get(client, world.a).status_code == 200
    assert api_get(client, world.b).status_code == 404


# -- refusals of the password step ------------------------------------------------------------


def _body(answer: TestResponse, email: str) -> str:
    text = answer.get_data(as_text=True).replace(email, "EMAIL")
    return re.sub(r'name="csrf_token" value="[^"]+"', "", text)


def test_unknown_email_and_wrong_password_answer_alike(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = person(world, world.a)
    from metacrm.runtime import passwords

    calls: list[str] = []
    real = passwords.verify_password

    def counting(stored: str | None, password: str) -> bool:
        calls.append("verify")
        return real(stored, password)

    monkeypatch.setattr(passwords, "verify_password", counting)
    wrong = sign_in(browser(world), user.email, "not the password at all")
    verified_wrong = len(calls)
    unknown_email = f"nobody{uuid.uuid4().hex[:8]}@example.com"
    unknown = sign_in(browser(world), unknown_email, "not the password at all")
    assert wrong.status_code == unknown.status_code == 401
    assert _body(wrong, user.email) == _body(unknown, unknown_email)
    # One password hash is checked on both paths (a dummy one for the unknown email).
    assert verified_wrong == 1 and len(calls) == 2
    assert "Set-Cookie" not in wrong.headers or "sid" not in wrong.headers.get("Set-Cookie", "")


def test_brute_force_locks_account_without_telling(world: World) -> None:
    user = person(world, world.a)
    for _ in range(4):
        assert sign_in(browser(world), user.email, "guess guess guess").status_code == 401
    # Locked: the right password now gets the very same answer as a wrong one.
    client = browser(world)
    locked = sign_in(client, user.email)
    wrong = sign_in(browser(world), user.email, "guess guess guess")
    assert locked.status_code == 401
    assert _body(locked, user.email) == _body(wrong, user.email)
    assert client.get(f"/t/{world.a.slug}/").status_code == 302
    actions = audit_actions(world.a, user.email)
    assert actions.count("auth.login_failed") >= 5 and actions.count("auth.lockout") == 1
    assert open_sessions(world, user) == 0
    # The lockout ends by itself.
    with world.platform.session() as session:
        session.execute(
            sa.update(LoginThrottle)
            .where(LoginThrottle.key == user.email)
            .values(locked_until=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
    assert sign_in(browser(world), user.email).status_code == 302


def test_password_spray_from_one_address_is_locked(world: World) -> None:
    ip = new_ip()
    for _ in range(8):
        sign_in(browser(world, ip), f"x{uuid.uuid4().hex[:8]}@example.com", "Spring2024!!")
    user = person(world, world.a)
    assert sign_in(browser(world, ip), user.email).status_code == 401
    assert sign_in(browser(world), user.email).status_code == 302


@pytest.mark.parametrize(
    "form",
    [
        {"email": "a" * 100_000 + "@example.com", "password": PASSWORD},
        {"email": "x@example.com", "password": "p" * 5000},
        {"email": "x@example.com\x00", "password": PASSWORD},
        {"email": "", "password": ""},
        {"password": PASSWORD},
        {"email": "x@example.com"},
        {"email": "' OR 1=1 --", "password": "' OR 1=1 --"},
    ],
)
def test_hostile_login_forms_are_refused_plainly(world: World, form: dict[str, str]) -> None:
    with world.platform.session() as session:
        before = session.scalar(sa.select(sa.func.count()).select_from(LoginSession))
    answer = post(browser(world), "/login", form)
    assert answer.status_code in (401, 413)
    with world.platform.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(LoginSession)) == before


def test_login_rate_limit_answers_429(world: World) -> None:
    client = browser(world)
    token = csrf(client)
    statuses = [
        client.post("/login", data={"csrf_token": token, "email": "r@example.com"}).status_code
        for _ in range(41)
    ]
    assert statuses[-1] == 429 and set(statuses[:40]) == {401}
    assert client.post("/login", data={"csrf_token": token}).json["code"] == "too_many_requests"


# -- CSRF -----------------------------------------------------------------------------------------


def test_forms_without_csrf_token_are_refused(world: World) -> None:
    user = person(world, world.a)
    client = browser(world)
    answer = client.post("/login", data={"email": user.email, "password": PASSWORD})
    assert answer.status_code == 400
    assert open_sessions(world, user) == 0
    sign_in(client, user.email)
    client.get("/login/tenant")
    # Logout without the token does not end the session.
    assert client.post("/logout").status_code == 400
    assert api_get(client, world.a).status_code == 200
    bad = client.post("/logout", data={"csrf_token": "forged"})
    assert bad.status_code == 400 and open_sessions(world, user) == 1


def test_cookie_api_write_needs_csrf_header_and_bearer_does_not(world: World) -> None:
    admin = person(world, world.a, roles=("admin",))
    member = person(world, world.a)
    client = browser(world)
    sign_in(client, admin.email)
    client.get("/login/tenant")
    path = f"/t/{world.a.slug}/api/v1/users/{member.id}/mfa"
    refused = client.delete(path)
    assert refused.status_code == 403 and refused.json["code"] == "csrf_failed"
    token = csrf(client, f"/t/{world.a.slug}/")
    allowed = client.delete(path, headers={"X-CSRFToken": token})
    assert allowed.status_code == 409 and allowed.json["code"] == "mfa_not_enabled"
    bearer = world.app.test_client().delete(
        path, headers={"Authorization": f"Bearer {world.a.token}"}
    )
    assert bearer.status_code == 409


def test_requests_without_the_cookie_get_no_session_and_no_cookie(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bearer request opens no signed session (no signer is built) and sets no cookie."""
    built: list[object] = []
    original = auth.CookieSessions.get_signing_serializer

    def counted(self: auth.CookieSessions, app: Flask) -> Any:
        built.append(app)
        return original(self, app)

    monkeypatch.setattr(auth.CookieSessions, "get_signing_serializer", counted)
    answer = world.app.test_client().get(
        f"/t/{world.a.slug}/api/v1/records/customer",
        headers={"Authorization": f"Bearer {world.a.token}"},
    )
    assert answer.status_code == 200
    assert "Set-Cookie" not in answer.headers
    assert built == []
    # A browser with the cookie still has its session read (and signed) as before.
    admin = person(world, world.a, roles=("admin",))
    client = browser(world)
    sign_in(client, admin.email)
    assert client.get("/login/tenant").status_code in (200, 302)
    assert built, "a request with the cookie must open the signed session"
    assert api_get(client, world.a).status_code == 200


# -- MFA ----------------------------------------------------------------------------------------


def test_mfa_enrol_then_sign_in_with_totp_and_recovery_code(world: World) -> None:
    user = person(world, world.a)
    client = browser(world)
    other = browser(world)
    for c in (client, other):
        sign_in(c, user.email)
        c.get("/login/tenant")
    secret, codes = enrol(world, client, user)
    # Turning MFA on ended the other browser's session, not this one's.
    assert api_get(other, world.a).status_code == 401
    assert api_get(client, world.a).status_code == 200
    assert "auth.mfa_enabled" in audit_actions(world.a, user.email)
    post(client, "/logout", {}, f"/t/{world.a.slug}/")

    wait_for_next_step(world, user)
    again = browser(world)
    assert sign_in(again, user.email).headers["Location"].endswith("/login/mfa")
    assert again.get(f"/t/{world.a.slug}/").headers["Location"].endswith("/login/mfa")
    assert api_get(again, world.a).status_code == 401
    code = mfa.current_code(secret)
    ok = post(again, "/login/mfa", {"code": code}, "/login/mfa")
    assert ok.headers["Location"].endswith("/login/tenant")
    assert again.get("/login/tenant").headers["Location"].endswith(f"/t/{world.a.slug}/")

    # The same code, replayed in another sign-in, is refused.
    replay = browser(world)
    sign_in(replay, user.email)
    refused = post(replay, "/login/mfa", {"code": code}, "/login/mfa")
    assert refused.status_code == 401
    assert api_get(replay, world.a).status_code == 401
    # A recovery code works once.
    assert post(replay, "/login/mfa", {"code": codes[0]}, "/login/mfa").status_code == 302
    third = browser(world)
    sign_in(third, user.email)
    assert post(third, "/login/mfa", {"code": codes[0]}, "/login/mfa").status_code == 401
    with world.platform.session() as session:
        assert mfa.recovery_codes_left(session, user.id) == mfa.RECOVERY_CODES - 1


@pytest.mark.parametrize("code", ["", "12345", "1234567", "abcdef", "１２３４５６", "x" * 50])
def test_malformed_mfa_codes_are_refused(world: World, code: str) -> None:
    user = person(world, world.a)
    client = browser(world)
    sign_in(client, user.email)
    client.get("/login/tenant")
    secret, _ = enrol(world, client, user)
    post(client, "/logout", {}, f"/t/{world.a.slug}/")
    sign_in(client, user.email)
    assert post(client, "/login/mfa", {"code": code}, "/login/mfa").status_code == 401
    with world.platform.session() as session:
        assert mfa.enabled(session, user.id)


def test_mfa_guesses_lock_the_account(world: World) -> None:
    user = person(world, world.a)
    client = browser(world)
    sign_in(client, user.email)
    client.get("/login/tenant")
    secret, _ = enrol(world, client, user)
    post(client, "/logout", {}, f"/t/{world.a.slug}/")
    sign_in(client, user.email)
    for _ in range(4):
        post(client, "/login/mfa", {"code": "000000"}, "/login/mfa")
    # The pending session ended; the password alone is locked out now.
    assert client.get("/login/mfa").headers["Location"].endswith("/login")
    assert sign_in(browser(world), user.email).status_code == 401
    assert "auth.lockout" in audit_actions(world.a, user.email)


def test_role_that_requires_mfa_is_sent_to_enrolment(world: World) -> None:
    user = person(world, world.b, roles=("sales_manager",))
    with security_settings(world.b, mfa_required_roles=["sales_manager"]):
        client = browser(world)
        sign_in(client, user.email)
        landing = client.get("/login/tenant")
        assert landing.headers["Location"].endswith("/account/security")
        assert client.get(f"/t/{world.b.slug}/").headers["Location"].endswith("/account/security")
        assert api_get(client, world.b).status_code == 401
        page = client.get("/account/security").get_data(as_text=True)
        assert world.b.tenant.name in page
        enrol(world, client, user)
        assert api_get(client, world.b).status_code == 200
        # Required here, so it cannot be turned off.
        secret_refused = post(
            client,
            "/account/security/mfa/disable",
            {"password": PASSWORD, "code": "000000"},
            "/account/security",
        )
        assert secret_refused.status_code == 409


def test_admin_resets_mfa_with_audit(world: World) -> None:
    user = person(world, world.a)
    client = browser(world)
    sign_in(client, user.email)
    client.get("/login/tenant")
    enrol(world, client, user)
    path = f"/t/{world.a.slug}/api/v1/users/{user.id}/mfa"
    rep = person(world, world.a)
    with world.platform.session() as session:
        rep_user = session.get(User, rep.id)
        tenant = world.a.tenant
        _, rep_token = tokens.create_token(session, tenant, rep_user, "rep")
    anonymous = world.app.test_client()
    assert anonymous.delete(path).status_code == 401
    denied = anonymous.delete(path, headers={"Authorization": f"Bearer {rep_token}"})
    assert denied.status_code == 403
    foreign = anonymous.delete(
        f"/t/{world.b.slug}/api/v1/users/{user.id}/mfa",
        headers={"Authorization": f"Bearer {world.b.token}"},
    )
    assert foreign.status_code == 404
    cross = anonymous.delete(path, headers={"Authorization": f"Bearer {world.b.token}"})
    assert cross.status_code == 404
    with world.platform.session() as session:
        assert mfa.enabled(session, user.id)
    admin = {"Authorization": f"Bearer {world.a.token}"}
    shown = anonymous.get(path, headers=admin)
    assert shown.json == {
        "user_id": str(user.id),
        "enabled": True,
        "recovery_codes_left": mfa.RECOVERY_CODES,
    }
    assert anonymous.delete(path, headers=admin).status_code == 204
    with world.platform.session() as session:
        assert not mfa.enabled(session, user.id)
    assert open_sessions(world, user) == 0
    gone = api_get(client, world.a)
    assert gone.status_code == 401, gone.json
    assert audit_actions(world.a, world.a.admin.email)[-1] == "auth.mfa_reset"
    assert anonymous.delete(path, headers=admin).json["code"] == "mfa_not_enabled"
    for bad in ("not-a-uuid", str(uuid.uuid4()), "0" * 5000):
        missing = anonymous.delete(f"/t/{world.a.slug}/api/v1/users/{bad}/mfa", headers=admin)
        assert missing.status_code == 404


def test_admin_cannot_reset_mfa_of_a_login_shared_with_another_tenant(world: World) -> None:
    user = person(world, world.a, world.b)
    client = browser(world)
    sign_in(client, user.email)
    post(client, "/login/tenant", {"tenant": world.a.slug}, "/login/tenant")
    enrol(world, client, user)
    path = f"/t/{world.a.slug}/api/v1/users/{user.id}/mfa"
    resets = audit_actions(world.a).count("auth.mfa_reset")
    answer = world.app.test_client().delete(
        path, headers={"Authorization": f"Bearer {world.a.token}"}
    )
    assert answer.status_code == 409 and answer.json["code"] == "shared_identity"
    with world.platform.session() as session:
        assert mfa.enabled(session, user.id)
    assert audit_actions(world.a).count("auth.mfa_reset") == resets


# -- password change, timeouts, deactivation ------------------------------------------------


def test_password_change_ends_other_sessions(world: World) -> None:
    user = person(world, world.a)
    client, other = browser(world), browser(world)
    for c in (client, other):
        sign_in(c, user.email)
        c.get("/login/tenant")
    with world.platform.session() as session:
        before = session.get(User, user.id).password_hash
    for form, error in (
        ({"current_password": "wrong one here", "new_password": "x" * 12}, 400),
        ({"current_password": PASSWORD, "new_password": "password123"}, 400),
        ({"current_password": PASSWORD, "new_password": "short"}, 400),
    ):
        form["confirm_password"] = form["new_password"]
        answer = post(client, "/account/security/password", form, "/account/security")
        assert answer.status_code == error
    mismatch = post(
        client,
        "/account/security/password",
        {
            "current_password": PASSWORD,
            "new_password": "a brand new secret 9",
            "confirm_password": "another secret 9 x",
        },
        "/account/security",
    )
    assert mismatch.status_code == 400
    with world.platform.session() as session:
        assert session.get(User, user.id).password_hash == before
    assert api_get(other, world.a).status_code == 200
    changed = post(
        client,
        "/account/security/password",
        {
            "current_password": PASSWORD,
            "new_password": "a brand new secret 9",
            "confirm_password": "a brand new secret 9",
        },
        "/account/security",
    )
    assert changed.status_code == 200
    assert api_get(other, world.a).status_code == 401
    assert api_get(client, world.a).status_code == 200
    assert "auth.password_changed" in audit_actions(world.a, user.email)
    assert sign_in(browser(world), user.email, "a brand new secret 9").status_code == 302


def test_idle_and_absolute_timeouts_end_sessions(world: World) -> None:
    user = person(world, world.a)
    idle, old = browser(world), browser(world)
    for c in (idle, old):
        sign_in(c, user.email)
        c.get("/login/tenant")
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=31)
    with world.platform.session() as session:
        rows = session.scalars(
            sa.select(LoginSession)
            .where(LoginSession.user_id == user.id, LoginSession.revoked_at.is_(None))
            .order_by(LoginSession.created_at)
        ).all()
        assert len(rows) == 2
        rows[0].last_seen_at = long_ago
        rows[1].created_at = dt.datetime.now(dt.UTC) - dt.timedelta(hours=13)
    assert api_get(idle, world.a).status_code == 401
    assert api_get(old, world.a).status_code == 401
    assert open_sessions(world, user) == 0


def test_tenant_timeout_overrides_the_platform_default(world: World) -> None:
    user = person(world, world.b)
    with security_settings(world.b, session_idle_minutes=5, session_absolute_minutes=60):
        client = browser(world)
        sign_in(client, user.email)
        client.get("/login/tenant")
        assert api_get(client, world.b).status_code == 200
        with world.platform.session() as session:
            session.execute(
                sa.update(LoginSession)
                .where(LoginSession.user_id == user.id)
                .values(last_seen_at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=6))
            )
        assert api_get(client, world.b).status_code == 401


def test_deactivated_member_loses_session(world: World) -> None:
    user = person(world, world.a)
    client = browser(world)
    sign_in(client, user.email)
    client.get("/login/tenant")
    with world.platform.session() as session:
        session.execute(
            sa.update(Membership).where(Membership.user_id == user.id).values(is_active=False)
        )
    assert api_get(client, world.a).status_code == 401
    assert open_sessions(world, user) == 0


# -- IP allowlist and new-address alerts --------------------------------------------------------


def test_ip_allowlist_refuses_tokens_and_sessions_from_elsewhere(world: World) -> None:
    user = person(world, world.b)
    inside = browser(world, "203.0.113.7")
    sign_in(inside, user.email)
    inside.get("/login/tenant")
    outside = browser(world)
    sign_in(outside, user.email)
    outside.get("/login/tenant")
    token = {"Authorization": f"Bearer {world.b.token}"}
    with security_settings(world.b, ip_allowlist=["203.0.113.0/24", "2001:db8::/32"]):
        refused = outside.get(f"/t/{world.b.slug}/api/v1/meta/", headers=token)
        assert refused.status_code == 403 and refused.json["code"] == "ip_not_allowed"
        cookie_refused = api_get(outside, world.b)
        assert cookie_refused.status_code == 403
        assert cookie_refused.json["code"] == "ip_not_allowed"
        assert outside.get(f"/t/{world.b.slug}/").status_code == 403
        assert inside.get(f"/t/{world.b.slug}/api/v1/meta/", headers=token).status_code == 200
        assert api_get(inside, world.b).status_code == 200
        late = browser(world)
        sign_in(late, user.email)
        assert late.get("/login/tenant").status_code == 403
    assert api_get(outside, world.b).status_code == 200


def test_invalid_allowlist_is_refused_at_publish(world: World) -> None:
    store = world.a.platform.store(world.a.tenant)
    with store.connect() as connection:
        current = metastore.current(connection)
    for bad in (["300.1.2.3/8"], ["10.0.0.0/33"], ["::g/64"]):
        doc = copy.deepcopy(current.bundle)
        doc["settings"]["security"] = {"ip_allowlist": bad}
        with pytest.raises(Exception) as refused:
            metastore.publish(store, doc, expected_version=current.version)
        assert "ip_allowlist" in str(getattr(refused.value, "problems", refused.value))
    with store.connect() as connection:
        assert metastore.current(connection).version == current.version


def test_login_from_new_address_alerts_admins(world: World) -> None:
    user = person(world, world.a)
    first = browser(world)
    sign_in(first, user.email)
    first.get("/login/tenant")
    assert "auth.new_ip_login" not in audit_actions(world.a, user.email)
    second = browser(world)
    sign_in(second, user.email)
    second.get("/login/tenant")
    assert audit_actions(world.a, user.email).count("auth.new_ip_login") == 1
    again = browser(world, second.environ_base["REMOTE_ADDR"])
    sign_in(again, user.email)
    again.get("/login/tenant")
    assert audit_actions(world.a, user.email).count("auth.new_ip_login") == 1
    with world.platform.session() as session:
        assert (
            session.scalar(
                sa.select(sa.func.count()).select_from(KnownIp).where(KnownIp.user_id == user.id)
            )
            == 2
        )
    listed = world.app.test_client().get(
        f"/t/{world.a.slug}/api/v1/notifications",
        headers={"Authorization": f"Bearer {world.a.token}"},
    )
    assert user.email in listed.get_data(as_text=True)


# -- language -------------------------------------------------------------------------------------


def test_pages_speak_chinese_when_asked(world: World) -> None:
    client = browser(world)
    assert "登录" in client.get("/login?lang=zh-CN").get_data(as_text=True)
    assert "登录" in client.get("/login").get_data(as_text=True)  # remembered
    assert "Sign in" in client.get("/login?lang=en").get_data(as_text=True)
    fresh = browser(world)
    page = fresh.get("/login", headers={"Accept-Language": "zh-CN,zh;q=0.9"})
    assert 'lang="zh-CN"' in page.get_data(as_text=True)
    assert "Sign in" in fresh.get("/login?lang=fr").get_data(as_text=True)


def test_deactivation_through_the_api_ends_sessions_at_once(world: World) -> None:
    user = person(world, world.a)
    client = browser(world)
    sign_in(client, user.email)
    client.get("/login/tenant")
    assert open_sessions(world, user) == 1
    answer = world.app.test_client().post(
        f"/t/{world.a.slug}/api/v1/users/{user.id}/deactivate",
        headers={"Authorization": f"Bearer {world.a.token}"},
    )
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert open_sessions(world, user) == 0
    assert api_get(client, world.a).status_code == 401


@pytest.mark.parametrize(
    "path",
    [
        "/account/security",
        "/login/mfa",
        "/login/tenant",
    ],
)
def test_pages_need_a_session(world: World, path: str) -> None:
    answer = browser(world).get(path)
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/login")


@pytest.mark.parametrize(
    "path",
    [
        "/account/security/mfa/start",
        "/account/security/mfa/confirm",
        "/account/security/mfa/disable",
        "/account/security/password",
    ],
)
def test_security_changes_need_a_finished_sign_in(world: World, path: str) -> None:
    user = person(world, world.a)
    client = browser(world)
    anonymous = post(client, path, {"code": "123456", "password": PASSWORD})
    assert anonymous.status_code == 302 and anonymous.headers["Location"].endswith("/login")
    # Half signed in (password passed, second factor pending): no changes either.
    sign_in(client, user.email)
    client.get("/login/tenant")
    enrol(world, client, user)
    post(client, "/logout", {}, f"/t/{world.a.slug}/")
    sign_in(client, user.email)
    pending = post(client, path, {"code": "123456", "password": PASSWORD}, "/login/mfa")
    assert pending.headers["Location"].endswith("/login/mfa")
    with world.platform.session() as session:
        assert mfa.enabled(session, user.id)


def test_recovery_codes_can_be_replaced_with_password_and_code(world: World) -> None:
    user = person(world, world.a)
    client = browser(world)
    sign_in(client, user.email)
    client.get("/login/tenant")
    secret, old_codes = enrol(world, client, user)
    refused = post(
        client,
        "/account/security/recovery",
        {"password": "not my password", "code": old_codes[0]},
        "/account/security",
    )
    assert refused.status_code == 400
    wait_for_next_step(world, user)
    renewed = post(
        client,
        "/account/security/recovery",
        {"password": PASSWORD, "code": mfa.current_code(secret)},
        "/account/security",
    )
    assert renewed.status_code == 200
    new_codes = re.findall(
        r"<code>([a-z2-9]{5}-[a-z2-9]{5})</code>", renewed.get_data(as_text=True)
    )
    assert len(new_codes) == mfa.RECOVERY_CODES and not set(new_codes) & set(old_codes)
    assert "auth.mfa_recovery_codes_renewed" in audit_actions(world.a, user.email)
    post(client, "/logout", {}, f"/t/{world.a.slug}/")
    sign_in(client, user.email)
    assert post(client, "/login/mfa", {"code": old_codes[1]}, "/login/mfa").status_code == 401
    assert post(client, "/login/mfa", {"code": new_codes[0]}, "/login/mfa").status_code == 302
