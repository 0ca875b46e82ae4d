"""Record export through the API: permissions, scope, hidden fields, CSV safety, audit, alerts.

One tenant per backend from the ``core`` template, with nested teams (``east`` >
``north``, and ``west``), a member per built-in role and one customer per
owner. The bundle hides ``phone`` from sales managers (on their own customer
grant and the inherited sales rep one), so a manager's export must not carry it
while an admin's does. ``mass_export_rows`` is 5 here: the admin's export of the
six customers is a mass export, the manager's three are not.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from werkzeug.test import TestResponse

from metacrm.runtime import metastore, records, tokens
from metacrm.runtime.api import export
from metacrm.runtime.control import Membership, Team, Tenant, User
from metacrm.runtime.platform import Platform
from metacrm.runtime.recordview import SYSTEM_FIELDS
from metacrm.runtime.store import audit, notification, outbox

from ...conftest import BACKENDS, make_settings
from .test_api_meta import build_app, make_tenant, private_control_database, problem

MEMBERS = {
    "admin": (("admin",), None),
    "manager": (("sales_manager",), "east"),
    "rep_east": (("sales_rep",), "east"),
    "rep_north": (("sales_rep",), "north"),
    "rep_west": (("sales_rep",), "west"),
    "agent": (("service_agent",), "west"),
    "reader": (("read_only",), None),
}
OWNERS = ("admin", "manager", "rep_east", "rep_north", "rep_west", "agent")
#: Whose customers each member may export (None: the export is refused with 403).
EXPORTS: dict[str, set[str] | None] = {
    "admin": set(OWNERS),
    "manager": {"manager", "rep_east", "rep_north"},
    "rep_east": None,
    "rep_north": None,
    "rep_west": None,
    "agent": None,
    "reader": None,
}
NAMES = {
    "admin": "Admin Holdings",
    "manager": "上海 客户 Ltd",
    "rep_east": '=HYPERLINK("http://evil.example","click")',
    "rep_north": "@SUM(A1:A9)",
    "rep_west": "-2+3",
    "agent": "+cmd|' /C calc'!A0",
}
MASS = 5


@dataclass
class World:
    app: Flask
    platform: Platform
    tenant: Tenant
    users: dict[str, User] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    customers: dict[str, str] = field(default_factory=dict)

    def export(self, who: str, entity: str = "customer", **query: str) -> TestResponse:
        return self.app.test_client().get(
            f"/t/{self.tenant.slug}/api/v1/records/{entity}/export",
            headers={"Authorization": f"Bearer {self.tokens[who]}"},
            query_string=query,
        )

    def state(self) -> list[Any]:
        """Every record, audit entry, outbox event and notification of the tenant."""
        store = self.platform.store(self.tenant)
        with store.connect() as connection:
            model = self.platform.models.current(store, connection)
            tables = [e.table for e in model.entities.values()] + [audit, outbox, notification]
            return [
                sorted(map(repr, connection.execute(sa.select(t)).all()), key=str) for t in tables
            ]

    def audit_entries(self, after: int = 0) -> list[Any]:
        store = self.platform.store(self.tenant)
        with store.connect() as connection:
            return connection.execute(
                sa.select(audit).where(audit.c.seq > after).order_by(audit.c.seq)
            ).all()

    def last_seq(self) -> int:
        store = self.platform.store(self.tenant)
        with store.connect() as connection:
            return connection.execute(sa.select(sa.func.max(audit.c.seq))).scalar_one() or 0

    def mass_alerts(self) -> list[Any]:
        store = self.platform.store(self.tenant)
        with store.connect() as connection:
            return connection.execute(
                sa.select(notification).where(notification.c.kind == export.NOTIFICATION_KIND)
            ).all()

    def owner(self, record_id: str) -> str:
        return next(o for o, i in self.customers.items() if i == record_id)


def _bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    """The core bundle with ``phone`` hidden on every customer grant of the sales manager."""
    bundle = copy.deepcopy(bundle)
    for role in bundle["roles"]:
        if role["name"] in ("sales_rep", "sales_manager"):
            for grant in role["permissions"]:
                if grant["entity"] == "customer":
                    grant["fields"] = {"phone": "hidden"}
    return bundle


@pytest.fixture(scope="module", params=BACKENDS)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    with private_control_database(request.param) as database:
        folder = tmp_path_factory.mktemp("export")
        settings = make_settings(
            request.param,
            folder,
            request,
            api_rate_limit="100000 per minute",
            mass_export_rows=MASS,
            **database,
        )
        p = Platform(settings)
        p.init_control()
        try:
            with build_app(settings) as app:
                api = make_tenant(p, app)
                store = p.store(api.tenant)
                with store.connect() as connection:
                    current = metastore.current(connection)
                metastore.publish(store, _bundle(current.bundle), expected_version=current.version)
                w = World(app, p, api.tenant)
                teams: dict[str, uuid.UUID] = {}
                with p.session() as session:
                    east = Team(tenant_id=api.tenant.id, name="east", label="East")
                    session.add(east)
                    session.flush()
                    north = Team(
                        tenant_id=api.tenant.id, name="north", label="North", parent_id=east.id
                    )
                    west = Team(tenant_id=api.tenant.id, name="west", label="West")
                    session.add_all([north, west])
                    session.flush()
                    teams = {"east": east.id, "north": north.id, "west": west.id}
                    for name, (roles, team) in MEMBERS.items():
                        if name == "admin":
                            user = session.get(User, api.admin.id)
                            assert user is not None
                        else:
                            user = User(
                                email=f"{name}@{api.tenant.slug}.example", display_name=name
                            )
                            session.add(user)
                            session.flush()
                            session.add(
                                Membership(
                                    tenant_id=api.tenant.id,
                                    user_id=user.id,
                                    roles=list(roles),
                                    team_id=teams[team] if team else None,
                                )
                            )
                        session.flush()
                        w.users[name] = user
                        _, w.tokens[name] = tokens.create_token(session, api.tenant, user, "export")
                with store.begin() as connection:
                    model = p.models.current(store, connection)
                    for index, owner in enumerate(OWNERS):
                        user = w.users[owner]
                        team = MEMBERS[owner][1]
                        caller = records.Caller(user.id, user.email, teams[team] if team else None)
                        created = records.create(
                            connection,
                            model,
                            model.entities["customer"],
                            {
                                "name": NAMES[owner],
                                "phone": f"+86 21 5550 000{index}",
                                "lifetime_value": f"{100 + index}.50",
                                "city": "-12.50",
                            },
                            caller,
                            p.cipher,
                        )
                        w.customers[owner] = created["id"]
                yield w
        finally:
            p.close()


def csv_rows(response: TestResponse) -> list[dict[str, str]]:
    assert response.status_code == 200, response.get_data(as_text=True)[:1000]
    assert response.mimetype == "text/csv"
    text = response.get_data().decode("utf-8")
    return list(csv.DictReader(io.StringIO(text.removeprefix("\ufeff"))))


def jsonl_rows(response: TestResponse) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.get_data(as_text=True)[:1000]
    assert response.mimetype == "application/x-ndjson"
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


# -- who may export what ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
@pytest.mark.parametrize("who", tuple(MEMBERS))
def test_each_role_exports_exactly_its_scope_or_is_refused(
    world: World, who: str, kind: str
) -> None:
    before = world.state()
    response = world.export(who, format=kind)
    expected = EXPORTS[who]
    if expected is None:
        body = problem(response, 403, "forbidden")
        assert "export" in body["detail"]
        assert world.state() == before  # no audit entry, no alert, nothing else
        return
    rows = csv_rows(response) if kind == "csv" else jsonl_rows(response)
    assert {world.owner(r["id"]) for r in rows} == expected
    assert len(rows) == len(expected)
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Disposition"].startswith('attachment; filename="customer-')


def test_every_export_is_audited_with_its_row_count(world: World) -> None:
    seq = world.last_seq()
    alerts = len(world.mass_alerts())
    rows = csv_rows(world.export("manager", filter='city = "-12.50"', sort="name", fields="name"))
    assert len(rows) == 3
    (entry,) = world.audit_entries(seq)
    assert entry.action == "record.export"
    assert entry.entity == "customer"
    assert entry.actor_id == world.users["manager"].id
    assert entry.detail == {
        "format": "csv",
        "filter": 'city = "-12.50"',
        "sort": "name",
        "fields": ["name"],
        "rows": 3,
        "complete": True,
        "mass": False,
        "mass_export_rows": MASS,
    }
    assert len(world.mass_alerts()) == alerts  # three rows are no mass export


def test_a_mass_export_alerts_the_admins_and_is_audited_as_such(world: World) -> None:
    seq = world.last_seq()
    alerts = len(world.mass_alerts())
    assert len(jsonl_rows(world.export("admin", format="jsonl"))) == len(OWNERS)
    (entry,) = world.audit_entries(seq)
    assert entry.action == "record.export"
    assert entry.detail["rows"] == len(OWNERS) and entry.detail["mass"] is True
    found = world.mass_alerts()
    assert len(found) == alerts + 1
    alert = found[-1]
    assert alert.capability == "manage_users" and alert.user_id is None
    assert "more than 5 'customer' records" in alert.message["en"]
    assert "超过 5 条" in alert.message["zh-CN"]
    # The admin sees it in the inbox API.
    inbox = world.app.test_client().get(
        f"/t/{world.tenant.slug}/api/v1/notifications",
        headers={"Authorization": f"Bearer {world.tokens['admin']}"},
    )
    assert inbox.status_code == 200
    assert any(n["kind"] == export.NOTIFICATION_KIND for n in inbox.get_json()["items"])


def test_an_export_read_in_keyset_batches_never_uses_offset(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "BATCH", 2)
    statements: list[str] = []
    # The application's own platform, whose engine serves the request.
    store = world.app.extensions["metacrm"].store(world.tenant)

    def capture(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    engine = store.engine
    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        rows = jsonl_rows(world.export("admin", format="jsonl", sort="name"))
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    listed = world.app.test_client().get(
        f"/t/{world.tenant.slug}/api/v1/records/customer",
        headers={"Authorization": f"Bearer {world.tokens['admin']}"},
        query_string={"sort": "name", "limit": "100"},
    )
    assert [r["id"] for r in rows] == [i["id"] for i in listed.get_json()["items"]]
    selects = [s for s in statements if "lifetime_value" in s and s.lstrip().startswith("SELECT")]
    assert len(selects) == 3  # 6 rows, 2 per batch (each asks for 3 to know if more follow)
    assert all("LIMIT 3" in s for s in selects)
    assert not any("OFFSET" in s.upper() for s in statements)


def test_a_client_that_goes_away_is_audited_as_incomplete(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "BATCH", 2)
    seq = world.last_seq()
    response = world.app.test_client().get(
        f"/t/{world.tenant.slug}/api/v1/records/customer/export",
        headers={"Authorization": f"Bearer {world.tokens['admin']}"},
        query_string={"format": "jsonl"},
        buffered=False,
    )
    chunks = iter(response.response)
    first = next(chunks)
    assert len(first.splitlines()) == 2
    response.close()
    (entry,) = world.audit_entries(seq)
    assert entry.detail["rows"] == 2 and entry.detail["complete"] is False
    assert entry.detail["mass"] is False


# -- what an export shows -------------------------------------------------------------------------


def test_hidden_fields_never_appear_and_are_refused_like_unknown_ones(world: World) -> None:
    manager = world.export("manager")
    text = manager.get_data().decode("utf-8")
    rows = csv_rows(manager)
    # The phone numbers themselves (their digits alone also occur inside random UUIDs).
    assert "phone" not in rows[0] and "21 5550" not in text
    assert "phone" not in jsonl_rows(world.export("manager", format="jsonl"))[0]
    admin = csv_rows(world.export("admin"))
    assert {r["phone"] for r in admin} == {f"'+86 21 5550 000{i}" for i in range(len(OWNERS))}
    before = world.state()
    for query, code in (
        ({"fields": "name,phone"}, "invalid_fields"),
        ({"filter": 'phone = "+86 21 5550 0001"'}, "invalid_filter"),
        ({"sort": "phone"}, "invalid_sort"),
    ):
        hidden = problem(world.export("manager", **query), 400, "invalid_query")
        assert hidden["query_code"] == code
        assert "5550" not in json.dumps(hidden)
        unknown = {k: v.replace("phone", "nosuchfield") for k, v in query.items()}
        other = problem(world.export("manager", **unknown), 400, "invalid_query")
        assert other["query_code"] == code
        # The same words as for a field that does not exist (a suggestion may follow).
        same = hidden["detail"].split(";")[0].replace("phone", "nosuchfield")
        assert same == other["detail"].split(";")[0]
        assert "phone" not in hidden["detail"].split(";", 1)[-1]
    assert world.state() == before


def test_csv_cells_cannot_run_as_formulas_and_bom_is_optional(world: World) -> None:
    plain = world.export("admin", sort="name", fields="name,city,lifetime_value")
    assert not plain.get_data().startswith(b"\xef\xbb\xbf")
    rows = {world.owner(r["id"]): r for r in csv_rows(plain)}
    assert rows["rep_east"]["name"] == "'" + NAMES["rep_east"]
    assert rows["rep_north"]["name"] == "'@SUM(A1:A9)"
    assert rows["rep_west"]["name"] == "'-2+3"
    assert rows["agent"]["name"] == "'+cmd|' /C calc'!A0"
    assert rows["manager"]["name"] == NAMES["manager"]
    assert rows["admin"]["city"] == "-12.50"  # a plain number is no formula
    header = plain.get_data(as_text=True).splitlines()[0].split(",")
    assert header == [*SYSTEM_FIELDS, "name", "city", "lifetime_value"]
    excel = world.export("admin", bom="true", fields="name")
    body = excel.get_data()
    assert body.startswith(b"\xef\xbb\xbf")
    assert "上海 客户 Ltd".encode() in body
    # JSON Lines keep the values as they are: JSON is no spreadsheet.
    lines = {world.owner(r["id"]): r for r in jsonl_rows(world.export("admin", format="jsonl"))}
    assert lines["rep_east"]["name"] == NAMES["rep_east"]


@pytest.mark.parametrize(
    "value,cell",
    [
        (None, ""),
        (True, "true"),
        (12, "12"),
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1", "-1"),
        ("-1.5", "-1.5"),
        ("-1e5", "'-1e5"),
        ("@x", "'@x"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("a=b", "a=b"),
        (["=x"], '["=x"]'),
        ({"amount": "1.00"}, '{"amount": "1.00"}'),
    ],
)
def test_csv_cell(value: Any, cell: str) -> None:
    assert export.csv_cell(value) == cell


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query,status,code,pointer",
    [
        ({"format": "xml"}, 400, "invalid_query", "/format"),
        ({"format": "CSV"}, 400, "invalid_query", "/format"),
        ({"format": "jsonl", "bom": "true"}, 400, "invalid_query", "/bom"),
        ({"bom": "yes"}, 400, "invalid_query", "/bom"),
        ({"limit": "10"}, 400, "invalid_query", "/limit"),
        ({"fitler": 'name = "x"'}, 400, "invalid_query", "/fitler"),
        ({"filter": "name = "}, 400, "invalid_query", "/filter"),
        ({"filter": "name = 'x' or 1=1; DROP TABLE customer"}, 400, "invalid_query", "/filter"),
        ({"filter": "(" * 5000 + "true" + ")" * 5000}, 400, "invalid_query", "/filter"),
        ({"filter": "x\x00"}, 400, "invalid_query", "/filter"),
        ({"sort": "-nosuch"}, 400, "invalid_query", "/sort"),
        ({"fields": "name,,"}, 400, "invalid_query", "/fields"),
    ],
)
def test_bad_input_is_a_precise_problem_and_changes_nothing(
    world: World, query: dict[str, str], status: int, code: str, pointer: str
) -> None:
    before = world.state()
    body = problem(world.export("admin", **query), status, code)
    assert [e["pointer"] for e in body.get("errors", [])][:1] == [pointer]
    assert world.state() == before


def test_repeated_parameters_unknown_entities_and_strangers_are_refused(world: World) -> None:
    before = world.state()
    client = world.app.test_client()
    base = f"/t/{world.tenant.slug}/api/v1/records"
    auth = {"Authorization": f"Bearer {world.tokens['admin']}"}
    problem(
        client.get(f"{base}/customer/export?format=csv&format=jsonl", headers=auth),
        400,
        "invalid_query",
    )
    problem(client.get(f"{base}/nosuch/export", headers=auth), 404, "not_found")
    problem(client.get(f"{base}/{'x' * 5000}/export", headers=auth), 404, "not_found")
    problem(client.get(f"{base}/customer/export"), 401, "unauthorized")
    wrong = {"Authorization": "Bearer mct_" + "0" * 40}
    problem(client.get(f"{base}/customer/export", headers=wrong), 401, "unauthorized")
    problem(
        client.get("/t/nosuchtenant/api/v1/records/customer/export", headers=auth),
        404,
        "not_found",
    )
    assert world.state() == before


def test_the_openapi_document_lists_the_export(world: World) -> None:
    document = world.app.test_client().get(
        f"/t/{world.tenant.slug}/api/v1/openapi.json",
        headers={"Authorization": f"Bearer {world.tokens['manager']}"},
    )
    assert document.status_code == 200
    operation = document.get_json()["paths"]["/records/customer/export"]["get"]
    names = {p.get("name") for p in operation["parameters"]}
    assert {"format", "sort", "fields", "bom"} <= names
    assert "phone" not in json.dumps(operation)  # hidden from the manager, even in patterns


def test_token_scopes_and_other_tenants(world: World) -> None:
    """A read-only token may export; an entity-limited one only its entities; nothing crosses
    tenants."""
    p = world.platform
    with p.session() as session:
        admin = session.get(User, world.users["admin"].id)
        assert admin is not None
        _, reading = tokens.create_token(session, world.tenant, admin, "ro", read_only=True)
        _, contacts = tokens.create_token(
            session, world.tenant, admin, "contacts", entities=["contact"]
        )
    client = world.app.test_client()
    base = f"/t/{world.tenant.slug}/api/v1/records"
    exported = client.get(f"{base}/customer/export", headers={"Authorization": f"Bearer {reading}"})
    assert len(csv_rows(exported)) == len(OWNERS)
    before = world.state()
    refused = client.get(f"{base}/customer/export", headers={"Authorization": f"Bearer {contacts}"})
    assert "customer" in problem(refused, 403, "forbidden")["detail"]
    assert world.state() == before
    other = make_tenant(p, world.app)
    foreign = client.get(
        f"/t/{other.slug}/api/v1/records/customer/export",
        headers={"Authorization": f"Bearer {world.tokens['admin']}"},
    )
    problem(foreign, 404, "not_found")
    theirs = client.get(
        f"{base}/customer/export", headers={"Authorization": f"Bearer {other.token}"}
    )
    problem(theirs, 404, "not_found")
    assert world.state() == before
