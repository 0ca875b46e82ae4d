"""The record API over HTTP, on SQLite and PostgreSQL.

Happy paths go through the API only: create, read, list (filter, sort,
fields, keyset cursors, search, include), count, update with ETags and
If-Match, the recycle bin, related records, idempotent retries and bulk
requests. Every refusal is an RFC 9457 problem with a stable ``code`` and
changes nothing: each bad-input test compares every row of the tenant's
tables (records, links, audit, outbox, idempotency keys, sequences) before
and after.
"""

from __future__ import annotations

import copy
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from flask import Flask
from werkzeug.datastructures import MultiDict
from werkzeug.test import TestResponse

from metacrm.runtime import metastore, tenancy
from metacrm.runtime import records as records_service
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import audit, idempotency, outbox, sequence

from ...conftest import BACKENDS, make_settings
from .test_api_meta import (
    Api,
    build_app,
    make_tenant,
    no_leak,
    pointers,
    private_control_database,
    problem,
)

# -- fixtures and helpers ---------------------------------------------------------------------


@dataclass
class Records:
    """The record API of one tenant, as one of its members calls it."""

    api: Api
    token: str

    @property
    def slug(self) -> str:
        return self.api.slug

    def url(self, path: str, slug: str | None = None) -> str:
        return f"/t/{slug or self.slug}/api/v1/records/{path}"

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        data: bytes | str | None = None,
        content_type: str = "application/json",
        slug: str | None = None,
        token: str | None = None,
    ) -> TestResponse:
        sent = {"Authorization": f"Bearer {token or self.token}", **(headers or {})}
        kwargs: dict[str, Any] = {"headers": sent, "query_string": query}
        if data is not None:
            kwargs.update(data=data, content_type=content_type)
        elif body is not None:
            kwargs["json"] = body
        return self.api.client.open(self.url(path, slug), method=method, **kwargs)

    def get(self, path: str, **kwargs: Any) -> TestResponse:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> TestResponse:
        return self.call("POST", path, body, **kwargs)

    def patch(self, path: str, body: Any = None, **kwargs: Any) -> TestResponse:
        return self.call("PATCH", path, body, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> TestResponse:
        return self.call("DELETE", path, **kwargs)

    def create(self, entity: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        response = self.post(entity, body, **kwargs)
        assert response.status_code == 201, response.get_data(as_text=True)[:1000]
        return response.get_json()

    def read(self, entity: str, record_id: str, **kwargs: Any) -> dict[str, Any]:
        response = self.get(f"{entity}/{record_id}", **kwargs)
        assert response.status_code == 200, response.get_data(as_text=True)[:1000]
        return response.get_json()

    def items(self, entity: str, **query: Any) -> list[dict[str, Any]]:
        response = self.get(entity, query=query)
        assert response.status_code == 200, response.get_data(as_text=True)[:1000]
        return response.get_json()["items"]

    def state(self) -> dict[str, list[str]]:
        """Every row of every table a record write touches, for before/after comparisons."""
        p = self.api.platform
        store = p.store(self.api.tenant)
        with store.connect() as connection:
            model = p.models.current(store, connection)
            tables = [e.table for e in model.entities.values()]
            tables += [link for e in model.entities.values() for link in e.links.values()]
            tables += [audit, outbox, idempotency, sequence]
            return {
                t.name: sorted(repr(tuple(row)) for row in connection.execute(sa.select(t)))
                for t in tables
            }

    def count(self, table: sa.Table) -> int:
        store = self.api.platform.store(self.api.tenant)
        with store.connect() as connection:
            return connection.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


@dataclass
class World:
    """Tenants on one backend: two core ones, and a strict one with a richer bundle."""

    app: Flask
    a: Records
    b: Records
    strict: Records
    read_only: str


def _field(name: str, kind: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "label": {"en": name.title()}, **extra}


def strict_bundle() -> dict[str, Any]:
    """The core bundle with If-Match required and fields of every kind the core lacks."""
    bundle = copy.deepcopy(tenancy.template_bundle("core"))
    customer = next(e for e in bundle["entities"] if e["name"] == "customer")
    customer["fields"] += [
        _field("code", "text", max_length=12, unique=True),
        _field("secret", "encrypted_text"),
        _field("partners", "many_to_many", target="contact"),
        _field("extra", "json"),
        _field("double_value", "formula", expression="lifetime_value * 2", result_type="decimal"),
    ]
    bundle["entities"].append(
        {
            "name": "gadget",
            "label": {"en": "Gadget"},
            "plural_label": {"en": "Gadgets"},
            "title_field": "title",
            "fields": [_field("title", "text")],
        }
    )
    bundle["settings"]["require_if_match"] = True
    return bundle


@pytest.fixture(scope="module", params=BACKENDS)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """Build, once per backend, the tenants every test here works in.

    Tests share them; each refusal test compares the whole tenant before and
    after, and each happy-path test looks only at records it made itself.
    """
    with private_control_database(request.param) as database:
        folder = tmp_path_factory.mktemp("records")
        settings = make_settings(request.param, folder, request, **database)
        p = Platform(settings)
        p.init_control()
        try:
            with build_app(settings) as app:
                a, b, strict = (make_tenant(p, app) for _ in range(3))
                store = p.store(strict.tenant)
                bundle = strict_bundle()
                metastore.publish(store, bundle, expected_version=1)
                # Removing an entity archives it: its table stays, the API must not show it.
                bundle["entities"] = [e for e in bundle["entities"] if e["name"] != "gadget"]
                metastore.publish(store, bundle, expected_version=2)
                yield World(
                    app,
                    Records(a, a.token),
                    Records(b, b.token),
                    Records(strict, strict.token),
                    a.new_token(read_only=True),
                )
        finally:
            for item in tenancy.list_tenants(p):
                tenancy.delete_tenant(p, item.slug)
            p.close()


@pytest.fixture
def a(world: World) -> Records:
    return world.a


@pytest.fixture
def b(world: World) -> Records:
    return world.b


@pytest.fixture
def strict(world: World) -> Records:
    return world.strict


def marker() -> str:
    """Return a value unique to one test, to find its own records in shared tenants."""
    return f"m{uuid.uuid4().hex[:12]}"


def customer(a: Records, **fields: Any) -> dict[str, Any]:
    return a.create("customer", {"name": f"Customer {marker()}", **fields})


@contextmanager
def unchanged(t: Records) -> Iterator[None]:
    """Assert that the block changes no row of the tenant."""
    before = t.state()
    yield
    assert t.state() == before


@contextmanager
def statements(t: Records) -> Iterator[list[str]]:
    """Collect the SQL statements the app sends to the tenant's database during the block."""
    store = t.api.client.application.extensions["metacrm"].store(t.api.tenant)
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # On PostgreSQL the control tables share the engine; tenant SQL names its schema.
        if store.schema is None or store.schema in statement:
            seen.append(statement)

    engine = store.engine

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


# -- create and read --------------------------------------------------------------------------


def test_create_answers_201_with_location_etag_and_the_stored_record(a):
    audits, events = a.count(audit), a.count(outbox)
    response = a.post("customer", {"name": "上海华联贸易有限公司", "lifetime_value": "12.5"})
    assert response.status_code == 201
    record = response.get_json()
    assert record["name"] == "上海华联贸易有限公司"
    assert record["lifetime_value"] == "12.50"
    assert record["version"] == 1 and record["status"] == "prospect"  # default
    assert record["created_by"] == str(a.api.admin.id)
    assert response.headers["ETag"] == '"1"'
    location = response.headers["Location"]
    assert location == f"/t/{a.slug}/api/v1/records/customer/{record['id']}"
    again = a.api.client.get(location, headers={"Authorization": f"Bearer {a.token}"})
    assert again.status_code == 200
    assert again.get_json() == record
    assert again.headers["ETag"] == '"1"'
    assert a.count(audit) == audits + 1 and a.count(outbox) == events + 1


def test_get_reads_from_the_recycle_bin_only_when_asked(a):
    record = customer(a)
    assert a.delete(f"customer/{record['id']}").status_code == 204
    problem(a.get(f"customer/{record['id']}"), 404, "not_found")
    binned = a.read("customer", record["id"], query={"deleted": "true"})
    assert binned["deleted_at"] is not None and binned["version"] == 2


def test_unknown_or_archived_entity_is_404(strict, a):
    problem(a.get("nothing"), 404, "not_found")
    problem(a.get("Customer"), 404, "not_found")
    problem(a.post("nothing", {"name": "x"}), 404, "not_found")
    with unchanged(strict):
        body = problem(strict.get("gadget"), 404, "not_found")
        assert "gadget" in body["detail"]
        problem(strict.post("gadget", {"title": "x"}), 404, "not_found")
        problem(strict.get(f"gadget/{uuid.uuid4()}"), 404, "not_found")


# -- lists ------------------------------------------------------------------------------------


def test_list_pages_through_every_match_once_with_signed_cursors(a):
    city = marker()
    made = [customer(a, city=city)["id"] for _ in range(7)]
    seen: list[str] = []
    query: dict[str, Any] = {"filter": f'city = "{city}"', "limit": 3, "sort": "name"}
    pages = 0
    while True:
        response = a.get("customer", query=query)
        assert response.status_code == 200
        body = response.get_json()
        seen += [item["id"] for item in body["items"]]
        pages += 1
        if pages == 1:
            # A record added meanwhile does not disturb the pages already cut.
            customer(a, city=city, name="Z last")
            made.append(seen[-1])
        if body["next_cursor"] is None:
            break
        query["cursor"] = body["next_cursor"]
    assert pages == 3
    assert len(seen) == len(set(seen)) == 8
    assert set(made) <= set(seen)
    names = [a.read("customer", i)["name"] for i in seen]
    assert names == sorted(names)


def test_list_filters_sorts_and_chooses_fields(a):
    city = marker()
    for value in ("30", "10", "20"):
        customer(a, city=city, lifetime_value=value, level="gold")
    items = a.items(
        "customer",
        filter=f'city = "{city}" and lifetime_value >= 15',
        sort="-lifetime_value",
        fields="name,lifetime_value",
    )
    assert [i["lifetime_value"] for i in items] == ["30.00", "20.00"]
    assert set(items[0]) == {
        "id",
        "owner_id",
        "team_id",
        "created_at",
        "created_by",
        "updated_at",
        "updated_by",
        "version",
        "deleted_at",
        "name",
        "lifetime_value",
    }


def test_filters_reading_the_clock_and_the_caller_use_the_request_values(a):
    """``today()``, ``now()`` and ``me()`` in a filter see this request's date and caller.

    The request's evaluation context reads the clock on first use only (most
    statements are built once and never ask); a filter that asks must still get it.
    """
    city = marker()
    customer(a, city=city, next_follow_up_on="2000-01-01")
    customer(a, city=city, next_follow_up_on="2999-01-01")
    due = a.items("customer", filter=f'city = "{city}" and next_follow_up_on < today()')
    assert [i["next_follow_up_on"] for i in due] == ["2000-01-01"]
    mine = a.items(
        "customer", filter=f'city = "{city}" and owner_id = me() and created_at <= now()'
    )
    assert len(mine) == 2
    assert {i["owner_id"] for i in mine} == {a.create("customer", {"name": city})["owner_id"]}


def test_list_search_finds_chinese_names_by_substring(a):
    city = marker()
    customer(a, city=city, name=f"上海华联贸易有限公司 {city}")
    customer(a, city=city, name=f"北京 {city}")
    items = a.items("customer", q="华联", filter=f'city = "{city}"')
    assert [i["name"] for i in items] == [f"上海华联贸易有限公司 {city}"]
    assert a.items("customer", q="华联贸易", filter=f'city = "{city}"')


def test_list_include_embeds_lookup_targets_without_a_query_per_row(a):
    tag = marker()
    for size in (2, 12):
        owner = customer(a)
        contact = a.create("contact", {"name": "王芳", "customer": owner["id"]})
        for i in range(size):
            a.create(
                "deal",
                {
                    "name": f"{tag}-{size}-{i}",
                    "customer": owner["id"],
                    "primary_contact": contact["id"],
                },
            )
    counts = []
    # The writes above changed the tenant's database: the first read after them asks for
    # the published version again (decision 0010). Compare two reads that do not.
    a.items("deal", limit=1)
    for size in (2, 12):
        with statements(a) as seen:
            items = a.items(
                "deal",
                filter=f'name starts_with "{tag}-{size}-"',
                include="customer,primary_contact",
            )
        counts.append(len(seen))
        assert len(items) == size
        assert items[0]["_included"]["customer"]["id"] == items[0]["customer"]
        assert items[0]["_included"]["primary_contact"]["name"] == "王芳"
    assert counts[0] == counts[1]  # no N+1


def test_record_read_costs_a_fixed_number_of_statements(a):
    record = customer(a)
    with statements(a) as seen:
        a.read("customer", record["id"])
    assert len(seen) <= 3  # the metadata version, the row (and relations when any)


def test_count_is_exact_below_the_threshold(a):
    city = marker()
    for _ in range(3):
        customer(a, city=city)
    response = a.get("customer/count", query={"filter": f'city = "{city}"'})
    assert response.status_code == 200
    assert response.get_json() == {"count": 3, "exact": True}
    exact = a.get("customer/count", query={"filter": f'city = "{city}"', "exact": "true"})
    assert exact.get_json() == {"count": 3, "exact": True}
    problem(a.get("customer/count", query={"filter": "nope = 1"}), 400, "invalid_query")


def test_count_above_the_threshold_is_a_flagged_estimate_unless_exact(b):
    # Tenant b: these rows would slow every before/after snapshot of tenant a.
    city = marker()
    for _ in range(3):
        batch = {"items": [{"name": f"Many {city}", "city": city} for _ in range(400)]}
        assert b.post("customer/bulk", batch).status_code == 201
    where = {"filter": f'city = "{city}"'}
    estimate = b.get("customer/count", query=where).get_json()
    assert estimate["exact"] is False and estimate["count"] > 1000
    exact = b.get("customer/count", query={**where, "exact": "true"}).get_json()
    assert exact == {"count": 1200, "exact": True}


def test_recycle_bin_lists_only_deleted_records(a):
    city = marker()
    kept, gone = customer(a, city=city), customer(a, city=city)
    assert a.delete(f"customer/{gone['id']}").status_code == 204
    live = a.items("customer", filter=f'city = "{city}"')
    binned = a.items("customer", filter=f'city = "{city}"', deleted="true")
    assert [i["id"] for i in live] == [kept["id"]]
    assert [i["id"] for i in binned] == [gone["id"]]
    count = a.get("customer/count", query={"filter": f'city = "{city}"', "deleted": "true"})
    assert count.get_json()["count"] == 1


# -- update, ETag, If-Match -------------------------------------------------------------------


def test_patch_with_current_if_match_changes_the_record(a):
    record = customer(a)
    response = a.patch(
        f"customer/{record['id']}", {"city": "Shanghai"}, headers={"If-Match": '"1"'}
    )
    assert response.status_code == 200
    assert response.headers["ETag"] == '"2"'
    assert response.get_json()["city"] == "Shanghai"
    assert response.get_json()["version"] == 2
    plain = a.patch(f"customer/{record['id']}", {"city": "Beijing"})
    assert plain.status_code == 200 and plain.get_json()["version"] == 3


@pytest.mark.parametrize(
    "header", ['"1"', 'W/"2"', '"1", "3"', '"x"', '"02"', '"99999999999999999999999"']
)
def test_patch_with_stale_or_weak_if_match_is_412_with_current_version(a, header):
    record = customer(a)
    assert a.patch(f"customer/{record['id']}", {"city": "x"}).status_code == 200
    with unchanged(a):
        response = a.patch(f"customer/{record['id']}", {"city": "y"}, headers={"If-Match": header})
        body = problem(response, 412, "version_mismatch")
    assert body["current_version"] == 2


@pytest.mark.parametrize("header", ['"2"', '"1", "2"', "*", ' "2" '])
def test_patch_accepts_matching_tags_and_star(a, header):
    record = customer(a)
    assert a.patch(f"customer/{record['id']}", {"city": "x"}).status_code == 200
    response = a.patch(f"customer/{record['id']}", {"city": "y"}, headers={"If-Match": header})
    assert response.status_code == 200
    assert response.get_json()["version"] == 3


@pytest.mark.parametrize("header", ["2", '"2', "W/2", '"2";', '"a"b"', "**", '"2",,', '"2 "'])
def test_malformed_if_match_is_400(a, header):
    record = customer(a)
    with unchanged(a):
        response = a.patch(f"customer/{record['id']}", {"city": "y"}, headers={"If-Match": header})
        problem(response, 400, "invalid_if_match")
        problem(
            a.delete(f"customer/{record['id']}", headers={"If-Match": header}),
            400,
            "invalid_if_match",
        )


def test_patch_without_if_match_is_428_when_the_tenant_requires_it(strict):
    record = strict.create("customer", {"name": "Strict"})
    with unchanged(strict):
        body = problem(
            strict.patch(f"customer/{record['id']}", {"city": "x"}), 428, "precondition_required"
        )
        assert "If-Match" in body["detail"]
        star = strict.patch(f"customer/{record['id']}", {"city": "x"}, headers={"If-Match": "*"})
        problem(star, 428, "precondition_required")
        bulk = strict.patch(
            "customer/bulk", {"items": [{"id": record["id"], "fields": {"city": "x"}}]}
        )
        assert pointers(problem(bulk, 428, "precondition_required")) == ["/items/0/version"]
    ok = strict.patch(f"customer/{record['id']}", {"city": "x"}, headers={"If-Match": '"1"'})
    assert ok.status_code == 200
    # Deleting stays possible without If-Match: only updates require it.
    assert strict.delete(f"customer/{record['id']}").status_code == 204


def test_delete_with_stale_if_match_is_412_and_keeps_the_record(a):
    record = customer(a)
    a.patch(f"customer/{record['id']}", {"city": "x"})
    with unchanged(a):
        response = a.delete(f"customer/{record['id']}", headers={"If-Match": '"1"'})
        assert problem(response, 412, "version_mismatch")["current_version"] == 2
    assert a.delete(f"customer/{record['id']}", headers={"If-Match": '"2"'}).status_code == 204


def test_patch_of_a_deleted_record_is_404(a):
    record = customer(a)
    a.delete(f"customer/{record['id']}")
    with unchanged(a):
        problem(a.patch(f"customer/{record['id']}", {"city": "x"}), 404, "not_found")
        problem(a.delete(f"customer/{record['id']}"), 404, "not_found")


# -- recycle bin ------------------------------------------------------------------------------


def test_delete_restore_and_purge(a):
    record = customer(a)
    rid = record["id"]
    problem(a.post(f"customer/{rid}/restore"), 404, "not_found")  # not in the bin
    with unchanged(a):
        problem(a.delete(f"customer/{rid}/purge"), 409, "not_in_recycle_bin")
    assert a.delete(f"customer/{rid}").status_code == 204
    restored = a.post(f"customer/{rid}/restore")
    assert restored.status_code == 200
    assert restored.get_json()["deleted_at"] is None
    assert restored.headers["ETag"] == '"3"'
    assert a.delete(f"customer/{rid}").status_code == 204
    audits = a.count(audit)
    purged = a.delete(f"customer/{rid}/purge")
    assert purged.status_code == 204 and purged.data == b""
    problem(a.get(f"customer/{rid}", query={"deleted": "true"}), 404, "not_found")
    assert a.count(audit) == audits + 1
    problem(a.delete(f"customer/{rid}/purge"), 404, "not_found")


def test_purge_refused_while_a_restricting_lookup_points_at_the_record(a):
    owner = customer(a)
    a.create("deal", {"name": "D", "customer": owner["id"]})  # deal.customer restricts
    a.delete(f"customer/{owner['id']}")
    with unchanged(a):
        problem(a.delete(f"customer/{owner['id']}/purge"), 409, "still_referenced")


# -- related ----------------------------------------------------------------------------------


def test_related_lists_records_that_point_at_the_record(a):
    owner, other = customer(a), customer(a)
    deals = [a.create("deal", {"name": f"D{i}", "customer": owner["id"]}) for i in range(3)]
    a.create("deal", {"name": "elsewhere", "customer": other["id"]})
    task = a.create(
        "task", {"subject": "call", "related_to": {"entity": "customer", "id": owner["id"]}}
    )
    response = a.get(f"customer/{owner['id']}/related/deal", query={"sort": "name", "limit": 2})
    assert response.status_code == 200
    body = response.get_json()
    assert [d["name"] for d in body["items"]] == ["D0", "D1"]
    rest = a.get(
        f"customer/{owner['id']}/related/deal",
        query={"sort": "name", "limit": 2, "cursor": body["next_cursor"]},
    ).get_json()
    assert [d["id"] for d in rest["items"]] == [deals[2]["id"]] and rest["next_cursor"] is None
    tasks = a.items(f"customer/{owner['id']}/related/task")
    assert [t["id"] for t in tasks] == [task["id"]]
    filtered = a.items(f"customer/{owner['id']}/related/deal", filter='name = "D1"')
    assert [d["name"] for d in filtered] == ["D1"]


def test_related_refusals(a):
    owner = customer(a)
    with unchanged(a):
        problem(a.get(f"customer/{uuid.uuid4()}/related/deal"), 404, "not_found")
        problem(a.get(f"customer/{owner['id']}/related/nothing"), 404, "not_found")
        problem(a.get(f"task/{uuid.uuid4()}/related/customer"), 404, "not_found")
        problem(
            a.get(f"customer/{owner['id']}/related/deal", query={"sort": "nope"}),
            400,
            "invalid_query",
        )
        problem(
            a.get(f"customer/{owner['id']}/related/deal", query={"deleted": "true"}),
            400,
            "invalid_query",
        )


def test_related_through_many_to_many(strict):
    contact = strict.create("contact", {"name": "Li"})
    owner = strict.create("customer", {"name": "M2M", "partners": [contact["id"]]})
    assert owner["partners"] == [contact["id"]]
    back = strict.items(f"contact/{contact['id']}/related/customer")
    assert [c["id"] for c in back] == [owner["id"]]


def test_strict_tenant_masks_encrypted_and_computes_formulas(strict):
    record = strict.create(
        "customer", {"name": "Enc", "secret": "p@ss", "lifetime_value": 21, "code": marker()[:12]}
    )
    assert record["secret"] == "********"
    assert record["double_value"] in ("42.0", "42.00")
    found = strict.items("customer", filter="double_value = 42", sort="-double_value")
    assert record["id"] in [i["id"] for i in found]
    duplicate = strict.post("customer", {"name": "Dup", "code": record["code"]})
    assert pointers(problem(duplicate, 422, "validation_failed")) == ["/code"]


# -- idempotency ------------------------------------------------------------------------------


def test_retry_with_the_same_idempotency_key_replays_and_creates_nothing(a):
    key = f"create-{marker()}"
    body = {"name": f"Once {key}"}
    first = a.post("customer", body, headers={"Idempotency-Key": key})
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    with unchanged(a):
        again = a.post("customer", body, headers={"Idempotency-Key": key})
    assert again.status_code == 201
    assert again.get_json() == first.get_json()
    assert again.headers["Location"] == first.headers["Location"]
    assert again.headers["ETag"] == first.headers["ETag"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert len(a.items("customer", filter=f'name = "Once {key}"')) == 1


def test_same_idempotency_key_with_another_body_is_422(a):
    key = f"create-{marker()}"
    a.create("customer", {"name": "First"}, headers={"Idempotency-Key": key})
    with unchanged(a):
        response = a.post("customer", {"name": "Second"}, headers={"Idempotency-Key": key})
        body = problem(response, 422, "idempotency_key_reused")
        assert "different request" in body["detail"]
        other_path = a.post("contact", {"name": "First"}, headers={"Idempotency-Key": key})
        problem(other_path, 422, "idempotency_key_reused")


def test_refused_request_stores_no_idempotency_key(a):
    key = f"create-{marker()}"
    with unchanged(a):
        problem(
            a.post("customer", {"nope": 1}, headers={"Idempotency-Key": key}),
            422,
            "validation_failed",
        )
    assert (
        a.post("customer", {"name": "Fixed"}, headers={"Idempotency-Key": key}).status_code == 201
    )


def test_idempotency_keys_belong_to_one_user(a):
    key = f"shared-{marker()}"
    member = a.api.add_member(["sales_rep"])
    other = a.api.new_token(member)
    body = {"name": f"Per user {key}"}
    first = a.post("customer", body, headers={"Idempotency-Key": key})
    second = a.post("customer", body, headers={"Idempotency-Key": key}, token=other)
    assert first.status_code == second.status_code == 201
    assert first.get_json()["id"] != second.get_json()["id"]


def test_bulk_create_and_delete_honour_idempotency_keys(a):
    key = f"bulk-{marker()}"
    body = {"items": [{"name": f"Bulk {key} {i}"} for i in range(3)]}
    first = a.post("customer/bulk", body, headers={"Idempotency-Key": key})
    assert first.status_code == 201
    with unchanged(a):
        again = a.post("customer/bulk", body, headers={"Idempotency-Key": key})
    assert again.get_json() == first.get_json()
    ids = [i["id"] for i in first.get_json()["items"]]
    delete_key = f"delete-{marker()}"
    gone = a.post("customer/bulk/delete", {"ids": ids}, headers={"Idempotency-Key": delete_key})
    assert gone.status_code == 204
    with unchanged(a):
        replayed = a.post(
            "customer/bulk/delete", {"ids": ids}, headers={"Idempotency-Key": delete_key}
        )
    assert replayed.status_code == 204 and replayed.headers["Idempotent-Replayed"] == "true"


def test_concurrent_retries_with_one_idempotency_key_create_once(world, a, request):
    key = f"race-{marker()}"
    body = {"name": f"Race {key}"}
    barrier = threading.Barrier(4)
    answers: list[tuple[int, Any]] = []

    def send() -> None:
        client = world.app.test_client()
        barrier.wait()
        response = client.post(
            a.url("customer"),
            json=body,
            headers={"Authorization": f"Bearer {a.token}", "Idempotency-Key": key},
        )
        answers.append((response.status_code, response.get_json()))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in answers] == [201] * 4
    assert len({answer["id"] for _, answer in answers}) == 1
    assert len(a.items("customer", filter=f'name = "Race {key}"')) == 1


@pytest.mark.parametrize("key", ["", " ", "é-key", "x" * 201, "tab\there"])
def test_malformed_idempotency_key_is_400(a, key):
    with unchanged(a):
        response = a.post("customer", {"name": "x"}, headers={"Idempotency-Key": key})
        problem(response, 400, "invalid_idempotency_key")


# -- bulk -------------------------------------------------------------------------------------


def test_bulk_create_creates_every_item_in_one_transaction(a):
    tag = marker()
    audits = a.count(audit)
    response = a.post("customer/bulk", {"items": [{"name": f"{tag}-{i}"} for i in range(3)]})
    assert response.status_code == 201
    created = response.get_json()["items"]
    assert [c["name"] for c in created] == [f"{tag}-0", f"{tag}-1", f"{tag}-2"]
    assert a.count(audit) == audits + 3


def test_bulk_create_is_all_or_nothing_with_per_row_pointers(a):
    tag = marker()
    items = [
        {"name": f"{tag}-ok"},
        {"city": "no name"},
        {"name": f"{tag}-bad", "lifetime_value": "abc", "nope": 1},
        "not an object",
    ]
    with unchanged(a):
        body = problem(a.post("customer/bulk", {"items": items}), 422, "validation_failed")
    assert sorted(pointers(body)) == [
        "/items/1/name",
        "/items/2/lifetime_value",
        "/items/2/nope",
        "/items/3",
    ]


def test_bulk_patch_changes_every_item_or_none(a):
    first, second = customer(a), customer(a)
    ok = a.patch(
        "customer/bulk",
        {
            "items": [
                {"id": first["id"], "version": 1, "fields": {"city": "A"}},
                {"id": second["id"], "fields": {"city": "B"}},
            ]
        },
    )
    assert ok.status_code == 200
    assert [r["city"] for r in ok.get_json()["items"]] == ["A", "B"]
    with unchanged(a):
        bad = a.patch(
            "customer/bulk",
            {
                "items": [
                    {"id": first["id"], "fields": {"city": "C"}},
                    {"id": second["id"], "fields": {"lifetime_value": "abc", "id": "x"}},
                ]
            },
        )
        assert sorted(pointers(problem(bad, 422, "validation_failed"))) == [
            "/items/1/fields/id",
            "/items/1/fields/lifetime_value",
        ]
        stale = a.patch(
            "customer/bulk",
            {
                "items": [
                    {"id": first["id"], "version": 2, "fields": {"city": "C"}},
                    {"id": second["id"], "version": 1, "fields": {"city": "D"}},
                ]
            },
        )
        body = problem(stale, 412, "version_mismatch")
        assert pointers(body) == ["/items/1/version"]
        assert body["errors"][0]["current_version"] == 2
        missing = a.patch(
            "customer/bulk", {"items": [{"id": str(uuid.uuid4()), "fields": {"city": "E"}}]}
        )
        assert pointers(problem(missing, 422, "validation_failed")) == ["/items/0/id"]
        twice = a.patch(
            "customer/bulk",
            {
                "items": [
                    {"id": first["id"], "fields": {}},
                    {"id": first["id"], "fields": {}},
                ]
            },
        )
        assert pointers(problem(twice, 422, "validation_failed")) == ["/items/1/id"]
        shape = a.patch(
            "customer/bulk",
            {"items": [{"id": "nope", "version": 0, "fields": [], "more": 1}, 7]},
        )
        assert sorted(pointers(problem(shape, 422, "validation_failed"))) == [
            "/items/0/fields",
            "/items/0/id",
            "/items/0/more",
            "/items/0/version",
            "/items/1",
        ]


def test_bulk_delete_is_all_or_nothing(a):
    first, second = customer(a), customer(a)
    with unchanged(a):
        missing = a.post("customer/bulk/delete", {"ids": [first["id"], str(uuid.uuid4())]})
        assert pointers(problem(missing, 422, "validation_failed")) == ["/ids/1"]
        twice = a.post("customer/bulk/delete", {"ids": [first["id"], first["id"]]})
        assert pointers(problem(twice, 422, "validation_failed")) == ["/ids/1"]
        wrong = a.post("customer/bulk/delete", {"ids": ["x", 5]})
        assert pointers(problem(wrong, 422, "validation_failed")) == ["/ids/0", "/ids/1"]
    assert a.post("customer/bulk/delete", {"ids": [first["id"], second["id"]]}).status_code == 204
    problem(a.get(f"customer/{first['id']}"), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "customer/bulk", {"items": [{"name": "x"}] * 501}),
        ("POST", "customer/bulk", {"items": []}),
        ("POST", "customer/bulk", {"items": {"name": "x"}}),
        ("POST", "customer/bulk", {"rows": []}),
        ("PATCH", "customer/bulk", {"items": [{"id": str(uuid.uuid4()), "fields": {}}] * 501}),
        ("POST", "customer/bulk/delete", {"ids": [str(uuid.uuid4()) for _ in range(10_000)]}),
        ("POST", "customer/bulk/delete", {"ids": "all"}),
    ],
)
def test_bulk_request_shape_is_checked(a, method, path, body):
    with unchanged(a):
        response = a.call(method, path, body)
        found = pointers(problem(response, 422, "validation_failed"))
    assert found[0] in ("/items", "/ids", "/rows")
    listed = body.get("items", body.get("ids"))
    if isinstance(listed, list) and len(listed) > 500:
        assert "send 1 to 500 per request" in response.get_json()["errors"][0]["message"]


