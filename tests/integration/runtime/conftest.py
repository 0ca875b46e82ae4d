"""Fixtures for runtime tests: a tenant on each backend, and ways to look inside it."""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from uuid6 import uuid7

from metacrm.metadata.model import Bundle
from metacrm.metadata.tables import build_tables
from metacrm.runtime import metastore, tenancy
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import TenantStore

MINIMAL = {
    "format": 1,
    "entities": [
        {
            "name": "lead",
            "label": {"en": "Lead", "zh-CN": "线索"},
            "plural_label": {"en": "Leads", "zh-CN": "线索"},
            "title_field": "name",
            "fields": [
                {"name": "name", "type": "text", "label": {"en": "Name"}, "required": True},
                {"name": "score", "type": "text", "label": {"en": "Score"}, "max_length": 20},
                {"name": "city", "type": "text", "label": {"en": "City"}},
            ],
        }
    ],
}


@pytest.fixture
def minimal_bundle() -> dict[str, Any]:
    """A one-entity bundle that tests change step by step."""
    return copy.deepcopy(MINIMAL)


@pytest.fixture
def store(platform: Platform) -> Iterator[TenantStore]:
    """An empty tenant (no template content beyond version 1) on the test's backend."""
    slug = f"t{uuid.uuid4().hex[:10]}"
    created = tenancy.create_tenant(platform, slug, "Test tenant", template="core")
    the_store = platform.store(created.tenant)
    yield the_store


@pytest.fixture
def blank_store(platform: Platform, minimal_bundle: dict[str, Any]) -> TenantStore:
    """A tenant whose version 2 is the minimal bundle (core entities archived)."""
    slug = f"t{uuid.uuid4().hex[:10]}"
    created = tenancy.create_tenant(platform, slug, "Blank tenant", template="core")
    the_store = platform.store(created.tenant)
    metastore.publish(the_store, minimal_bundle, expected_version=1)
    return the_store


def insert(store: TenantStore, entity: str, *rows: dict[str, Any]) -> list[uuid.UUID]:
    """Insert raw rows (system columns filled in) and return their ids."""
    with store.begin() as connection:
        bundle = Bundle.from_doc(metastore.current(connection).bundle)
        table = build_tables(bundle).tables[entity]
        now = dt.datetime.now(dt.UTC)
        ids = []
        for row in rows:
            values = {"id": uuid7(), "created_at": now, "updated_at": now, **row}
            connection.execute(table.insert().values(values))
            ids.append(values["id"])
        return ids


def snapshot(store: TenantStore) -> dict[str, Any]:
    """Describe everything a failed publish must leave unchanged: schema, data, versions."""
    with store.connect() as connection:
        inspector = sa.inspect(connection)
        tables = sorted(inspector.get_table_names(schema=store.schema))
        schema: dict[str, Any] = {}
        data: dict[str, Any] = {}
        for name in tables:
            schema[name] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"])
                    for c in inspector.get_columns(name, schema=store.schema)
                ],
                "indexes": sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                    for i in inspector.get_indexes(name, schema=store.schema)
                ),
                "fks": sorted(
                    (
                        f["name"] or "",
                        tuple(f["constrained_columns"]),
                        f["referred_table"],
                        str(f.get("options", {})),
                    )
                    for f in inspector.get_foreign_keys(name, schema=store.schema)
                ),
            }
            table = sa.Table(name, sa.MetaData(), autoload_with=connection, schema=store.schema)
            data[name] = sorted(repr(tuple(row)) for row in connection.execute(sa.select(table)))
        return {"schema": schema, "data": data}


def columns(store: TenantStore, table: str) -> dict[str, dict[str, Any]]:
    """Return the columns of one of the tenant's tables, by name."""
    with store.connect() as connection:
        return {
            c["name"]: c for c in sa.inspect(connection).get_columns(table, schema=store.schema)
        }


def indexes(store: TenantStore, table: str) -> dict[str, dict[str, Any]]:
    """Return the indexes of one of the tenant's tables, by name."""
    with store.connect() as connection:
        return {
            i["name"]: i for i in sa.inspect(connection).get_indexes(table, schema=store.schema)
        }


def rows(store: TenantStore, entity: str, *names: str) -> list[tuple[Any, ...]]:
    """Return chosen columns of every row of an entity, by id order."""
    with store.connect() as connection:
        bundle = Bundle.from_doc(metastore.current(connection).bundle)
        table = build_tables(bundle).tables[entity]
        query = sa.select(*(table.c[n] for n in names)).order_by(table.c.id)
        return [tuple(r) for r in connection.execute(query)]
