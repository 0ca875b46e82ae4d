"""User admin, own tokens, account pages and the operator console, through HTTP.

Mail goes to a real SMTP server (aiosmtpd on 127.0.0.1, a free port), and the
tests follow the links it receives, as a person would.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from typing import Any

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from argon2 import PasswordHasher
from flask import Flask
from flask.testing import FlaskClient

from metacrm.app import create_app
from metacrm.runtime import accounts, operators, tenancy, tokens
from metacrm.runtime.control import ApiToken, Membership, Team, Tenant, User
from metacrm.runtime.passwords import verify_password
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import audit

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
GOOD = "violet kettle orbit 42"


@dataclass
class Mailbox:
    """What the local SMTP server received."""

    port: int = 0
    messages: list[Message] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        message = message_from_bytes(envelope.content)
        message["X-Envelope-To"] = ",".join(envelope.rcpt_tos)
        self.messages.append(message)
        return "250 OK"

    def wait(self, count: int = 1, seconds: float = 5.0) -> list[Message]:
        """Return the messages once ``count`` have arrived (mail may be sent off-thread)."""
        deadline = time.monotonic() + seconds
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.messages) >= count, f"{len(self.messages)} mails, expected {count}"
        return self.messages


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox(port=free_port())
    controller = Controller(box, hostname="127.0.0.1", port=box.port)
    controller.start()
    try:
        yield box
    finally:
        controller.stop()


@pytest.fixture(autouse=True)
def cheap_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts, "hash_password", CHEAP.hash)
    monkeypatch.setattr(tenancy, "hash_password", CHEAP.hash)
    monkeypatch.setattr(operators, "hash_password", CHEAP.hash)


@pytest.fixture
def app(platform: Platform, mailbox: Mailbox) -> Iterator[Flask]:
    s = platform.settings
    the_app = create_app(
        {
            "instance_dir": str(s.instance_dir),
            "secret_key": s.secret_key,
            "database_url": s.database_url,
            "tenant_schema_prefix": s.tenant_schema_prefix,
            "smtp_host": "127.0.0.1",
            "smtp_port": mailbox.port,
            "smtp_security": "none",
            "mail_from": "crm@example.com",
            "base_url": "https://crm.example.com",
        }
    )
    the_app.config["TESTING"] = True
    yield the_app
    the_app.extensions["metacrm"].close()


@dataclass
class Org:
    """A tenant with an admin and a sales rep, and a token for each."""

    tenant: Tenant
    admin: User
    admin_token: str
    rep: User
    rep_token: str

    @property
    def slug(self) -> str:
        return self.tenant.slug


def make_org(platform: Platform) -> Org:
    slug = f"t{uuid.uuid4().hex[:10]}"
    created = tenancy.create_tenant(
        platform, slug, f"Org {slug}", admin_email=f"boss@{slug}.example", admin_password=GOOD
    )
    with accounts.work(platform, created.tenant, accounts.CLI_ACTOR) as w:
        rep = accounts.add_member(
            w, email=f"rep@{slug}.example", roles=["sales_rep"], password=GOOD
        ).member.user
    with platform.session() as session:
        tenant = session.get_one(Tenant, created.tenant.id)
        admin = session.scalar(sa.select(User).where(User.email == f"boss@{slug}.example"))
        rep = session.get_one(User, rep.id)
        _, admin_token = tokens.create_token(session, tenant, admin, "admin")
        _, rep_token = tokens.create_token(session, tenant, rep, "rep")
    return Org(tenant, admin, admin_token, rep, rep_token)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def snapshot(platform: Platform, *orgs: Org) -> dict[str, Any]:
    """The control rows and each tenant's audit trail: what a refusal must leave unchanged."""
    result: dict[str, Any] = {}
    with platform.session() as session:
        for model in (User, Membership, Team, ApiToken):
            # Using a token notes when: that is not a change a refusal must undo.
            columns = [c for c in model.__table__.c if c.name != "last_used_at"]
            rows = session.execute(sa.select(*columns)).all()
            result[model.__tablename__] = sorted(tuple(map(str, r)) for r in rows)
    for org in orgs:
        with platform.store(org.tenant).connect() as connection:
            result[org.slug] = connection.execute(
                sa.select(sa.func.count()).select_from(audit)
            ).scalar()
    return result


