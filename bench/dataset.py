"""The D1 and D4 datasets of BENCHMARKS.md, shared by every benchmark that needs them.

D1 is one entity ``lead`` with 1,000,000 records: two selects (8 and 50
values), a decimal (indexed, for range lists), an integer, a date, four short
texts, email, phone, owners spread over 200 users and ``created_at`` over 3
years, with a composite index on ``(status, created_at)``. The entity is
published through ``metastore.publish`` like any tenant's; the rows are loaded
directly (PostgreSQL: ``INSERT ... SELECT`` over ``generate_series`` with
``hashint4``, then ``VACUUM ANALYZE``; SQLite: a seeded generator and
``executemany``), because loading through the record service is what O8
measures, not what every other benchmark should wait for.

D4 is a 1,000,000-row CSV with 14 columns, generated on the fly from a seed
(``d4_rows`` / ``write_d4``): the payload an import would receive.
"""

from __future__ import annotations

import csv
import datetime as dt
import random
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from metacrm.runtime import metastore, tenancy, tokens
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import TenantStore

ENTITY = "lead"
STATUSES = (
    "new",
    "contacted",
    "qualified",
    "proposal",
    "negotiation",
    "won",
    "lost",
    "dormant",
)
REGIONS = tuple(f"region_{k:02d}" for k in range(50))
USERS = 200
#: created_at runs back three years from this instant.
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SPAN_SECONDS = 3 * 365 * 86400
#: The columns the O1 list shows (explicit, as the API selects them).
LIST_COLUMNS = ("id", "name", "company", "status", "region", "amount", "owner_id", "created_at")


def _label(text: str) -> dict[str, str]:
    return {"en": text.replace("_", " ").capitalize(), "zh-CN": text}


def d1_entity() -> dict[str, Any]:
    """Return the D1-like entity document.

    It has no ``search_fields``: D1 does not name any, and quick-search indexes
    (pg_trgm GIN, SQLite FTS5 triggers) would make the direct load many times
    slower without changing what O9 measures.
    """

    def f(name: str, kind: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "type": kind, "label": _label(name), **extra}

    def options(values: Sequence[str]) -> list[dict[str, Any]]:
        return [{"value": v, "label": _label(v)} for v in values]

    return {
        "name": ENTITY,
        "label": _label(ENTITY),
        "plural_label": _label("leads"),
        "title_field": "name",
        "fields": [
            f("name", "text", required=True, max_length=120),
            f("company", "text", max_length=120),
            f("city", "text", max_length=60),
            f("job_title", "text", max_length=80),
            f("status", "single_select", options=options(STATUSES)),
            f("region", "single_select", options=options(REGIONS)),
            f("amount", "decimal", precision=14, scale=2, indexed=True),
            f("employees", "integer", min=0),
            f("close_date", "date"),
            f("email", "email"),
            f("phone", "phone"),
        ],
        "indexes": [{"name": "status_created", "fields": ["status", "created_at"]}],
    }


def d1_bundle() -> dict[str, Any]:
    """Return the core template with the D1 entity added."""
    bundle = tenancy.template_bundle("core")
    bundle["entities"].append(d1_entity())
    return bundle


def load_postgresql(store: TenantStore, rows: int) -> None:
    """Fill the D1 table with ``rows`` deterministic rows in one INSERT ... SELECT."""

    def h(k: int) -> str:
        return f"(hashint4(g + {k}) & 2147483647)"

    statuses = ", ".join(f"'{s}'" for s in STATUSES)
    sql = f"""
        INSERT INTO "{store.schema}"."{ENTITY}" (
            id, owner_id, created_at, created_by, updated_at, version,
            name, company, city, job_title, status, region,
            amount, employees, close_date, email, phone)
        SELECT md5('lead' || g)::uuid, owner, ts, owner, ts, 1,
            'Lead ' || g,
            'Company ' || {h(1)} % 20000,
            'City ' || {h(2)} % 300,
            'Title ' || {h(3)} % 120,
            (ARRAY[{statuses}])[1 + {h(4)} % {len(STATUSES)}],
            'region_' || lpad(({h(5)} % {len(REGIONS)})::text, 2, '0'),
            ({h(6)} % 100000000)::numeric / 100,
            {h(7)} % 5000,
            date '2023-01-01' + {h(8)} % 1095,
            'lead' || g || '@example.com',
            '+86 138 ' || lpad(({h(9)} % 100000000)::text, 8, '0')
        FROM (
            SELECT g,
                md5('user' || {h(10)} % {USERS})::uuid AS owner,
                timestamptz '{EPOCH.isoformat()}'
                    - make_interval(secs => {h(11)} % {SPAN_SECONDS}) AS ts
            FROM generate_series(1, :rows) AS g
        ) AS s
    """
    with store.engine.begin() as connection:
        connection.execute(sa.text(sql), {"rows": rows})
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql(f'VACUUM ANALYZE "{store.schema}"."{ENTITY}"')


