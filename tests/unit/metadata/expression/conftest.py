"""Database fixtures for the expression tests: SQLite always, PostgreSQL in its own schema."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from metacrm.metadata.expression import register_sqlite_functions

from .model import build_tables

PG_URL = os.environ.get("TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")


@dataclass(frozen=True)
class Database:
    """An engine with the deal and customer tables created and empty."""

    engine: sa.Engine
    tables: dict[str, sa.Table]

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name


def _sqlite() -> Iterator[Database]:
    engine = sa.create_engine("sqlite://")
    sa.event.listen(engine, "connect", lambda connection, _: register_sqlite_functions(connection))
    metadata = sa.MetaData()
    tables = build_tables(metadata)
    metadata.create_all(engine)
    yield Database(engine, tables)
    engine.dispose()


def _postgresql() -> Iterator[Database]:
    schema = f"expr_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(PG_URL)
    with engine.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    metadata = sa.MetaData(schema=schema)
    tables = build_tables(metadata)
    try:
        metadata.create_all(engine)
        yield Database(engine, tables)
    finally:
        with engine.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        engine.dispose()


@pytest.fixture(scope="session")
def sqlite_db() -> Iterator[Database]:
    """SQLite in memory, with the mc_* functions registered on connect."""
    yield from _sqlite()


@pytest.fixture(scope="session")
def postgres_db() -> Iterator[Database]:
    """PostgreSQL (TEST_PG_URL, else the local test server) in a throw-away schema."""
    yield from _postgresql()


@pytest.fixture(
    scope="session",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db(request: pytest.FixtureRequest) -> Database:
    """Each database backend in turn."""
    name = "sqlite_db" if request.param == "sqlite" else "postgres_db"
    return request.getfixturevalue(name)
