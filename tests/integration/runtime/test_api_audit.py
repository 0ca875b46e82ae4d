"""The audit and notifications APIs over HTTP, on SQLite and PostgreSQL.

Who may look (``view_audit`` only), what they see (hidden fields left out),
search and keyset pages, the CSV export (streamed, defused, itself audited),
and every refusal as a problem that changes nothing. The notifications API
shows each member only their own notifications.
"""

from __future__ import annotations

import copy
import csv
import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from werkzeug.test import TestResponse

from metacrm.runtime import audittrail, metastore, notifications, tenancy
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import audit, notification, notification_read

from ...conftest import BACKENDS, make_settings
from .test_api_meta import Api, build_app, make_tenant, private_control_database, problem
from .test_api_records import Records

AUDITOR_ROLE = {
    "kind": "role",
    "name": "auditor",
    "label": {"en": "Auditor", "zh-CN": "审计员"},
    "permissions": [
        {
            "entity": "customer",
            "actions": ["read"],
            "scope": "all",
            "fields": {"lifetime_value": "hidden"},
        }
    ],
    "capabilities": ["view_audit"],
}
MESSAGE = {"en": "A login from a new address", "zh-CN": "来自新地址的登录"}


@dataclass
class Caller:
    """One member of a tenant and how they call the audit and notifications APIs."""

    api: Api
    token: str
    user_id: uuid.UUID

    def get(self, path: str = "", query: Any = None, slug: str | None = None) -> TestResponse:
        return self.api.client.get(
            f"/t/{slug or self.api.slug}/api/v1/{path}",
            query_string=query,
            headers={"Authorization": f"Bearer {self.token}"},
        )

    def post(self, path: str, body: Any = None, **kwargs: Any) -> TestResponse:
        return self.api.client.post(
            f"/t/{self.api.slug}/api/v1/{path}",
            headers={"Authorization": f"Bearer {self.token}"},
            json=body,
            **kwargs,
        )

    def audit(self, **query: Any) -> dict[str, Any]:
        response = self.get("audit", query=query)
        assert response.status_code == 200, response.get_data(as_text=True)[:1000]
        return response.get_json()


@dataclass
class World:
    app: Flask
    admin: Caller
    auditor: Caller
    rep: Caller
    read_only: Caller
    other: Caller
    customer_id: str
    deal_id: str


def _member(api: Api, roles: list[str], **token: Any) -> Caller:
    user = api.add_member(roles)
    return Caller(api, api.new_token(user, **token), user.id)


@pytest.fixture(scope="module", params=BACKENDS)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """A tenant with an admin, an auditor who may not see lifetime_value, a sales rep,
    a read-only token, a few audited writes; and a second tenant."""
    with private_control_database(request.param) as database:
        folder = tmp_path_factory.mktemp("audit")
        settings = make_settings(request.param, folder, request, **database)
        p = Platform(settings)
        p.init_control()
        try:
            with build_app(settings) as app:
                a, b = make_tenant(p, app), make_tenant(p, app)
                bundle = copy.deepcopy(tenancy.template_bundle("core"))
                bundle["roles"].append(AUDITOR_ROLE)
                metastore.publish(p.store(a.tenant), bundle, expected_version=1)
                records = Records(a, a.token)
                customer = records.create(
                    "customer", {"name": '=HYPERLINK("http://x")', "lifetime_value": "1200.50"}
                )
                records.patch(
                    f"customer/{customer['id']}",
                    {"lifetime_value": "99.00", "city": "Hangzhou"},
                    headers={"If-Match": f'"{customer["version"]}"'},
                )
                deal = records.create("deal", {"name": "Big deal", "customer": customer["id"]})
                yield World(
                    app,
                    Caller(a, a.token, a.admin.id),
                    _member(a, ["auditor"]),
                    _member(a, ["sales_rep"]),
                    Caller(a, a.new_token(read_only=True), a.admin.id),
                    Caller(b, b.token, b.admin.id),
                    customer["id"],
                    deal["id"],
                )
        finally:
            for item in tenancy.list_tenants(p):
                tenancy.delete_tenant(p, item.slug)
            p.close()


def log(api: Api) -> list[tuple[Any, ...]]:
    with api.platform.store(api.tenant).connect() as connection:
        return [tuple(r) for r in connection.execute(sa.select(audit).order_by(audit.c.seq))]