def csrf(client: FlaskClient, url: str) -> str:
    page = client.get(url)
    assert page.status_code == 200, page.get_data(as_text=True)
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True))
    assert found
    return found.group(1)


def link_in(message: Message, path: str) -> str:
    body = message.get_payload(decode=True).decode("utf-8")
    found = re.search(rf"https://crm\.example\.com({re.escape(path)}[A-Za-z0-9._-]+)", body)
    assert found, body
    return found.group(1)


@pytest.fixture
def orgs(platform: Platform) -> tuple[Org, Org]:
    return make_org(platform), make_org(platform)


# -- user admin -----------------------------------------------------------------------------


def test_admin_invites_by_mail_and_the_link_sets_a_password(app, platform, orgs, mailbox):
    a, _ = orgs
    client = app.test_client()
    response = client.post(
        f"/t/{a.slug}/api/v1/users",
        json={"email": "New.Person@Example.com", "roles": ["sales_rep"], "language": "zh-CN"},
        headers=auth(a.admin_token),
    )
    assert response.status_code == 201, response.json
    body = response.json
    assert body["email"] == "new.person@example.com" and body["pending_invitation"]
    assert body["invitation"]["sent"] is True and "url" not in body["invitation"]
    (message,) = mailbox.wait(1)
    assert message["X-Envelope-To"] == "new.person@example.com"
    assert "您受邀加入" in str(message["Subject"]) or "=?utf-8?" in message["Subject"]
    path = link_in(message, "/account/invitation/")
    browser = app.test_client()
    token = csrf(browser, path)
    refused = browser.post(
        path, data={"csrf_token": token, "password": "short", "confirm": "short"}
    )
    assert refused.status_code == 422 and "at least 10" in refused.get_data(as_text=True)
    done = browser.post(
        path, data={"csrf_token": token, "password": GOOD, "confirm": GOOD, "display_name": "N P"}
    )
    assert done.status_code == 200, done.get_data(as_text=True)
    assert done.headers["Referrer-Policy"] == "no-referrer"
    with platform.session() as session:
        user = session.scalar(sa.select(User).where(User.email == "new.person@example.com"))
        assert verify_password(user.password_hash, GOOD) and user.display_name == "N P"
    replay = browser.post(
        path, data={"csrf_token": token, "password": GOOD + "!", "confirm": GOOD + "!"}
    )
    assert replay.status_code == 404
    assert browser.get(path).status_code == 404


def test_account_forms_refuse_a_missing_csrf_token(app, platform, orgs):
    a, _ = orgs
    with accounts.work(platform, a.tenant, accounts.CLI_ACTOR) as w:
        added = accounts.add_member(w, email="csrf@example.com", roles=["sales_rep"])
    path = f"/account/invitation/{added.invitation}"
    client = app.test_client()
    response = client.post(path, data={"password": GOOD, "confirm": GOOD})
    assert response.status_code == 400
    with platform.session() as session:
        user = session.scalar(sa.select(User).where(User.email == "csrf@example.com"))
        assert user.password_hash is None


