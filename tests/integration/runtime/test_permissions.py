"""The permission matrix: each built-in role x entity x action through the record API.

One tenant per backend from the ``core`` template, with nested teams
(``east`` > ``north``, and ``west``) and a member per role. Every owner has one
record of each entity (all carrying the module's marker), so for each role the
test knows exactly which rows it must see, change or delete: ``own`` is the
member's records, ``team`` those of its team and the teams below it (and its
own), ``all`` everything. A record outside the scope answers 404 exactly like a
missing one; an action the role lacks answers 403; every refusal leaves the
tenant's rows (records, audit, outbox) as they were.

Field-level security is checked on a role added to the bundle (``sales_rep``'s
customer grant hides ``phone`` and keeps ``lifetime_value`` read-only), and an
explicit deny on a role that inherits ``sales_rep``.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from werkzeug.test import TestResponse

from metacrm.runtime import metastore, records, tokens
from metacrm.runtime.control import Membership, Team, Tenant, User
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import audit, outbox

from ...conftest import BACKENDS, make_settings
from .test_api_meta import build_app, make_tenant, no_leak, private_control_database, problem

ENTITIES = ("customer", "contact", "deal", "interaction", "task")
#: Record owners: who holds which role, in which team.
MEMBERS = {
    "admin": (("admin",), None),
    "manager": (("sales_manager",), "east"),
    "rep_east": (("sales_rep",), "east"),
    "rep_north": (("sales_rep",), "north"),
    "rep_west": (("sales_rep",), "west"),
    "agent": (("service_agent",), "west"),
    "reader": (("read_only",), None),
    "intern": (("intern",), "east"),
}
OWNERS = ("admin", "manager", "rep_east", "rep_north", "rep_west", "agent")
#: Teams below each team (nested): the ``team`` scope of a member of the key.
TEAMS_WITHIN = {"east": {"east", "north"}, "north": {"north"}, "west": {"west"}, None: set()}

_ALL = {entity: "all" for entity in ENTITIES}
_TEAM = {entity: "team" for entity in ENTITIES}
_OWN = {entity: "own" for entity in ENTITIES}
_NONE: dict[str, str | None] = {entity: None for entity in ENTITIES}
#: The built-in roles' scopes (issue 4): role -> action -> entity -> scope.
EXPECTED: dict[str, dict[str, dict[str, str | None]]] = {
    "admin": {"read": _ALL, "update": _ALL, "delete": _ALL, "create": _ALL},
    "manager": {"read": _TEAM, "update": _TEAM, "delete": _TEAM, "create": _OWN},
    "rep_east": {"read": _OWN, "update": _OWN, "delete": _OWN, "create": _OWN},
    "rep_north": {"read": _OWN, "update": _OWN, "delete": _OWN, "create": _OWN},
    "rep_west": {"read": _OWN, "update": _OWN, "delete": _OWN, "create": _OWN},
    "agent": {
        "read": {**_NONE, "customer": "all", "contact": "all", "interaction": "own", "task": "own"},
        "update": {**_NONE, "interaction": "own", "task": "own"},
        "delete": _NONE,
        "create": {**_NONE, "interaction": "own", "task": "own"},
    },
    "reader": {"read": _ALL, "update": _NONE, "delete": _NONE, "create": _NONE},
    "intern": {"read": _OWN, "update": _OWN, "delete": _NONE, "create": _OWN},
}
ROLES = tuple(EXPECTED)
TITLE = {"interaction": "subject", "task": "subject"}


@dataclass
class Matrix:
    app: Flask
    platform: Platform
    tenant: Tenant
    marker: str
    users: dict[str, User] = field(default_factory=dict)
    teams: dict[str, uuid.UUID] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    #: entity -> owner -> record id
    records: dict[str, dict[str, str]] = field(default_factory=dict)

    def call(
        self,
        who: str,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        **kw: Any,
    ) -> TestResponse:
        headers = {"Authorization": f"Bearer {token or self.tokens[who]}"}
        return self.app.test_client().open(
            f"/t/{self.tenant.slug}/api/v1/records/{path}",
            method=method,
            headers=headers,
            json=body,
            **kw,
        )

    def state(self) -> list[Any]:
        store = self.platform.store(self.tenant)
        with store.connect() as connection:
            model = self.platform.models.current(store, connection)
            tables = [e.table for e in model.entities.values()] + [audit, outbox]
            return [
                sorted(map(repr, connection.execute(sa.select(t)).all()), key=str) for t in tables
            ]

    def owner_of(self, entity: str, record_id: str) -> str:
        return next(o for o, i in self.records[entity].items() if i == record_id)


def _secure_bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    """The core bundle with field security on sales_rep and an ``intern`` role with a deny."""
    bundle = copy.deepcopy(bundle)
    for role in bundle["roles"]:
        if role["name"] == "sales_rep":
            for grant in role["permissions"]:
                if grant["entity"] == "customer":
                    grant["fields"] = {"phone": "hidden", "lifetime_value": "read_only"}
    bundle["roles"].append(
        {
            "name": "intern",
            "label": {"en": "Intern", "zh-CN": "实习生"},
            "inherits": ["sales_rep"],
            "permissions": [
                {"entity": "*", "actions": ["delete"], "scope": "all", "effect": "deny"}
            ],
        }
    )
    return bundle


def _values(entity: str, marker: str, owner: str, customer: str | None) -> dict[str, Any]:
    title = f"{marker} {entity} of {owner}"
    if entity == "customer":
        return {"name": title, "phone": "+86 21 5550 0001", "lifetime_value": "100.00"}
    if entity == "contact":
        return {"name": title, "customer": customer}
    if entity == "deal":
        return {"name": title, "customer": customer}
    if entity == "interaction":
        return {"subject": title, "occurred_at": "2026-01-05T09:00:00Z", "customer": customer}
    return {"subject": title}


def _make_records(m: Matrix, owner: str, marker: str) -> dict[str, str]:
    """Create one record of each entity owned by ``owner`` (as the platform, unrestricted)."""
    p = m.platform
    store = p.store(m.tenant)
    user = m.users[owner]
    team = MEMBERS[owner][1]
    caller = records.Caller(user.id, user.email, m.teams[team] if team else None)
    made: dict[str, str] = {}
    with store.begin() as connection:
        model = p.models.current(store, connection)
        for entity in ENTITIES:
            data = _values(entity, marker, owner, made.get("customer"))
            created = records.create(
                connection, model, model.entities[entity], data, caller, p.cipher
            )
            made[entity] = created["id"]
    return made


@pytest.fixture(scope="module", params=BACKENDS)
def matrix(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Matrix]:
    with private_control_database(request.param) as database:
        folder = tmp_path_factory.mktemp("permissions")
        # The matrix sends thousands of requests from one client address.
        settings = make_settings(
            request.param, folder, request, api_rate_limit="100000 per minute", **database
        )
        p = Platform(settings)
        p.init_control()
        try:
            with build_app(settings) as app:
                api = make_tenant(p, app)
                store = p.store(api.tenant)
                with store.connect() as connection:
                    current = metastore.current(connection)
                metastore.publish(
                    store, _secure_bundle(current.bundle), expected_version=current.version
                )
                m = Matrix(app, p, api.tenant, f"mk{uuid.uuid4().hex[:10]}")
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
                    m.teams = {"east": east.id, "north": north.id, "west": west.id}
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
                                    team_id=m.teams[team] if team else None,
                                )
                            )
                        session.flush()
                        m.users[name] = user
                        _, m.tokens[name] = tokens.create_token(session, api.tenant, user, "matrix")
                for owner in OWNERS:
                    for entity, record_id in _make_records(m, owner, m.marker).items():
                        m.records.setdefault(entity, {})[owner] = record_id
                yield m
        finally:
            p.close()


def visible_owners(who: str, scope: str | None) -> set[str]:
    """The owners whose records a member reaches with a scope."""
    if scope is None:
        return set()
    if scope == "all":
        return set(OWNERS)
    mine = {who} & set(OWNERS)
    if scope == "own":
        return mine
    teams = TEAMS_WITHIN[MEMBERS[who][1]]
    return mine | {o for o in OWNERS if MEMBERS[o][1] in teams}


def listed(m: Matrix, who: str, entity: str, **query: str) -> TestResponse:
    return m.call(who, "GET", entity, query_string={"q": m.marker, "limit": "100", **query})


def ids(response: TestResponse) -> set[str]:
    assert response.status_code == 200, response.get_data(as_text=True)[:500]
    return {item["id"] for item in response.get_json()["items"]}


# -- reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("entity", ENTITIES)
@pytest.mark.parametrize("who", ROLES)
def test_list_search_and_count_see_exactly_the_scope(matrix: Matrix, who: str, entity: str) -> None:
    scope = EXPECTED[who]["read"][entity]
    response = listed(matrix, who, entity)
    count = matrix.call(who, "GET", f"{entity}/count", query_string={"q": matrix.marker})
    if scope is None:
        problem(response, 403, "forbidden")
        problem(count, 403, "forbidden")
        return
    expected = {matrix.records[entity][o] for o in visible_owners(who, scope)}
    assert ids(response) == expected
    assert count.get_json() == {"count": len(expected), "exact": True}
    # A filter cannot widen the scope either: the scope is ANDed to it in SQL.
    wide = listed(matrix, who, entity, filter=f"{TITLE.get(entity, 'name')} != 'zzz'")
    assert ids(wide) == expected
    # Nor can the recycle bin: nothing of another owner is in it for the caller.
    binned = listed(matrix, who, entity, deleted="true")
    assert ids(binned) <= expected


@pytest.mark.parametrize("who", ["admin", "manager", "rep_north", "rep_west"])
def test_my_team_in_a_filter_covers_nested_teams(matrix: Matrix, who: str) -> None:
    """``team_id in my_team()`` means the caller's team and every team below it."""
    response = listed(matrix, who, "customer", filter="team_id in my_team()")
    reachable = visible_owners(who, EXPECTED[who]["read"]["customer"])
    teams = TEAMS_WITHIN[MEMBERS[who][1]]
    expected = {matrix.records["customer"][o] for o in reachable if MEMBERS[o][1] in teams}
    assert ids(response) == expected
    if who == "manager":
        # east > north: the manager's filter reaches the north rep's customer.
        assert matrix.records["customer"]["rep_north"] in expected


