"""Read connections kept between requests (``database.ReadConnections``, decision 0017).

A kept connection saves a read its pool checkout and autocommit switch; these
tests pin what must not change because of it: each read sees every committed
write, borrowers never share a connection, a connection someone reconfigured
or lost is not kept, and disposing of an engine closes what it kept.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from metacrm.runtime.database import ReadConnections, create_engine


@pytest.fixture
def engine(backend: str, tmp_path, request: pytest.FixtureRequest) -> Iterator[sa.Engine]:  # noqa: ANN001
    """An engine on the test's backend (a SQLite file: its pool hands connections on)."""
    if backend == "postgresql":
        made = create_engine(request.getfixturevalue("pg_url"))
    else:
        made = create_engine(f"sqlite:///{tmp_path / 'reads.db'}")
    yield made
    made.dispose()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    made = create_engine(pg_url)
    yield made
    made.dispose()


@pytest.fixture
def reads() -> ReadConnections:
    return ReadConnections()


def _driver(connection: sa.Connection):
    return connection.connection.dbapi_connection


def test_a_read_reuses_the_connection_the_last_read_gave_back(engine, reads):
    with reads.borrow(engine) as first:
        seen = _driver(first)
        assert first.exec_driver_sql("SELECT 1").scalar() == 1
    with reads.borrow(engine) as second:
        assert _driver(second) is seen
        assert second.exec_driver_sql("SELECT 2").scalar() == 2
    # Kept out of the pool, not in it.
    assert engine.pool.checkedout() == 1


def test_each_read_sees_writes_committed_since_the_last(engine, reads):
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE counter (n integer)")
        connection.exec_driver_sql("INSERT INTO counter VALUES (1)")
    for expected in (1, 2, 3):
        with reads.borrow(engine) as connection:
            assert connection.exec_driver_sql("SELECT n FROM counter").scalar() == expected
            # No transaction (PostgreSQL) or snapshot (SQLite) outlives the read.
        with engine.begin() as writer:
            writer.exec_driver_sql("UPDATE counter SET n = n + 1")
    if engine.dialect.name == "postgresql":
        with engine.connect() as probe:
            states = probe.exec_driver_sql(
                "SELECT state FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).scalars()
            assert "idle in transaction" not in set(states)


def test_postgresql_reads_run_in_autocommit(pg_engine, reads):
    for _ in range(2):
        with reads.borrow(pg_engine) as connection:
            assert connection.get_execution_options()["isolation_level"] == "AUTOCOMMIT"
            assert _driver(connection).autocommit is True
    with pg_engine.connect() as other:  # the pool's own connections are untouched
        assert _driver(other).autocommit is False


def test_nested_reads_get_different_connections(engine, reads):
    with reads.borrow(engine) as outer, reads.borrow(engine) as inner:
        assert _driver(outer) is not _driver(inner)
    with reads.borrow(engine) as a, reads.borrow(engine) as b:
        assert {id(_driver(a)), id(_driver(b))} == {id(_driver(outer)), id(_driver(inner))}


def test_no_more_are_kept_than_the_limit(engine):
    reads = ReadConnections(keep=2)
    with reads.borrow(engine), reads.borrow(engine), reads.borrow(engine):
        assert engine.pool.checkedout() == 3
    assert engine.pool.checkedout() == 2  # the third went back to the pool


def test_the_schema_map_follows_the_borrower(pg_engine, reads):
    table = sa.Table("place", sa.MetaData(), sa.Column("name", sa.Text))
    with pg_engine.begin() as connection:
        for schema in ("t_one", "t_two"):
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
            connection.exec_driver_sql(f"CREATE TABLE {schema}.place (name text)")
            connection.exec_driver_sql(f"INSERT INTO {schema}.place VALUES ('{schema}')")
    for schema in ("t_one", "t_two", "t_one"):
        with reads.borrow(pg_engine, schema_translate_map={None: schema}) as connection:
            assert connection.execute(sa.select(table.c.name)).scalar() == schema


def test_a_connection_whose_options_were_changed_is_not_kept(engine, reads):
    with reads.borrow(engine) as connection:
        changed = _driver(connection)
        connection.execution_options(stream_results=True)
    with reads.borrow(engine) as connection:
        assert _driver(connection) is not changed
        assert "stream_results" not in connection.get_execution_options()


def test_an_invalidated_connection_is_not_kept(engine, reads):
    with reads.borrow(engine) as connection:
        lost = _driver(connection)
        connection.invalidate()
    with reads.borrow(engine) as connection:
        assert _driver(connection) is not lost
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1


def test_a_replaced_pool_retires_what_was_kept_from_the_old_one(engine, reads):
    with reads.borrow(engine) as connection:
        old = connection
    engine.dispose(close=False)  # what a lost server leads to (``direct``)
    assert old.closed
    with reads.borrow(engine) as connection:
        assert connection is not old
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1


def test_disposing_of_the_engine_closes_the_kept_connections(pg_engine, reads):
    with reads.borrow(pg_engine) as connection:
        kept = _driver(connection)
        backend_pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    pg_engine.dispose()
    assert kept.closed
    with pg_engine.connect() as probe:  # a new pool's connection
        alive = probe.execute(
            sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
            {"pid": backend_pid},
        )
        assert alive.scalar() == 0


def test_an_error_inside_the_read_keeps_a_sound_connection(engine, reads):
    with pytest.raises(sa.exc.DBAPIError), reads.borrow(engine) as connection:
        kept = _driver(connection)
        connection.exec_driver_sql("SELECT * FROM no_such_table")
    with reads.borrow(engine) as connection:
        assert _driver(connection) is kept
        assert connection.exec_driver_sql("SELECT 1").scalar() == 1


def test_an_in_memory_database_keeps_nothing(reads):
    engine = create_engine("sqlite://")
    try:
        with reads.borrow(engine) as connection:
            assert connection.exec_driver_sql("SELECT 1").scalar() == 1
        assert connection.closed  # given back to its pool, which hands it to one thread only
    finally:
        engine.dispose()


def test_a_connection_kept_by_one_thread_serves_the_next(engine, reads):
    """Worker threads hand kept connections on (gunicorn's gthread workers)."""
    seen: list[tuple[object, int]] = []
    failures: list[BaseException] = []

    def read() -> None:
        try:
            with reads.borrow(engine) as connection:
                seen.append((_driver(connection), connection.exec_driver_sql("SELECT 7").scalar()))
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    for _ in range(3):
        worker = threading.Thread(target=read)
        worker.start()
        worker.join()
    assert not failures, failures
    assert [value for _, value in seen] == [7, 7, 7]
    assert len({id(driver) for driver, _ in seen}) == 1