def test_password_reset_by_mail_works_once(app, platform, orgs, mailbox):
    a, _ = orgs
    browser = app.test_client()
    token = csrf(browser, "/account/reset")
    unknown = browser.post("/account/reset", data={"csrf_token": token, "email": "ghost@x.example"})
    known = browser.post("/account/reset", data={"csrf_token": token, "email": a.rep.email})
    assert unknown.status_code == known.status_code == 200
    # The same words whether or not the address has a login.
    assert unknown.get_data(as_text=True).replace("ghost@x.example", a.rep.email) == known.get_data(
        as_text=True
    )
    (message,) = mailbox.wait(1)
    assert message["X-Envelope-To"] == a.rep.email
    path = link_in(message, "/account/reset/")
    form = csrf(browser, path)
    mismatch = browser.post(path, data={"csrf_token": form, "password": GOOD, "confirm": "x"})
    assert mismatch.status_code == 422
    done = browser.post(
        path,
        data={
            "csrf_token": form,
            "password": "fresh morning tide 7",
            "confirm": "fresh morning tide 7",
        },
    )
    assert done.status_code == 200
    again = browser.post(
        path,
        data={
            "csrf_token": form,
            "password": "other morning tide 8",
            "confirm": "other morning tide 8",
        },
    )
    assert again.status_code == 404
    with platform.session() as session:
        user = session.get_one(User, a.rep.id)
        assert verify_password(user.password_hash, "fresh morning tide 7")


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"email": "x@example.com", "roles": ["a,b"]}, 422, "invalid_roles"),
        ({"email": "x@example.com", "roles": ["x]"]}, 422, "invalid_roles"),
        ({"email": "x@example.com", "roles": ["emperor"]}, 422, "unknown_role"),
        (
            {"email": "x@example.com\r\nBcc: y@example.com", "roles": ["admin"]},
            422,
            "invalid_email",
        ),
        ({"email": "<img src=x>@example.com", "roles": ["admin"]}, 422, "invalid_email"),
        (
            {"email": "x@example.com", "roles": ["admin"], "display_name": "x" * 201},
            422,
            "invalid_value",
        ),
        ({"email": "x@example.com", "roles": ["admin"], "team": "ghost"}, 422, "unknown_team"),
        ({"email": "x@example.com", "roles": ["admin"], "is_operator": True}, 422, "unknown_field"),
        ({"roles": ["admin"]}, 422, "missing_field"),
        (["not", "an", "object"], 400, "bad_request"),
    ],
)
def test_bad_member_input_is_refused_and_changes_nothing(app, platform, orgs, body, status, code):
    a, b = orgs
    before = snapshot(platform, a, b)
    response = app.test_client().post(
        f"/t/{a.slug}/api/v1/users", json=body, headers=auth(a.admin_token)
    )
    assert (response.status_code, response.json["code"]) == (status, code)
    assert response.mimetype == "application/problem+json"
    assert snapshot(platform, a, b) == before


def test_oversized_body_is_refused(app, platform, orgs):
    a, b = orgs
    before = snapshot(platform, a, b)
    response = app.test_client().post(
        f"/t/{a.slug}/api/v1/users",
        data='{"email": "' + "a" * 70000 + '@example.com", "roles": ["admin"]}',
        content_type="application/json",
        headers=auth(a.admin_token),
    )
    assert response.status_code == 413 and response.json["code"] == "payload_too_large"
    assert snapshot(platform, a, b) == before


def test_only_user_managers_with_a_writing_credential_get_in(app, platform, orgs):
    a, _ = orgs
    client = app.test_client()
    with platform.session() as session:
        tenant = session.get_one(Tenant, a.tenant.id)
        admin = session.get_one(User, a.admin.id)
        _, read_only = tokens.create_token(session, tenant, admin, "ro", read_only=True)
        _, scoped = tokens.create_token(session, tenant, admin, "scoped", entities=["customer"])
    for token in (a.rep_token, read_only, scoped):
        response = client.get(f"/t/{a.slug}/api/v1/users", headers=auth(token))
        assert response.status_code == 403 and response.json["code"] == "forbidden"
    assert client.get(f"/t/{a.slug}/api/v1/users").status_code == 401
    listed = client.get(f"/t/{a.slug}/api/v1/users", headers=auth(a.admin_token)).json["items"]
    assert {m["email"] for m in listed} == {a.admin.email, a.rep.email}
    assert all("password_hash" not in m for m in listed)