@pytest.mark.parametrize("entity", ENTITIES)
@pytest.mark.parametrize("who", ROLES)
def test_get_answers_404_outside_the_scope(matrix: Matrix, who: str, entity: str) -> None:
    scope = EXPECTED[who]["read"][entity]
    reach = visible_owners(who, scope)
    missing = matrix.call(who, "GET", f"{entity}/{uuid.uuid4()}")
    for owner, record_id in matrix.records[entity].items():
        response = matrix.call(who, "GET", f"{entity}/{record_id}")
        if scope is None:
            problem(response, 403, "forbidden")
        elif owner in reach:
            assert response.status_code == 200
            assert response.get_json()["owner_id"] == str(matrix.users[owner].id)
        else:
            body = problem(response, 404, "not_found")
            assert body["title"] == missing.get_json()["title"]
            no_leak(response)


@pytest.mark.parametrize("who", ROLES)
def test_related_lists_and_includes_keep_the_scope(matrix: Matrix, who: str) -> None:
    customers = EXPECTED[who]["read"]["customer"]
    contacts = EXPECTED[who]["read"]["contact"]
    for owner, customer_id in matrix.records["customer"].items():
        response = matrix.call(who, "GET", f"customer/{customer_id}/related/contact")
        if customers is None:
            problem(response, 403, "forbidden")
            continue
        if owner not in visible_owners(who, customers):
            problem(response, 404, "not_found")
            continue
        if contacts is None:
            problem(response, 403, "forbidden")
            continue
        expected = (
            {matrix.records["contact"][owner]} if owner in visible_owners(who, contacts) else set()
        )
        assert ids(response) == expected
    if contacts is None:
        return
    # An embedded customer the caller may not read is null, like a missing one.
    embedded = listed(matrix, who, "contact", include="customer")
    assert embedded.status_code == 200
    for item in embedded.get_json()["items"]:
        owner = matrix.owner_of("contact", item["id"])
        shown = item["_included"]["customer"]
        if customers is not None and owner in visible_owners(who, customers):
            assert shown is not None and shown["id"] == matrix.records["customer"][owner]
        else:
            assert shown is None


