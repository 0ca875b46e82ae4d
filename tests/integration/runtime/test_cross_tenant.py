"""Tenant A's credentials reach nothing of tenant B, through every tenant route there is.

The routes come from the application's own URL map, so a route added later is
swept too (and a route with a path parameter this file cannot fill fails the
test until it learns it). Each route and method is called on B's path, with B's
record, user, team, token and notification ids, once with A's admin token and
once with A's admin's signed-in cookie (with A's CSRF token, so only the tenant
check can refuse it). Every answer must be 403 or 404 without any of B's data,
and afterwards B's whole namespace (records, audit, outbox, notifications,
versions) and B's rows in the control database must be exactly as before; so
must A's: a request refused after it wrote something is a known bug class.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from metacrm.runtime import notifications, tenancy
from metacrm.runtime.control import ApiToken, Membership, Team, User
from metacrm.runtime.platform import Platform

from ...conftest import BACKENDS, make_settings
from .conftest import snapshot
from .test_api_meta import CHEAP_HASHER, Api, build_app, make_tenant, private_control_database

PASSWORD = "a long and private passphrase 7"
IMPLICIT = {"HEAD", "OPTIONS"}
#: A body for every write: plausible enough to reach the handler's own checks.
BODY = {
    "name": "taken over",
    "items": [{"name": "taken over"}],
    "ids": [],
    "email": "intruder@example.com",
    "roles": ["admin"],
    "label": "Intruders",
    "comment": "x",
}


@dataclass
class Sweep:
    app: Flask
    platform: Platform
    a: Api
    b: Api
    #: Values for the path parameters of B's routes.
    values: dict[str, str]
    #: Strings that must never appear in an answer given to A (B's ids and data).
    secrets: list[str]


def _signed_in(app: Flask, api: Api) -> tuple[FlaskClient, str]:
    """Return a client signed in as the tenant's admin, and its CSRF token."""
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = "10.9.8.7"

    def token(path: str) -> str:
        page = client.get(path).get_data(as_text=True)
        found = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert found, f"no CSRF token on {path}"
        return found.group(1)

    answer = client.post(
        "/login",
        data={"csrf_token": token("/login"), "email": api.admin.email, "password": PASSWORD},
    )
    assert answer.status_code in (302, 303), answer.get_data(as_text=True)[:300]
    # A person of one tenant has it chosen for them when they reach the tenant step.
    chosen = client.get("/login/tenant")
    assert chosen.status_code in (302, 303), chosen.get_data(as_text=True)[:300]
    landing = client.get(f"/t/{api.slug}/")
    assert landing.status_code == 200, landing.get_data(as_text=True)[:300]
    return client, token(f"/t/{api.slug}/")


@pytest.fixture(scope="module", params=BACKENDS)
def sweep(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sweep]:
    with private_control_database(request.param) as database:
        folder = tmp_path_factory.mktemp("cross")
        settings = make_settings(request.param, folder, request, **database)
        p = Platform(settings)
        p.init_control()
        try:
            with build_app(settings) as app:
                a, b = make_tenant(p, app), make_tenant(p, app)
                with p.session() as session:
                    for api in (a, b):
                        session.get(User, api.admin.id).password_hash = CHEAP_HASHER.hash(PASSWORD)
                    team = Team(tenant_id=b.tenant.id, name="b_team", label="B team")
                    session.add(team)
                    session.flush()
                    token_id = session.scalar(
                        sa.select(ApiToken.id).where(ApiToken.tenant_id == b.tenant.id)
                    )
                customer = b.client.post(
                    f"/t/{b.slug}/api/v1/records/customer",
                    json={"name": "Secret Customer of B", "kind": "company"},
                    headers={"Authorization": f"Bearer {b.token}"},
                ).get_json()
                assert "id" in customer, customer
                with p.store(b.tenant).begin() as connection:
                    note = notifications.notify(
                        connection,
                        [b.admin.id],
                        kind="test.note",
                        message={"en": "B's private note", "zh-CN": "B 的私人通知"},
                    )
                values = {
                    "tenant": b.slug,
                    "entity": "customer",
                    "other": "contact",
                    "record_id": customer["id"],
                    "user_id": str(b.admin.id),
                    "token_id": str(token_id),
                    "name": "b_team",
                    "notification_id": str(_id_of(note)),
                    "kind": "entity",
                    "number": "1",
                }
                secrets = [customer["id"], "Secret Customer of B", b.admin.email, "B's private"]
                yield Sweep(app, p, a, b, values, secrets)
        finally:
            for item in tenancy.list_tenants(p):
                tenancy.delete_tenant(p, item.slug)
            p.close()


def _id_of(note: Any) -> Any:
    """The id of what ``notify`` returned (a row mapping, a dict or the id itself)."""
    if isinstance(note, list | tuple):
        note = note[0]
    if isinstance(note, dict):
        return note["id"]
    return getattr(note, "id", note)


def _tenant_routes(app: Flask) -> list[tuple[str, str, str]]:
    """Every (method, rule, endpoint) under /t/<tenant>/."""
    found = []
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/t/<tenant>/"):
            for method in sorted((rule.methods or set()) - IMPLICIT):
                found.append((method, rule.rule, rule.endpoint))
    return sorted(found)