def test_a_tenant_admin_cannot_reach_another_tenant(app, platform, orgs):
    a, b = orgs
    client = app.test_client()
    before = snapshot(platform, a, b)
    with platform.session() as session:
        session.add(Team(tenant_id=b.tenant.id, name="b_team", label="B"))
    before = snapshot(platform, a, b)
    calls = [
        ("get", f"/t/{b.slug}/api/v1/users", None),
        ("post", f"/t/{b.slug}/api/v1/users", {"email": "x@example.com", "roles": ["admin"]}),
        ("get", f"/t/{b.slug}/api/v1/teams", None),
        ("get", f"/t/{a.slug}/api/v1/users/{b.rep.id}", None),
        ("patch", f"/t/{a.slug}/api/v1/users/{b.rep.id}", {"roles": ["admin"]}),
        ("post", f"/t/{a.slug}/api/v1/users/{b.rep.id}/deactivate", None),
        ("post", f"/t/{a.slug}/api/v1/users/{b.admin.id}/reactivate", None),
        ("post", f"/t/{a.slug}/api/v1/users/{b.rep.id}/invitation", None),
        ("patch", f"/t/{a.slug}/api/v1/teams/b_team", {"label": "mine"}),
        ("delete", f"/t/{a.slug}/api/v1/teams/b_team", None),
        ("get", f"/t/{b.slug}/api/v1/tokens", None),
        ("post", f"/t/{b.slug}/api/v1/tokens", {"name": "x"}),
        ("delete", f"/t/{a.slug}/api/v1/tokens/{_token_id(b.rep_token)}", None),
        ("delete", f"/t/{b.slug}/api/v1/tokens/{_token_id(b.rep_token)}", None),
        ("get", f"/t/{a.slug}/api/v1/users/not-a-uuid", None),
    ]
    for method, url, body in calls:
        response = getattr(client, method)(url, json=body, headers=auth(a.admin_token))
        assert response.status_code == 404, (method, url, response.json)
        assert response.json["code"] == "not_found"
    assert snapshot(platform, a, b) == before
    with platform.session() as session:
        assert tokens.authenticate(session, b.rep_token) is not None


def _token_id(secret: str) -> str:
    return secret.split("_")[1]


def test_admin_changes_roles_team_and_manager_and_each_is_audited(app, platform, orgs):
    a, _ = orgs
    client = app.test_client()
    made = client.post(
        f"/t/{a.slug}/api/v1/teams",
        json={"name": "north", "label": "North 北区"},
        headers=auth(a.admin_token),
    )
    assert made.status_code == 201 and made.json["label"] == "North 北区"
    response = client.patch(
        f"/t/{a.slug}/api/v1/users/{a.rep.id}",
        json={"roles": ["sales_manager"], "team": "north", "manager": a.admin.email},
        headers=auth(a.admin_token),
    )
    assert response.status_code == 200, response.json
    assert response.json["roles"] == ["sales_manager"]
    assert response.json["team"] == "north" and response.json["manager"] == a.admin.email
    with platform.store(a.tenant).connect() as connection:
        actions = list(connection.scalars(sa.select(audit.c.action).order_by(audit.c.seq)))
        actor = connection.scalar(
            sa.select(audit.c.actor_name).order_by(audit.c.seq.desc()).limit(1)
        )
    assert actions[-4:] == [
        "team.created",
        "user.roles_changed",
        "user.team_changed",
        "user.manager_changed",
    ]
    assert actor == a.admin.email
    # A bad part of a PATCH undoes the good parts before it.
    before = snapshot(platform, a)
    bad = client.patch(
        f"/t/{a.slug}/api/v1/users/{a.rep.id}",
        json={"roles": ["read_only"], "team": "nowhere"},
        headers=auth(a.admin_token),
    )
    assert bad.status_code == 422 and bad.json["code"] == "unknown_team"
    assert snapshot(platform, a) == before


def test_admin_cannot_lock_the_tenant_out(app, platform, orgs):
    a, b = orgs
    before = snapshot(platform, a, b)
    client = app.test_client()
    for method, url, body in [
        ("patch", f"/t/{a.slug}/api/v1/users/{a.admin.id}", {"roles": ["sales_rep"]}),
        ("post", f"/t/{a.slug}/api/v1/users/{a.admin.id}/deactivate", None),
    ]:
        response = getattr(client, method)(url, json=body, headers=auth(a.admin_token))
        assert response.status_code == 422 and response.json["code"] == "would_lock_out"
    assert snapshot(platform, a, b) == before