# -- access -----------------------------------------------------------------------------------


def _writes(record_id: str) -> list[tuple[str, str, Any]]:
    return [
        ("POST", "customer", {"name": "x"}),
        ("PATCH", f"customer/{record_id}", {"city": "x"}),
        ("DELETE", f"customer/{record_id}", None),
        ("POST", f"customer/{record_id}/restore", None),
        ("DELETE", f"customer/{record_id}/purge", None),
        ("POST", "customer/bulk", {"items": [{"name": "x"}]}),
        ("PATCH", "customer/bulk", {"items": [{"id": record_id, "fields": {"city": "x"}}]}),
        ("POST", "customer/bulk/delete", {"ids": [record_id]}),
    ]


def test_read_only_token_can_read_but_not_write(world, a):
    record = customer(a)
    assert a.get(f"customer/{record['id']}", token=world.read_only).status_code == 200
    assert a.get("customer", token=world.read_only).status_code == 200
    with unchanged(a):
        for method, path, body in _writes(record["id"]):
            response = a.call(method, path, body, token=world.read_only)
            assert problem(response, 403, "forbidden")["detail"] == "this API token is read-only"


def test_other_tenants_token_sees_nothing_and_changes_nothing(a, b):
    record = customer(b)
    paths = [
        ("GET", f"customer/{record['id']}", None),
        ("GET", "customer", None),
        ("GET", "customer/count", None),
        ("GET", f"customer/{record['id']}/related/deal", None),
        *_writes(record["id"]),
    ]
    with unchanged(b):
        for method, path, body in paths:
            # A's token on B's URLs: exactly like an unknown tenant.
            response = b.call(method, path, body, token=a.token)
            assert problem(response, 404, "not_found")["detail"] == "there is no such tenant"
            # B's record ids under A's URLs: no such record.
            if record["id"] in path and method == "GET":
                problem(a.call(method, path, body), 404, "not_found")
    assert b.read("customer", record["id"]) == record


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "customer"),
        ("GET", "customer/count"),
        ("POST", "customer"),
        ("POST", "customer/bulk"),
    ],
)
def test_unknown_query_parameters_are_400(a, method, path):
    """A misspelt parameter (fitler=) must not silently widen a list or reach a write."""
    with unchanged(a):
        response = a.call(method, path, {"name": "x"}, query={"fitler": "name = 'x'"})
        assert pointers(problem(response, 400, "invalid_query")) == ["/fitler"]


