"""The API tokens page of the user menu, over HTTP on SQLite and PostgreSQL.

A token made on the page must be a real bearer token (and a read-only one must
not write), a revoked one must stop working, and every refusal (bad input,
missing CSRF token, another tenant, another member's token) must leave the
stored tokens exactly as they were.
"""

from __future__ import annotations

import re
import uuid

import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from metacrm.runtime import accounts, metastore, tokens
from metacrm.runtime.control import User

from ..runtime.test_api_meta import Api
from .test_signin import World, audit_actions, browser, person, post, sign_in, world

__all__ = ["world"]  # the module-scoped two-tenant world of the sign-in tests

SECRET = re.compile(r'id="token-secret">(mcrm_[0-9a-f]{32}_[A-Za-z0-9_-]+)<')


def signed_in(world: World, api: Api, *also: Api, roles: tuple[str, ...] = ("sales_rep",)):
    """Return a person who is a member of ``api`` (and ``also``), signed in to ``api``."""
    user = person(world, api, *also, roles=roles)
    client = browser(world)
    assert sign_in(client, user.email).status_code == 302
    if also:
        chosen = post(client, "/login/tenant", {"tenant": api.slug}, "/login/tenant")
        assert chosen.status_code == 302
    else:
        assert client.get("/login/tenant").status_code == 302
    assert client.get(f"/t/{api.slug}/").status_code == 200
    return user, client


def page_url(api: Api) -> str:
    return f"/t/{api.slug}/account/tokens"


def create(client: FlaskClient, api: Api, **form: str) -> TestResponse:
    return post(client, page_url(api), form, page_url(api))


def stored(world: World, api: Api, user: User) -> list[dict]:
    with world.platform.session() as session:
        return [tokens.describe(t) for t in tokens.list_tokens(session, api.tenant.id, user.id)]


def secret_of(answer: TestResponse) -> str:
    found = SECRET.search(answer.get_data(as_text=True))
    assert found, answer.get_data(as_text=True)
    return found.group(1)


def bearer(world: World, api: Api, secret: str, method: str = "GET", **kwargs) -> TestResponse:
    client = world.app.test_client()
    return client.open(
        f"/t/{api.slug}/api/v1/records/customer",
        method=method,
        headers={"Authorization": f"Bearer {secret}"},
        **kwargs,
    )


def test_page_needs_a_signed_in_session(world: World) -> None:
    answer = browser(world).get(page_url(world.a))
    assert answer.status_code == 302 and answer.headers["Location"].endswith("/login")
    refused = browser(world).post(page_url(world.a), data={"name": "x"})
    assert refused.status_code in (302, 400)


def test_create_use_list_and_revoke(world: World) -> None:
    user, client = signed_in(world, world.a)
    empty = client.get(page_url(world.a))
    assert empty.status_code == 200
    assert 'id="no-tokens"' in empty.get_data(as_text=True)
    assert "unsafe-inline" not in empty.headers["Content-Security-Policy"]
    assert empty.headers["Cache-Control"] == "no-store"
    landing = client.get(f"/t/{world.a.slug}/").get_data(as_text=True)
    assert page_url(world.a) in landing

    made = create(client, world.a, name="nightly export", expires_days="30")
    assert made.status_code == 201
    secret = secret_of(made)
    assert made.headers["Cache-Control"] == "no-store"
    assert bearer(world, world.a, secret).status_code == 200
    written = bearer(world, world.a, secret, "POST", json={"name": f"Page {uuid.uuid4().hex}"})
    assert written.status_code == 201, written.get_data(as_text=True)

    reader = create(client, world.a, name="dashboard", read_only="1", entities="customer")
    assert reader.status_code == 201
    read_secret = secret_of(reader)
    assert bearer(world, world.a, read_secret).status_code == 200
    assert bearer(world, world.a, read_secret, "POST", json={"name": "no"}).status_code == 403

    rows = stored(world, world.a, user)
    assert [r["name"] for r in rows] == ["dashboard", "nightly export"]  # newest first
    assert rows[0]["read_only"] and rows[0]["entities"] == ["customer"]
    assert rows[1]["entities"] is None and rows[1]["expires_at"] is not None
    listing = client.get(page_url(world.a)).get_data(as_text=True)
    assert secret not in listing and read_secret not in listing  # shown once only
    assert listing.index("dashboard") < listing.index("nightly export")
    assert "read-only" in listing and "read and write" in listing
    assert audit_actions(world.a, user.email).count("token.created") == 2

    first = rows[1]["id"]
    gone = post(client, f"{page_url(world.a)}/{first}/revoke", {}, page_url(world.a))
    assert gone.status_code == 200
    assert "nightly export" in gone.get_data(as_text=True)
    assert bearer(world, world.a, secret).status_code == 401
    assert bearer(world, world.a, read_secret).status_code == 200
    again = post(client, f"{page_url(world.a)}/{first}/revoke", {}, page_url(world.a))
    assert again.status_code == 200
    assert audit_actions(world.a, user.email).count("token.revoked") == 1
    assert [r["state"] for r in stored(world, world.a, user)] == ["active", "revoked"]