def test_deactivation_ends_the_members_tokens_at_once(app, platform, orgs):
    a, _ = orgs
    client = app.test_client()
    assert client.get(f"/t/{a.slug}/api/v1/tokens", headers=auth(a.rep_token)).status_code == 200
    response = client.post(
        f"/t/{a.slug}/api/v1/users/{a.rep.id}/deactivate", headers=auth(a.admin_token)
    )
    assert response.status_code == 200 and response.json["active"] is False
    assert client.get(f"/t/{a.slug}/api/v1/tokens", headers=auth(a.rep_token)).status_code == 401
    again = client.post(
        f"/t/{a.slug}/api/v1/users/{a.rep.id}/deactivate", headers=auth(a.admin_token)
    )
    assert again.status_code == 409 and again.json["code"] == "already_inactive"
    back = client.post(
        f"/t/{a.slug}/api/v1/users/{a.rep.id}/reactivate", headers=auth(a.admin_token)
    )
    assert back.status_code == 200 and back.json["active"] is True
    assert client.get(f"/t/{a.slug}/api/v1/tokens", headers=auth(a.rep_token)).status_code == 401


def test_team_crud_refuses_loops_and_deleting_a_used_team(app, platform, orgs):
    a, _ = orgs
    client = app.test_client()
    h = auth(a.admin_token)
    assert (
        client.post(
            f"/t/{a.slug}/api/v1/teams", json={"name": "top", "label": "Top"}, headers=h
        ).status_code
        == 201
    )
    sub = client.post(
        f"/t/{a.slug}/api/v1/teams",
        json={"name": "sub", "label": "Sub", "parent": "top"},
        headers=h,
    )
    assert sub.json["parent"] == "top"
    loop = client.patch(f"/t/{a.slug}/api/v1/teams/top", json={"parent": "sub"}, headers=h)
    assert loop.status_code == 422 and loop.json["code"] == "invalid_parent"
    used = client.delete(f"/t/{a.slug}/api/v1/teams/top", headers=h)
    assert used.status_code == 409 and used.json["code"] == "team_in_use"
    moved = client.patch(
        f"/t/{a.slug}/api/v1/teams/sub", json={"parent": None, "label": "Solo"}, headers=h
    )
    assert moved.status_code == 200 and moved.json == {
        **moved.json,
        "parent": None,
        "label": "Solo",
    }
    assert client.delete(f"/t/{a.slug}/api/v1/teams/top", headers=h).status_code == 204
    dup = client.post(f"/t/{a.slug}/api/v1/teams", json={"name": "sub", "label": "x"}, headers=h)
    assert dup.status_code == 409 and dup.json["code"] == "team_exists"
    names = {t["name"] for t in client.get(f"/t/{a.slug}/api/v1/teams", headers=h).json["items"]}
    assert names == {"sub"}


# -- own tokens -----------------------------------------------------------------------------


def test_a_member_creates_lists_and_revokes_their_own_tokens(app, platform, orgs):
    a, _ = orgs
    client = app.test_client()
    made = client.post(
        f"/t/{a.slug}/api/v1/tokens",
        json={"name": "sync", "read_only": True, "entities": ["customer"], "expires_days": 30},
        headers=auth(a.rep_token),
    )
    assert made.status_code == 201, made.json
    secret = made.json["token"]
    assert made.json["entities"] == ["customer"] and made.json["read_only"] is True
    with platform.session() as session:
        principal = tokens.authenticate(session, secret)
        assert principal.token.entities == ["customer"] and principal.read_only
    listed = client.get(f"/t/{a.slug}/api/v1/tokens", headers=auth(a.rep_token)).json["items"]
    assert {t["name"] for t in listed} == {"rep", "sync"}
    assert secret not in str(listed) and all("token" not in t for t in listed)
    assert (
        client.delete(
            f"/t/{a.slug}/api/v1/tokens/{made.json['id']}", headers=auth(a.rep_token)
        ).status_code
        == 204
    )
    assert client.get(f"/t/{a.slug}/api/v1/tokens", headers=auth(secret)).status_code == 401
    # Another member's token is not yours to revoke.
    admin_id = _token_id(a.admin_token)
    other = client.delete(f"/t/{a.slug}/api/v1/tokens/{admin_id}", headers=auth(a.rep_token))
    assert other.status_code == 404
    with platform.store(a.tenant).connect() as connection:
        actions = list(connection.scalars(sa.select(audit.c.action).order_by(audit.c.seq)))
    assert actions[-2:] == ["token.created", "token.revoked"]