@pytest.mark.parametrize(
    "error",
    [
        sqlite3.OperationalError("database is locked"),
        psycopg.errors.DeadlockDetected("deadlock detected"),
        psycopg.errors.LockNotAvailable("could not obtain lock"),
    ],
)
def test_busy_database_is_503_with_retry_after(a, monkeypatch, error):
    def busy(*args: Any, **kwargs: Any) -> None:
        raise sa.exc.OperationalError("INSERT", {}, error)

    monkeypatch.setattr(records_service, "create", busy)
    with unchanged(a):
        response = a.post("customer", {"name": "x"}, headers={"Idempotency-Key": marker()})
        problem(response, 503, "busy")
    assert response.headers["Retry-After"] == "1"


def test_requests_without_a_token_are_401(a):
    response = a.api.client.get(a.url("customer"))
    problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="metacrm"'


# -- bad input: queries -----------------------------------------------------------------------

DEEP = "(" * 10_000 + "1 = 1" + ")" * 10_000
LONG = " or ".join(f'name = "{i:05d}"' for i in range(6_000))  # about 100 kB


@pytest.mark.parametrize(
    ("query", "query_code", "pointer"),
    [
        ({"filter": "nope = 1"}, "invalid_filter", "/filter"),
        ({"filter": "name > 5"}, "invalid_filter", "/filter"),
        ({"filter": "1=1; drop table customer"}, "invalid_filter", "/filter"),
        ({"filter": "name = 'x' or 1=1 --"}, "invalid_filter", "/filter"),
        ({"filter": LONG}, "invalid_filter", "/filter"),
        ({"filter": DEEP}, "invalid_filter", "/filter"),
        ({"filter": "(" * 100 + "1 = 1" + ")" * 100}, "invalid_filter", "/filter"),
        ({"filter": "not " * 2000 + "true"}, "invalid_filter", "/filter"),
        ({"filter": "-" * 5000 + "1 = 1"}, "invalid_filter", "/filter"),
        ({"filter": 'name = "unterminated'}, "invalid_filter", "/filter"),
        ({"filter": "description contains"}, "invalid_filter", "/filter"),
        ({"sort": "nope"}, "invalid_sort", "/sort"),
        ({"sort": "description"}, "invalid_sort", "/sort"),
        ({"sort": "tags"}, "invalid_sort", "/sort"),
        ({"sort": "name,-name"}, "invalid_sort", "/sort"),
        ({"sort": "name;drop"}, "invalid_sort", "/sort"),
        ({"fields": "name,nope"}, "invalid_fields", "/fields"),
        ({"include": "name"}, "invalid_include", "/include"),
        ({"include": "nope"}, "invalid_include", "/include"),
        ({"q": "x" * 201}, "invalid_search", "/q"),
        ({"cursor": "garbage"}, "invalid_cursor", "/cursor"),
        ({"cursor": "x" * 9000}, "invalid_cursor", "/cursor"),
    ],
)
def test_bad_query_is_400_invalid_query(a, query, query_code, pointer):
    with unchanged(a):
        body = problem(a.get("customer", query=query), 400, "invalid_query")
    assert body["query_code"] == query_code
    assert pointers(body) == [pointer]
    if query_code == "invalid_filter":
        assert body["errors"][0]["line"] >= 1 and body["errors"][0]["column"] >= 1


