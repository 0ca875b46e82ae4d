"""Statements sent together (psycopg's pipeline mode; SQLite runs them at once)."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import sqlalchemy as sa

from metacrm.runtime import tenancy
from metacrm.runtime.pipeline import pipelined
from metacrm.runtime.store import TenantStore, idempotency, outbox

NOW = dt.datetime(2026, 12, 7, 8, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=8)))


def event(n: int) -> dict[str, object]:
    return {
        "created_at": NOW,
        "event": "record.create",
        "entity": "customer",
        "record_id": uuid.UUID(int=n),
        "actor_id": None,
        "payload": {"n": n},
    }


def idempotency_key(n: int) -> dict[str, object]:
    return {
        "principal_id": uuid.UUID(int=n),
        "key": "k",
        "request_hash": "h",
        "status": 0,
        "body": "",
        "headers": {},
        "created_at": NOW,
    }


def test_pipelined_statements_answer_when_the_block_ends(store: TenantStore):
    with store.begin() as connection:
        with pipelined(connection) as pipe:
            pipe.execute(outbox.insert().inline(), event(1))
            pipe.execute(outbox.insert().inline(), [event(2), event(3)])
            found = pipe.execute(
                sa.select(outbox.c.record_id, outbox.c.payload).order_by(outbox.c.id)
            )
            nothing = pipe.execute(outbox.update().values(attempts=0).where(sa.false()))
            if store.dialect == "postgresql":
                with pytest.raises(RuntimeError, match="not ended"):
                    found.rows()
        assert [tuple(row) for row in found.rows()] == [
            (uuid.UUID(int=n), {"n": n}) for n in (1, 2, 3)
        ]
        assert nothing.rows() == [] and found.first() == found.rows()[0]
        connection.rollback()


def test_pipelined_rows_by_name_are_typed_as_sqlalchemy_types_them(store: TenantStore):
    query = sa.select(outbox).where(outbox.c.record_id == uuid.UUID(int=7))
    with store.begin() as connection:
        connection.execute(outbox.insert(), event(7))
        with pipelined(connection) as pipe:
            pending = pipe.execute(query)
        expected = connection.execute(query).mappings().one()
        (got,) = pending.mappings()
        assert dict(got) == dict(expected)
        assert got["created_at"].tzinfo == dt.UTC and got["created_at"] == NOW
        with pipelined(connection) as pipe:
            empty = pipe.execute(query.where(sa.false()))
        assert empty.mappings() == []
        connection.rollback()


def test_an_error_in_a_pipeline_is_raised_as_sqlalchemy_raises_it(store: TenantStore):
    key = idempotency_key(1)
    later: list[str] = []
    with pytest.raises(sa.exc.IntegrityError), store.begin() as connection:
        with pipelined(connection) as pipe:
            pipe.execute(idempotency.insert(), key)
            pipe.execute(idempotency.insert(), key)
            pipe.execute(outbox.insert().inline(), event(9))
            pipe.then(lambda: later.append("ran"))
    with store.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(idempotency)).scalar() == 0
        assert connection.execute(sa.select(sa.func.count()).select_from(outbox)).scalar() == 0
    # A callback completes answers: after a failure there are none (SQLite stops at once).
    assert later == []


_REUSED_INSERT = outbox.insert().inline()
_REUSED_SELECT = sa.select(outbox).where(outbox.c.record_id == sa.bindparam("wanted"))


def test_reused_statements_store_and_read_what_sqlalchemy_would(store: TenantStore):
    """Compiled once per parameter names and sent on the driver's cursor, same answers."""
    sent: list[str] = []
    with store.begin() as connection:
        sa.event.listen(connection, "before_cursor_execute", lambda *a: sent.append(a[2]))
        with pipelined(connection) as pipe:
            pipe.execute(_REUSED_INSERT, event(11), reused=True)
            # Other keys, another compilation; columns left out take their server defaults.
            fewer = {k: v for k, v in event(12).items() if k != "actor_id"}
            pipe.execute(_REUSED_INSERT, {**fewer, "depth": 2}, reused=True)
            first = pipe.execute(_REUSED_SELECT, {"wanted": uuid.UUID(int=11)}, reused=True)
            second = pipe.execute(_REUSED_SELECT, {"wanted": uuid.UUID(int=12)}, reused=True)
        assert len(sent) == 4 and all("outbox" in sql for sql in sent)
        expected = (
            connection.execute(_REUSED_SELECT, {"wanted": uuid.UUID(int=11)}).mappings().one()
        )
        (got,) = first.mappings()
        assert dict(got) == dict(expected)
        assert got["payload"] == {"n": 11} and got["created_at"] == NOW
        (other,) = second.mappings()
        assert (other["depth"], other["attempts"], other["actor_id"]) == (2, 0, None)
        assert (got["depth"], got["attempts"]) == (0, 0)
        connection.rollback()


def test_a_reused_statement_that_fails_is_raised_as_sqlalchemy_raises_it(store: TenantStore):
    key = idempotency_key(2)
    insert = idempotency.insert()
    with pytest.raises(sa.exc.IntegrityError), store.begin() as connection:
        with pipelined(connection) as pipe:
            pipe.execute(insert, key, reused=True)
            pipe.execute(_REUSED_INSERT, event(13), reused=True)
            pipe.execute(insert, key, reused=True)
    with store.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(idempotency)).scalar() == 0
        assert connection.execute(sa.select(sa.func.count()).select_from(outbox)).scalar() == 0


def test_a_reused_statement_writes_into_each_tenants_own_namespace(store: TenantStore, platform):
    """Compiled per schema: the same statement object never reaches another tenant's table."""
    other = platform.store(
        tenancy.create_tenant(
            platform, f"t{uuid.uuid4().hex[:10]}", "Other", template="core"
        ).tenant
    )
    for tenant_store, n in ((store, 21), (other, 22), (store, 23)):
        with tenant_store.begin() as connection:
            with pipelined(connection) as pipe:
                pipe.execute(_REUSED_INSERT, event(n), reused=True)
    for tenant_store, expected in ((store, {21, 23}), (other, {22})):
        with tenant_store.connect() as connection:
            found = connection.execute(sa.select(outbox.c.record_id)).scalars().all()
        assert {r.int for r in found} == expected