# -- writing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("entity", ENTITIES)
@pytest.mark.parametrize("who", ROLES)
def test_update_reaches_only_the_scope(matrix: Matrix, who: str, entity: str) -> None:
    scope = EXPECTED[who]["update"][entity]
    title = TITLE.get(entity, "name")
    for owner, record_id in matrix.records[entity].items():
        # The same title as stored: an allowed update changes nothing, a refused one 404s.
        same = {title: f"{matrix.marker} {entity} of {owner}"}
        before = matrix.state()
        response = matrix.call(who, "PATCH", f"{entity}/{record_id}", same)
        if scope is None:
            problem(response, 403, "forbidden")
        elif owner in visible_owners(who, scope):
            assert response.status_code == 200, response.get_data(as_text=True)[:500]
        else:
            problem(response, 404, "not_found")
        assert matrix.state() == before


@pytest.mark.parametrize("entity", ENTITIES)
@pytest.mark.parametrize("who", ROLES)
def test_bulk_update_and_delete_refuse_records_outside_the_scope(
    matrix: Matrix, who: str, entity: str
) -> None:
    title = TITLE.get(entity, "name")
    items = [
        {"id": record_id, "fields": {title: f"{matrix.marker} {entity} of {owner}"}}
        for owner, record_id in matrix.records[entity].items()
    ]
    before = matrix.state()
    updated = matrix.call(who, "PATCH", f"{entity}/bulk", {"items": items})
    deleted = matrix.call(who, "POST", f"{entity}/bulk/delete", {"ids": [i["id"] for i in items]})
    for action, response in (("update", updated), ("delete", deleted)):
        scope = EXPECTED[who][action][entity]
        reach = visible_owners(who, scope)
        if scope is None:
            problem(response, 403, "forbidden")
        elif reach == set(OWNERS) and action == "update":
            assert response.status_code == 200
        elif reach == set(OWNERS):
            continue  # an admin's bulk delete of everything would succeed: not run below
        else:
            body = problem(response, 422, "validation_failed")
            outside = {
                f"/{'items' if action == 'update' else 'ids'}/{index}"
                + ("/id" if action == "update" else "")
                for index, item in enumerate(items)
                if matrix.owner_of(entity, item["id"]) not in reach
            }
            assert {e["pointer"] for e in body["errors"]} == outside
    if EXPECTED[who]["delete"][entity] == "all":
        # Deleting everything succeeded: put it back for the other tests.
        assert deleted.status_code == 204
        for record_id in [i["id"] for i in items]:
            restored = matrix.call("admin", "POST", f"{entity}/{record_id}/restore")
            assert restored.status_code == 200
        return
    assert matrix.state() == before


