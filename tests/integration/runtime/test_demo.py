"""The demo tenant's sample data goes through the record service like any payload."""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from metacrm.runtime import records, tenancy
from metacrm.runtime.demo import load_sample
from metacrm.runtime.store import audit, outbox


def test_sample_loads_validated_with_audit_and_numbering_continues(platform):
    created = tenancy.create_tenant(platform, "demo", "Demo", admin_email="a@demo.example")
    store = platform.store(created.tenant)
    total = load_sample(platform, store, created.admin.id)
    with store.connect() as connection:
        model = platform.models.current(store, connection)
        tables = {
            name: model.entity(name).table
            for name in ("customer", "contact", "deal", "interaction", "task")
        }
        counted = {
            name: connection.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
            for name, t in tables.items()
        }
        audited = connection.execute(
            sa.select(sa.func.count()).select_from(audit).where(audit.c.entity.is_not(None))
        ).scalar_one()
        events = connection.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one()
        names = set(connection.execute(sa.select(tables["customer"].c.name)).scalars())
    assert sum(counted.values()) == total and all(counted.values())
    assert audited == events == total
    assert "上海华联贸易有限公司" in names
    caller = records.Caller(created.admin.id, "a@demo.example")
    with store.begin(immediate=True) as connection:
        model = platform.models.current(store, connection)
        customer_id = connection.execute(sa.select(tables["customer"].c.id).limit(1)).scalar()
        deal = records.create(
            connection,
            model,
            model.entity("deal"),
            {"name": "New", "customer": str(customer_id)},
            caller,
            platform.cipher,
        )
    assert deal["number"] == f"D-{counted['deal'] + 1:05d}"
    assert uuid.UUID(deal["id"])
