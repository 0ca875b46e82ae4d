"""O13: create 1,000 tenants from the ``core`` template, and what that costs the servers.

Each tenant is made with ``tenancy.create_tenant`` (no admin: the admin's
password is hashed with argon2, ~50 ms by design, which would swamp the
storage work measured here). PostgreSQL: a schema per tenant, one shared pool;
SQLite: a file per tenant. Reported: per-creation p50/p95/p99/max, the
PostgreSQL server connections this database had during the run (sampled from
``pg_stat_activity``), catalog-cache memory of the pooled server connections at
the end, open SQLite files, and process RSS before and after.

Baseline in the same run, the hand-written floor: the same tables and indexes
(``build_tables`` of the core bundle plus the platform's own table, compiled to
DDL text once) executed for the same number of schemas / files with psycopg /
sqlite3 directly, one transaction per tenant. Target: <= 100 ms p95 per tenant.
Everything is dropped afterwards (private databases, a temporary folder).

Run: ``.venv/bin/python -m bench.o13_tenants [--quick] [--tenants N] [--backend sqlite]``
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.schema import CreateIndex, CreateTable

from bench.common import (
    Report,
    Row,
    Stats,
    Target,
    argument_parser,
    backend_argument,
    chosen_backends,
    environment,
    libpq_url,
    memory_kib,
    private_database,
    stats_rows,
)
from metacrm.metadata import fieldtypes
from metacrm.metadata.fieldtypes import constraint_name
from metacrm.metadata.model import Bundle
from metacrm.metadata.tables import backend_indexes, build_tables
from metacrm.runtime import settings, tenancy
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import PLATFORM, audit_guard_ddl

TARGET_P95_MS = 100.0
WARMUP_TENANTS = 3
SCHEMA_PLACEHOLDER = "__tenant_schema__"
#: The pragmas metacrm sets on every SQLite connection (runtime/database.py).
SQLITE_PRAGMAS = (
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=5000",
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
)


def core_ddl(dialect: sa.engine.Dialect, trigram_schema: str | None = None) -> list[str]:
    """Return the DDL of a core tenant's tables, indexes and search indexes, compiled once.

    Tables and indexes are ``build_tables`` of the core bundle plus the platform's
    own tables, and the triggers that keep ``_audit`` append-only (objects every
    tenant has; the audit chain's head row is data and left out, as the version
    row is). On PostgreSQL every name is qualified with a placeholder schema
    that the floor replaces per tenant (metacrm names schemas in SQL too).
    """
    bundle = Bundle.from_doc(tenancy.template_bundle("core"))
    metadata = build_tables(bundle)
    for table in PLATFORM.sorted_tables:
        table.to_metadata(metadata)
    translate = {None: SCHEMA_PLACEHOLDER} if dialect.name == "postgresql" else None
    statements: list[str] = []
    for table in metadata.sorted_tables:
        indexes = backend_indexes(table, dialect.name)
        for element in (CreateTable(table), *(CreateIndex(i) for i in indexes)):
            compiled = element.compile(
                dialect=dialect,
                schema_translate_map=translate,
                render_schema_translate=translate is not None,
            )
            statements.append(str(compiled).strip())
    schema = SCHEMA_PLACEHOLDER if dialect.name == "postgresql" else None
    statements.extend(
        s for s in audit_guard_ddl(dialect.name, schema) if not s.startswith("INSERT")
    )
    if dialect.name == "postgresql":
        if trigram_schema:
            statements.extend(trigram_ddl(bundle, trigram_schema))
    else:
        statements.extend(fts_ddl(bundle))
    return statements


def search_columns(bundle: Bundle) -> dict[str, list[str]]:
    """Return each entity's quick-search columns: its stored, text-like search fields."""
    result = {}
    for entity in bundle.active_entities():
        names = []
        for name in entity.doc.get("search_fields", []):
            f = entity.fields.get(name)
            if f is not None and not f.archived:
                ft = fieldtypes.get(f.type)
                if ft.stored and ft.text_like and ft.column_names(f) == [name]:
                    names.append(name)
        if names:
            result[entity.name] = names
    return result