@pytest.mark.parametrize("entity", ENTITIES)
@pytest.mark.parametrize("who", ROLES)
def test_delete_restore_and_purge_follow_the_scope(matrix: Matrix, who: str, entity: str) -> None:
    """Fresh records per owner: deleting one in scope works, outside it is a 404."""
    scope = EXPECTED[who]["delete"][entity]
    fresh_marker = f"fresh{uuid.uuid4().hex[:10]}"  # not found by the lists' q=marker
    fresh = {owner: _make_records(matrix, owner, fresh_marker)[entity] for owner in OWNERS}
    for owner, record_id in fresh.items():
        before = matrix.state()
        response = matrix.call(who, "DELETE", f"{entity}/{record_id}")
        if scope is None:
            problem(response, 403, "forbidden")
            assert matrix.state() == before
        elif owner in visible_owners(who, scope):
            assert response.status_code == 204
            assert matrix.call(who, "POST", f"{entity}/{record_id}/restore").status_code == 200
            assert matrix.call(who, "DELETE", f"{entity}/{record_id}").status_code == 204
            purged = matrix.call(who, "DELETE", f"{entity}/{record_id}/purge")
            assert purged.status_code in (204, 409), purged.get_data(as_text=True)
        else:
            problem(response, 404, "not_found")
            assert matrix.state() == before
            # In the bin (deleted by the admin) it stays out of reach too.
            assert matrix.call("admin", "DELETE", f"{entity}/{record_id}").status_code == 204
            before = matrix.state()
            problem(matrix.call(who, "POST", f"{entity}/{record_id}/restore"), 404, "not_found")
            problem(matrix.call(who, "DELETE", f"{entity}/{record_id}/purge"), 404, "not_found")
            problem(
                matrix.call(who, "GET", f"{entity}/{record_id}", query_string={"deleted": "true"}),
                404,
                "not_found",
            )
            assert matrix.state() == before