def _fill(rule: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1).split(":")[-1]
        assert name in values, f"{rule}: teach this test a value for <{name}>"
        return values[name]

    return re.sub(r"<([^>]+)>", value, rule)


def _control_state(p: Platform, *apis: Api) -> list[str]:
    """The control-database rows of the tenants' members, tokens and teams."""
    tenant_ids = [api.tenant.id for api in apis]
    rows: list[str] = []
    with p.control_engine.connect() as connection:
        for model in (Membership, ApiToken, Team):
            table = model.__table__
            query = sa.select(table).where(table.c.tenant_id.in_(tenant_ids))
            rows += sorted(repr(tuple(r)) for r in connection.execute(query))
        users = User.__table__
        query = sa.select(users).where(users.c.id.in_([api.admin.id for api in apis]))
        rows += sorted(repr(tuple(r)) for r in connection.execute(query))
    return rows


def _state(s: Sweep) -> dict[str, Any]:
    return {
        "a": snapshot(s.platform.store(s.a.tenant))["data"],
        "b": snapshot(s.platform.store(s.b.tenant))["data"],
        "control": _control_state(s.platform, s.a, s.b),
    }


def test_the_sweep_covers_every_kind_of_tenant_route(sweep: Sweep) -> None:
    endpoints = {endpoint for _, _, endpoint in _tenant_routes(sweep.app)}
    blueprints = {endpoint.split(".")[0] for endpoint in endpoints}
    # The areas a tenant's data is reached through; a missing one means the map changed.
    assert {"records", "meta_api", "audit_api", "users_api", "tokens_api", "signin"} <= blueprints
    assert len(endpoints) >= 40


@pytest.mark.parametrize("credential", ["token", "cookie"])
def test_tenant_a_reaches_nothing_of_tenant_b(sweep: Sweep, credential: str) -> None:
    s = sweep
    if credential == "token":
        client = s.app.test_client()
        headers = {"Authorization": f"Bearer {s.a.token}"}
    else:
        client, csrf = _signed_in(s.app, s.a)
        headers = {"X-CSRFToken": csrf}
    # The credential works on its own tenant (so the refusals below are about B).
    own = client.get(f"/t/{s.a.slug}/api/v1/records/customer", headers=headers)
    assert own.status_code == 200, own.get_data(as_text=True)[:300]

    before = _state(s)
    answers = []
    for method, rule, endpoint in _tenant_routes(s.app):
        url = _fill(rule, s.values)
        kwargs: dict[str, Any] = {"headers": headers}
        if method in ("POST", "PATCH", "PUT", "DELETE"):
            kwargs["json"] = BODY
        response = client.open(url, method=method, **kwargs)
        text = response.get_data(as_text=True)
        answers.append((method, url, endpoint, response.status_code))
        if credential == "token" and response.status_code in (302, 303):
            # Screens take no bearer token: they send the visitor to sign in, showing nothing.
            assert response.location.split("?")[0].endswith("/login"), (method, url)
        else:
            assert response.status_code in (403, 404), (
                method,
                url,
                response.status_code,
                text[:300],
            )
        # A problem's `instance` echoes the path A asked for; only what else it says counts.
        told = text.replace(url, "")
        for secret in s.secrets:
            assert secret not in told, (method, url, secret)
        if response.mimetype == "application/problem+json":
            assert json.loads(text)["status"] == response.status_code
    assert _state(s) == before
    assert len(answers) >= 40


def test_tenant_b_ids_on_tenant_a_paths_are_unknown(sweep: Sweep) -> None:
    """A's own path with B's record id: not found, never B's record."""
    s = sweep
    headers = {"Authorization": f"Bearer {s.a.token}"}
    record = s.values["record_id"]
    before = _state(s)
    client = s.app.test_client()
    for method, path in [
        ("GET", f"customer/{record}"),
        ("PATCH", f"customer/{record}"),
        ("DELETE", f"customer/{record}"),
        ("POST", f"customer/{record}/restore"),
        ("DELETE", f"customer/{record}/purge"),
        ("GET", f"customer/{record}/related/contact"),
    ]:
        response = client.open(
            f"/t/{s.a.slug}/api/v1/records/{path}",
            method=method,
            headers={**headers, "If-Match": "*"},
            json={"name": "taken over"} if method == "PATCH" else None,
        )
        if path.endswith("related/contact"):
            assert response.status_code == 404
        else:
            assert response.status_code == 404, (method, path, response.status_code)
        assert "Secret Customer of B" not in response.get_data(as_text=True)
    bulk = client.patch(
        f"/t/{s.a.slug}/api/v1/records/customer/bulk",
        json={"items": [{"id": record, "fields": {"name": "taken over"}}]},
        headers=headers,
    )
    assert bulk.status_code in (404, 422), bulk.get_data(as_text=True)[:300]
    member = client.get(f"/t/{s.a.slug}/api/v1/users/{s.values['user_id']}", headers=headers)
    assert member.status_code == 404
    revoke = client.delete(f"/t/{s.a.slug}/api/v1/tokens/{s.values['token_id']}", headers=headers)
    assert revoke.status_code == 404
    assert _state(s) == before