def test_a_token_cannot_mint_a_broader_one(app, platform, orgs):
    a, b = orgs
    client = app.test_client()
    with platform.session() as session:
        tenant = session.get_one(Tenant, a.tenant.id)
        rep = session.get_one(User, a.rep.id)
        _, read_only = tokens.create_token(session, tenant, rep, "ro", read_only=True)
        _, scoped = tokens.create_token(session, tenant, rep, "scoped", entities=["customer"])
    before = snapshot(platform, a, b)
    url = f"/t/{a.slug}/api/v1/tokens"
    assert client.post(url, json={"name": "x"}, headers=auth(read_only)).status_code == 403
    for body in ({"name": "x"}, {"name": "x", "entities": ["customer", "deal"]}):
        response = client.post(url, json=body, headers=auth(scoped))
        assert response.status_code == 422 and response.json["code"] == "invalid_token_request"
    assert snapshot(platform, a, b) == before
    narrow = client.post(url, json={"name": "x", "entities": ["customer"]}, headers=auth(scoped))
    assert narrow.status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "x" * 101},
        {"name": "tab\there"},
        {"name": 7},
        {"name": "x", "entities": ["Customer"]},
        {"name": "x", "entities": ["ghost"]},
        {"name": "x", "entities": "customer"},
        {"name": "x", "expires_days": 0},
        {"name": "x", "expires_days": 99999},
        {"name": "x", "expires_days": True},
        {"name": "x", "read_only": "yes"},
        {"name": "x", "owner": "someone"},
    ],
)
def test_bad_token_requests_are_refused(app, platform, orgs, body):
    a, b = orgs
    before = snapshot(platform, a, b)
    response = app.test_client().post(
        f"/t/{a.slug}/api/v1/tokens", json=body, headers=auth(a.rep_token)
    )
    assert response.status_code == 422 and response.json["code"] == "invalid_token_request"
    assert response.json["errors"]
    assert snapshot(platform, a, b) == before


def test_a_token_cannot_switch_tenant(app, platform, orgs):
    a, b = orgs
    client = app.test_client()
    for url in (
        f"/t/{b.slug}/api/v1/meta/",
        f"/t/{b.slug}/api/v1/users",
        f"/t/{b.slug}/api/v1/tokens",
    ):
        response = client.get(
            url, headers={**auth(a.admin_token), "X-Tenant": b.slug}, json={"tenant": b.slug}
        )
        assert response.status_code == 404


# -- operator console -----------------------------------------------------------------------


def new_operator_email() -> str:
    """An operator address of the test's own (PostgreSQL tests share one control database)."""
    return f"ops{uuid.uuid4().hex[:8]}@example.com"


def operator_login(app: Flask, platform: Platform, email: str | None = None) -> FlaskClient:
    email = email or new_operator_email()
    operators.create_operator(platform, email, GOOD)
    client = app.test_client()
    token = csrf(client, "/operator/login")
    response = client.post(
        "/operator/login", data={"csrf_token": token, "email": email, "password": GOOD}
    )
    assert response.status_code == 303 and response.headers["Location"].endswith("/operator/")
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/operator" in cookie
    return client


def test_operator_sees_and_creates_tenants_but_no_tenant_data(app, platform, orgs, mailbox):
    a, _ = orgs
    email = new_operator_email()
    client = operator_login(app, platform, email)
    home = client.get("/operator/")
    assert home.status_code == 200 and a.slug in home.get_data(as_text=True)
    token = csrf(client, "/operator/")
    slug = f"n{uuid.uuid4().hex[:8]}"
    made = client.post(
        "/operator/tenants",
        data={
            "csrf_token": token,
            "slug": slug,
            "name": "New Co",
            "template": "core",
            "admin_email": "first@newco.example",
        },
    )
    assert made.status_code == 201, made.get_data(as_text=True)
    (message,) = mailbox.wait(1)
    assert message["X-Envelope-To"] == "first@newco.example"
    with platform.session() as session:
        tenant = session.scalar(sa.select(Tenant).where(Tenant.slug == slug))
        member = accounts.member_by_email(session, tenant.id, "first@newco.example")
        assert member.membership.roles == ["admin"]
    # The operator's cookie opens no tenant's API, and no operator is a member anywhere.
    for url in (
        f"/t/{a.slug}/api/v1/meta/",
        f"/t/{a.slug}/api/v1/users",
        f"/t/{slug}/api/v1/users",
    ):
        assert client.get(url).status_code == 401
    with platform.session() as session:
        assert session.scalar(sa.select(User).where(User.email == email)) is None


