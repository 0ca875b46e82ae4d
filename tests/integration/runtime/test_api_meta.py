"""The metadata API over HTTP, on SQLite and PostgreSQL.

Every refusal is answered as ``application/problem+json`` with a stable
``code``, leaks no stack trace or SQL, and leaves the published version and
bundle exactly as they were (checked by reading ``GET /meta/`` and
``/versions`` before and after).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher
from flask import Flask
from flask.testing import FlaskClient
from uuid6 import uuid7
from werkzeug.test import TestResponse

from metacrm.app import create_app
from metacrm.metadata import schemas
from metacrm.metadata.model import Bundle
from metacrm.metadata.tables import build_tables
from metacrm.runtime import metastore, tenancy, tokens
from metacrm.runtime.control import ApiToken, Membership, Tenant, User, utcnow
from metacrm.runtime.platform import Platform
from metacrm.runtime.settings import Settings

from ...conftest import BACKENDS, PG_ADMIN_URL, make_settings

DEFAULT = object()
#: argon2id at its lowest cost: a real hash, made fast (nothing here logs in).
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
#: Text that must never reach a client: stack traces, SQL, driver names.
LEAKS = (
    "Traceback",
    'File "',
    "sqlalchemy",
    "psycopg",
    "sqlite3",
    "SELECT ",
    "INSERT ",
    "UPDATE ",
    "CREATE TABLE",
    "ALTER TABLE",
    "DROP TABLE",
    "[SQL:",
)


# -- fixtures and helpers ---------------------------------------------------------------------


@dataclass
class Api:
    """One tenant with an admin and their token, and a test client of the app."""

    client: FlaskClient
    platform: Platform
    tenant: Tenant
    admin: User
    token: str

    @property
    def slug(self) -> str:
        return self.tenant.slug

    def url(self, path: str = "", slug: str | None = None) -> str:
        return f"/t/{slug or self.slug}/api/v1/meta/{path}"

    def headers(self, auth: Any) -> dict[str, str]:
        if auth is DEFAULT:
            return {"Authorization": f"Bearer {self.token}"}
        if auth is None:
            return {}
        return {"Authorization": auth}

    def get(self, path: str = "", auth: Any = DEFAULT, slug: str | None = None) -> TestResponse:
        return self.client.get(self.url(path, slug), headers=self.headers(auth))

    def post(
        self,
        path: str,
        body: Any = None,
        *,
        data: bytes | str | None = None,
        content_type: str | None = "application/json",
        auth: Any = DEFAULT,
        slug: str | None = None,
    ) -> TestResponse:
        headers = self.headers(auth)
        if data is None:
            return self.client.post(self.url(path, slug), json=body, headers=headers)
        kwargs: dict[str, Any] = {"data": data, "headers": headers}
        if content_type is not None:
            kwargs["content_type"] = content_type
        return self.client.post(self.url(path, slug), **kwargs)

    def bearer(self, token: str) -> str:
        return f"Bearer {token}"

    def new_token(self, user: User | None = None, **kwargs: Any) -> str:
        """Create another token in this tenant (for the admin unless a user is given)."""
        with self.platform.session() as session:
            _, secret = tokens.create_token(
                session, self.tenant, user or self.admin, "test", **kwargs
            )
        return secret

    def add_member(self, roles: list[str]) -> User:
        """Add a second user to this tenant with the given roles."""
        with self.platform.session() as session:
            user = User(
                email=f"member-{uuid.uuid4().hex[:8]}@example.com",
                display_name="Member",
                password_hash=None,
            )
            session.add(user)
            session.flush()
            session.add(Membership(tenant_id=self.tenant.id, user_id=user.id, roles=roles))
        return user

    def current(self) -> dict[str, Any]:
        response = self.get()
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()

    def state(self) -> tuple[Any, ...]:
        """Everything a refused request must leave unchanged, as the API shows it."""
        response = self.get()
        versions = self.get("versions")
        assert response.status_code == 200 and versions.status_code == 200
        return response.get_json(), response.headers["ETag"], versions.get_json()

    def publish(self, bundle: dict[str, Any], **extra: Any) -> TestResponse:
        body = {"bundle": bundle, "expected_version": self.current()["version"], **extra}
        return self.post("publish", body)


def no_leak(response: TestResponse) -> None:
    """Assert that nothing internal (stack trace, SQL, driver) is in the body."""
    text = response.get_data(as_text=True)
    for marker in LEAKS:
        assert marker not in text, f"{marker!r} leaked in {text[:500]}"


def problem(response: TestResponse, status: int, code: str) -> dict[str, Any]:
    """Assert an RFC 9457 problem with this status and code; return its body."""
    assert response.status_code == status, response.get_data(as_text=True)[:2000]
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == f"https://metacrm.dev/problems/{code.replace('_', '-')}"
    assert body["title"]
    no_leak(response)
    return body


def pointers(body: dict[str, Any]) -> list[str]:
    """Return the pointers of a problem's errors, after checking each has a message."""
    assert isinstance(body["errors"], list) and body["errors"]
    for error in body["errors"]:
        assert isinstance(error["pointer"], str)
        assert isinstance(error["message"], str) and error["message"]
    return [e["pointer"] for e in body["errors"]]


