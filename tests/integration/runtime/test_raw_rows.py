"""Raw rows on the read path: driver values straight to JSON, the same text as typed rows.

Lists and reads by id select stored columns without SQLAlchemy's result
processors and convert the driver's values once (recordview.raw_converter).
These tests compare that JSON, byte for byte, with the typed path's on random
records of every field type, on both backends, including stored shapes the
fast paths do not expect; and they check that cached filters, sorts and select
lists still take the request's ``today()`` and ``me()``.
"""

from __future__ import annotations

import copy
import datetime as dt
import decimal
import json
import random
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from metacrm.metadata.expression import EvalContext
from metacrm.runtime import metastore, query, records, recordview, tenancy
from metacrm.runtime.contextfree import ContextFreeCache, build_watched
from metacrm.runtime.records import Caller

CALLER = Caller(uuid.UUID("00000000-0000-7000-8000-000000000001"), "tester@example.com")
SECRET = b"raw-rows-secret"
KEEPER = uuid.UUID("0000abcd-ef00-7000-8000-00000000beef")


def _field(name: str, kind: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "label": {"en": name}, **extra}


def _formula(name: str, expression: str, result_type: str, **extra: Any) -> dict[str, Any]:
    return _field(name, "formula", expression=expression, result_type=result_type, **extra)


SPECIMEN = {
    "name": "specimen",
    "label": {"en": "Specimen"},
    "plural_label": {"en": "Specimens"},
    "title_field": "title",
    "fields": [
        _field("title", "text"),
        _field("body", "long_text"),
        _field("rich", "rich_text"),
        _field("quantity", "integer"),
        _field("ratio", "decimal", precision=18, scale=6),
        _field("price", "currency"),
        _field("share", "percent"),
        _field("flag", "boolean"),
        _field("day", "date"),
        _field("moment", "datetime"),
        _field("mail", "email"),
        _field("phone", "phone"),
        _field("site", "url"),
        _field(
            "colour",
            "single_select",
            options=[{"value": v, "label": {"en": v}} for v in ("red", "green")],
        ),
        _field("sizes", "multi_select", options=[{"value": v, "label": {"en": v}} for v in "sml"]),
        _field("labels", "tags"),
        _field("parent", "lookup", target="customer"),
        _field("peers", "many_to_many", target="customer"),
        _field("about", "related_to", targets=["customer", "deal"]),
        _field("keeper", "user"),
        _field("serial", "auto_number", prefix="S-", padding=4),
        _field("attachment", "file"),
        _field("secret", "encrypted_text"),
        _field("extra", "json"),
        _formula("twice", "price * 2", "decimal", scale=2),
        _formula("shout", "upper(title)", "text"),
        _formula("next_day", "add_days(day, 1)", "date"),
        _formula("is_big", "quantity > 10", "boolean"),
        _formula("age_days", "days_between(day, today())", "integer"),
    ],
}


def tenant_with(platform, entity: dict[str, Any]):
    """A new core tenant whose version 2 adds ``entity``; returns (platform, store)."""
    created = tenancy.create_tenant(platform, f"w{uuid.uuid4().hex[:9]}", "Specimen tenant")
    store = platform.store(created.tenant)
    with store.connect() as connection:
        bundle = copy.deepcopy(metastore.current(connection).bundle)
    bundle["entities"].append(copy.deepcopy(entity))
    metastore.publish(store, bundle, expected_version=1)
    return platform, store


@pytest.fixture
def tenant(platform):
    """A core tenant with an entity holding a field of every type."""
    return tenant_with(platform, SPECIMEN)


def _create(tenant, entity: str, data: dict[str, Any]) -> dict[str, Any]:
    platform, store = tenant
    with store.begin(immediate=True) as connection:
        m = platform.models.current(store, connection)
        return records.create(connection, m, m.entity(entity), data, CALLER, platform.cipher)