@pytest.mark.parametrize("limit", ["-1", "0", str(10**12), "abc", "1.5", "", "501", " 5", "５"])
def test_bad_limit_is_400(a, limit):
    with unchanged(a):
        body = problem(a.get("customer", query={"limit": limit}), 400, "invalid_query")
    assert pointers(body) == ["/limit"]


@pytest.mark.parametrize(
    "query",
    [
        {"deleted": "yes"},
        {"deleted": "1"},
        {"exact": "maybe"},
        {"filter": 'name = "a\x00b"'},
        {"q": "a\x00"},
        MultiDict([("filter", "name = 'a'"), ("filter", "name = 'b'")]),
    ],
)
def test_bad_parameters_are_400(a, query):
    with unchanged(a):
        problem(a.get("customer", query=query), 400, "invalid_query")
        problem(a.get("customer/count", query=query), 400, "invalid_query")


def _cursor(t: Records, entity: str = "customer", **query: Any) -> str:
    for _ in range(2):
        t.create(entity, {"name": f"Cursor {marker()}"})
    response = t.get(entity, query={"limit": 1, **query})
    cursor = response.get_json()["next_cursor"]
    assert cursor
    return cursor


def test_tampered_and_foreign_cursors_are_400(a, b):
    good = _cursor(a)
    body, _, signature = good.partition(".")
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    candidates = {
        "tampered body": f"{flipped}.{signature}",
        "tampered signature": f"{body}.{signature[:-2]}AA",
        "no signature": body,
        "other tenant": _cursor(b),
        "other entity": _cursor(a, "contact"),
        "other sort": _cursor(a, sort="name"),
    }
    with unchanged(a):
        for name, cursor in candidates.items():
            response = a.get("customer", query={"limit": 1, "cursor": cursor})
            assert problem(response, 400, "invalid_query")["query_code"] == "invalid_cursor", name
        sorted_by_name = a.get("customer", query={"limit": 1, "cursor": good, "sort": "name"})
        problem(sorted_by_name, 400, "invalid_query")
    assert a.get("customer", query={"limit": 1, "cursor": good}).status_code == 200