# -- search -----------------------------------------------------------------------------------


def test_admin_sees_entries_newest_first(world):
    items = world.admin.audit()["items"]
    seqs = [i["seq"] for i in items]
    assert seqs == sorted(seqs, reverse=True) and seqs[-1] == 1
    actions = [i["action"] for i in reversed(items)]
    assert actions[:2] == ["meta.create", "meta.publish"]
    assert ["record.create", "record.update", "record.create"] == [
        a for a in actions if a.startswith("record.")
    ][:3]
    update = next(i for i in items if i["action"] == "record.update")
    assert update["changes"]["lifetime_value"] == ["1200.50", "99.00"]
    assert update["actor_id"] == str(world.admin.user_id)
    assert update["ip"] == "127.0.0.1"  # the client's address, from the request
    assert set(update) >= {"seq", "id", "at", "actor_name", "prev_hash", "hash", "ip", "detail"}


def test_the_client_address_does_not_outlive_its_request(world):
    world.admin.audit(limit=1)
    assert audittrail.client_ip() is None


def test_filters(world):
    admin = world.admin
    creates = admin.audit(action="record.create")["items"]
    assert {i["action"] for i in creates} == {"record.create"} and len(creates) >= 2
    records = admin.audit(action="record.*")["items"]
    assert {i["action"] for i in records} >= {"record.create", "record.update"}
    both = admin.audit(action=["meta.create", "record.update"])["items"]
    assert {i["action"] for i in both} == {"meta.create", "record.update"}
    one = admin.audit(entity="customer", record_id=world.customer_id)["items"]
    assert [i["action"] for i in one] == ["record.update", "record.create"]
    assert admin.audit(entity="deal")["items"][0]["record_id"] == world.deal_id
    mine = admin.audit(actor=str(admin.user_id))["items"]
    assert mine and all(i["actor_id"] == str(admin.user_id) for i in mine)
    assert admin.audit(actor=str(uuid.uuid4()))["items"] == []
    first = admin.audit(action="meta.create")["items"][0]
    assert admin.audit(until=first["at"], action="meta.create")["items"] == []
    assert admin.audit(since=first["at"], action="meta.create")["items"] == [first]
    assert admin.audit(since="2999-01-01T00:00:00+08:00")["items"] == []


def test_keyset_pages_walk_the_whole_log_once(world):
    everything = world.admin.audit(limit=500)["items"]
    seen: list[int] = []
    page = world.admin.audit(limit=2)
    while True:
        seen += [i["seq"] for i in page["items"]]
        if page["next_cursor"] is None:
            break
        page = world.admin.audit(limit=2, cursor=page["next_cursor"])
    assert seen == [i["seq"] for i in everything]
    filtered = world.admin.audit(limit=1, action="record.*")
    assert filtered["next_cursor"] is not None
    second = world.admin.audit(limit=1, action="record.*", cursor=filtered["next_cursor"])
    assert second["items"][0]["seq"] < filtered["items"][0]["seq"]


def test_hidden_fields_stay_out_of_the_auditors_view(world):
    auditor = world.auditor.audit(action="record.*")["items"]
    update = next(i for i in auditor if i["action"] == "record.update")
    assert update["changes"] == {"city": [None, "Hangzhou"]}
    created = next(
        i for i in auditor if i["entity"] == "customer" and i["action"] == "record.create"
    )
    assert "lifetime_value" not in created["changes"] and "name" in created["changes"]
    # No right to read deals at all: no deal field is shown.
    deal = next(i for i in auditor if i["entity"] == "deal")
    assert deal["changes"] == {}
    text = world.auditor.get("audit", query={"limit": 500}).get_data(as_text=True)
    assert "lifetime_value" not in text and "1200.50" not in text


# -- refusals ---------------------------------------------------------------------------------


def test_a_read_only_token_may_read_the_audit_trail(world):
    assert world.read_only.audit(limit=1)["items"]


def test_members_without_view_audit_are_refused(world):
    before = log(world.admin.api)
    for path in ("audit", "audit/export"):
        problem(world.rep.get(path), 403, "forbidden")
    assert log(world.admin.api) == before