def sqlite_rows(rows: int, seed: int = 9) -> Iterator[tuple[Any, ...]]:
    """Yield deterministic D1 rows in SQLite's storage format (UUIDs as hex, UTC text)."""
    rng = random.Random(seed)
    owners = [uuid.UUID(int=random.Random(u).getrandbits(128)).hex for u in range(USERS)]
    start = dt.date(2023, 1, 1)
    for g in range(1, rows + 1):
        ts = (EPOCH - dt.timedelta(seconds=rng.randrange(SPAN_SECONDS))).replace(tzinfo=None)
        stamp = ts.strftime("%Y-%m-%d %H:%M:%S.%f")
        owner = owners[rng.randrange(USERS)]
        yield (
            uuid.UUID(int=rng.getrandbits(128)).hex,
            owner,
            stamp,
            owner,
            stamp,
            1,
            f"Lead {g}",
            f"Company {rng.randrange(20000)}",
            f"City {rng.randrange(300)}",
            f"Title {rng.randrange(120)}",
            STATUSES[rng.randrange(len(STATUSES))],
            REGIONS[rng.randrange(len(REGIONS))],
            rng.randrange(100_000_000) / 100,
            rng.randrange(5000),
            (start + dt.timedelta(days=rng.randrange(1095))).isoformat(),
            f"lead{g}@example.com",
            f"+86 138 {rng.randrange(100_000_000):08d}",
        )


def load_sqlite(store: TenantStore, rows: int, batch: int = 20_000) -> None:
    """Fill the D1 table with ``executemany`` in batches, straight through sqlite3."""
    path = store.engine.url.database
    sql = (
        f'INSERT INTO "{ENTITY}" (id, owner_id, created_at, created_by, updated_at, version, '
        "name, company, city, job_title, status, region, amount, employees, close_date, "
        "email, phone) VALUES (" + ", ".join("?" * 17) + ")"
    )
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("BEGIN")
        pending: list[tuple[Any, ...]] = []
        for row in sqlite_rows(rows):
            pending.append(row)
            if len(pending) == batch:
                connection.executemany(sql, pending)
                pending.clear()
        if pending:
            connection.executemany(sql, pending)
        connection.execute("COMMIT")
        connection.execute("ANALYZE")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


# -- a D1 tenant ready for the API ------------------------------------------------------


@dataclass
class D1Tenant:
    """A tenant holding D1, its store, its admin and an API token for the admin."""

    slug: str
    store: TenantStore
    admin_id: uuid.UUID
    token: str
    load_seconds: float


def build_d1(platform: Platform, slug: str, rows: int) -> D1Tenant:
    """Create a tenant from ``core`` with an admin, publish D1 and load ``rows`` records."""
    created = tenancy.create_tenant(
        platform,
        slug,
        f"{slug} benchmark",
        admin_email=f"admin@{slug}.example.com",
        admin_password="bench-Password-2026!",
    )
    assert created.admin is not None
    store = platform.store(created.tenant)
    metastore.publish(store, d1_bundle(), expected_version=1)
    with platform.session() as session:
        _, token = tokens.create_token(session, created.tenant, created.admin, "bench")
    started = time.perf_counter()
    if rows:
        (load_postgresql if store.schema else load_sqlite)(store, rows)
    return D1Tenant(slug, store, created.admin.id, token, time.perf_counter() - started)


# -- D4: the CSV an import receives ------------------------------------------------------

#: The 14 columns of D4, in file order: every D1 field plus the owner's e-mail-free id.
D4_COLUMNS = (
    "name",
    "company",
    "city",
    "job_title",
    "status",
    "region",
    "amount",
    "employees",
    "close_date",
    "email",
    "phone",
    "owner_id",
    "external_ref",
    "notes",
)


def d4_rows(rows: int, seed: int = 4) -> Iterator[list[str]]:
    """Yield D4's data rows as CSV text cells, deterministically from ``seed``.

    ``external_ref`` and ``notes`` are columns an import maps to nothing (a real
    export carries such columns); the importer must skip them, not refuse them.
    """
    rng = random.Random(seed)
    owners = [str(uuid.UUID(int=random.Random(u).getrandbits(128))) for u in range(USERS)]
    start = dt.date(2023, 1, 1)
    for g in range(1, rows + 1):
        yield [
            f"Import {g}",
            f"Company {rng.randrange(20000)}",
            f"City {rng.randrange(300)}",
            f"Title {rng.randrange(120)}",
            STATUSES[rng.randrange(len(STATUSES))],
            REGIONS[rng.randrange(len(REGIONS))],
            f"{rng.randrange(100_000_000) / 100:.2f}",
            str(rng.randrange(5000)),
            (start + dt.timedelta(days=rng.randrange(1095))).isoformat(),
            f"import{g}@example.com",
            f"+86 139 {rng.randrange(100_000_000):08d}",
            owners[rng.randrange(USERS)],
            f"EXT-{g:08d}",
            "",
        ]


def write_d4(path: Path, rows: int, seed: int = 4) -> Path:
    """Write D4 (header and ``rows`` rows) to ``path`` and return it."""
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(D4_COLUMNS)
        writer.writerows(d4_rows(rows, seed))
    return path