def test_page_speaks_chinese(world: World) -> None:
    _, client = signed_in(world, world.a)
    page = client.get(page_url(world.a) + "?lang=zh-CN").get_data(as_text=True)
    assert "API 令牌" in page and "创建令牌" in page
    refused = create(client, world.a, name="", expires_days="abc")
    text = refused.get_data(as_text=True)
    assert refused.status_code == 422
    assert "名称须为 1 到 100 个字符" in text and "有效期须为 1 到 3650" in text


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"name": ""}, "The name must be 1 to 100 characters long"),
        ({"name": "   "}, "The name must be 1 to 100 characters long"),
        ({"name": "x" * 101}, "The name must be 1 to 100 characters long"),
        ({"name": "x" * 100_000}, "The name must be 1 to 100 characters long"),
        ({"name": "bell\x07"}, "without control characters"),
        ({"name": "ok", "entities": "no_such_entity"}, "“no_such_entity” is not an entity"),
        ({"name": "ok", "entities": "'; DROP TABLE x; --"}, "is not an entity you may read"),
        ({"name": "ok", "expires_days": "0"}, "whole number of days from 1 to 3650"),
        ({"name": "ok", "expires_days": "-1"}, "whole number of days from 1 to 3650"),
        ({"name": "ok", "expires_days": "100000"}, "whole number of days from 1 to 3650"),
        ({"name": "ok", "expires_days": "abc"}, "whole number of days from 1 to 3650"),
        ({"name": "ok", "expires_days": "1.5"}, "whole number of days from 1 to 3650"),
    ],
)
def test_bad_input_is_explained_and_stores_nothing(
    world: World, form: dict[str, str], message: str
) -> None:
    user, client = signed_in(world, world.a)
    assert create(client, world.a, name="kept").status_code == 201
    before = stored(world, world.a, user)
    answer = create(client, world.a, **form)
    assert answer.status_code == 422
    body = answer.get_data(as_text=True)
    assert "The token was not created." in body
    assert message in body.replace("&#34;", '"').replace("&#39;", "'")
    assert SECRET.search(body) is None
    assert stored(world, world.a, user) == before
    assert audit_actions(world.a, user.email).count("token.created") == 1


def test_entity_the_member_cannot_read_is_refused(world: World) -> None:
    # A service agent reads customers, contacts, interactions and tasks, but not deals.
    user, client = signed_in(world, world.a, roles=("service_agent",))
    with world.platform.store(world.a.tenant).connect() as connection:
        assert "deal" in accounts.entity_names(metastore.current(connection).bundle)
    page = client.get(page_url(world.a)).get_data(as_text=True)
    assert 'value="customer"' in page and 'value="deal"' not in page
    answer = create(client, world.a, name="sneaky", entities="deal")
    assert answer.status_code == 422
    assert "“deal” is not an entity you may read here." in answer.get_data(as_text=True)
    assert stored(world, world.a, user) == []
    assert create(client, world.a, name="fine", entities="customer").status_code == 201


def test_missing_or_wrong_csrf_token_is_refused(world: World) -> None:
    user, client = signed_in(world, world.a)
    assert client.post(page_url(world.a), data={"name": "forged"}).status_code == 400
    wrong = client.post(page_url(world.a), data={"name": "forged", "csrf_token": "x" * 40})
    assert wrong.status_code == 400
    assert stored(world, world.a, user) == []
    made = secret_of(create(client, world.a, name="mine"))
    token_id = stored(world, world.a, user)[0]["id"]
    assert client.post(f"{page_url(world.a)}/{token_id}/revoke").status_code == 400
    assert bearer(world, world.a, made).status_code == 200
    assert stored(world, world.a, user)[0]["state"] == "active"


def test_other_tenant_and_foreign_tokens_are_404(world: World) -> None:
    user, client = signed_in(world, world.a, world.b)
    # A session for tenant A sees nothing of tenant B's page and can create nothing there.
    assert client.get(page_url(world.b)).status_code == 404
    elsewhere = post(client, page_url(world.b), {"name": "elsewhere"}, page_url(world.a))
    assert elsewhere.status_code == 404
    assert stored(world, world.b, user) == []
    # The same person's token in tenant B cannot be revoked through tenant A's page.
    with world.platform.session() as session:
        own_b, secret_b = tokens.create_token(session, world.b.tenant, user, "in b")
        own_b_id = own_b.id.hex
    # Another member's token in tenant A cannot be revoked either.
    other = person(world, world.a)
    with world.platform.session() as session:
        theirs, secret_theirs = tokens.create_token(session, world.a.tenant, other, "theirs")
        theirs_id = theirs.id.hex
    for token_id in (own_b_id, theirs_id, uuid.uuid4().hex, "not-a-token", "x" * 300):
        answer = post(client, f"{page_url(world.a)}/{token_id}/revoke", {}, page_url(world.a))
        assert answer.status_code == 404, token_id
    assert bearer(world, world.b, secret_b).status_code == 200
    assert bearer(world, world.a, secret_theirs).status_code == 200
    assert "token.revoked" not in audit_actions(world.a, user.email)
    assert "token.revoked" not in audit_actions(world.b, user.email)
    with world.platform.session() as session:
        assert tokens.find_token(session, world.b.tenant.id, own_b_id).revoked_at is None
        assert tokens.find_token(session, world.a.tenant.id, theirs_id).revoked_at is None