def test_operator_bad_input_creates_nothing(app, platform, orgs):
    a, b = orgs
    client = operator_login(app, platform)
    token = csrf(client, "/operator/")
    before = [t.slug for t in tenancy.list_tenants(platform)]
    for data in (
        {"slug": "Bad Slug", "name": "x", "admin_email": "x@example.com"},
        {"slug": a.slug, "name": "x", "admin_email": "x@example.com"},
        {"slug": "okslug", "name": "x", "admin_email": "not-an-email"},
        {"slug": "okslug", "name": "", "admin_email": "x@example.com"},
        {"slug": "okslug", "name": "x", "template": "../../etc", "admin_email": "x@example.com"},
    ):
        response = client.post("/operator/tenants", data={"csrf_token": token, **data})
        assert response.status_code in (400, 422), data
    assert [t.slug for t in tenancy.list_tenants(platform)] == before
    assert (
        client.post(
            "/operator/tenants",
            data={"slug": "noscrf", "name": "x", "admin_email": "x@example.com"},
        ).status_code
        == 400
    )


def test_operator_login_gives_one_answer_for_unknown_and_wrong(app, platform):
    email = new_operator_email()
    operators.create_operator(platform, email, GOOD)
    client = app.test_client()
    token = csrf(client, "/operator/login")
    wrong = client.post(
        "/operator/login",
        data={"csrf_token": token, "email": email, "password": "nope nope nope"},
    )
    unknown = client.post(
        "/operator/login",
        data={"csrf_token": token, "email": "who@example.com", "password": "nope nope nope"},
    )
    assert wrong.status_code == unknown.status_code == 401
    # The same page but for the CSRF token, which is signed afresh each time.
    strip = re.compile(r'name="csrf_token" value="[^"]+"')
    assert strip.sub("", wrong.get_data(as_text=True)) == strip.sub(
        "", unknown.get_data(as_text=True)
    )
    assert client.get("/operator/").status_code == 303


def test_operator_logout_revokes_the_session_on_the_server(app, platform):
    client = operator_login(app, platform)
    cookie = client.get_cookie("metacrm_operator", path="/operator").value
    token = csrf(client, "/operator/")
    assert client.post("/operator/logout", data={"csrf_token": token}).status_code == 303
    replay = app.test_client()
    replay.set_cookie("metacrm_operator", cookie, path="/operator")
    assert replay.get("/operator/").status_code == 303


def test_the_invitation_page_speaks_chinese(app, platform, orgs):
    a, _ = orgs
    with accounts.work(platform, a.tenant, accounts.CLI_ACTOR) as w:
        added = accounts.add_member(w, email="mei@example.com", roles=["sales_rep"])
    path = f"/account/invitation/{added.invitation}?lang=zh-CN"
    browser = app.test_client()
    page = browser.get(path)
    assert "设置密码" in page.get_data(as_text=True) and 'lang="zh-CN"' in page.get_data(
        as_text=True
    )
    token = csrf(browser, path)
    weak = browser.post(
        path, data={"csrf_token": token, "password": "12345678901", "confirm": "12345678901"}
    )
    assert weak.status_code == 422
    assert "密码是最常见的密码之一" in weak.get_data(as_text=True)
    accept_language = browser.get(
        f"/account/invitation/{added.invitation}", headers={"Accept-Language": "zh-CN,zh;q=0.9"}
    )
    assert "加入" in accept_language.get_data(as_text=True)


def test_a_sales_rep_cannot_change_their_own_roles(app, platform, orgs):
    a, b = orgs
    before = snapshot(platform, a, b)
    response = app.test_client().patch(
        f"/t/{a.slug}/api/v1/users/{a.rep.id}", json={"roles": ["admin"]}, headers=auth(a.rep_token)
    )
    assert response.status_code == 403 and response.json["code"] == "forbidden"
    assert snapshot(platform, a, b) == before


