"""Hot reads on the driver's cursor (``runtime.direct``): the same answers, errors and events.

A read by id and a list's first page whose statement every request shares are
compiled once per tenant schema and sent on the pooled connection's own
cursor. These tests read random records of every field type both ways (the
driver path, and SQLAlchemy's through an added always-true scope, which turns
the driver path off) and compare the JSON text; they check which path ran, that
listeners still see the statement, that a lost PostgreSQL connection still
arrives as SQLAlchemy's error with the pool invalidated, and what ``prepare``
refuses.
"""

from __future__ import annotations

import copy
import gc
import json
import random
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from metacrm.runtime import direct, query, records

from .test_raw_rows import SPECIMEN, _create, _ctx, _payload, _random_specimen, tenant_with

SECRET = b"direct-secret"
#: SPECIMEN without its formula that reads today(): every statement is shared.
SHARED = copy.deepcopy(SPECIMEN)
SHARED["fields"] = [f for f in SHARED["fields"] if f["name"] != "age_days"]
ALWAYS = sa.true()


@pytest.fixture
def tenant(platform):
    return tenant_with(platform, SHARED)


@contextmanager
def statements(engine: sa.Engine) -> Iterator[list[tuple[str, bool]]]:
    """Collect (SQL, whether SQLAlchemy's execution context ran it) for every statement."""
    seen: list[tuple[str, bool]] = []

    def before(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: bool) -> None:
        seen.append((sql, context is not None))

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


_FROM_SPECIMEN = re.compile(r'FROM\s+(?:"?\w+"?\.)?"?specimen"?(?:\s|$)')


def _specimen_reads(seen: list[tuple[str, bool]]) -> list[bool]:
    """For each SELECT from the specimen table itself: whether SQLAlchemy's context ran it."""
    return [typed for sql, typed in seen if _FROM_SPECIMEN.search(sql)]


def _texts(items: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(item, ensure_ascii=False) for item in items]


def test_reads_and_first_pages_give_the_same_json_both_ways(tenant):
    rng = random.Random(7)
    customers = [_create(tenant, "customer", {"name": f"C{i}"})["id"] for i in range(3)]
    deals = [_create(tenant, "deal", {"name": "D", "customer": customers[0]})["id"]]
    created = [
        _create(tenant, "specimen", _payload(_random_specimen(rng, customers, deals)))
        for _ in range(30)
    ]
    platform, store = tenant
    filters = (
        None,
        'colour = "red"',
        "quantity > 0 and flag = true",
        "twice >= 1",
        "shout is not null",
    )
    with store.read() as connection, statements(store.engine) as seen:
        m = platform.models.current(store, connection)
        entity = m.entity("specimen")
        for item in created:
            key = uuid.UUID(item["id"])
            fast = records.get(connection, m, entity, key, _ctx())
            slow = records.get(connection, m, entity, key, _ctx(), scope=ALWAYS)
            assert _texts([fast]) == _texts([slow])
        for text in filters:
            for sort in ("-created_at", "price", "-moment,title"):
                request = query.ListRequest(filter=text, sort=sort, limit=500)
                fast_page = query.list_records(connection, m, entity, request, _ctx(), SECRET)
                slow_page = query.list_records(
                    connection, m, entity, request, _ctx(), SECRET, ALWAYS
                )
                assert _texts(fast_page.items) == _texts(slow_page.items), (text, sort)
    # Every read by id and every first page without the extra scope went to the driver.
    paths = _specimen_reads(seen)
    assert paths.count(False) == len(created) + len(filters) * 3
    assert paths.count(True) == len(created) + len(filters) * 3


def test_a_formula_reading_today_keeps_the_sqlalchemy_path(platform):
    """SPECIMEN's ``age_days`` makes every statement per request: nothing is compiled once."""
    platform, store = tenant_with(platform, SPECIMEN)
    record = _create((platform, store), "specimen", {"title": "x", "day": "2024-05-01"})
    with store.read() as connection, statements(store.engine) as seen:
        m = platform.models.current(store, connection)
        entity = m.entity("specimen")
        records.get(connection, m, entity, uuid.UUID(record["id"]), _ctx())
        query.list_records(connection, m, entity, query.ListRequest(), _ctx(), SECRET)
    assert _specimen_reads(seen) == [True, True]


def test_pages_after_a_cursor_go_to_the_driver_with_the_same_rows(tenant):
    """A cursor's values are the request's own parameters of SQL prepared once per null pattern."""
    rng = random.Random(11)
    customers = [_create(tenant, "customer", {"name": f"C{i}"})["id"] for i in range(2)]
    deals = [_create(tenant, "deal", {"name": "D", "customer": customers[0]})["id"]]
    for _ in range(25):
        _create(tenant, "specimen", _payload(_random_specimen(rng, customers, deals)))
    platform, store = tenant
    sorts = ("price", "-ratio", "day", "-moment", "parent", "keeper,-created_at", "flag", "title")
    with store.read() as connection, statements(store.engine) as seen:
        m = platform.models.current(store, connection)
        entity = m.entity("specimen")

        def walk(sort: str, scope: Any) -> list[str]:
            ids: list[str] = []
            cursor = None
            while True:
                page = query.list_records(
                    connection,
                    m,
                    entity,
                    query.ListRequest(sort=sort, limit=4, cursor=cursor),
                    _ctx(),
                    SECRET,
                    scope,
                )
                ids += [item["id"] for item in page.items]
                if page.next_cursor is None:
                    return ids
                cursor = page.next_cursor

        for sort in sorts:
            fast = walk(sort, None)
            assert len(fast) == 25 and fast == walk(sort, ALWAYS), sort
    paths = _specimen_reads(seen)
    assert paths.count(False) == paths.count(True) >= 7 * len(sorts)
    with store.read() as connection, statements(store.engine) as seen:
        listed = query.list_records(
            connection,
            m,
            entity,
            query.ListRequest(filter="quantity in (1, 3, 5)", sort="quantity"),
            _ctx(),
            SECRET,
        )
    assert all(item["quantity"] in (1, 3, 5) for item in listed.items)
    # A filter's in-list is literal values in fixed SQL: the driver's path too.
    assert _specimen_reads(seen) == [False]