@pytest.mark.parametrize("entity", ENTITIES)
@pytest.mark.parametrize("who", ROLES)
def test_create_needs_the_create_action_and_owns_the_record(
    matrix: Matrix, who: str, entity: str
) -> None:
    scope = EXPECTED[who]["create"][entity]
    customer = matrix.records["customer"]["admin"] if entity != "customer" else None
    data = _values(entity, f"new{uuid.uuid4().hex[:10]}", who, customer)
    data.pop("phone", None)
    data.pop("lifetime_value", None)
    if entity in ("contact", "deal", "interaction"):
        data.pop("customer")
        if entity == "deal":
            data["customer"] = matrix.records["customer"][who if who in OWNERS else "admin"]
    before = matrix.state()
    response = matrix.call(who, "POST", entity, data)
    if scope is None:
        problem(response, 403, "forbidden")
        assert matrix.state() == before
        return
    assert response.status_code == 201, response.get_data(as_text=True)[:500]
    record = response.get_json()
    team = MEMBERS[who][1]
    assert record["owner_id"] == str(matrix.users[who].id)
    assert record["team_id"] == (str(matrix.teams[team]) if team else None)


# -- owners ---------------------------------------------------------------------------------------


def test_owner_id_is_assigned_only_within_the_scope(matrix: Matrix) -> None:
    m = matrix
    rep_east, rep_north, rep_west = (m.users[n].id for n in ("rep_east", "rep_north", "rep_west"))
    # A sales rep creates only for itself: anyone else is a 422 on /owner_id.
    for target in (rep_west, m.users["admin"].id, uuid.uuid4()):
        before = m.state()
        response = m.call("rep_east", "POST", "task", {"subject": "x", "owner_id": str(target)})
        body = problem(response, 422, "validation_failed")
        assert [e["pointer"] for e in body["errors"]] == ["/owner_id"]
        assert m.state() == before
    for bad in (42, "not-a-uuid", None, "x" * 500):
        response = m.call("rep_east", "POST", "task", {"subject": "x", "owner_id": bad})
        assert [e["pointer"] for e in problem(response, 422, "validation_failed")["errors"]] == [
            "/owner_id"
        ]
    mine = m.call("rep_east", "POST", "task", {"subject": "mine", "owner_id": str(rep_east)})
    assert mine.status_code == 201
    task = mine.get_json()
    # team_id is the platform's, never the client's.
    smuggled = m.call("rep_east", "PATCH", f"task/{task['id']}", {"team_id": str(m.teams["west"])})
    problem(smuggled, 422, "validation_failed")
    # Smuggling another owner into a PATCH of one's own record is refused.
    before = m.state()
    response = m.call("rep_east", "PATCH", f"task/{task['id']}", {"owner_id": str(rep_west)})
    problem(response, 422, "validation_failed")
    assert m.state() == before
    # A manager (team scope on update) hands the record to a member of its nested team ...
    handed = m.call("manager", "PATCH", f"task/{task['id']}", {"owner_id": str(rep_north)})
    assert handed.status_code == 200, handed.get_data(as_text=True)
    assert handed.get_json()["owner_id"] == str(rep_north)
    assert handed.get_json()["team_id"] == str(m.teams["north"])
    # ... and the previous owner no longer reaches it.
    problem(m.call("rep_east", "GET", f"task/{task['id']}"), 404, "not_found")
    # ... but not to another team.
    before = m.state()
    response = m.call("manager", "PATCH", f"task/{task['id']}", {"owner_id": str(rep_west)})
    problem(response, 422, "validation_failed")
    assert m.state() == before
    # The admin assigns to any active member, and the team follows the owner.
    moved = m.call("admin", "PATCH", f"task/{task['id']}", {"owner_id": str(rep_west)})
    assert moved.get_json()["team_id"] == str(m.teams["west"])
    assert m.call("rep_west", "GET", f"task/{task['id']}").status_code == 200


def test_a_sales_rep_cannot_edit_another_teams_record(matrix: Matrix) -> None:
    west = matrix.records["deal"]["rep_west"]
    before = matrix.state()
    response = matrix.call("rep_east", "PATCH", f"deal/{west}", {"name": "taken over"})
    problem(response, 404, "not_found")
    response = matrix.call("manager", "PATCH", f"deal/{west}", {"name": "taken over"})
    problem(response, 404, "not_found")
    assert matrix.state() == before


# -- credentials ---------------------------------------------------------------------------------