def sign_in(app: Flask, email: str, password: str = GOOD) -> FlaskClient:
    """Sign in through the login page, as a browser would; return the signed-in client."""
    client = app.test_client()
    token = csrf(client, "/login")
    answer = client.post("/login", data={"csrf_token": token, "email": email, "password": password})
    assert answer.status_code == 302, answer.get_data(as_text=True)
    client.get("/login/tenant", follow_redirects=True)
    return client


def test_deactivation_ends_the_members_login_sessions_at_once(app, platform, orgs):
    a, _ = orgs
    browser = sign_in(app, a.rep.email)
    assert browser.get(f"/t/{a.slug}/api/v1/tokens").status_code == 200
    response = app.test_client().post(
        f"/t/{a.slug}/api/v1/users/{a.rep.id}/deactivate", headers=auth(a.admin_token)
    )
    assert response.status_code == 200
    assert browser.get(f"/t/{a.slug}/api/v1/tokens").status_code == 401
    with platform.store(a.tenant).connect() as connection:
        detail = connection.scalar(
            sa.select(audit.c.detail).where(audit.c.action == "user.deactivated")
        )
    assert detail["sessions_ended"] == 1 and detail["tokens_revoked"] == 1


def test_a_password_reset_ends_the_login_sessions(app, platform, orgs, mailbox):
    a, _ = orgs
    browser = sign_in(app, a.rep.email)
    assert browser.get(f"/t/{a.slug}/api/v1/tokens").status_code == 200
    other = app.test_client()
    token = csrf(other, "/account/reset")
    other.post("/account/reset", data={"csrf_token": token, "email": a.rep.email})
    (message,) = mailbox.wait(1)
    path = link_in(message, "/account/reset/")
    form = csrf(other, path)
    fresh = "fresh morning tide 7"
    done = other.post(path, data={"csrf_token": form, "password": fresh, "confirm": fresh})
    assert done.status_code == 200
    assert browser.get(f"/t/{a.slug}/api/v1/tokens").status_code == 401
    assert sign_in(app, a.rep.email, fresh).get(f"/t/{a.slug}/api/v1/tokens").status_code == 200


def test_operator_and_account_posts_share_the_sign_in_rate_limit(platform):
    s = platform.settings
    limited = create_app(
        {
            "instance_dir": str(s.instance_dir),
            "secret_key": s.secret_key,
            "database_url": s.database_url,
            "tenant_schema_prefix": s.tenant_schema_prefix,
            "login_rate_limit": "3 per minute",
        }
    )
    try:
        for path in ("/operator/login", "/account/reset", "/account/reset/x.y"):
            client = limited.test_client()
            page = "/account/reset" if path.startswith("/account/reset/") else path
            token = csrf(client, page)
            answers = [
                client.post(
                    path, data={"csrf_token": token, "email": "a@x.example", "password": "p"}
                )
                for _ in range(4)
            ]
            assert [a.status_code for a in answers][-1] == 429, path
            assert answers[-1].json["code"] == "too_many_requests"
    finally:
        limited.extensions["metacrm"].close()


def test_a_role_change_reaches_a_token_in_use_at_once(app, platform, orgs):
    """A token's principal and access are kept between requests; a new role still counts."""
    a, _ = orgs
    client = app.test_client()
    users = f"/t/{a.slug}/api/v1/users"
    for _ in range(3):  # served from the token cache and the principal's access after the first
        assert client.get(users, headers=auth(a.rep_token)).status_code == 403
    granted = client.patch(
        f"{users}/{a.rep.id}", json={"roles": ["admin"]}, headers=auth(a.admin_token)
    )
    assert granted.status_code == 200, granted.json
    assert client.get(users, headers=auth(a.rep_token)).status_code == 200
    taken = client.patch(
        f"{users}/{a.rep.id}", json={"roles": ["sales_rep"]}, headers=auth(a.admin_token)
    )
    assert taken.status_code == 200, taken.json
    assert client.get(users, headers=auth(a.rep_token)).status_code == 403