def test_without_a_token_or_from_another_tenant(world):
    response = world.admin.api.client.get(f"/t/{world.admin.api.slug}/api/v1/audit")
    problem(response, 401, "unauthorized")
    before = log(world.admin.api)
    for path in ("audit", "audit/export", "notifications"):
        problem(world.other.get(path, slug=world.admin.api.slug), 404, "not_found")
    assert log(world.admin.api) == before


@pytest.mark.parametrize(
    ("query", "pointer"),
    [
        ({"limit": "0"}, "/limit"),
        ({"limit": "501"}, "/limit"),
        ({"limit": "ten"}, "/limit"),
        ({"limit": "-1"}, "/limit"),
        ({"limit": ["1", "2"]}, "/limit"),
        ({"actor": "alice"}, "/actor"),
        ({"record_id": "1; DROP TABLE _audit"}, "/record_id"),
        ({"entity": "Customer"}, "/entity"),
        ({"entity": "x" * 64}, "/entity"),
        ({"action": "record.%"}, "/action"),
        ({"action": "RECORD.update"}, "/action"),
        ({"action": ["a"] * 21}, "/action"),
        ({"since": "yesterday"}, "/since"),
        ({"since": "2026-01-01T00:00:00"}, "/since"),
        ({"since": "0001-01-01T00:00:00+08:00"}, "/since"),
        ({"until": "9999-12-31T23:59:59-08:00"}, "/until"),
        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "/until"),
        ({"cursor": "not-a-cursor"}, "/cursor"),
        ({"cursor": "x" * 9000}, "/cursor"),
        ({"actor": "\x00"}, "/actor"),
        ({"sort": "seq"}, "/sort"),
        ({"filter": "1=1"}, "/filter"),
    ],
)
def test_bad_query_parameters_are_problems(world, query, pointer):
    before = log(world.admin.api)
    body = problem(world.admin.get("audit", query=query), 400, "invalid_query")
    assert [e["pointer"] for e in body["errors"]] == [pointer]
    if "cursor" not in query and "limit" not in query:
        body = problem(world.admin.get("audit/export", query=query), 400, "invalid_query")
    assert log(world.admin.api) == before


def test_a_cursor_only_continues_its_own_search(world):
    cursor = world.admin.audit(limit=1)["next_cursor"]
    problem(
        world.admin.get("audit", query={"cursor": cursor, "entity": "deal"}), 400, "invalid_query"
    )
    body, _, signature = cursor.partition(".")
    forged = body[:5] + ("A" if body[5] != "A" else "B") + body[6:] + "." + signature
    problem(world.admin.get("audit", query={"cursor": forged}), 400, "invalid_query")
    with world.other.api.platform.store(world.other.api.tenant).begin() as connection:
        audittrail.append(connection, action="auth.login", actor_id=None, actor_name="x")
    other = world.other.audit(limit=1)["next_cursor"]
    assert other is not None
    problem(world.admin.get("audit", query={"cursor": other}), 400, "invalid_query")


def test_export_format_must_be_csv(world):
    before = log(world.admin.api)
    problem(world.admin.get("audit/export", query={"format": "xlsx"}), 400, "invalid_query")
    problem(world.admin.get("audit/export", query={"limit": "5"}), 400, "invalid_query")
    assert log(world.admin.api) == before


# -- export -----------------------------------------------------------------------------------


def _csv(response: TestResponse) -> list[dict[str, str]]:
    assert response.status_code == 200, response.get_data(as_text=True)[:1000]
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"].startswith("attachment; filename=")
    return list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))


def test_export_streams_csv_and_is_audited(world):
    before = world.admin.audit(limit=500)["items"]
    rows = _csv(world.admin.get("audit/export", query={"action": "record.*"}))
    expected = [i for i in reversed(before) if i["action"].startswith("record.")]
    assert [int(r["seq"]) for r in rows] == [i["seq"] for i in expected]
    assert list(rows[0]) == [
        "seq", "id", "at", "actor_id", "actor_name", "action", "entity", "record_id",
        "changes", "detail", "ip", "prev_hash", "hash",
    ]  # fmt: skip
    exported = world.admin.audit(action="audit.export", limit=1)["items"][0]
    assert exported["actor_id"] == str(world.admin.user_id)
    assert exported["detail"]["filters"]["action"] == ["record.*"]
    assert exported["seq"] > max(i["seq"] for i in before)
    assert all(int(r["seq"]) < exported["seq"] for r in rows)
    store = world.admin.api.platform.store(world.admin.api.tenant)
    with store.connect() as connection:
        assert audittrail.verify(connection).ok