def entity_doc(bundle: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in bundle["entities"] if e["name"] == name)


def entity_index(bundle: dict[str, Any], name: str) -> int:
    return next(i for i, e in enumerate(bundle["entities"]) if e["name"] == name)


def with_field(bundle: dict[str, Any], entity: str, *fields: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the bundle with fields appended to one entity."""
    result = copy.deepcopy(bundle)
    entity_doc(result, entity)["fields"].extend(copy.deepcopy(list(fields)))
    return result


def text_field(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "text", "label": {"en": name.title()}, **extra}


def formula(name: str, expression: str, result_type: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "formula",
        "label": {"en": name},
        "expression": expression,
        "result_type": result_type,
    }


def field_names(bundle: dict[str, Any], entity: str) -> list[str]:
    return [f["name"] for f in entity_doc(bundle, entity)["fields"]]


def new_entity(name: str, *fields: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "label": {"en": "Thing"},
        "plural_label": {"en": "Things"},
        "title_field": "title",
        "fields": [text_field("title"), *fields],
    }


def insert_rows(api: Api, entity: str, *rows: dict[str, Any]) -> list[str]:
    """Insert raw records into one of the tenant's tables; return their ids."""
    store = api.platform.store(api.tenant)
    with store.begin() as connection:
        bundle = Bundle.from_doc(metastore.current(connection).bundle)
        table = build_tables(bundle).tables[entity]
        now = dt.datetime.now(dt.UTC)
        ids = []
        for row in rows:
            values = {"id": uuid7(), "created_at": now, "updated_at": now, **row}
            connection.execute(table.insert().values(values))
            ids.append(str(values["id"]))
    return ids


def app_overrides(settings: Settings) -> dict[str, Any]:
    """Return create_app() overrides that reproduce these settings exactly."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


@contextmanager
def build_app(settings: Settings) -> Iterator[Flask]:
    """Build the application on the same databases and instance folder as a platform."""
    with pytest.MonkeyPatch.context() as patch:
        for key in list(os.environ):
            # create_app() also reads METACRM_* from the environment; none may leak in.
            if key.startswith("METACRM_"):
                patch.delenv(key)
        the_app = create_app(app_overrides(settings))
    try:
        yield the_app
    finally:
        the_app.extensions["metacrm"].close()


def make_tenant(platform: Platform, app: Flask) -> Api:
    """Create a tenant from the core template with an admin and an API token."""
    slug = f"a{uuid.uuid4().hex[:10]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tenancy, "hash_password", CHEAP_HASHER.hash)
        created = tenancy.create_tenant(
            platform, slug, "API tenant", template="core", admin_email=f"admin@{slug}.example"
        )
    assert created.admin is not None
    with platform.session() as session:
        _, secret = tokens.create_token(session, created.tenant, created.admin, "test")
    return Api(app.test_client(), platform, created.tenant, created.admin, secret)


@dataclass
class World:
    """Two tenants on one backend, shared by the tests that must not change them."""

    app: Flask
    a: Api
    b: Api


@contextmanager
def private_control_database(backend: str) -> Iterator[dict[str, Any]]:
    """Give PostgreSQL worlds a control database of their own; SQLite ones have one already.

    The ``platform`` fixture deletes every tenant of the session's shared control
    database when a test ends, which would take a module-scoped world's tenants with it.
    """
    if backend != "postgresql":
        yield {}
        return
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"metacrm_world_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = sa.make_url(PG_ADMIN_URL).set(database=name)
        yield {"database_url": url.render_as_string(hide_password=False)}
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="module", params=BACKENDS)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """Build, once per backend, what read-only and refused requests run against.

    Creating a tenant publishes the whole core bundle; sharing two tenants
    keeps the many refusal tests fast. Each refusal test still checks that the
    tenant is exactly as before, so a refusal that changes anything fails there.
    """
    with private_control_database(request.param) as database:
        folder = tmp_path_factory.mktemp("world")
        settings = make_settings(request.param, folder, request, **database)
        p = Platform(settings)
        p.init_control()
        try:
            with build_app(settings) as the_app:
                yield World(the_app, make_tenant(p, the_app), make_tenant(p, the_app))
        finally:
            for item in tenancy.list_tenants(p):
                tenancy.delete_tenant(p, item.slug)
            p.close()


@pytest.fixture
def shared(world: World) -> Api:
    """A tenant at version 1 that tests may read and send refused requests to."""
    return world.a


@pytest.fixture
def app(world: World) -> Flask:
    return world.app


@pytest.fixture
def api(platform: Platform) -> Iterator[Api]:
    """A fresh tenant of its own, for tests that publish (on the ``platform`` fixture)."""
    with build_app(platform.settings) as the_app:
        yield make_tenant(platform, the_app)


# -- service endpoints ------------------------------------------------------------------------


def test_healthz_answers_ok_without_a_token(app):
    response = app.test_client().get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_healthz_answers_503_problem_when_control_database_is_down(app, tmp_path, monkeypatch):
    dead = sa.create_engine(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'control.db'}")
    monkeypatch.setattr(Platform, "control_engine", property(lambda self: dead))
    try:
        body = problem(app.test_client().get("/healthz"), 503, "unavailable")
    finally:
        dead.dispose()
    assert "control database" in body["detail"]


def test_index_describes_the_api(app):
    response = app.test_client().get("/")
    assert response.status_code == 200
    body = response.get_json()
    assert body["service"] == "metacrm"
    assert "tenant_api" not in body  # /t/{tenant}/api/v1/ itself is not an endpoint
    assert body["metadata_api"] == "/t/{tenant}/api/v1/meta/"
    assert body["health"] == "/healthz"
    assert body["sign_in"] == "/login"


def test_index_sends_a_browser_to_the_sign_in_page(app):
    page = app.test_client().get("/", headers={"Accept": "text/html,*/*;q=0.8"})
    assert page.status_code == 302 and page.headers["Location"] == "/login"
    api = app.test_client().get("/", headers={"Accept": "application/json"})
    assert api.status_code == 200 and api.get_json()["service"] == "metacrm"


# -- reading ----------------------------------------------------------------------------------


def test_get_bundle_returns_version_bundle_and_etag(shared):
    response = shared.get()
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["ETag"] == '"1"'
    body = response.get_json()
    assert body["version"] == 1
    assert body["action"] == "create"
    assert body["bundle"] == tenancy.template_bundle("core")
    assert {e["name"] for e in body["bundle"]["entities"]} == {
        "customer",
        "contact",
        "deal",
        "interaction",
        "task",
    }
    assert [op["kind"] for op in body["operations"]].count("create_entity") == 5
    assert "客户" in response.get_data(as_text=True)  # labels are not \u-escaped


def test_versions_of_new_tenant_lists_version_one(shared):
    body = shared.get("versions").get_json()
    assert [v["version"] for v in body["versions"]] == [1]
    first = body["versions"][0]
    assert first["action"] == "create"
    assert first["comment"] == "created from template core"
    assert first["operations"] >= 5
    assert "bundle" not in first


def test_get_one_version_returns_its_bundle(shared):
    response = shared.get("versions/1")
    assert response.status_code == 200
    body = response.get_json()
    assert body["version"] == 1
    assert body["bundle"] == shared.current()["bundle"]


@pytest.mark.parametrize("number", ["2", "99", "0099", "2147483648", "99999999999999999999"])
def test_unknown_version_is_404_problem(shared, number):
    problem(shared.get(f"versions/{number}"), 404, "not_found")


def test_diff_from_nothing_creates_every_entity(shared):
    body = shared.get("diff?from=0&to=1").get_json()
    assert body["from"] == 0 and body["to"] == 1
    assert [op["kind"] for op in body["operations"]].count("create_entity") == 5
    same = shared.get("diff?from=1&to=1").get_json()
    assert same["operations"] == []
    assert same["destructive"] is False


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?from=1",
        "?to=1",
        "?from=a&to=1",
        "?from=1&to=-1",
        "?from=1&to=1234567890",
        "?from=1.0&to=1",
        "?from=%C2%B2&to=1",
    ],
)
def test_diff_with_bad_version_numbers_is_400(shared, query):
    body = problem(shared.get(f"diff{query}"), 400, "bad_request")
    assert pointers(body)[0] in ("/from", "/to")


def test_diff_with_unknown_version_is_404(shared):
    problem(shared.get("diff?from=1&to=42"), 404, "not_found")
    problem(shared.get("diff?from=42&to=1"), 404, "not_found")


@pytest.mark.parametrize("kind", schemas.KINDS)
def test_schema_of_every_kind_is_served(shared, kind):
    response = shared.get(f"schemas/{kind}")
    assert response.status_code == 200
    assert response.mimetype == "application/schema+json"
    body = response.get_json(force=True)
    assert body == schemas.schema(kind)
    assert body["$id"] == f"{schemas.BASE_URI}{kind}.json"


@pytest.mark.parametrize("kind", ["nope", "Bundle", "bundle.json", "x" * 300])
def test_unknown_schema_kind_is_404(shared, kind):
    body = problem(shared.get(f"schemas/{kind}"), 404, "not_found")
    assert len(body["detail"]) < 300


# -- validate and plan ------------------------------------------------------------------------


def test_validate_accepts_a_valid_bundle(shared):
    bundle = shared.current()["bundle"]
    response = shared.post("validate", {"bundle": bundle})
    assert response.status_code == 200
    assert response.get_json() == {"valid": True, "errors": []}
    # The bundle may also be the body itself.
    assert shared.post("validate", bundle).get_json() == {"valid": True, "errors": []}


def test_validate_lists_every_problem_with_pointers(shared):
    bundle = copy.deepcopy(shared.current()["bundle"])
    i = entity_index(bundle, "customer")
    fields = entity_doc(bundle, "customer")["fields"]
    fields.append({"name": "broken", "label": {"en": "B"}})
    entity_doc(bundle, "customer")["title_field"] = "no_such_field"
    before = shared.state()
    response = shared.post("validate", {"bundle": bundle})
    assert response.status_code == 200
    body = response.get_json()
    assert body["valid"] is False
    found = [e["pointer"] for e in body["errors"]]
    assert all(isinstance(e["message"], str) and e["message"] for e in body["errors"])
    assert f"/entities/{i}/fields/{len(fields) - 1}" in found, found
    assert f"/entities/{i}/title_field" in found, found
    assert shared.state() == before


def test_validate_refuses_wrong_bundle_shape(shared):
    body = shared.post("validate", {"bundle": {"format": 1, "entities": "nope"}}).get_json()
    assert body["valid"] is False
    assert "/entities" in [e["pointer"] for e in body["errors"]]


def test_plan_lists_operations_and_checks_without_publishing(shared):
    before = shared.state()
    bundle = with_field(shared.current()["bundle"], "customer", text_field("nickname"))
    response = shared.post("plan", {"bundle": bundle})
    assert response.status_code == 200
    body = response.get_json()
    assert body["base_version"] == 1
    assert [op["kind"] for op in body["operations"]] == ["add_field"]
    assert body["operations"][0]["description"]
    assert body["checks"] == []
    assert body["applicable"] is True
    assert body["destructive"] is False
    assert shared.state() == before


def test_plan_of_invalid_bundle_is_422(shared):
    bundle = with_field(shared.current()["bundle"], "customer", {"name": "x", "type": "text"})
    before = shared.state()
    body = problem(shared.post("plan", {"bundle": bundle}), 422, "invalid_metadata")
    assert pointers(body)
    assert shared.state() == before


def test_plan_without_bundle_is_422(shared):
    body = problem(shared.post("plan", {}), 422, "validation_failed")
    assert pointers(body) == ["/bundle"]


# -- publish, history, diff and rollback ------------------------------------------------------


def test_publish_then_history_diff_and_rollback(api):
    bundle = with_field(api.current()["bundle"], "customer", text_field("nickname"))
    response = api.post(
        "publish", {"bundle": bundle, "expected_version": 1, "comment": "add nickname"}
    )
    assert response.status_code == 201
    assert response.headers["Location"].endswith(f"/t/{api.slug}/api/v1/meta/versions/2")
    body = response.get_json()
    assert body["version"] == 2
    assert body["action"] == "publish"
    assert body["comment"] == "add nickname"
    assert body["created_by"] == api.admin.email
    assert [op["kind"] for op in body["operations"]] == ["add_field"]
    assert "bundle" not in body

    current = api.get()
    assert current.headers["ETag"] == '"2"'
    assert current.get_json()["version"] == 2
    assert "nickname" in field_names(current.get_json()["bundle"], "customer")
    located = api.client.get(response.headers["Location"], headers=api.headers(DEFAULT))
    assert located.status_code == 200
    assert located.get_json()["version"] == 2
    assert located.get_json()["bundle"] == current.get_json()["bundle"]

    versions = api.get("versions").get_json()["versions"]
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[0]["comment"] == "add nickname"
    assert versions[0]["created_by"] == api.admin.email

    diff = api.get("diff?from=1&to=2").get_json()
    assert [(op["kind"], op["entity"], op["field"]) for op in diff["operations"]] == [
        ("add_field", "customer", "nickname")
    ]
    assert diff["destructive"] is False
    backwards = api.get("diff?from=2&to=1").get_json()
    assert "archive_field" in [op["kind"] for op in backwards["operations"]]

    rolled = api.post("rollback", {"to_version": 1, "expected_version": 2})
    assert rolled.status_code == 201
    body = rolled.get_json()
    assert body["version"] == 3
    assert body["action"] == "rollback"
    assert body["comment"] == "roll back to version 1"
    assert "archive_field" in [op["kind"] for op in body["operations"]]
    current = api.current()
    assert current["version"] == 3
    nickname = next(
        f for f in entity_doc(current["bundle"], "customer")["fields"] if f["name"] == "nickname"
    )
    assert nickname["archived"] is True
    assert [v["version"] for v in api.get("versions").get_json()["versions"]] == [3, 2, 1]


def test_removing_a_field_plans_no_reorder(api):
    # Archiving the last field keeps the others in order: a "reorder" step is noise.
    core = api.current()["bundle"]
    assert api.publish(with_field(core, "customer", text_field("nickname"))).status_code == 201
    body = api.post("plan", {"bundle": core}).get_json()
    assert [op["kind"] for op in body["operations"]] == ["archive_field"]


def test_publish_of_unchanged_bundle_creates_no_version(shared):
    before = shared.state()
    response = shared.publish(shared.current()["bundle"])
    assert response.status_code == 200
    assert response.get_json()["version"] == 1
    assert response.get_json()["changed"] is False
    assert shared.state() == before


def test_rollback_to_unknown_version_is_404_and_changes_nothing(shared):
    before = shared.state()
    problem(shared.post("rollback", {"to_version": 9, "expected_version": 1}), 404, "not_found")
    problem(shared.post("rollback", {"to_version": 0, "expected_version": 1}), 404, "not_found")
    for huge in (2**31, 10**20):
        response = shared.post("rollback", {"to_version": huge, "expected_version": 1})
        problem(response, 404, "not_found")
    assert shared.state() == before


# -- authentication and tenant isolation ------------------------------------------------------


def test_no_token_is_401_with_www_authenticate(shared):
    before = shared.state()
    for response in (
        shared.get(auth=None),
        shared.get("versions", auth=None),
        shared.get("schemas/bundle", auth=None),
        shared.post("publish", {"bundle": {}, "expected_version": 1}, auth=None),
    ):
        body = problem(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="metacrm"'
        assert "Bearer" in body["detail"]
    assert shared.state() == before


@pytest.mark.parametrize(
    "header",
    [
        "Basic YWRtaW46YWRtaW4=",
        "Bearer",
        "Bearer    ",
        "Bearer garbage",
        "Bearer mcrm_",
        "Bearer mcrm_nothex_secret",
        f"Bearer mcrm_{uuid.uuid4().hex}_secret",
        "Bearer mcrm_" + "x" * 300,
        "Token abc",
    ],
)
def test_garbage_or_unknown_token_is_401(shared, header):
    before = shared.state()
    response = shared.post(
        "publish", {"bundle": shared.current()["bundle"], "expected_version": 1}, auth=header
    )
    problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    problem(shared.get(auth=header), 401, "unauthorized")
    assert shared.state() == before


def test_bearer_scheme_is_case_insensitive_and_use_is_recorded(shared):
    token = shared.new_token()
    token_id = uuid.UUID(hex=token[len(tokens.PREFIX) :].partition("_")[0])
    assert shared.get(auth=f"bearer {token}").status_code == 200
    with shared.platform.session() as session:
        assert session.get(ApiToken, token_id).last_used_at is not None


def test_token_of_member_of_both_tenants_is_bound_to_its_own_tenant(world):
    a, b = world.a, world.b
    user = b.add_member(["admin"])
    with a.platform.session() as session:
        session.add(Membership(tenant_id=a.tenant.id, user_id=user.id, roles=["admin"]))
    token_for_a = a.bearer(a.new_token(user))
    assert a.get(auth=token_for_a).status_code == 200
    before = b.state()
    problem(b.get(auth=token_for_a), 404, "not_found")
    bundle = with_field(b.current()["bundle"], "customer", text_field("nickname"))
    response = b.post("publish", {"bundle": bundle, "expected_version": 1}, auth=token_for_a)
    problem(response, 404, "not_found")
    assert b.state() == before


def test_token_with_wrong_secret_is_401(shared):
    token_id = shared.token[len(tokens.PREFIX) :].partition("_")[0]
    forged = f"{tokens.PREFIX}{token_id}_{'A' * 43}"
    problem(shared.get(auth=shared.bearer(forged)), 401, "unauthorized")


def test_revoked_token_is_401(shared):
    token = shared.new_token()
    assert shared.get(auth=shared.bearer(token)).status_code == 200
    token_id = uuid.UUID(hex=token[len(tokens.PREFIX) :].partition("_")[0])
    with shared.platform.session() as session:
        session.get(ApiToken, token_id).revoked_at = utcnow()
    before = shared.state()
    problem(shared.get(auth=shared.bearer(token)), 401, "unauthorized")
    bundle = with_field(shared.current()["bundle"], "customer", text_field("nickname"))
    response = shared.post(
        "publish", {"bundle": bundle, "expected_version": 1}, auth=shared.bearer(token)
    )
    problem(response, 401, "unauthorized")
    assert shared.state() == before


def test_expired_token_is_401(shared):
    token = shared.new_token(expires_at=utcnow() - dt.timedelta(seconds=1))
    problem(shared.get(auth=shared.bearer(token)), 401, "unauthorized")
    fresh = shared.new_token(expires_at=utcnow() + dt.timedelta(hours=1))
    assert shared.get(auth=shared.bearer(fresh)).status_code == 200


def test_token_of_deactivated_member_is_401(shared):
    user = shared.add_member(["admin"])
    token = shared.new_token(user)
    assert shared.get(auth=shared.bearer(token)).status_code == 200
    with shared.platform.session() as session:
        membership = session.scalar(sa.select(Membership).where(Membership.user_id == user.id))
        membership.is_active = False
    problem(shared.get(auth=shared.bearer(token)), 401, "unauthorized")


def test_token_of_other_tenant_is_404_and_other_tenant_unchanged(world):
    a, b = world.a, world.b
    b_before, a_before = b.state(), a.state()
    bundle = with_field(b.current()["bundle"], "customer", text_field("nickname"))
    attempts = [
        a.get(slug=b.slug),
        a.get("versions", slug=b.slug),
        a.get("versions/1", slug=b.slug),
        a.get("schemas/bundle", slug=b.slug),
        a.post("validate", {"bundle": bundle}, slug=b.slug),
        a.post("plan", {"bundle": bundle}, slug=b.slug),
        a.post("publish", {"bundle": bundle, "expected_version": 1}, slug=b.slug),
        a.post("rollback", {"to_version": 1, "expected_version": 1}, slug=b.slug),
    ]
    unknown = problem(a.get(slug="nosuchtenant"), 404, "not_found")
    for response in attempts:
        body = problem(response, 404, "not_found")
        # Indistinguishable from a tenant that does not exist.
        assert {k: v for k, v in body.items() if k != "instance"} == {
            k: v for k, v in unknown.items() if k != "instance"
        }
    assert b.state() == b_before
    assert a.state() == a_before


@pytest.mark.parametrize("slug", ["nosuchtenant", "x" * 64, "UPPER", "a%20b", "x" * 1000])
def test_unknown_tenant_is_404(shared, slug):
    problem(shared.get(slug=slug), 404, "not_found")
    response = shared.post("publish", {"bundle": {}, "expected_version": 1}, slug=slug)
    problem(response, 404, "not_found")


def test_bad_token_answers_alike_for_known_and_unknown_tenants(shared):
    # Without a valid token nothing tells an outsider which tenants exist.
    known = problem(shared.get(auth="Bearer garbage"), 401, "unauthorized")
    unknown = problem(shared.get(slug="nosuchtenant", auth="Bearer garbage"), 401, "unauthorized")
    assert {k: v for k, v in known.items() if k != "instance"} == {
        k: v for k, v in unknown.items() if k != "instance"
    }
    problem(shared.get(slug="nosuchtenant", auth=None), 401, "unauthorized")


# -- authorisation ----------------------------------------------------------------------------


def test_read_only_token_can_read_but_not_change(shared):
    token = shared.bearer(shared.new_token(read_only=True))
    assert shared.get(auth=token).status_code == 200
    assert shared.get("versions", auth=token).status_code == 200
    before = shared.state()
    bundle = with_field(shared.current()["bundle"], "customer", text_field("nickname"))
    for path, body in (
        ("publish", {"bundle": bundle, "expected_version": 1}),
        ("rollback", {"to_version": 1, "expected_version": 1}),
        ("plan", {"bundle": bundle}),
        ("validate", {"bundle": bundle}),
    ):
        detail = problem(shared.post(path, body, auth=token), 403, "forbidden")["detail"]
        assert "read-only" in detail
    assert shared.state() == before


def test_member_without_manage_metadata_cannot_publish(shared):
    token = shared.bearer(shared.new_token(shared.add_member(["sales_rep"])))
    assert shared.get(auth=token).status_code == 200
    before = shared.state()
    bundle = with_field(shared.current()["bundle"], "customer", text_field("nickname"))
    for path, body in (
        ("publish", {"bundle": bundle, "expected_version": 1}),
        ("rollback", {"to_version": 1, "expected_version": 1}),
        ("plan", {"bundle": bundle}),
        ("validate", {"bundle": bundle}),
    ):
        detail = problem(shared.post(path, body, auth=token), 403, "forbidden")["detail"]
        assert "manage_metadata" in detail
    assert shared.state() == before


def test_member_with_unknown_role_cannot_publish(shared):
    token = shared.bearer(shared.new_token(shared.add_member(["no_such_role"])))
    before = shared.state()
    response = shared.post(
        "publish", {"bundle": shared.current()["bundle"], "expected_version": 1}, auth=token
    )
    problem(response, 403, "forbidden")
    assert shared.state() == before


def test_role_inheriting_manage_metadata_may_publish(api):
    bundle = copy.deepcopy(api.current()["bundle"])
    bundle["roles"].append(
        {"name": "deputy", "label": {"en": "Deputy"}, "inherits": ["admin"], "permissions": []}
    )
    assert api.publish(bundle).status_code == 201
    token = api.bearer(api.new_token(api.add_member(["deputy"])))
    bundle = with_field(api.current()["bundle"], "customer", text_field("nickname"))
    response = api.post("publish", {"bundle": bundle, "expected_version": 2}, auth=token)
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["created_by"].startswith("member-")


# -- refusals of publish ----------------------------------------------------------------------


def test_stale_expected_version_is_409_version_conflict(shared):
    bundle = with_field(shared.current()["bundle"], "customer", text_field("nickname"))
    before = shared.state()
    for expected in (0, 2, 7):
        response = shared.post("publish", {"bundle": bundle, "expected_version": expected})
        body = problem(response, 409, "version_conflict")
        assert body["current_version"] == 1
    response = shared.post("rollback", {"to_version": 1, "expected_version": 5})
    assert problem(response, 409, "version_conflict")["current_version"] == 1
    assert shared.state() == before


def test_purge_without_confirmation_is_409_and_with_it_applies(api):
    core = api.current()["bundle"]
    assert api.publish(with_field(core, "customer", text_field("nickname"))).status_code == 201
    assert api.publish(core).status_code == 201  # archives nickname
    before = api.state()
    body = problem(api.publish(core, purge=["customer.nickname"]), 409, "confirmation_required")
    assert [op["kind"] for op in body["operations"]] == ["purge_field"]
    assert all(op["destructive"] for op in body["operations"])
    assert api.state() == before
    response = api.publish(core, purge=["customer.nickname"], confirm_destructive=True)
    assert response.status_code == 201
    assert "nickname" not in field_names(api.current()["bundle"], "customer")


def test_data_check_failure_is_shown_by_plan_and_refused_by_publish(api):
    ids = insert_rows(api, "customer", {"name": "Acme"}, {"name": "Globex"})
    bundle = with_field(api.current()["bundle"], "customer", text_field("region", required=True))
    before = api.state()
    planned = api.post("plan", {"bundle": bundle}).get_json()
    assert planned["applicable"] is False
    (check,) = planned["checks"]
    assert check["count"] == 2
    assert sorted(check["sample_ids"]) == sorted(ids)
    assert "region" in check["message"]
    assert api.state() == before
    body = problem(api.publish(bundle), 422, "data_check_failed")
    (failure,) = body["failures"]
    assert failure["count"] == 2
    assert sorted(failure["sample_ids"]) == sorted(ids)
    assert "region" in failure["message"]
    assert failure["description"]
    assert body["detail"]
    assert api.state() == before


def test_invalid_metadata_is_422_with_pointer_and_message(shared):
    bundle = copy.deepcopy(shared.current()["bundle"])
    i = entity_index(bundle, "customer")
    fields = entity_doc(bundle, "customer")["fields"]
    fields.append({"name": "score", "type": "no_such_type", "label": {"en": "Score"}})
    before = shared.state()
    body = problem(shared.publish(bundle), 422, "invalid_metadata")
    where = f"/entities/{i}/fields/{len(fields) - 1}"
    assert any(p.startswith(where) for p in pointers(body)), body["errors"]
    assert shared.state() == before


def test_purging_what_does_not_exist_is_422(shared):
    before = shared.state()
    for purge in (["ghost"], ["customer.ghost"], ["ghost.field"], ["customer.name"]):
        body = problem(
            shared.publish(shared.current()["bundle"], purge=purge), 422, "invalid_metadata"
        )
        assert pointers(body)
    assert shared.state() == before


HOSTILE_NAMES = ["x; drop table t", "lead\n", "lеad", "a" * 64, "Lead", "1lead", "select", ""]


def test_hostile_entity_names_are_refused_with_pointers(shared):
    bundle = copy.deepcopy(shared.current()["bundle"])
    first = len(bundle["entities"])
    bundle["entities"].extend(new_entity(name) for name in HOSTILE_NAMES)
    expected = {f"/entities/{first + k}/name" for k in range(len(HOSTILE_NAMES))}
    before = shared.state()
    body = problem(shared.publish(bundle), 422, "invalid_metadata")
    assert expected <= set(pointers(body)), body["errors"]
    assert shared.state() == before
    validated = shared.post("validate", {"bundle": bundle}).get_json()
    assert validated["valid"] is False
    assert expected <= {e["pointer"] for e in validated["errors"]}


def test_hostile_field_names_are_refused_with_pointers(shared):
    bundle = with_field(
        shared.current()["bundle"], "customer", *(text_field("x") for _ in HOSTILE_NAMES)
    )
    fields = entity_doc(bundle, "customer")["fields"]
    first = len(fields) - len(HOSTILE_NAMES)
    for k, name in enumerate(HOSTILE_NAMES):
        fields[first + k]["name"] = name
    prefix = f"/entities/{entity_index(bundle, 'customer')}/fields/"
    expected = {f"{prefix}{first + k}/name" for k in range(len(HOSTILE_NAMES))}
    before = shared.state()
    body = problem(shared.publish(bundle), 422, "invalid_metadata")
    assert expected <= set(pointers(body)), body["errors"]
    assert shared.state() == before


def test_formula_fields_in_a_cycle_are_refused(shared):
    bundle = with_field(
        shared.current()["bundle"],
        "customer",
        formula("score_a", "score_b + 1", "integer"),
        formula("score_b", "score_a + 1", "integer"),
    )
    prefix = f"/entities/{entity_index(bundle, 'customer')}/fields/"
    before = shared.state()
    body = problem(shared.publish(bundle), 422, "invalid_metadata")
    cycle = [e for e in body["errors"] if "cycle" in e["message"]]
    assert cycle, body["errors"]
    assert all(e["pointer"].startswith(prefix) for e in cycle)
    assert shared.state() == before


def test_formula_fields_without_cycle_are_accepted(shared):
    bundle = with_field(
        shared.current()["bundle"],
        "customer",
        formula("double_value", "lifetime_value * 2", "decimal"),
        formula("quadruple_value", "double_value * 2", "decimal"),
    )
    before = shared.state()
    response = shared.post("plan", {"bundle": bundle})
    assert response.status_code == 200, response.get_data(as_text=True)
    operations = response.get_json()["operations"]
    assert [(op["kind"], op["field"]) for op in operations] == [
        ("add_virtual_field", "double_value"),
        ("add_virtual_field", "quadruple_value"),
    ]
    assert shared.state() == before


# -- malformed requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "text/json"]
)
def test_wrong_content_type_is_415(shared, content_type):
    before = shared.state()
    data = '{"bundle": {}, "expected_version": 1}'
    response = shared.post("publish", data=data, content_type=content_type)
    problem(response, 415, "unsupported_media_type")
    assert shared.state() == before


def test_json_with_charset_parameter_is_accepted(shared):
    response = shared.post(
        "validate",
        data='{"bundle": {"format": 1, "entities": []}}',
        content_type="application/json; charset=utf-8",
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "data",
    [
        b'{"bundle": ',
        b"",
        b'{"bundle": {}, "bundle": {}, "expected_version": 1}',
        b'{"bundle": {"format": 1, "format": 1}, "expected_version": 1}',
        b'{"bundle": {}, "expected_version": NaN}',
        b'{"bundle": {}, "expected_version": Infinity}',
        b'{"bundle": {}, "expected_version": -Infinity}',
        b'{"bundle": "\xff\xfe", "expected_version": 1}',
        b"[" * 10_000 + b"]" * 10_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b"{'bundle': {}}",
    ],
    ids=[
        "truncated",
        "empty",
        "duplicate-key",
        "nested-duplicate-key",
        "nan",
        "infinity",
        "minus-infinity",
        "invalid-utf8",
        "deep-array",
        "deep-object",
        "single-quotes",
    ],
)
def test_malformed_json_is_400(shared, data):
    before = shared.state()
    for path in ("publish", "validate"):
        body = problem(shared.post(path, data=data), 400, "malformed_json")
        assert body["detail"]
    assert shared.state() == before


def test_body_over_max_request_bytes_is_413(shared):
    before = shared.state()
    data = b'{"bundle": "' + b"x" * (10 * 1024 * 1024) + b'", "expected_version": 1}'
    problem(shared.post("publish", data=data), 413, "payload_too_large")
    assert shared.state() == before


def test_body_over_bundle_limit_is_413(shared):
    # Under max_request_bytes (5 MB) but over the 4 MB bundle limit: too large, not malformed.
    before = shared.state()
    data = b'{"bundle": {}, "comment": "' + b"x" * (4 * 1024 * 1024 + 512) + b'"}'
    problem(shared.post("publish", data=data), 413, "payload_too_large")
    assert shared.state() == before


@pytest.mark.parametrize("data", [b"[]", b'[{"bundle": {}}]', b'"bundle"', b"1", b"null"])
def test_body_that_is_not_an_object_is_400(shared, data):
    before = shared.state()
    for path in ("publish", "plan", "validate", "rollback"):
        problem(shared.post(path, data=data), 400, "bad_request")
    assert shared.state() == before


@pytest.mark.parametrize("value", ["1", True, False, 1.0, None, [1], {"v": 1}])
def test_expected_version_of_wrong_type_is_422(shared, value):
    before = shared.state()
    body = {"bundle": shared.current()["bundle"], "expected_version": value}
    response = problem(shared.post("publish", body), 422, "validation_failed")
    assert pointers(response) == ["/expected_version"]
    assert shared.state() == before


def test_missing_expected_version_is_422(shared):
    response = shared.post("publish", {"bundle": shared.current()["bundle"]})
    assert pointers(problem(response, 422, "validation_failed")) == ["/expected_version"]


@pytest.mark.parametrize(
    "extra, where",
    [
        ({"bundle": []}, "/bundle"),
        ({"bundle": "x"}, "/bundle"),
        ({"comment": 5}, "/comment"),
        ({"confirm_destructive": "yes"}, "/confirm_destructive"),
        ({"confirm_destructive": 1}, "/confirm_destructive"),
        ({"purge": "customer.name"}, "/purge"),
        ({"purge": [1]}, "/purge"),
        ({"purge": ["x" * 200]}, "/purge"),
    ],
)
def test_publish_fields_of_wrong_type_are_422(shared, extra, where):
    before = shared.state()
    body = {"bundle": shared.current()["bundle"], "expected_version": 1, **extra}
    response = problem(shared.post("publish", body), 422, "validation_failed")
    assert pointers(response) == [where]
    assert shared.state() == before


def test_rollback_to_version_of_wrong_type_is_422(shared):
    before = shared.state()
    for value in ("1", True, None):
        body = problem(
            shared.post("rollback", {"to_version": value, "expected_version": 1}),
            422,
            "validation_failed",
        )
        assert pointers(body) == ["/to_version"]
    assert shared.state() == before


# -- routing and internal errors --------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/t/x/api/v1/", "/t/x/api/v1/nothing", "/t/x/api/v2/meta/", "/nothing"]
)
def test_unknown_route_is_404_problem(app, path):
    problem(app.test_client().get(path), 404, "not_found")


def test_unknown_route_under_real_tenant_is_404_problem(shared):
    problem(shared.get("nothing"), 404, "not_found")
    problem(shared.get("versions/abc"), 404, "not_found")
    problem(shared.get("versions/-1"), 404, "not_found")


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("GET", "publish", "POST"),
        ("PUT", "", "GET"),
        ("DELETE", "", "GET"),
        ("DELETE", "versions/1", "GET"),
        ("POST", "versions", "GET"),
        ("GET", "rollback", "POST"),
    ],
)
def test_wrong_method_is_405_problem_with_allow(shared, method, path, allowed):
    before = shared.state()
    response = shared.client.open(shared.url(path), method=method, headers=shared.headers(DEFAULT))
    problem(response, 405, "method_not_allowed")
    assert allowed in response.headers.get("Allow", "")
    assert shared.state() == before


def test_internal_error_is_500_problem_without_details(shared, monkeypatch, caplog):
    def broken(connection: Any) -> Any:
        raise sa.exc.OperationalError(
            "SELECT secret_column FROM meta_version", {}, Exception("disk on fire")
        )

    monkeypatch.setattr(metastore, "history", broken)
    body = problem(shared.get("versions"), 500, "internal_error")
    assert "disk on fire" not in str(body)
    assert "secret_column" not in str(body)
    assert "unhandled error" in caplog.text