def test_read_only_and_entity_limited_tokens(matrix: Matrix) -> None:
    m = matrix
    with m.platform.session() as session:
        user = session.get(User, m.users["rep_east"].id)
        assert user is not None
        _, read_only = tokens.create_token(session, m.tenant, user, "ro", read_only=True)
        _, limited = tokens.create_token(session, m.tenant, user, "lim", entities=["customer"])
    own = m.records["customer"]["rep_east"]
    before = m.state()
    assert m.call("rep_east", "GET", f"customer/{own}", token=read_only).status_code == 200
    response = m.call("rep_east", "PATCH", f"customer/{own}", {"city": "x"}, token=read_only)
    problem(response, 403, "forbidden")
    assert m.call("rep_east", "GET", f"customer/{own}", token=limited).status_code == 200
    contact = m.records["contact"]["rep_east"]
    problem(m.call("rep_east", "GET", f"contact/{contact}", token=limited), 403, "forbidden")
    problem(m.call("rep_east", "GET", "contact", token=limited), 403, "forbidden")
    assert m.state() == before


# -- field-level security ------------------------------------------------------------------------


def test_hidden_fields_never_leave_the_server(matrix: Matrix) -> None:
    m = matrix
    own = m.records["customer"]["rep_east"]
    record = m.call("rep_east", "GET", f"customer/{own}").get_json()
    assert "phone" not in record and "name" in record
    assert all("phone" not in item for item in ids_items(listed(m, "rep_east", "customer")))
    # The manager inherits sales_rep, but its own grant does not hide the field: it sees it.
    seen = m.call("manager", "GET", f"customer/{own}").get_json()
    assert seen["phone"] == "+86 21 5550 0001"
    included = listed(m, "rep_east", "contact", include="customer").get_json()["items"]
    assert included and all("phone" not in (i["_included"]["customer"] or {}) for i in included)
    # Nor does a filter through a lookup reach it.
    hop = m.call("rep_east", "GET", "contact", query_string={"filter": "customer.phone = 'x'"})
    assert problem(hop, 400, "invalid_query")["query_code"] == "invalid_filter"
    assert "customer.phone" not in hop.get_json()["detail"].split("did you mean")[-1]
    allowed = m.call("manager", "GET", "contact", query_string={"filter": "customer.phone = 'x'"})
    assert allowed.status_code == 200
    # Quick search does not look into it: the rep's own customer is not found by its phone.
    assert ids(m.call("rep_east", "GET", "customer", query_string={"q": "5550 0001"})) == set()
    assert ids(m.call("manager", "GET", "customer", query_string={"q": "5550 0001"}))
    document = m.app.test_client().get(
        f"/t/{m.tenant.slug}/api/v1/openapi.json",
        headers={"Authorization": f"Bearer {m.tokens['rep_east']}"},
    )
    text = document.get_data(as_text=True)
    assert document.status_code == 200
    assert '"name"' in _schema(document, "customer.Record")
    assert '"phone"' not in _schema(document, "customer.Record")
    assert '"phone"' not in _schema(document, "customer.Patch")
    assert '"lifetime_value"' in text
    # The agent cannot read deals: they are not in its document at all.
    agent_doc = m.app.test_client().get(
        f"/t/{m.tenant.slug}/api/v1/openapi.json",
        headers={"Authorization": f"Bearer {m.tokens['agent']}"},
    )
    assert "/records/deal" not in agent_doc.get_data(as_text=True)


def _plain(text: str) -> str:
    """A refusal without its spelling suggestion (which depends on the name asked)."""
    return re.sub(r"; did you mean '[a-z_]+'\?", "", text)


def ids_items(response: TestResponse) -> list[dict[str, Any]]:
    assert response.status_code == 200
    return response.get_json()["items"]


def _schema(document: TestResponse, name: str) -> str:
    return json.dumps(document.get_json()["components"]["schemas"].get(name, {}))


@pytest.mark.parametrize(
    ("parameter", "hidden", "unknown"),
    [
        ("filter", "phone = 'x'", "qqqqq = 'x'"),
        ("sort", "phone", "qqqqq"),
        ("fields", "name,phone", "name,qqqqq"),
        ("include", "phone", "qqqqq"),
    ],
)
def test_hidden_fields_are_answered_like_unknown_ones(
    matrix: Matrix, parameter: str, hidden: str, unknown: str
) -> None:
    """Filter, sort, fields= and include= on a hidden field look exactly like an unknown field."""
    first = matrix.call("rep_east", "GET", "customer", query_string={parameter: hidden})
    second = matrix.call("rep_east", "GET", "customer", query_string={parameter: unknown})
    a, b = problem(first, 400, "invalid_query"), problem(second, 400, "invalid_query")
    assert a["query_code"] == b["query_code"]
    assert _plain(a["detail"]).replace("phone", "qqqqq") == _plain(b["detail"])
    assert "'phone'?" not in a["detail"]  # never suggested either
    shown = matrix.call("manager", "GET", "customer", query_string={parameter: hidden})
    assert shown.status_code == 200 or parameter == "include", shown.get_data(as_text=True)