def _random_specimen(rng: random.Random, customers: list[str], deals: list[str]) -> dict:
    """A payload with each field present or absent at random, values of every shape."""

    def maybe(value: Any) -> Any:
        return value if rng.random() < 0.8 else None

    moment = dt.datetime(2020, 1, 1, tzinfo=dt.UTC) + dt.timedelta(
        seconds=rng.randrange(10**8), microseconds=rng.choice([0, 0, 1, 500000, 999999])
    )
    return {
        "title": maybe(rng.choice(["Alpha", "贸易", "x" * 40, "a\"b'c"])),
        "body": maybe("line\n" * rng.randrange(3)),
        "rich": maybe("<p>hi</p>"),
        "quantity": maybe(rng.randrange(-(10**12), 10**12)),
        "ratio": maybe(str(decimal.Decimal(rng.randrange(-(10**11), 10**11)).scaleb(-6))),
        "price": maybe(rng.choice(["0.10", "-0.01", "12345678.90", "0", "1E+3", "7.5"])),
        "share": maybe(str(decimal.Decimal(rng.randrange(0, 10**6)).scaleb(-4))),
        "flag": maybe(rng.random() < 0.5),
        "day": maybe(dt.date(1999, 12, 31) + dt.timedelta(days=rng.randrange(20000))),
        "moment": maybe(
            moment.astimezone(dt.timezone(dt.timedelta(hours=rng.choice([-5, 0, 8])))).isoformat()
        ),
        "mail": maybe("someone@example.com"),
        "phone": maybe("+86 21 1234 5678"),
        "site": maybe("https://example.com/x?y=1"),
        "colour": maybe(rng.choice(["red", "green"])),
        "sizes": maybe(rng.sample(list("sml"), rng.randrange(4))),
        "labels": maybe(["a", "中文"][: rng.randrange(3)]),
        "parent": maybe(rng.choice(customers)),
        "peers": rng.sample(customers, rng.randrange(len(customers) + 1)),
        "about": maybe(
            rng.choice(
                [{"entity": "customer", "id": customers[0]}, {"entity": "deal", "id": deals[0]}]
            )
        ),
        "keeper": maybe(str(CALLER.user_id)),
        "attachment": maybe({"name": "a.pdf", "size": 3, "url": "https://example.com/a.pdf"}),
        "secret": maybe("hush"),
        "extra": maybe({"n": rng.random(), "list": [1, "two", None], "nested": {"ok": True}}),
    }


def _payload(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, dt.date) else v for k, v in data.items()}


def _typed_and_raw(tenant, entity_name: str, ctx: EvalContext) -> tuple[list, list]:
    """Every row of an entity read both ways, as JSON text per record, in id order."""
    platform, store = tenant
    with store.connect() as connection:
        m = platform.models.current(store, connection)
        entity = m.entity(entity_name)
        found = []
        for raw in (None, connection.dialect):
            columns = recordview.select_columns(m, entity, ctx, raw=raw)
            result = connection.execute(sa.select(*columns).order_by(entity.table.c.id))
            rows = recordview.rows_to_json(entity, list(result.keys()), result.all(), raw)
            found.append([json.dumps(r, ensure_ascii=False) for r in rows])
    return found[0], found[1]


def _ctx() -> EvalContext:
    now = dt.datetime.now(dt.UTC)
    return EvalContext(now=now, today=now.date(), user_id=CALLER.user_id)


def test_raw_rows_give_the_typed_rows_json_for_every_field_type(tenant):
    rng = random.Random(20261207)
    customers = [_create(tenant, "customer", {"name": f"C{i}"})["id"] for i in range(3)]
    deals = [_create(tenant, "deal", {"name": "D", "customer": customers[0]})["id"]]
    created = [
        _create(tenant, "specimen", _payload(_random_specimen(rng, customers, deals)))
        for _ in range(40)
    ]
    typed, raw = _typed_and_raw(tenant, "specimen", _ctx())
    assert len(raw) == 40 and raw == typed
    # And what the API paths return (list pages, read by id) is that JSON, too.
    platform, store = tenant
    with store.connect() as connection:
        m = platform.models.current(store, connection)
        entity = m.entity("specimen")
        listed: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = query.list_records(
                connection,
                m,
                entity,
                query.ListRequest(sort="moment,-price", limit=7, cursor=cursor),
                _ctx(),
                SECRET,
            )
            listed += page.items
            cursor = page.next_cursor
            if cursor is None:
                break
        read = [records.get(connection, m, entity, uuid.UUID(c["id"]), _ctx()) for c in created]
    assert sorted(r["id"] for r in listed) == sorted(c["id"] for c in created)
    by_id = {json.loads(t)["id"]: json.loads(t) for t in typed}
    for item in listed + read:
        expected = dict(by_id[item["id"]])
        expected["peers"] = item["peers"]  # many-to-many values are attached afterwards
        assert json.dumps(item, ensure_ascii=False) == json.dumps(expected, ensure_ascii=False)
    assert all(isinstance(item["flag"], bool | None) for item in listed)