# -- bad input: payloads ----------------------------------------------------------------------


def _payload_cases() -> list[tuple[str, dict[str, Any], list[str]]]:
    return [
        ("system field id", {"name": "x", "id": str(uuid.uuid4())}, ["/id"]),
        ("system field version", {"name": "x", "version": 9}, ["/version"]),
        (
            "system field created_at",
            {"name": "x", "created_at": "2024-01-01T00:00:00Z"},
            ["/created_at"],
        ),
        ("system field deleted_at", {"name": "x", "deleted_at": None}, ["/deleted_at"]),
        ("system field owner_id", {"name": "x", "owner_id": str(uuid.uuid4())}, ["/owner_id"]),
        ("unknown field", {"name": "x", "nmae": "y"}, ["/nmae"]),
        ("wrong type text", {"name": 5}, ["/name"]),
        ("wrong type decimal", {"name": "x", "lifetime_value": "abc"}, ["/lifetime_value"]),
        ("wrong type list", {"name": "x", "tags": "vip"}, ["/tags"]),
        ("bad date", {"name": "x", "next_follow_up_on": "2024-13-01"}, ["/next_follow_up_on"]),
        (
            "naive datetime",
            {"name": "x", "last_contacted_at": "2024-01-01T10:00"},
            ["/last_contacted_at"],
        ),
        ("unknown option", {"name": "x", "status": "nope"}, ["/status"]),
        ("too long", {"name": "x" * 201}, ["/name"]),
        ("10,000 tags", {"name": "x", "tags": [f"t{i}" for i in range(10_000)]}, ["/tags"]),
        ("below minimum", {"name": "x", "lifetime_value": -1}, ["/lifetime_value"]),
        ("huge decimal", {"name": "x", "lifetime_value": 3.5e307}, ["/lifetime_value"]),
        ("huge decimal text", {"name": "x", "lifetime_value": "1e400"}, ["/lifetime_value"]),
        ("empty required", {"name": ""}, ["/name"]),
        ("null required", {"name": None}, ["/name"]),
    ]