def test_export_defuses_formulas(world):
    store = world.admin.api.platform.store(world.admin.api.tenant)
    with store.begin() as connection:
        audittrail.append(
            connection, action="auth.login_failed", actor_id=None, actor_name="=cmd|' /C calc'!A0"
        )
    rows = _csv(world.admin.get("audit/export", query={"action": "auth.login_failed"}))
    assert [r["actor_name"] for r in rows] == ["'=cmd|' /C calc'!A0"]


def test_export_hides_what_the_viewer_may_not_see(world):
    rows = _csv(world.auditor.get("audit/export", query={"entity": "customer"}))
    assert rows and all("lifetime_value" not in r["changes"] for r in rows)
    assert all("1200.50" not in ",".join(r.values()) for r in rows)


def test_formula_cells_are_defused():
    from metacrm.runtime.api.audit import _cell

    for text in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx"):
        assert _cell(text) == "'" + text
    assert _cell("plain") == "plain" and _cell(None) == ""
    assert _cell({"a": "=x"}) == '{"a": "=x"}'


# -- notifications ----------------------------------------------------------------------------


def _send(world: World) -> tuple[uuid.UUID, uuid.UUID]:
    store = world.admin.api.platform.store(world.admin.api.tenant)
    with store.begin() as connection:
        to_admins = notifications.notify_admins(connection, kind="auth.new_ip", message=MESSAGE)
        (to_rep,) = notifications.notify(
            connection, [world.rep.user_id], kind="task.assigned", message=MESSAGE, link="/t/x"
        )
    return to_admins, to_rep


def _inbox(caller: Caller, **query: Any) -> dict[str, Any]:
    response = caller.get("notifications", query=query)
    assert response.status_code == 200, response.get_data(as_text=True)[:1000]
    return response.get_json()


def _reads(world: World) -> list[tuple[Any, ...]]:
    store = world.admin.api.platform.store(world.admin.api.tenant)
    with store.connect() as connection:
        return sorted(tuple(r) for r in connection.execute(sa.select(notification_read))) + sorted(
            tuple(r) for r in connection.execute(sa.select(notification))
        )


def test_each_member_sees_only_their_notifications(world):
    to_admins, to_rep = _send(world)
    admin = [n["id"] for n in _inbox(world.admin)["items"]]
    rep = [n["id"] for n in _inbox(world.rep)["items"]]
    assert str(to_admins) in admin and str(to_rep) not in admin
    assert str(to_rep) in rep and str(to_admins) not in rep
    item = next(n for n in _inbox(world.rep)["items"] if n["id"] == str(to_rep))
    assert item["message"] == MESSAGE and item["link"] == "/t/x" and item["read"] is False
    assert _inbox(world.auditor)["items"] == []
    # A read-only token still shows its owner (an admin) the alerts for admins.
    assert str(to_admins) in [n["id"] for n in _inbox(world.read_only)["items"]]


def test_marking_read(world):
    to_admins, to_rep = _send(world)
    unread = _inbox(world.rep, unread="true")["unread"]
    response = world.rep.post(f"notifications/{to_rep}/read")
    assert response.status_code == 204
    after = _inbox(world.rep)
    assert after["unread"] == unread - 1
    assert next(n for n in after["items"] if n["id"] == str(to_rep))["read"] is True
    assert str(to_rep) not in [n["id"] for n in _inbox(world.rep, unread="true")["items"]]
    # Another member's notification answers like an unknown one, and stays unread.
    before = _reads(world)
    problem(world.rep.post(f"notifications/{to_admins}/read"), 404, "not_found")
    problem(world.rep.post(f"notifications/{uuid.uuid4()}/read"), 404, "not_found")
    problem(world.rep.post("notifications/not-an-id/read"), 404, "not_found")
    marked = world.rep.post("notifications/read", {"ids": [str(to_admins)]})
    assert marked.status_code == 200 and marked.get_json()["marked"] == 0
    assert _reads(world) == before
    everything = world.admin.post("notifications/read", {"all": True})
    assert everything.get_json()["unread"] == 0
    assert _inbox(world.admin)["unread"] == 0