def trigram_ddl(bundle: Bundle, extension_schema: str) -> list[str]:
    """Return hand-written pg_trgm GIN indexes, one per search column (as quick search uses)."""
    return [
        f'CREATE INDEX "{constraint_name("trgm", entity, column)}" '
        f'ON "{SCHEMA_PLACEHOLDER}"."{entity}" '
        f'USING gin ("{column}" "{extension_schema}".gin_trgm_ops)'
        for entity, columns in search_columns(bundle).items()
        for column in columns
    ]


def fts_ddl(bundle: Bundle) -> list[str]:
    """Return hand-written FTS5 trigram tables over the search columns, kept by triggers."""
    statements = []
    for entity, columns in search_columns(bundle).items():
        fts = f"_fts_{entity}"
        cols = ", ".join(f'"{c}"' for c in columns)
        new = ", ".join(f'new."{c}"' for c in columns)
        old = ", ".join(f'old."{c}"' for c in columns)
        insert = f'INSERT INTO "{fts}"(rowid, {cols}) VALUES (new._rowid_, {new});'
        delete = (
            f'INSERT INTO "{fts}"("{fts}", rowid, {cols}) VALUES (\'delete\', old._rowid_, {old});'
        )
        statements += [
            f"CREATE VIRTUAL TABLE \"{fts}\" USING fts5({cols}, content='{entity}', "
            "content_rowid='_rowid_', tokenize='trigram')",
            f'CREATE TRIGGER "{fts}_ai" AFTER INSERT ON "{entity}" BEGIN {insert} END',
            f'CREATE TRIGGER "{fts}_ad" AFTER DELETE ON "{entity}" BEGIN {delete} END',
            f'CREATE TRIGGER "{fts}_au" AFTER UPDATE OF {cols} ON "{entity}" '
            f"BEGIN {delete} {insert} END",
        ]
    return statements


def trigram_schema(connection: psycopg.Connection[Any]) -> str | None:
    """Create pg_trgm when permitted and return its schema (None: no trigram indexes)."""
    try:
        connection.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except psycopg.Error:
        connection.rollback()
        return None
    row = connection.execute(
        "SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'pg_trgm'"
    ).fetchone()
    connection.commit()
    return row[0] if row else None


# -- watching the servers ---------------------------------------------------------------