def test_pages_sorted_by_every_sortable_kind_continue_where_they_stopped(tenant):
    rng = random.Random(7)
    customers = [_create(tenant, "customer", {"name": f"C{i}"})["id"] for i in range(2)]
    deals = [_create(tenant, "deal", {"name": "D", "customer": customers[0]})["id"]]
    for _ in range(25):
        _create(tenant, "specimen", _payload(_random_specimen(rng, customers, deals)))
    platform, store = tenant
    for sort in ("price", "-ratio", "day", "-moment", "parent", "keeper,-created_at", "flag"):
        with store.connect() as connection:
            m = platform.models.current(store, connection)
            entity = m.entity("specimen")
            whole = query.list_records(
                connection, m, entity, query.ListRequest(sort=sort, limit=500), _ctx(), SECRET
            ).items
            paged: list[dict[str, Any]] = []
            cursor = None
            while True:
                page = query.list_records(
                    connection,
                    m,
                    entity,
                    query.ListRequest(sort=sort, limit=4, cursor=cursor),
                    _ctx(),
                    SECRET,
                )
                paged += page.items
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
        assert [r["id"] for r in paged] == [r["id"] for r in whole], sort


def test_stored_shapes_the_fast_paths_do_not_expect_read_as_before(tenant, backend):
    """Values written by other hands (a migration, a person with SQL) go the typed way."""
    platform, store = tenant
    record = _create(
        tenant,
        "specimen",
        {
            "title": "odd",
            "moment": "2024-05-01T12:00:00Z",
            "day": "2024-05-01",
            "price": "1.5",
            "keeper": str(KEEPER),
        },
    )
    if backend == "sqlite":
        with store.begin() as connection:
            changed = connection.exec_driver_sql(
                "UPDATE specimen SET moment = '2024-05-01 12:00:00', day = '2024-05-01', "
                "keeper = ?, price = 2 WHERE id = ?",
                (str(KEEPER).upper(), uuid.UUID(record["id"]).hex),
            )
            assert changed.rowcount == 1
    typed, raw = _typed_and_raw(tenant, "specimen", _ctx())
    assert raw == typed
    (shown,) = [json.loads(r) for r in raw if json.loads(r)["id"] == record["id"]]
    assert shown["moment"] == "2024-05-01T12:00:00Z"
    assert shown["keeper"] == str(KEEPER)


def test_raw_columns_leave_the_sql_as_it_was(tenant):
    platform, store = tenant
    with store.connect() as connection:
        m = platform.models.current(store, connection)
        entity = m.entity("specimen")
        typed = sa.select(*recordview.select_columns(m, entity, _ctx()))
        raw = sa.select(*recordview.select_columns(m, entity, _ctx(), raw=connection.dialect))
        dialect = connection.dialect
        assert str(raw.compile(dialect=dialect)) == str(typed.compile(dialect=dialect))


def test_cached_filters_still_read_the_request_context(tenant):
    platform, store = tenant
    for day in ("2024-05-01", "2024-05-02"):
        _create(tenant, "specimen", {"title": day, "day": day})

    def titles(filter_text: str, today: dt.date, user: uuid.UUID | None = None) -> list[str]:
        ctx = EvalContext(
            now=dt.datetime.combine(today, dt.time(12), dt.UTC), today=today, user_id=user
        )
        with store.connect() as connection:
            m = platform.models.current(store, connection)
            page = query.list_records(
                connection,
                m,
                m.entity("specimen"),
                query.ListRequest(filter=filter_text, sort="title"),
                ctx,
                SECRET,
            )
        return [item["title"] for item in page.items]

    # today() directly, and through a formula that reads it.
    assert titles("day = today()", dt.date(2024, 5, 1)) == ["2024-05-01"]
    assert titles("day = today()", dt.date(2024, 5, 2)) == ["2024-05-02"]
    assert titles("age_days = 0", dt.date(2024, 5, 1)) == ["2024-05-01"]
    assert titles("age_days = 0", dt.date(2024, 5, 2)) == ["2024-05-02"]
    # me(): the owner is the creator.
    assert titles("owner_id = me()", dt.date(2024, 5, 1), CALLER.user_id) == [
        "2024-05-01",
        "2024-05-02",
    ]
    assert titles("owner_id = me()", dt.date(2024, 5, 1), uuid.uuid4()) == []
    # A plain filter is compiled once per published version and reused.
    with store.connect() as connection:
        m = platform.models.current(store, connection)
        entity = m.entity("specimen")
        first = query._compile_filter(m, entity, 'title = "x"', _ctx())
        again = query._compile_filter(m, entity, 'title = "x"', _ctx())
        dated = query._compile_filter(m, entity, "day = today()", _ctx())
        dated_again = query._compile_filter(m, entity, "day = today()", _ctx())
    assert again[0][1] is first[0][1]
    assert dated_again[0][1] is not dated[0][1]
    # Only the shared one may be compiled once for the driver (see ``direct``).
    assert (first[1], again[1], dated[1], dated_again[1]) == (True, True, False, False)