def test_a_read_inside_a_write_sees_the_write(tenant):
    platform, store = tenant
    record = _create(tenant, "specimen", {"title": "before"})
    key = uuid.UUID(record["id"])
    with store.begin() as connection:
        m = platform.models.current(store, connection)
        entity = m.entity("specimen")
        connection.execute(
            sa.update(entity.table).where(entity.table.c.id == key).values(title="inside")
        )
        assert records.get(connection, m, entity, key, _ctx())["title"] == "inside"
        connection.rollback()
    with store.read() as connection:
        m = platform.models.current(store, connection)
        assert records.get(connection, m, m.entity("specimen"), key, _ctx())["title"] == "before"


def test_an_unknown_id_is_not_found(tenant):
    platform, store = tenant
    with store.read() as connection:
        m = platform.models.current(store, connection)
        with pytest.raises(records.RecordNotFound):
            records.get(connection, m, m.entity("specimen"), uuid.uuid4(), _ctx())


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_lost_connection_is_sqlalchemys_error_and_the_pool_starts_again(tenant):
    platform, store = tenant
    record = _create(tenant, "specimen", {"title": "kept"})
    key = uuid.UUID(record["id"])
    with store.read() as connection:
        m = platform.models.current(store, connection)
        entity = m.entity("specimen")
        records.get(connection, m, entity, key, _ctx())
        pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        admin = sa.create_engine(store.engine.url, poolclass=sa.NullPool)
        with admin.connect() as other:
            assert other.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
        admin.dispose()
        with pytest.raises(sa.exc.OperationalError) as lost:
            records.get(connection, m, entity, key, _ctx())
        assert lost.value.connection_invalidated
        assert connection.invalidated
    with store.read() as connection:
        m = platform.models.current(store, connection)
        assert records.get(connection, m, m.entity("specimen"), key, _ctx())["title"] == "kept"


def test_prepare_refuses_statements_without_fixed_sql(tenant):
    platform, store = tenant
    with store.read() as connection:
        m = platform.models.current(store, connection)
        table = m.entity("specimen").table
        dialect = connection.dialect
        schema = direct.schema_of(connection)
        expanding = sa.select(table.c.id).where(table.c.quantity.in_([1, 2]))
        assert direct.prepare(expanding, dialect, schema) is None
        fixed = sa.select(table.c.id, table.c.flag).where(table.c.quantity == 2)
        prepared = direct.prepare(fixed, dialect, schema)
        assert prepared is not None
        assert direct.rows(connection, prepared) == []
        if schema is not None:
            assert f'"{schema}"' in prepared.sql or f"{schema}." in prepared.sql


def test_result_processors_turn_driver_values_into_sqlalchemys(tenant):
    """Booleans and JSON stored by SQLite come back as Python's, as SQLAlchemy returns them."""
    platform, store = tenant
    _create(tenant, "specimen", {"title": "t", "flag": True, "extra": {"a": [1, None]}})
    with store.read() as connection:
        m = platform.models.current(store, connection)
        table = m.entity("specimen").table
        statement = sa.select(table.c.flag, table.c.extra, table.c.title)
        prepared = direct.prepare(statement, connection.dialect, direct.schema_of(connection))
        assert prepared is not None
        assert (
            [tuple(r) for r in direct.rows(connection, prepared)]
            == [tuple(r) for r in connection.execute(statement).all()]
            == [(True, {"a": [1, None]}, "t")]
        )


def test_the_cache_keeps_what_its_keys_name_and_goes_with_its_owner():
    cache = direct.PreparedCache(limit=2)

    class Owner:
        pass

    owner, kept = Owner(), Owner()
    built: list[int] = []

    def build() -> None:
        built.append(1)

    key = ("k", id(kept))
    assert cache.get(owner, key, build, keep=kept) is None
    assert cache.get(owner, key, build, keep=kept) is None
    assert built == [1]  # a None ("cannot") is remembered too
    del kept
    gc.collect()
    # Still alive in the entry: its id() cannot come to name another object.
    assert isinstance(cache._found[owner][key][0], Owner)
    cache.get(owner, "a", build)
    cache.get(owner, "b", build)  # over the limit: the owner's entries start again
    assert len(cache._found[owner]) == 1
    del owner
    gc.collect()
    assert len(cache._found) == 0


def test_a_second_tenant_reads_its_own_tables_through_the_same_prepared_shapes(platform):
    """Prepared SQL names the tenant's schema: another tenant never reads the first one's rows."""
    first, second = tenant_with(platform, SHARED), tenant_with(platform, SHARED)
    mine = _create(first, "specimen", {"title": "first's"})
    for (p, store), expected in ((first, [mine["id"]]), (second, [])):
        with store.read() as connection:
            m = p.models.current(store, connection)
            entity = m.entity("specimen")
            page = query.list_records(connection, m, entity, query.ListRequest(), _ctx(), SECRET)
            assert [item["id"] for item in page.items] == expected
            if not expected:
                with pytest.raises(records.RecordNotFound):
                    records.get(connection, m, entity, uuid.UUID(mine["id"]), _ctx())
            else:
                assert records.get(connection, m, entity, uuid.UUID(mine["id"]), _ctx())["id"]