class ConnectionWatch:
    """Sample a PostgreSQL database's server connections in a thread, and their CPU time.

    The CPU time of each backend comes from ``/proc/<pid>/stat`` when the server
    runs on this machine and the file is readable; otherwise it is left out.
    """

    _SQL = (
        "SELECT pid FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )

    def __init__(self, url: str, interval: float = 0.05) -> None:
        self.url = url
        self.interval = interval
        self.counts: list[int] = []
        self.pids: set[int] = set()
        self.cpu_start: dict[int, float] = {}
        self.cpu_end: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pg-connection-watch")

    def __enter__(self) -> ConnectionWatch:
        self._connection = psycopg.connect(libpq_url(self.url), autocommit=True)
        for pid in self._sample():
            self.cpu_start[pid] = backend_cpu(pid) or 0.0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        for pid in self.pids:
            cpu = backend_cpu(pid)
            if cpu is not None:
                self.cpu_end[pid] = cpu
        self._connection.close()

    def _sample(self) -> list[int]:
        pids = [row[0] for row in self._connection.execute(self._SQL)]
        self.counts.append(len(pids))
        self.pids.update(pids)
        return pids

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @property
    def peak(self) -> int:
        return max(self.counts, default=0)

    @property
    def server_cpu(self) -> float | None:
        """Return the CPU seconds the database's backends used while watched (None: unknown)."""
        if not self.cpu_end:
            return None
        return sum(cpu - self.cpu_start.get(pid, 0.0) for pid, cpu in self.cpu_end.items())


def backend_cpu(pid: int) -> float | None:
    """Return a local process's user + system CPU seconds, or None when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def catalog_memory(engine: sa.Engine) -> list[float]:
    """Return the catalog-cache memory (MiB) of every idle pooled connection of ``engine``."""
    sql = sa.text(
        "SELECT coalesce(sum(total_bytes), 0) FROM pg_backend_memory_contexts "
        "WHERE name = 'CacheMemoryContext' OR parent = 'CacheMemoryContext'"
    )
    idle = engine.pool.checkedin()  # type: ignore[attr-defined]
    connections = [engine.connect() for _ in range(idle)]
    try:
        return [c.execute(sql).scalar_one() / 2**20 for c in connections]
    finally:
        for c in connections:
            c.close()


def open_database_files() -> int:
    """Return how many SQLite files (databases, WAL and shared memory) this process holds open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.endswith((".db", ".db-wal", ".db-shm"))
    return count


# -- the two sides ----------------------------------------------------------------------


@dataclass
class Side:
    """One side of the comparison (metacrm or the floor) on one backend, one repetition."""

    seconds: list[float] = field(default_factory=list)
    total_seconds: float = 0.0
    #: CPU seconds of the creating thread (Python, and SQLite's own work in-process).
    client_cpu: float = 0.0
    #: CPU seconds of the PostgreSQL backends (None: SQLite, or not measurable).
    server_cpu: float | None = None
    objects: frozenset[str] = frozenset()
    details: dict[str, Any] = field(default_factory=dict)

    def timed(self, create: Callable[[], object]) -> None:
        """Call ``create()`` once, adding its wall time and the thread's CPU time."""
        cpu = time.thread_time()
        start = time.perf_counter()
        create()
        elapsed = time.perf_counter() - start
        self.client_cpu += time.thread_time() - cpu
        self.seconds.append(elapsed)
        self.total_seconds += elapsed


class Metacrm:
    """Creates tenants through ``tenancy.create_tenant`` on one backend."""

    def __init__(self, pg_url: str | None, folder: Path) -> None:
        overrides: dict[str, Any] = {
            "instance_dir": str(folder),
            "secret_key": "bench-secret-key-0123456789",
        }
        if pg_url:
            overrides["database_url"] = pg_url
        self.pg_url = pg_url
        self.platform = Platform(settings.load(overrides, environ={}))
        self.platform.init_control()
        for k in range(WARMUP_TENANTS):
            tenancy.create_tenant(self.platform, f"warm{k}", f"Warm-up {k}")
        self.first: Any = None

    def create(self, i: int) -> None:
        created = tenancy.create_tenant(self.platform, f"b{i:05d}", f"Bench tenant {i}")
        if self.first is None:
            self.first = created.tenant

    def statements(self) -> int:
        """Create one more tenant, untimed, and return how many SQL statements it sent.

        Counted with a cursor event (BEGIN, COMMIT and pool pings are not statements
        there), outside the timed loop so the listener costs the measured side nothing.
        """
        sent: list[object] = []

        def count(*event: object) -> None:
            sent.append(event[2])  # (connection, cursor, statement, ...)

        sa.event.listen(sa.Engine, "before_cursor_execute", count)
        try:
            tenancy.create_tenant(self.platform, "counted", "Counted")
        finally:
            sa.event.remove(sa.Engine, "before_cursor_execute", count)
        return len(sent)

    def objects(self) -> frozenset[str]:
        if self.pg_url:
            return _pg_objects(self.pg_url, self.first.schema)
        return _sqlite_objects(Path(sa.make_url(self.first.database_url).database or ""))

    def close(self) -> None:
        self.platform.close()


class Floor:
    """Creates the same tables with precompiled DDL through the driver, one transaction each."""

    def __init__(self, pg_url: str | None, folder: Path) -> None:
        self.pg_url = pg_url
        self.folder = folder
        self.connection: psycopg.Connection[Any] | None = None
        if pg_url:
            self.connection = psycopg.connect(libpq_url(pg_url))
            self.statements = core_ddl(postgresql.dialect(), trigram_schema(self.connection))
        else:
            folder.mkdir(parents=True, exist_ok=True)
            self.statements = core_ddl(sqlite_dialect.dialect())

    def create(self, i: int) -> None:
        if self.connection is not None:
            schema = f"f_{i:05d}"
            script = ";\n".join(
                [f'CREATE SCHEMA "{schema}"']
                + [s.replace(SCHEMA_PLACEHOLDER, schema) for s in self.statements]
            )
            self.connection.execute(script.encode())
            self.connection.commit()
            return
        connection = sqlite3.connect(self.folder / f"f{i:05d}.db", isolation_level=None)
        try:
            for pragma in SQLITE_PRAGMAS:
                connection.execute(pragma)
            connection.execute("BEGIN")
            for statement in self.statements:
                connection.execute(statement)
            connection.execute("COMMIT")
        finally:
            connection.close()

    def objects(self) -> frozenset[str]:
        if self.pg_url:
            return _pg_objects(self.pg_url, "f_00000")
        return _sqlite_objects(self.folder / "f00000.db")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


def run_repetition(
    backend: str, tenants: int, ours_url: str | None, floor_url: str | None, folder: Path
) -> tuple[Side, Side]:
    """Create ``tenants`` tenants with metacrm and with the floor, alternating one by one.

    Alternating (and swapping which goes first) means a burst of load from
    other work on the machine hits both sides alike.
    """
    ours, floor = Side(), Side()
    metacrm = Metacrm(ours_url, folder / "metacrm")
    baseline = Floor(floor_url, folder / "floor")
    try:
        gc.collect()
        before = memory_kib()
        with contextlib.ExitStack() as stack:
            watches = (
                [stack.enter_context(ConnectionWatch(u)) for u in (ours_url, floor_url) if u]
                if backend == "postgresql"
                else []
            )
            for i in range(tenants):
                pair = [(ours, metacrm), (floor, baseline)]
                for side, creator in pair if i % 2 == 0 else reversed(pair):
                    side.timed(functools.partial(creator.create, i))
        after = memory_kib()
        ours.details.update(
            rss_before_mib=before["rss"] / 1024,
            rss_after_mib=after["rss"] / 1024,
            rss_peak_mib=after["peak"] / 1024,
            engines=len(metacrm.platform.engines._engines),
        )
        if watches:
            ours.server_cpu, floor.server_cpu = watches[0].server_cpu, watches[1].server_cpu
            ours.details.update(
                server_connections_peak=watches[0].peak,
                server_connections_seen=len(watches[0].pids),
                pool=metacrm.platform.control_engine.pool.status(),
            )
            memory = catalog_memory(metacrm.platform.control_engine)
            ours.details["catalog_mib_per_connection"] = [round(m, 1) for m in memory]
        else:
            ours.details["open_database_files"] = open_database_files()
        ours.objects = metacrm.objects()
        floor.objects = baseline.objects()
        floor.details["statements_per_tenant"] = len(baseline.statements)
        ours.details["sql_calls_per_tenant"] = metacrm.statements()
        # The floor sends one script on PostgreSQL; sqlite3 runs one statement a call.
        floor.details["sql_calls_per_tenant"] = (
            1 if backend == "postgresql" else len(SQLITE_PRAGMAS) + 2 + len(baseline.statements)
        )
    finally:
        metacrm.close()
        baseline.close()
    return ours, floor


def _pg_objects(url: str, schema: str) -> frozenset[str]:
    """Return the tables, indexes, sequences, triggers and functions in one schema."""
    with psycopg.connect(libpq_url(url), autocommit=True) as connection:
        rows = connection.execute(
            "SELECT c.relkind::text || ' ' || c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %(s)s AND c.relkind IN ('r', 'i', 'S') "
            "UNION ALL SELECT 'trigger ' || t.tgname FROM pg_trigger t "
            "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %(s)s AND NOT t.tgisinternal "
            "UNION ALL SELECT 'function ' || p.proname FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %(s)s",
            {"s": schema},
        ).fetchall()
    return frozenset(row[0] for row in rows)


def _sqlite_objects(path: Path) -> frozenset[str]:
    """Return the tables, indexes and triggers of one SQLite file, by kind and name."""
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute(
            "SELECT type || ' ' || name FROM sqlite_master "
            "WHERE type IN ('table', 'index', 'trigger')"
        ).fetchall()
    finally:
        connection.close()
    return frozenset(row[0] for row in rows)


@contextmanager
def _database(backend: str, admin_url: str, prefix: str) -> Iterator[str | None]:
    if backend != "postgresql":
        yield None
        return
    with private_database(admin_url, prefix) as url:
        yield url


def measure_backend(
    backend: str, tenants: int, repetitions: int, admin_url: str, workdir: Path
) -> tuple[list[Side], list[Side]]:
    """Run metacrm and the floor ``repetitions`` times, each on fresh databases."""
    ours: list[Side] = []
    floor: list[Side] = []
    for rep in range(repetitions):
        with (
            _database(backend, admin_url, "metacrm_bench_o13") as ours_url,
            _database(backend, admin_url, "metacrm_bench_o13_floor") as floor_url,
        ):
            mine, base = run_repetition(
                backend, tenants, ours_url, floor_url, workdir / f"{backend}-{rep}"
            )
        ours.append(mine)
        floor.append(base)
    return ours, floor


def backend_rows(backend: str, ours: list[Side], floor: list[Side]) -> list[Row]:
    """Return the table rows of one backend (percentiles: median over repetitions)."""
    mine = Stats.median([Stats.of(s.seconds) for s in ours])
    base = Stats.median([Stats.of(s.seconds) for s in floor])
    first = ours[0].details
    rows = stats_rows(
        "create one tenant",
        mine,
        base,
        {"p95": Target.at_most(TARGET_P95_MS, "ms")},
        figures=("p50", "p95", "p99", "max"),
    )
    tenth = max(1, len(ours[0].seconds) // 10)
    rows.append(
        Row(
            "p50 of the first 10% of tenants",
            statistics.median(Stats.of(s.seconds[:tenth]).p50 for s in ours),
            baseline=statistics.median(Stats.of(s.seconds[:tenth]).p50 for s in floor),
        )
    )
    rows.append(
        Row(
            "p50 of the last 10% of tenants",
            statistics.median(Stats.of(s.seconds[-tenth:]).p50 for s in ours),
            baseline=statistics.median(Stats.of(s.seconds[-tenth:]).p50 for s in floor),
        )
    )
    rows.append(
        Row(
            "all tenants, sum of creation times",
            statistics.median(s.total_seconds for s in ours),
            "s",
            statistics.median(s.total_seconds for s in floor),
        )
    )
    count = len(ours[0].seconds)
    rows.append(
        Row(
            "client CPU per tenant (creating thread)",
            statistics.median(s.client_cpu for s in ours) / count * 1000,
            baseline=statistics.median(s.client_cpu for s in floor) / count * 1000,
            note="Python" + (" + SQLite" if backend == "sqlite" else "") + ", thread_time",
        )
    )
    if all(s.server_cpu is not None for s in ours + floor):
        rows.append(
            Row(
                "server CPU per tenant (backends)",
                statistics.median(s.server_cpu or 0.0 for s in ours) / count * 1000,
                baseline=statistics.median(s.server_cpu or 0.0 for s in floor) / count * 1000,
                note="/proc/<pid>/stat of the database's backends",
            )
        )
    rows.append(
        Row(
            "SQL calls per tenant",
            first["sql_calls_per_tenant"],
            "",
            floor[0].details["sql_calls_per_tenant"],
            note="statements sent (a batch counts once); metacrm also stores the version, "
            "its audit entry and the tenant's registration",
        )
    )
    extra = sorted(ours[0].objects - floor[0].objects)
    missing = sorted(floor[0].objects - ours[0].objects)
    rows.append(
        Row(
            "tables+indexes+triggers per tenant",
            len(ours[0].objects),
            "",
            len(floor[0].objects),
            note="same objects"
            if not extra and not missing
            else f"metacrm only: {', '.join(extra[:4])}; floor only: {', '.join(missing[:4])}",
        )
    )
    if backend == "postgresql":
        peak = max(s.details["server_connections_peak"] for s in ours)
        rows.append(
            Row(
                "server connections, peak",
                peak,
                "",
                note=f"{max(s.details['server_connections_seen'] for s in ours)} distinct "
                "backends over the run; floor: 1",
            )
        )
        catalog = first.get("catalog_mib_per_connection") or [0.0]
        rows.append(
            Row(
                "catalog cache per pooled connection, max",
                max(catalog),
                "MiB",
                note=f"{len(catalog)} pooled: {', '.join(f'{m:.1f}' for m in catalog)}",
            )
        )
    else:
        rows.append(
            Row(
                "open SQLite files at the end (db, wal, shm)",
                first["open_database_files"],
                "",
                note=f"{first['engines']} engines in the platform's cache; floor: 0",
            )
        )
    rows.append(Row("process RSS before", first["rss_before_mib"], "MiB", note="repetition 1"))
    rows.append(
        Row(
            "process RSS after",
            first["rss_after_mib"],
            "MiB",
            note=f"+{first['rss_after_mib'] - first['rss_before_mib']:.1f} MiB; "
            f"peak {first['rss_peak_mib']:.1f} MiB",
        )
    )
    return rows


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its tables and return the JSON record."""
    parser = argument_parser(__doc__.split("\n\n")[0])
    backend_argument(parser)
    parser.add_argument("--tenants", type=int, default=None, help="tenants to create (1,000)")
    args = parser.parse_args(argv)
    tenants = args.tenants or (20 if args.quick else 1000)
    repetitions = args.repetitions or (1 if args.quick else 3)
    backends = chosen_backends(args.backend)
    options = {
        "tenants": tenants,
        "warmup_tenants": WARMUP_TENANTS,
        "repetitions": repetitions,
        "backends": backends,
        "admin": "none (argon2 hashing left out on purpose)",
    }
    env = environment(args.pg_url if "postgresql" in backends else None)
    report = Report("o13_tenants", options, env)
    with tempfile.TemporaryDirectory(prefix="metacrm-o13-") as tmp:
        for backend in backends:
            ours, floor = measure_backend(backend, tenants, repetitions, args.pg_url, Path(tmp))
            report.table(
                f"O13 create {tenants:,} tenants from core, {backend} (median of {repetitions})",
                backend_rows(backend, ours, floor),
                baseline_label="hand-written DDL",
                details={
                    "metacrm": [{"seconds_total": s.total_seconds, **s.details} for s in ours],
                    "floor": [{"seconds_total": s.total_seconds, **s.details} for s in floor],
                },
            )
    report.note(
        "tenants are created without an admin user: create_tenant hashes the admin's "
        "password with argon2 (~50 ms by design), which is not storage work"
    )
    return report.finish(write_json=not args.no_json)


def main(argv: Sequence[str] | None = None) -> int:
    record = run(argv)
    verdicts = [r["verdict"] for s in record["sections"] for r in s["rows"] if r["verdict"]]
    return 1 if "FAIL" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