def test_sorts_by_a_formula_reading_today_are_built_per_request(tenant):
    platform, store = tenant
    for day in ("2024-05-01", "2024-04-01"):
        _create(tenant, "specimen", {"title": day, "day": day})
    with store.connect() as connection:
        m = platform.models.current(store, connection)
        entity = m.entity("specimen")
        keys = [query._sort_keys(m, entity, "age_days", _ctx()) for _ in range(2)]
        plain = [query._sort_keys(m, entity, "-price", _ctx()) for _ in range(2)]
    assert keys[0] is not keys[1]
    assert plain[0] is plain[1]


def test_build_watched_tells_a_context_free_build():
    ctx = _ctx()
    assert build_watched(lambda c: 1, ctx) == (1, True)
    assert build_watched(lambda c: c.today, ctx) == (ctx.today, False)
    assert build_watched(lambda c: list(c.team_ids), ctx) == ([], False)
    # Nested builds: what the inner one read, the outer one read too.
    assert build_watched(lambda c: build_watched(lambda d: d.now, c)[1], ctx) == (False, False)
    assert build_watched(lambda c: build_watched(lambda d: 2, c)[1], ctx) == (True, True)


def test_a_request_context_reads_the_clock_only_when_asked():
    from zoneinfo import ZoneInfo

    from metacrm.runtime.api.records import _RequestEvalContext

    zone, team = ZoneInfo("Pacific/Kiritimati"), uuid.uuid4()  # UTC+14: its date is often not UTC's
    ctx = _RequestEvalContext(zone, CALLER.user_id, (team,))
    assert "now" not in vars(ctx) and "today" not in vars(ctx)
    assert (ctx.user_id, ctx.team_ids) == (CALLER.user_id, (team,))
    assert build_watched(lambda c: 1, ctx) == (1, True)
    assert ctx.now.tzinfo is dt.UTC and ctx.today == ctx.now.astimezone(zone).date()
    assert build_watched(lambda c: (c.now, c.today), ctx) == ((ctx.now, ctx.today), False)
    with pytest.raises(AttributeError):
        ctx.tomorrow  # noqa: B018 - only the two clock values are made on demand


def test_context_free_cache_keeps_only_what_did_not_read_the_context():
    class Owner:
        pass

    owner, cache, calls = Owner(), ContextFreeCache(limit=2), []

    def build(value: Any) -> Any:
        def run(ctx: EvalContext) -> Any:
            calls.append(value)
            return ctx.today if value == "today" else [value]

        return run

    ctx = _ctx()
    first = cache.get(owner, "a", build("a"), ctx)
    assert cache.get(owner, "a", build("a"), ctx) is first
    cache.get(owner, "today", build("today"), ctx)
    cache.get(owner, "today", build("today"), ctx)
    assert calls == ["a", "today", "today"]
    # Bounded: a third key clears the owner's entries.
    cache.get(owner, "b", build("b"), ctx)
    cache.get(owner, "c", build("c"), ctx)
    cache.get(owner, "a", build("a"), ctx)
    assert calls[-1] == "a" and calls.count("a") == 2

    def failing(ctx: EvalContext) -> Any:
        calls.append("error")
        raise ValueError("bad")

    for _ in range(2):
        with pytest.raises(ValueError):
            cache.get(owner, "bad", failing, ctx)
    assert calls.count("error") == 2