def test_notification_pages(world):
    for _ in range(3):
        _send(world)
    first = _inbox(world.rep, limit="2")
    assert len(first["items"]) == 2 and first["next_before"] == first["items"][-1]["id"]
    second = _inbox(world.rep, limit="2", before=first["next_before"])
    assert second["items"][0]["id"] < first["items"][-1]["id"]


@pytest.mark.parametrize(
    "query",
    [
        {"unread": "yes"},
        {"limit": "0"},
        {"limit": "201"},
        {"before": "x"},
        {"page": "2"},
        {"limit": ["1", "2"]},
    ],
)
def test_bad_notification_queries(world, query):
    problem(world.rep.get("notifications", query=query), 400, "invalid_query")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ([], 400, "bad_request"),
        ({}, 400, "bad_request"),
        ({"ids": [], "extra": 1}, 400, "bad_request"),
        ({"all": False}, 422, "validation_failed"),
        ({"all": True, "ids": []}, 422, "validation_failed"),
        ({"ids": []}, 422, "validation_failed"),
        ({"ids": "x"}, 422, "validation_failed"),
        ({"ids": ["nope", 3]}, 422, "validation_failed"),
        ({"ids": [str(uuid.uuid4())] * 501}, 422, "validation_failed"),
    ],
)
def test_bad_mark_read_bodies(world, body, status, code):
    _send(world)
    before = _reads(world)
    problem(world.rep.post("notifications/read", body), status, code)
    assert _reads(world) == before


def test_marking_read_needs_a_writing_token(world):
    _send(world)
    before = _reads(world)
    problem(world.read_only.post("notifications/read", {"all": True}), 403, "forbidden")
    assert _reads(world) == before
    problem(
        world.rep.post("notifications/read", data="{", content_type="application/json"),
        400,
        "malformed_json",
    )
    problem(
        world.rep.post("notifications/read", data="x", content_type="text/plain"),
        415,
        "unsupported_media_type",
    )
    assert _reads(world) == before


# -- grouped entries (imports) ------------------------------------------------------------------


def test_an_imported_records_creation_is_found_in_its_batchs_grouped_entry(world):
    """An import batch is one ``record.create`` entry keyed by record id (decision 0013):
    the record filter finds it and shows that record's part; masking applies inside it."""
    admin = world.admin
    tag = uuid.uuid4().hex[:8]
    body = f"name,city,lifetime_value\nImported A {tag},{tag},10.50\nImported B {tag},{tag},7\n"
    response = admin.api.client.post(
        f"/t/{admin.api.slug}/api/v1/records/customer/import",
        data=body.encode(),
        headers={"Authorization": f"Bearer {admin.token}", "Content-Type": "text/csv"},
    )
    assert response.status_code == 201, response.get_data(as_text=True)[:1000]
    listed = Records(admin.api, admin.token).items("customer", filter=f'city = "{tag}"')
    ids = {c["name"]: c["id"] for c in listed}
    first, second = ids[f"Imported A {tag}"], ids[f"Imported B {tag}"]

    found = admin.audit(record_id=first)["items"]
    assert [i["action"] for i in found] == ["record.create"]
    entry = found[0]
    assert entry["record_id"] is None and entry["entity"] == "customer"
    assert entry["detail"] == {"version": 1, "records": 2}
    assert list(entry["changes"]) == [first]  # only the record asked about
    assert entry["changes"][first]["name"] == f"Imported A {tag}"
    assert entry["changes"][first]["lifetime_value"] in ("10.50", "10.5")
    assert admin.audit(record_id=second, entity="customer")["items"][0]["id"] == entry["id"]
    assert admin.audit(record_id=second, entity="deal")["items"] == []
    assert admin.audit(record_id=str(uuid.uuid4()))["items"] == []
    whole = next(i for i in admin.audit(entity="customer")["items"] if i["id"] == entry["id"])
    assert set(whole["changes"]) == {first, second}

    mine = world.auditor.audit(record_id=first)["items"][0]["changes"][first]
    assert "lifetime_value" not in mine and mine["name"] == f"Imported A {tag}"
    with admin.api.platform.store(admin.api.tenant).connect() as connection:
        assert audittrail.verify(connection).ok
