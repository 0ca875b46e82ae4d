"""Record import through the API: files, columns, every refusal leaving the tenant as it was.

One tenant per backend from ``core``; the bundle gives sales managers the
``import`` action on customers and hides ``phone`` from them, so their header
must not be able to name it. Sales reps keep ``create`` without ``import``.
``max_import_bytes`` is 64 KiB here, so the size limit is reachable, and
``max_request_bytes`` 16 KiB, so an import is seen to be held to its own limit.
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

from metacrm.runtime import audittrail, metastore, tokens
from metacrm.runtime.control import Membership, Team, Tenant, User
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import audit, outbox

from ...conftest import BACKENDS, make_settings
from .conftest import snapshot
from .test_api_meta import (
    CHEAP_HASHER,
    Api,
    build_app,
    make_tenant,
    private_control_database,
    problem,
)
from .test_cross_tenant import PASSWORD, _signed_in

MAX_IMPORT = 64 * 1024
#: Smaller than the import limit: an import must not be held to it.
MAX_REQUEST = 16 * 1024
CSV = "text/csv"
JSONL = "application/x-ndjson"


@dataclass
class World:
    app: Flask
    platform: Platform
    tenant: Tenant
    users: dict[str, User] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)

    def post(
        self,
        body: bytes | str,
        who: str = "admin",
        content_type: str = CSV,
        entity: str = "customer",
        headers: dict[str, str] | None = None,
        **query: str,
    ) -> TestResponse:
        return self.app.test_client().post(
            f"/t/{self.tenant.slug}/api/v1/records/{entity}/import",
            data=body.encode() if isinstance(body, str) else body,
            headers={
                "Authorization": f"Bearer {self.tokens[who]}",
                "Content-Type": content_type,
                **(headers or {}),
            },
            query_string=query,
        )

    def get(self, path: str, who: str = "admin", **query: str) -> TestResponse:
        return self.app.test_client().get(
            f"/t/{self.tenant.slug}/api/v1/records/{path}",
            headers={"Authorization": f"Bearer {self.tokens[who]}"},
            query_string=query,
        )

    def state(self) -> Any:
        return snapshot(self.platform.store(self.tenant))["data"]

    def customers(self, **query: str) -> list[dict[str, Any]]:
        response = self.get("customer", limit="500", **query)
        assert response.status_code == 200, response.get_data(as_text=True)[:500]
        return response.get_json()["items"]

    def entries(self, after: int) -> list[Any]:
        store = self.platform.store(self.tenant)
        with store.connect() as connection:
            return connection.execute(
                sa.select(audit).where(audit.c.seq > after).order_by(audit.c.seq)
            ).all()

    def last_seq(self) -> int:
        store = self.platform.store(self.tenant)
        with store.connect() as connection:
            return connection.execute(sa.select(sa.func.max(audit.c.seq))).scalar_one() or 0

    def last_event(self) -> Any:
        store = self.platform.store(self.tenant)
        with store.connect() as connection:
            return connection.execute(sa.select(outbox).order_by(outbox.c.id.desc())).first()

    def events(self) -> int:
        store = self.platform.store(self.tenant)
        with store.connect() as connection:
            return connection.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one()


def _bundle(bundle: dict[str, Any]) -> dict[str, Any]:
    """Core, with sales managers allowed to import customers and ``phone`` hidden from them."""
    bundle = copy.deepcopy(bundle)
    for role in bundle["roles"]:
        if role["name"] in ("sales_rep", "sales_manager"):
            for grant in role["permissions"]:
                if grant["entity"] == "customer":
                    grant["fields"] = {"phone": "hidden"}
        if role["name"] == "sales_manager":
            role["permissions"].append(
                {"entity": "customer", "actions": ["import"], "scope": "team"}
            )
    return bundle


@pytest.fixture(scope="module", params=BACKENDS)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    with private_control_database(request.param) as database:
        folder = tmp_path_factory.mktemp("import")
        settings = make_settings(
            request.param,
            folder,
            request,
            max_import_bytes=MAX_IMPORT,
            max_request_bytes=MAX_REQUEST,
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
                with p.session() as session:
                    team = Team(tenant_id=api.tenant.id, name="east", label="East")
                    session.add(team)
                    session.flush()
                    admin = session.get(User, api.admin.id)
                    assert admin is not None
                    w.users["admin"] = admin
                    _, w.tokens["admin"] = tokens.create_token(session, api.tenant, admin, "t")
                    # The admin's own credentials that must not import: read-only, or
                    # limited to another entity.
                    _, w.tokens["admin_read_only"] = tokens.create_token(
                        session, api.tenant, admin, "ro", read_only=True
                    )
                    _, w.tokens["admin_deals_only"] = tokens.create_token(
                        session, api.tenant, admin, "deals", entities=["deal"]
                    )
                    for name, role in (("manager", "sales_manager"), ("rep", "sales_rep")):
                        user = User(email=f"{name}@{api.tenant.slug}.example", display_name=name)
                        session.add(user)
                        session.flush()
                        session.add(
                            Membership(
                                tenant_id=api.tenant.id,
                                user_id=user.id,
                                roles=[role],
                                team_id=team.id,
                            )
                        )
                        session.flush()
                        w.users[name] = user
                        _, w.tokens[name] = tokens.create_token(session, api.tenant, user, "t")
                yield w
        finally:
            p.close()


def _csv(*rows: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(rows)
    return out.getvalue()


def _tag() -> str:
    return uuid.uuid4().hex[:8]


# -- what an import stores -----------------------------------------------------------------------


def test_csv_import_creates_every_row_through_the_record_service(world: World) -> None:
    tag = _tag()
    seq, events = world.last_seq(), world.events()
    body = _csv(
        ["Name", "客户类型", "Tags", "Lifetime value", "city", "id", "created_at"],
        [f"上海{tag}贸易", "company", "vip; 华东", "1200.50", tag, "ignored", "2020-01-01"],
        [f"Beta {tag}", "person", '["a","b"]', "", tag, "", ""],
        [f"Gamma {tag}", "", "", "3", tag, "", ""],
    )
    response = world.post(body)
    assert response.status_code == 201, response.get_data(as_text=True)[:2000]
    assert response.get_json() == {
        "entity": "customer",
        "format": "csv",
        "dry_run": False,
        "rows": 3,
        "created": 3,
        "columns": {
            "Name": "name",
            "客户类型": "kind",
            "Tags": "tags",
            "Lifetime value": "lifetime_value",
            "city": "city",
        },
        "ignored_columns": ["id", "created_at"],
    }
    found = {c["name"]: c for c in world.customers(filter=f'city = "{tag}"')}
    assert set(found) == {f"上海{tag}贸易", f"Beta {tag}", f"Gamma {tag}"}
    first = found[f"上海{tag}贸易"]
    assert first["kind"] == "company"
    assert first["tags"] == ["vip", "华东"]
    assert first["lifetime_value"] in ("1200.50", "1200.5")
    assert first["owner_id"] == str(world.users["admin"].id)
    assert found[f"Beta {tag}"]["tags"] == ["a", "b"]
    assert found[f"Gamma {tag}"]["lifetime_value"] in ("3", "3.00")
    entries = world.entries(seq)
    # One grouped entry for the batch: every created record with its values (decision 0013).
    assert [e.action for e in entries] == ["record.create", "record.import"]
    group = entries[0]
    assert group.record_id is None and group.entity == "customer"
    assert group.detail == {"version": 1, "records": 3}
    # Stored in columns (decision 0015): the ids once, each field's values in their order.
    assert set(group.changes) == {"ids", "values"}
    assert set(group.changes["ids"]) == {c["id"] for c in found.values()}
    members = audittrail.group_members(group.changes)
    assert members[first["id"]]["name"] == f"上海{tag}贸易"
    assert members[first["id"]]["tags"] == ["vip", "华东"]
    assert members[found[f"Gamma {tag}"]["id"]]["lifetime_value"] in ("3", "3.00")
    assert entries[-1].detail == {
        "format": "csv",
        "rows": 3,
        "created": 3,
        "bytes": len(body.encode()),
    }
    assert entries[-1].actor_id == world.users["admin"].id
    assert world.events() == events + 1
    event = world.last_event()
    assert event.event == "record.create" and event.record_id is None
    assert sorted(event.payload["ids"]) == sorted(c["id"] for c in found.values())


def test_jsonl_import_takes_api_payloads_and_skips_system_values(world: World) -> None:
    tag = _tag()
    lines = [
        {"id": str(uuid.uuid4()), "name": f"J1 {tag}", "city": tag, "version": 9},
        {"name": f"J2 {tag}", "city": tag, "tags": ["x"], "lifetime_value": "7.25"},
    ]
    body = "\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n\n"
    response = world.post(body, content_type=JSONL)
    assert response.status_code == 201, response.get_data(as_text=True)[:2000]
    assert response.get_json()["rows"] == 2
    found = {c["name"]: c for c in world.customers(filter=f'city = "{tag}"')}
    assert set(found) == {f"J1 {tag}", f"J2 {tag}"}
    assert found[f"J1 {tag}"]["version"] == 1
    assert found[f"J1 {tag}"]["id"] != lines[0]["id"]


def test_an_export_imports_again_with_its_defused_cells_restored(world: World) -> None:
    tag = _tag()
    names = ['=HYPERLINK("http://evil.example")', "@SUM(A1)", "-2+3", "plain"]
    for name in names:
        created = world.app.test_client().post(
            f"/t/{world.tenant.slug}/api/v1/records/customer",
            json={"name": name, "city": tag, "tags": ["t1", "t2"]},
            headers={"Authorization": f"Bearer {world.tokens['admin']}"},
        )
        assert created.status_code == 201
    exported = world.get("customer/export", filter=f'city = "{tag}"', bom="true")
    assert exported.status_code == 200
    text = exported.get_data(as_text=True)
    assert "'=HYPERLINK" in text  # the export defused it
    other = _tag()
    again = world.post(text.replace(tag, other))
    assert again.status_code == 201, again.get_data(as_text=True)[:2000]
    assert "owner_id" in again.get_json()["columns"].values()
    imported = world.customers(filter=f'city = "{other}"')
    assert sorted(c["name"] for c in imported) == sorted(names)
    assert all(c["tags"] == ["t1", "t2"] for c in imported)


def test_owner_column_assigns_within_the_callers_create_scope(world: World) -> None:
    tag = _tag()
    rep = world.users["rep"]
    ok = world.post(_csv(["name", "owner_id", "city"], [f"O {tag}", str(rep.id), tag]))
    assert ok.status_code == 201, ok.get_data(as_text=True)[:2000]
    (record,) = world.customers(filter=f'city = "{tag}"')
    assert record["owner_id"] == str(rep.id)
    before = world.state()
    # A sales manager creates with the sales rep's `own` scope: only for themselves.
    refused = world.post(_csv(["name", "owner_id"], [f"P {tag}", str(rep.id)]), "manager")
    body = problem(refused, 422, "validation_failed")
    assert [e["pointer"] for e in body["errors"]] == ["/rows/2/owner_id"]
    assert world.state() == before


# -- refusals: every one leaves the tenant exactly as it was --------------------------------------


def test_refused_rows_are_all_listed_with_their_lines_and_nothing_is_stored(world: World) -> None:
    tag = _tag()
    before = world.state()
    body = _csv(
        ["name", "level", "lifetime_value", "next_follow_up_on", "email"],
        [f"ok {tag}", "", "", "", ""],
        [f"bad level {tag}", "platinum-ish", "", "", ""],
        ["", "", "abc", "2024-02-30", "not-an-email"],
        ["too", "few"],
    )
    response = world.post(body)
    found = problem(response, 422, "validation_failed")
    assert "nothing was imported" in found["detail"]
    by_pointer = {e["pointer"]: e for e in found["errors"]}
    assert {"/rows/3/level", "/rows/4/lifetime_value", "/rows/4/next_follow_up_on"} <= set(
        by_pointer
    )
    assert "/rows/4/email" in by_pointer
    assert "/rows/4/name" in by_pointer  # required
    assert by_pointer["/rows/5"]["message"] == "has 2 cells; the header has 5 columns"
    assert all(e["row"] in (3, 4, 5) for e in found["errors"])
    assert world.state() == before


def test_rows_after_a_refused_batch_are_still_checked(world: World) -> None:
    before = world.state()
    rows = [[f"row {i}", "x" if i in (3, 700) else ""] for i in range(800)]
    response = world.post(_csv(["name", "level"], *rows))
    found = problem(response, 422, "validation_failed")
    assert [e["pointer"] for e in found["errors"]] == ["/rows/5/level", "/rows/702/level"]
    assert world.state() == before


def test_a_row_repeating_a_unique_value_of_an_earlier_batch_is_refused(world: World) -> None:
    # contact.email is not unique in core; auto-numbers and ids are the platform's.
    # Use many rows so the duplicate lands in another batch: the service's unique check
    # sees rows of earlier batches because they are in the same transaction.
    tag = _tag()
    before = world.state()
    rows = [[f"u{i} {tag}", tag] for i in range(600)]
    rows.append(["", tag])
    response = world.post(_csv(["name", "city"], *rows))
    found = problem(response, 422, "validation_failed")
    assert [e["pointer"] for e in found["errors"]] == ["/rows/602/name"]
    assert world.state() == before


def test_dry_run_checks_every_row_and_stores_nothing(world: World) -> None:
    tag = _tag()
    before = world.state()
    good = world.post(
        _csv(["name", "city"], [f"d1 {tag}", tag], [f"d2 {tag}", tag]), dry_run="true"
    )
    assert good.status_code == 200, good.get_data(as_text=True)[:2000]
    assert good.get_json()["dry_run"] is True
    assert good.get_json()["rows"] == 2 and good.get_json()["created"] == 0
    bad = world.post(_csv(["name", "level"], ["x", "nope"]), dry_run="true")
    assert [e["pointer"] for e in problem(bad, 422, "validation_failed")["errors"]] == [
        "/rows/2/level"
    ]
    assert world.state() == before


def test_unknown_duplicate_and_empty_columns_are_each_named(world: World) -> None:
    before = world.state()
    response = world.post(_csv(["name", "nmae", "Name", "", "city"], ["a", "b", "c", "", "d"]))
    found = problem(response, 422, "unreadable_file")
    errors = {e["pointer"]: e["message"] for e in found["errors"]}
    assert errors["/columns/2"] == "'nmae' is not a field of 'customer'; did you mean 'name'?"
    assert errors["/columns/3"] == "'Name' is the field 'name' again (column 1 already is)"
    assert errors["/columns/4"] == "the column has no name"
    assert set(errors) == {"/columns/2", "/columns/3", "/columns/4"}
    assert world.state() == before


def test_skipped_columns_are_left_out_and_must_exist(world: World) -> None:
    tag = _tag()
    body = _csv(["name", "external ref", "owner_id", "city"], [f"S {tag}", "EXT-1", "x", tag])
    response = world.post(body, skip="external ref,owner_id")
    assert response.status_code == 201, response.get_data(as_text=True)[:2000]
    assert response.get_json()["ignored_columns"] == ["external ref", "owner_id"]
    (record,) = world.customers(filter=f'city = "{tag}"')
    assert record["owner_id"] == str(world.users["admin"].id)
    before = world.state()
    found = problem(world.post(body, skip="external ref,nothing"), 422, "unreadable_file")
    assert found["errors"] == [
        {"pointer": "/skip", "message": "'nothing' is not a column of the file"}
    ]
    assert world.state() == before


@pytest.mark.parametrize("title", ["phone", "Phone", "电话"])
def test_a_hidden_field_cannot_be_named_by_name_or_label(world: World, title: str) -> None:
    before = world.state()
    response = world.post(_csv(["name", title], ["x", "+86 21 5555 0000"]), "manager")
    found = problem(response, 422, "unreadable_file")
    assert [e["pointer"] for e in found["errors"]] == ["/columns/2"]
    assert found["errors"][0]["message"].startswith(f"'{title}' is not a field of 'customer'")
    assert "phone'?" not in found["errors"][0]["message"]  # never suggested either
    assert world.state() == before


def test_a_role_without_import_is_refused_before_the_file_is_read(world: World) -> None:
    before = world.state()
    response = world.post(_csv(["name"], ["by a rep"]), "rep")
    assert "import" in problem(response, 403, "forbidden")["detail"]
    assert world.state() == before


@pytest.mark.parametrize(
    ("who", "words"),
    [("admin_read_only", "read-only"), ("admin_deals_only", "does not cover 'customer'")],
)
def test_a_token_that_may_not_write_customers_imports_nothing(
    world: World, who: str, words: str
) -> None:
    before = world.state()
    response = world.post(_csv(["name"], ["by a narrow token"]), who)
    assert words in problem(response, 403, "forbidden")["detail"]
    assert world.state() == before


def test_undecodable_bytes_are_refused_with_a_hint_and_gb18030_reads_them(world: World) -> None:
    tag = _tag()
    before = world.state()
    data = _csv(["客户名称", "city"], [f"北京{tag}", tag]).encode("gb18030")
    refused = world.post(data)
    found = problem(refused, 422, "unreadable_file")
    assert "gb18030" in found["errors"][0]["message"]
    assert world.state() == before
    accepted = world.post(data, encoding="gb18030")
    assert accepted.status_code == 201, accepted.get_data(as_text=True)[:2000]
    assert [c["name"] for c in world.customers(filter=f'city = "{tag}"')] == [f"北京{tag}"]


def test_a_json_line_may_hold_a_line_separator_in_a_string(world: World) -> None:
    tag = _tag()
    body = json.dumps({"name": f"L\u2028S {tag}", "city": tag}, ensure_ascii=False) + "\r\n"
    assert "\u2028" in body
    response = world.post(body.encode("utf-8"), content_type=JSONL)
    assert response.status_code == 201, response.get_data(as_text=True)[:2000]
    assert [c["name"] for c in world.customers(filter=f'city = "{tag}"')] == [f"L\u2028S {tag}"]


def test_a_bom_and_semicolons_are_read(world: World) -> None:
    tag = _tag()
    body = "\ufeffname;city;tags\r\n" + f"Semi {tag};{tag};a\r\n"
    response = world.post(body.encode("utf-8"), delimiter=";")
    assert response.status_code == 201, response.get_data(as_text=True)[:2000]
    assert [c["tags"] for c in world.customers(filter=f'city = "{tag}"')] == [["a"]]


@pytest.mark.parametrize(
    ("body", "pointer", "words"),
    [
        ('name\r\n"unclosed\r\n', "/rows/2", "unexpected end of data"),
        ("name\r\nnul\x00here\r\n", "/rows/2/name", "NUL"),
    ],
)
def test_broken_csv_is_answered_per_row(world: World, body: str, pointer: str, words: str) -> None:
    before = world.state()
    found = problem(world.post(body), 422, "validation_failed")
    assert found["errors"][0]["pointer"] == pointer
    assert words in found["errors"][0]["message"]
    assert world.state() == before


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('{"name": "a", "name": "b"}', "duplicate key"),
        ('{"name": NaN}', "NaN"),
        ("[1, 2]", "must be a JSON object"),
        ('{"name": "x", "owner_id": "not a uuid"}', "UUID"),
        (json.dumps({"name": "x", "created_by": str(uuid.uuid4())}), None),
        ("[" * 10_000, "deep"),
    ],
)
def test_hostile_json_lines_are_refused_by_line(world: World, line: str, words: str | None) -> None:
    before = world.state()
    response = world.post('{"name": "fine"}\n' + line + "\n", content_type=JSONL, dry_run="true")
    if words is None:  # a system value from an export is ignored, not refused
        assert response.status_code == 200, response.get_data(as_text=True)[:500]
    else:
        found = problem(response, 422, "validation_failed")
        assert found["errors"][0]["row"] == 2
        assert words in found["errors"][0]["message"]
    assert world.state() == before


@pytest.mark.parametrize(
    ("query", "content_type", "status", "code"),
    [
        ({"format": "xml"}, CSV, 400, "invalid_query"),
        ({"encoding": "latin-1"}, CSV, 400, "invalid_query"),
        ({"delimiter": "|"}, CSV, 400, "invalid_query"),
        ({"format": "jsonl", "delimiter": ";"}, CSV, 400, "invalid_query"),
        ({"format": "jsonl", "skip": "name"}, CSV, 400, "invalid_query"),
        ({"dry_run": "maybe"}, CSV, 400, "invalid_query"),
        ({"fitler": "x"}, CSV, 400, "invalid_query"),
        ({}, "application/json", 415, "unsupported_media_type"),
    ],
)
def test_bad_parameters_are_refused(
    world: World, query: dict[str, str], content_type: str, status: int, code: str
) -> None:
    before = world.state()
    problem(world.post("name\r\nx\r\n", content_type=content_type, **query), status, code)
    assert world.state() == before


def test_an_empty_body_and_an_empty_header_are_refused(world: World) -> None:
    before = world.state()
    problem(world.post(""), 400, "bad_request")
    found = problem(world.post(",,\r\na,b,c\r\n"), 422, "unreadable_file")
    assert found["errors"][0]["pointer"] == "/rows/1"
    assert world.state() == before


def test_a_file_over_max_import_bytes_is_413_and_stores_nothing(world: World) -> None:
    before = world.state()
    body = "name\r\n" + ("x" * 100 + "\r\n") * (MAX_IMPORT // 100)
    found = problem(world.post(body), 413, "payload_too_large")
    assert found["status"] == 413
    assert world.state() == before


def test_the_import_limit_is_its_own_not_the_request_limit(world: World) -> None:
    tag = _tag()
    rows = [[f"big {i} {tag}", tag] for i in range(800)]
    body = _csv(["name", "city"], *rows)
    assert MAX_REQUEST < len(body.encode()) < MAX_IMPORT
    response = world.post(body)
    assert response.status_code == 201, response.get_data(as_text=True)[:2000]
    assert response.get_json()["created"] == 800


def test_a_signed_in_person_imports_a_file_over_the_request_limit(world: World) -> None:
    """The login cookie's CSRF check reads the body first; the import limit holds there too."""
    with world.platform.session() as session:
        session.get(User, world.users["admin"].id).password_hash = CHEAP_HASHER.hash(PASSWORD)
    client, csrf = _signed_in(
        world.app, Api(None, world.platform, world.tenant, world.users["admin"], "")
    )
    tag = _tag()
    body = _csv(["name", "city"], *[[f"cookie {i} {tag}", tag] for i in range(800)])
    assert MAX_REQUEST < len(body.encode()) < MAX_IMPORT
    response = client.post(
        f"/t/{world.tenant.slug}/api/v1/records/customer/import",
        data=body.encode(),
        headers={"Content-Type": CSV, "X-CSRFToken": csrf},
    )
    assert response.status_code == 201, response.get_data(as_text=True)[:1000]
    assert response.get_json()["created"] == 800
    refused = client.post(
        f"/t/{world.tenant.slug}/api/v1/records/customer/import",
        data=body.encode(),
        headers={"Content-Type": CSV},
    )
    assert problem(refused, 403, "csrf_failed")["status"] == 403


def test_an_entity_that_does_not_exist_is_404(world: World) -> None:
    problem(world.post("name\r\nx\r\n", entity="spaceship"), 404, "not_found")


def test_idempotency_key_replays_the_first_answer_and_imports_once(world: World) -> None:
    tag = _tag()
    key = {"Idempotency-Key": f"import-{tag}"}
    body = _csv(["name", "city"], [f"I {tag}", tag])
    first = world.post(body, headers=key)
    second = world.post(body, headers=key)
    assert first.status_code == second.status_code == 201
    assert first.get_json() == second.get_json()
    assert len(world.customers(filter=f'city = "{tag}"')) == 1