@pytest.mark.parametrize(("case", "payload", "expected"), _payload_cases())
def test_bad_create_payload_is_422_with_pointers(a, case, payload, expected):
    with unchanged(a):
        body = problem(a.post("customer", payload), 422, "validation_failed")
    assert pointers(body) == expected, case


@pytest.mark.parametrize(("case", "payload", "expected"), _payload_cases())
def test_bad_patch_payload_is_422_with_pointers(a, case, payload, expected):
    record = customer(a)
    payload = {k: v for k, v in payload.items() if not (k == "name" and v == "x")}
    with unchanged(a):
        body = problem(a.patch(f"customer/{record['id']}", payload), 422, "validation_failed")
    assert pointers(body) == expected, case


def test_lookup_to_a_missing_record_and_stage_rules_are_422(a):
    owner = customer(a)
    with unchanged(a):
        response = a.post("deal", {"name": "D", "customer": str(uuid.uuid4())})
        assert pointers(problem(response, 422, "validation_failed")) == ["/customer"]
        # Won needs an amount: a pipeline rule, checked after the insert, then undone.
        stage = a.post("deal", {"name": "D", "customer": owner["id"], "stage": "won"})
        assert "/amount" in pointers(problem(stage, 422, "validation_failed"))


@pytest.mark.parametrize(
    ("case", "data", "content_type", "status", "code"),
    [
        ("invalid UTF-8", b'{"name": "\xff\xfe"}', "application/json", 400, "malformed_json"),
        (
            "duplicate keys",
            b'{"name": "a", "name": "b"}',
            "application/json",
            400,
            "malformed_json",
        ),
        ("NaN", b'{"name": "a", "lifetime_value": NaN}', "application/json", 400, "malformed_json"),
        (
            "Infinity",
            b'{"name": "a", "lifetime_value": Infinity}',
            "application/json",
            400,
            "malformed_json",
        ),
        (
            "overflowing number",
            b'{"name": "a", "lifetime_value": 1e400}',
            "application/json",
            400,
            "malformed_json",
        ),
        (
            "5,000-digit integer",
            b'{"name": "a", "lifetime_value": ' + b"9" * 5000 + b"}",
            "application/json",
            400,
            "malformed_json",
        ),
        ("lone surrogate", b'{"name": "a\\ud800"}', "application/json", 400, "malformed_json"),
        ("NUL character", b'{"name": "a\\u0000b"}', "application/json", 400, "malformed_json"),
        (
            "deep nesting",
            b'{"name": ' + b"[" * 100 + b"]" * 100 + b"}",
            "application/json",
            400,
            "malformed_json",
        ),
        ("not JSON", b"name=a", "application/json", 400, "malformed_json"),
        ("empty body", b"", "application/json", 400, "malformed_json"),
        ("array body", b'[{"name": "a"}]', "application/json", 400, "bad_request"),
        ("string body", b'"a"', "application/json", 400, "bad_request"),
        (
            "form body",
            b"name=a",
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
        ),
        (
            "10 MB body",
            b'{"name": "' + b"a" * (10 * 1024 * 1024) + b'"}',
            "application/json",
            413,
            "payload_too_large",
        ),
    ],
)
def test_bad_bodies_are_precise_4xx(a, case, data, content_type, status, code):
    record = customer(a)
    with unchanged(a):
        for method, path in (
            ("POST", "customer"),
            ("PATCH", f"customer/{record['id']}"),
            ("POST", "customer/bulk"),
            ("PATCH", "customer/bulk"),
            ("POST", "customer/bulk/delete"),
        ):
            response = a.call(method, path, data=data, content_type=content_type)
            problem(response, status, code)