def test_hidden_and_read_only_fields_are_refused_on_write(matrix: Matrix) -> None:
    m = matrix
    own = m.records["customer"]["rep_east"]
    before = m.state()
    hidden = m.call("rep_east", "PATCH", f"customer/{own}", {"phone": "1"})
    unknown = m.call("rep_east", "PATCH", f"customer/{own}", {"nosuch": "1"})
    a = problem(hidden, 422, "validation_failed")["errors"]
    b = problem(unknown, 422, "validation_failed")["errors"]
    assert [e["pointer"] for e in a] == ["/phone"] and [e["pointer"] for e in b] == ["/nosuch"]
    assert _plain(a[0]["message"]) == _plain(b[0]["message"]) == "is not a field of 'customer'"
    # A typo close to a hidden field does not suggest it.
    typo = m.call("rep_east", "PATCH", f"customer/{own}", {"phon": "1"})
    assert "phone" not in typo.get_data(as_text=True)
    locked = m.call("rep_east", "PATCH", f"customer/{own}", {"lifetime_value": "5.00"})
    assert problem(locked, 422, "validation_failed")["errors"] == [
        {"pointer": "/lifetime_value", "message": "is read-only for your role"}
    ]
    created = m.call("rep_east", "POST", "customer", {"name": "n", "phone": "1"})
    problem(created, 422, "validation_failed")
    assert m.state() == before
    # The manager may write both.
    done = m.call("manager", "PATCH", f"customer/{own}", {"lifetime_value": "100.00"})
    assert done.status_code == 200


def test_an_explicit_deny_wins_over_the_inherited_grant(matrix: Matrix) -> None:
    m = matrix
    made = m.call("intern", "POST", "task", {"subject": "intern task"})
    assert made.status_code == 201
    task = made.get_json()["id"]
    before = m.state()
    problem(m.call("intern", "DELETE", f"task/{task}"), 403, "forbidden")
    problem(m.call("intern", "POST", "task/bulk/delete", {"ids": [task]}), 403, "forbidden")
    assert m.state() == before
    assert m.call("intern", "PATCH", f"task/{task}", {"subject": "renamed"}).status_code == 200


# -- publishing ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_publish_changes_permissions_in_every_process(
    backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    """Two apps (each with its own model cache) on one database both follow a new version.

    Policies are keyed by the version each request's model lookup reads, so no
    process can keep deciding with the roles of an older publish.
    """
    with private_control_database(backend) as database:
        folder = tmp_path_factory.mktemp("publish")
        settings = make_settings(backend, folder, request, **database)
        p = Platform(settings)
        p.init_control()
        try:
            with build_app(settings) as first, build_app(settings) as second:
                api = make_tenant(p, first)
                with p.session() as session:
                    user = User(email=f"rep@{api.tenant.slug}.example", display_name="rep")
                    session.add(user)
                    session.flush()
                    session.add(
                        Membership(tenant_id=api.tenant.id, user_id=user.id, roles=["sales_rep"])
                    )
                    _, secret = tokens.create_token(session, api.tenant, user, "t")
                headers = {"Authorization": f"Bearer {secret}"}
                url = f"/t/{api.tenant.slug}/api/v1/records/task"
                for app in (first, second):
                    assert app.test_client().get(url, headers=headers).status_code == 200
                store = p.store(api.tenant)
                with store.connect() as connection:
                    current = metastore.current(connection)
                bundle = copy.deepcopy(current.bundle)
                for role in bundle["roles"]:
                    if role["name"] == "sales_rep":
                        role["permissions"].append(
                            {"entity": "task", "actions": ["read"], "effect": "deny"}
                        )
                metastore.publish(store, bundle, expected_version=current.version)
                for app in (first, second):
                    problem(app.test_client().get(url, headers=headers), 403, "forbidden")
        finally:
            p.close()