# -- bad input: ids ---------------------------------------------------------------------------

NOT_IDS = [
    "123",
    "not-a-uuid",
    "01a2077fe1207c4eaf7bf93fdf465321",  # a UUID, but not in its canonical form
    "{01a2077f-e120-7c4e-af7b-f93fdf465321}",
    "01a2077f-e120-7c4e-af7b-f93fdf46532g",
    "x" * 300,
    "%00",
    "1%20or%201%3D1",
]


@pytest.mark.parametrize("record_id", NOT_IDS)
def test_ids_that_are_not_uuids_are_404(a, record_id):
    with unchanged(a):
        for method, path, body in (
            ("GET", f"customer/{record_id}", None),
            ("PATCH", f"customer/{record_id}", {"city": "x"}),
            ("DELETE", f"customer/{record_id}", None),
            ("POST", f"customer/{record_id}/restore", None),
            ("DELETE", f"customer/{record_id}/purge", None),
            ("GET", f"customer/{record_id}/related/deal", None),
        ):
            body_json = problem(a.call(method, path, body), 404, "not_found")
            assert "not a record id" in body_json["detail"] or "Not Found" in body_json["title"]


def test_unknown_uuid_is_404_on_every_record_endpoint(a):
    missing = str(uuid.uuid4())
    with unchanged(a):
        for method, path, body in (
            ("GET", f"customer/{missing}", None),
            ("PATCH", f"customer/{missing}", {"city": "x"}),
            ("DELETE", f"customer/{missing}", None),
            ("POST", f"customer/{missing}/restore", None),
            ("DELETE", f"customer/{missing}/purge", None),
        ):
            problem(a.call(method, path, body), 404, "not_found")


def test_problem_bodies_leak_nothing_internal(a):
    for response in (
        a.get("customer", query={"filter": "1=1; drop table customer"}),
        a.post("customer", {"name": "a\x00b"}),
        a.post("deal", {"name": "D", "customer": str(uuid.uuid4())}),
    ):
        no_leak(response)
        assert json.loads(response.get_data(as_text=True))["code"]


def test_single_writes_cost_a_fixed_number_of_statements(a):
    """One create: the row, its outbox event, its audit entry, the read back; an update
    first reads and locks the row. PostgreSQL appends the entry in one statement (which
    moves the chain's head), SQLite in three (decision record 0016)."""
    with statements(a) as created:
        record = customer(a)
    with statements(a) as updated:
        response = a.patch(
            f"customer/{record['id']}", {"city": marker()}, headers={"If-Match": '"1"'}
        )
    assert response.status_code == 200

    def writes(seen: list[str]) -> int:
        # Not the write's: SQLite's BEGIN (a statement there) and the published-version
        # check, which the request makes when its cache cannot vouch for the version.
        return sum(not s.startswith("BEGIN") and "_meta_version" not in s for s in seen)

    if a.api.platform.store(a.api.tenant).dialect == "postgresql":
        assert (writes(created), writes(updated)) == (4, 5)
    else:
        assert (writes(created), writes(updated)) == (6, 7)
