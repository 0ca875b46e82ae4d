"""O1-O8 and O14 of BENCHMARKS.md: record lists, paging, counts, reports, reads, writes,
bulk import and storage, each against its hand-written baseline in the same run.

Per backend a tenant gets D1 (``bench.dataset``: 1,000,000 ``lead`` records).
Then, interleaved per repetition so that noise hits both sides alike:

- **SQL** (O1 status list, O2 decimal range sorted by it, O3 two-field AND, O6
  GROUP BY one / two fields + SUM): metacrm's SQL is captured from its query
  layer (``query.list_records``; for O6, which has no report API yet, a GROUP
  BY built from expressions compiled by the expression compiler) and replayed
  on a raw driver connection next to B0, the SQL a person writes for the same
  answer (psycopg 3 / sqlite3). ``EXPLAIN`` plan shapes (node types, index
  names) must be equal, or the line fails whatever the time.
- **O4** deep paging: metacrm's page after row 1 % / 10 % / 95 % of the list
  (1,000,000 rows: 10k, 100k, 950k) through a cursor, against its first page;
  the SQL of every list and API request of the run is captured and must never
  hold ``OFFSET`` (B0 ``OFFSET`` is timed for reference).
- **O5** count with a list: ``query.count_records`` capped at 1,001 then
  estimated, on a held connection without a transaction of its own (as the
  count endpoint reads), timed alternately with the list's first page (what it
  adds to a list), and again after full counts (cold caches, informative); the
  exact count with its timeout, in a transaction
  (and a 1 ms timeout that must be refused with ``count_timeout``).
- **API** (O1, O2 list; O7 read by id): metacrm and B1 (``bench.servers``, which
  must answer the same JSON) under the same gunicorn settings; single-client
  p50/p95/p99 over keep-alive, and ``wrk -t1 -c8 -d15s --latency`` requests/s.
  O7 create and update (with ``If-Match``) through the API, single client,
  audit and outbox rows counted.
- **O8** bulk import of D4 (CSV, 14 columns): rows become API payloads and go
  through ``importer`` (the import endpoint's service) in one transaction (validated like the
  API, one audit entry and one outbox event per 500 records), against raw ``COPY`` /
  sqlite ``executemany`` into a typed table with the same secondary indexes;
  each run in a fresh process, peak RSS reported.
- A table of where an API request's time goes (in process), part by part.
- **O14** bytes per record including indexes against a hand-written typed table,
  whose indexes exist before its rows are inserted, as D1's table's do.

Run: ``.venv/bin/python -m bench.o1_o8_records [--quick] [--backend sqlite] [--only o1,o8]``
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import multiprocessing
import re
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event

from bench import dataset, servers
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
    sample,
    sample_alternating,
)
from bench.dataset import ENTITY, STATUSES
from metacrm.metadata.expression import EvalContext, compile_sql, parse
from metacrm.runtime import cursor as cursors
from metacrm.runtime import query, settings
from metacrm.runtime.platform import Platform
from metacrm.runtime.recordview import SYSTEM_FIELDS, column_resolver
from metacrm.runtime.store import TenantStore

OPERATIONS = ("o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8", "o14")
SECRET = "bench-secret-key-0123456789abcdef"
CURSOR_SECRET = b"bench-cursor-secret"


def at_least_ratio(limit: float) -> Target:
    return Target(f">= {limit}x", limit, relative=True, at_least=True)


# -- the lists ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ListOp:
    """One list: metacrm's request, and B0 written by hand for the same answer."""

    name: str
    title: str
    filter: str
    sort: str
    b0_where: str  # with {p} placeholders, in parameter order
    b0_order: str
    params: tuple[Any, ...]
    sql_target: float

    def b0_sql(self, table: str, columns: str, placeholder: str, limit: int = 50) -> str:
        where = self.b0_where.replace("{p}", placeholder)
        return (
            f"SELECT {columns} FROM {table} WHERE deleted_at IS NULL AND {where} "
            f"ORDER BY {self.b0_order} LIMIT {limit}"
        )


LISTS = (
    ListOp(
        "o1",
        'O1 list status = "won", sort -created_at, 50 rows',
        'status = "won"',
        "-created_at",
        "status = {p}",
        "created_at DESC, id DESC",
        ("won",),
        1.2,
    ),
    ListOp(
        "o2",
        "O2 list amount between 500000 and 510000, sort amount",
        "amount between 500000 and 510000",
        "amount",
        "amount BETWEEN {p} AND {p}",
        "amount, id",
        (500000, 510000),
        1.2,
    ),
    ListOp(
        "o3",
        'O3 list status = "won" and employees >= 4000, sort -created_at',
        'status = "won" and employees >= 4000',
        "-created_at",
        "status = {p} AND employees >= {p}",
        "created_at DESC, id DESC",
        ("won", 4000),
        1.5,
    ),
)


# -- a backend under test ---------------------------------------------------------------------


@dataclass
class Bed:
    """One backend's tenant, model, raw connection and captured SQL."""

    backend: str
    platform: Platform
    tenant: dataset.D1Tenant
    raw: Any
    overrides: dict[str, Any]
    captured: list[tuple[str, Any]] = field(default_factory=list)
    capturing: bool = False

    @property
    def store(self) -> TenantStore:
        return self.tenant.store

    @property
    def postgresql(self) -> bool:
        return self.backend == "postgresql"

    @property
    def table(self) -> str:
        schema = self.store.schema
        return f'"{schema}"."{ENTITY}"' if schema else f'"{ENTITY}"'

    @property
    def placeholder(self) -> str:
        return "%s" if self.postgresql else "?"

    def model(self) -> Any:
        with self.store.connect() as connection:
            return self.platform.models.current(self.store, connection)

    def columns(self) -> list[str]:
        entity = self.model().entity(ENTITY)
        return [*SYSTEM_FIELDS, *(f.name for f in entity.stored_fields())]

    def b0(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Run hand-written SQL on the raw driver connection."""
        return list(self.raw.execute(sql, self.raw_params(params)).fetchall())

    def raw_params(self, params: Sequence[Any]) -> Any:
        if self.postgresql:
            return params
        return [v.hex if isinstance(v, uuid.UUID) else v for v in params]

    def replay(self, statement: tuple[str, Any]) -> list[Any]:
        """Run captured metacrm SQL with its captured parameters on the raw connection."""
        sql, params = statement
        return list(self.raw.execute(sql, params).fetchall())

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[tuple[str, Any]]]:
        """Collect the statements the store's engine sends (this thread) inside the block."""
        found: list[tuple[str, Any]] = []
        me = threading.get_ident()

        def before(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
            if threading.get_ident() == me:
                found.append((statement, parameters))
                self.captured.append((statement, parameters))

        # On the Engine class: an application built in this process has engines of its own.
        event.listen(sa.engine.Engine, "before_cursor_execute", before)
        try:
            yield found
        finally:
            event.remove(sa.engine.Engine, "before_cursor_execute", before)

    def plan(self, sql: str, params: Any) -> str:
        """Return the plan shape of a statement: node types and index names."""
        if self.postgresql:
            raw = self.raw.execute("EXPLAIN (FORMAT JSON) " + sql, params).fetchone()[0]
            tree = raw if isinstance(raw, list) else json.loads(raw)
            nodes: list[str] = []

            def walk(node: dict[str, Any]) -> None:
                index = f" using {node['Index Name']}" if "Index Name" in node else ""
                nodes.append(node["Node Type"] + index)
                for child in node.get("Plans", []):
                    walk(child)

            walk(tree[0]["Plan"])
            return " -> ".join(nodes)
        rows = self.raw.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        details = (re.sub(r"\(.*\)$", "", str(r[-1])).strip() for r in rows)
        return "; ".join(re.sub(r"\bmain\.", "", d) for d in details)

    def eval_context(self) -> EvalContext:
        now = dt.datetime.now(dt.UTC)
        return EvalContext(now=now, today=now.date(), user_id=self.tenant.admin_id)


def _open_bed(backend: str, rows: int, workdir: Path, pg_url: str | None) -> Bed:
    overrides: dict[str, Any] = {
        "instance_dir": str(workdir / backend),
        "secret_key": SECRET,
        # The limiter stays on (its cost is measured) with a budget a benchmark cannot spend.
        "api_rate_limit": "100000000 per minute",
    }
    if pg_url:
        overrides["database_url"] = pg_url
    platform = Platform(settings.load(overrides, environ={}))
    platform.init_control()
    tenant = dataset.build_d1(platform, "bench", rows)
    if tenant.store.schema:
        import psycopg

        raw = psycopg.connect(libpq_url(pg_url or ""), autocommit=True)
    else:
        raw = sqlite3.connect(tenant.store.engine.url.database, isolation_level=None)
    return Bed(backend, platform, tenant, raw, overrides)


def _list_sql(bed: Bed, op: ListOp, request: query.ListRequest | None = None) -> tuple[str, Any]:
    """Run metacrm's list once and return the SELECT it sent."""
    model = bed.model()
    entity = model.entity(ENTITY)
    request = request or query.ListRequest(filter=op.filter, sort=op.sort)
    with bed.store.connect() as connection, bed.capture() as found:
        query.list_records(connection, model, entity, request, bed.eval_context(), CURSOR_SECRET)
    selects = [s for s in found if s[0].lstrip().upper().startswith("SELECT")]
    return selects[-1]


def _in_process_list(bed: Bed, request: query.ListRequest) -> Callable[[], None]:
    """Return metacrm's whole query layer for one page (model lookup, SQL, rows to JSON)."""

    def call() -> None:
        with bed.store.connect() as connection:
            model = bed.platform.models.current(bed.store, connection)
            page = query.list_records(
                connection, model, model.entity(ENTITY), request, bed.eval_context(), CURSOR_SECRET
            )
        if not page.items:
            raise RuntimeError("the list came back empty")

    return call


def _timed(fn: Callable[[], object], seconds: float) -> Stats:
    return Stats.of(sample(fn, max_seconds=seconds))


def _series(points: dict[str, Callable[[], object]], reps: int, seconds: float) -> dict[str, Stats]:
    """Time the points call by call in turn, ``reps`` times; return the median of each.

    A metacrm figure and its baseline are timed under the same load (see
    ``sample_alternating``), which is what their ratio needs.
    """
    runs: dict[str, list[Stats]] = {name: [] for name in points}
    for _ in range(reps):
        for name, durations in sample_alternating(points, max_seconds=seconds).items():
            runs[name].append(Stats.of(durations))
    return {name: Stats.median(found) for name, found in runs.items()}


# -- SQL-level sections ------------------------------------------------------------------------


def sql_lists(bed: Bed, report: Report, reps: int, seconds: float) -> None:
    columns = ", ".join(bed.columns())
    rows: list[Row] = []
    details: dict[str, Any] = {}
    for op in LISTS:
        b0 = op.b0_sql(bed.table, columns, bed.placeholder)
        metacrm = _list_sql(bed, op)
        if "OFFSET" in metacrm[0].upper():
            raise AssertionError(f"{op.name}: metacrm's list SQL holds OFFSET")
        b0_rows = bed.b0(b0, op.params)
        mc_rows = bed.replay(metacrm)
        same = [r[0] for r in b0_rows] == [r[0] for r in mc_rows[:50]]
        b0_plan = bed.plan(b0, bed.raw_params(op.params))
        mc_plan = bed.plan(*metacrm)
        request = query.ListRequest(filter=op.filter, sort=op.sort)
        stats = _series(
            {
                "b0": lambda b0=b0, op=op: bed.b0(b0, op.params),
                "sql": lambda m=metacrm: bed.replay(m),
                "layer": _in_process_list(bed, request),
            },
            reps,
            seconds,
        )
        rows += [
            Row(
                f"{op.name} SQL p50",
                stats["sql"].p50,
                baseline=stats["b0"].p50,
                target=Target.ratio_at_most(op.sql_target),
                note=f"n={stats['sql'].n}",
            ),
            Row(f"{op.name} SQL p95", stats["sql"].p95, baseline=stats["b0"].p95),
            Row(
                f"{op.name} plan shape equal",
                float(mc_plan == b0_plan),
                "",
                target=Target.exactly(1),
                note=mc_plan if mc_plan == b0_plan else f"metacrm: {mc_plan} | B0: {b0_plan}",
            ),
            Row(
                f"{op.name} same ids in the same order as B0",
                float(same and len(b0_rows) > 0),
                "",
                target=Target.exactly(1),
                note=f"{len(b0_rows)} rows",
            ),
            Row(
                f"{op.name} query layer p50 (SQL + rows to JSON)",
                stats["layer"].p50,
                baseline=stats["b0"].p50,
                note="in process; informative",
            ),
        ]
        details[op.name] = {
            "b0_sql": b0,
            "metacrm_sql": metacrm[0],
            "b0_plan": b0_plan,
            "metacrm_plan": mc_plan,
        }
    report.table(f"O1-O3 list SQL, {bed.backend} (median of {reps})", rows, "B0", details)


def deep_paging(bed: Bed, report: Report, rows_total: int, reps: int, seconds: float) -> None:
    columns = ", ".join(bed.columns())
    p = bed.placeholder
    model = bed.model()
    entity = model.entity(ENTITY)
    ctx = bed.eval_context()
    first_request = query.ListRequest(sort="-created_at", limit=1)
    with bed.store.connect() as connection:
        first = query.list_records(connection, model, entity, first_request, ctx, CURSOR_SECRET)
    template = cursors.decode(first.next_cursor or "", CURSOR_SECRET)
    positions = [0] + [int(rows_total * f) for f in (0.01, 0.10, 0.95)]
    points: dict[str, Callable[[], object]] = {}
    offsets: dict[int, str] = {}
    keysets: dict[int, tuple[str, tuple[Any, ...]]] = {}
    statements: dict[int, tuple[str, Any]] = {}
    table = bed.table
    for n in positions:
        if n == 0:
            request = query.ListRequest(sort="-created_at")
        else:
            offset_sql = (
                f"SELECT {columns} FROM {table} WHERE deleted_at IS NULL "
                f"ORDER BY created_at DESC, id DESC LIMIT 50 OFFSET {n}"
            )
            with bed.store.connect() as connection:
                created, ident = connection.execute(
                    sa.select(entity.table.c.created_at, entity.table.c.id)
                    .where(entity.table.c.deleted_at.is_(None))
                    .order_by(entity.table.c.created_at.desc(), entity.table.c.id.desc())
                    .offset(n - 1)
                    .limit(1)
                ).one()
            token = cursors.encode(
                cursors.Position(ENTITY, template.sort, template.digest, (created, ident)),
                CURSOR_SECRET,
            )
            request = query.ListRequest(sort="-created_at", cursor=token)
            offsets[n] = offset_sql
            b0 = (
                f"SELECT {columns} FROM {table} WHERE deleted_at IS NULL "
                f"AND (created_at, id) < ({p}, {p}) ORDER BY created_at DESC, id DESC LIMIT 50"
            )
            points[f"b0 {n}"] = lambda b0=b0, c=created, i=ident: bed.b0(b0, (c, i))
            keysets[n] = (b0, (created, ident))
        statements[n] = _list_sql(bed, LISTS[0], request)
        points[f"layer {n}"] = _in_process_list(bed, request)
    stats = _series(points, reps, seconds)
    # OFFSET, for reference only, after the series: its deep scans would otherwise
    # disturb the pages timed right after them.
    for n, offset_sql in offsets.items():
        stats[f"offset {n}"] = Stats.of(
            sample(lambda s=offset_sql: bed.b0(s, ()), min_samples=20, max_seconds=seconds)
        )
    first_p50 = stats["layer 0"].p50
    out: list[Row] = [Row("page 1 p50 (query layer)", first_p50, note=f"n={stats['layer 0'].n}")]
    for n in positions[1:]:
        deepest = n == positions[-1]
        out.append(
            Row(
                f"page after row {n:,} p50",
                stats[f"layer {n}"].p50,
                baseline=first_p50,
                target=Target.ratio_at_most(2) if deepest else None,
                note=f"B0 keyset {stats[f'b0 {n}'].p50:.2f} ms; "
                f"OFFSET {stats[f'offset {n}'].p50:.2f} ms",
            )
        )
    deepest = positions[-1]
    b0_sql, b0_params = keysets[deepest]
    b0_plan = bed.plan(b0_sql, bed.raw_params(b0_params))
    mc_plan = bed.plan(*statements[deepest])
    out.append(
        Row(
            f"page after row {deepest:,}: plan shape equal to B0 keyset",
            float(mc_plan == b0_plan),
            "",
            target=Target.exactly(1),
            note=mc_plan if mc_plan == b0_plan else f"metacrm: {mc_plan} | B0: {b0_plan}",
        )
    )
    offsets = [s for s, _ in bed.captured if re.search(r"\bOFFSET\b", s, re.I)]
    out.append(
        Row(
            "statements with OFFSET sent by metacrm",
            len(offsets),
            "",
            target=Target.exactly(0),
            note=f"of {len(bed.captured)} captured",
        )
    )
    report.table(
        f"O4 deep paging by cursor, {bed.backend}, {rows_total:,} rows (median of {reps})",
        out,
        "page 1",
        {"sql": {str(n): s[0] for n, s in statements.items()}},
    )


def counts(bed: Bed, report: Report, reps: int, seconds: float) -> None:
    model = bed.model()
    entity = model.entity(ENTITY)
    ctx = bed.eval_context()
    flt = 'status = "won"'

    # The count runs on a connection already held, so what is timed is what it adds to a
    # list: its own statements, no checkout. As in the API, the capped count reads on a
    # connection without a transaction of its own (``TenantStore.read``) and only the
    # exact count, which sets a statement timeout, takes one.
    held = contextlib.ExitStack()
    reading = held.enter_context(bed.store.read())
    connection = held.enter_context(bed.store.connect())

    def capped() -> tuple[int, bool]:
        return query.count_records(reading, model, entity, flt, ctx, threshold=1000)

    def exact() -> tuple[int, bool]:
        found = query.count_records(
            connection, model, entity, flt, ctx, exact=True, timeout_ms=60_000
        )
        connection.rollback()
        return found

    def page() -> object:
        request = query.ListRequest(filter=flt, sort="-created_at")
        return query.list_records(reading, model, entity, request, ctx, CURSOR_SECRET)

    b0 = f"SELECT count(*) FROM {bed.table} WHERE deleted_at IS NULL AND status = {bed.placeholder}"
    value, is_exact = capped()
    truth = bed.b0(b0, ("won",))[0][0]
    # What a count adds to a list: timed right after the list's page, as the API runs
    # them. Timed after a full count instead (the heavy points below, 10-20 ms of
    # scanning each), the same count took twice as long, its caches cold; that figure
    # is shown too, for information.
    listed = _series({"page": page, "capped": capped}, reps, seconds)
    stats = _series(
        {"capped": capped, "b0": lambda: bed.b0(b0, ("won",)), "exact": exact}, reps, seconds
    )
    every = f"SELECT count(*) FROM {bed.table} WHERE deleted_at IS NULL"
    full_count_ms = _timed(lambda: bed.b0(every, ()), seconds).p50
    held.close()
    refused = ""
    try:
        with bed.store.connect() as connection:
            query.count_records(connection, model, entity, None, ctx, exact=True, timeout_ms=1)
    except query.QueryError as exc:
        refused = exc.code
    rows = [
        Row(
            "list page (O1's filter) p50, for reference",
            listed["page"].p50,
            note=f"n={listed['page'].n}",
        ),
        Row(
            "count capped/estimated after the page p50",
            listed["capped"].p50,
            note=f"n={listed['capped'].n}",
        ),
        Row(
            "count capped/estimated after the page p95 (added to a list)",
            listed["capped"].p95,
            target=Target.at_most(1, "ms"),
            note=f"{value:,} ({'exact' if is_exact else 'estimate'}; true {truth:,})",
        ),
        Row(
            "count capped/estimated after a full count p50 / p95 (cold)",
            stats["capped"].p50,
            note=f"p95 {stats['capped'].p95:.2f} ms; informative",
        ),
        Row(
            "exact count on request p50",
            stats["exact"].p50,
            baseline=stats["b0"].p50,
            note="B0: count(*)",
        ),
        Row(
            "exact count over all rows with a 1 ms timeout refused",
            float(refused == "count_timeout"),
            "",
            # A count that finishes within 1 ms cannot be stopped by a 1 ms timeout.
            target=Target.exactly(1) if full_count_ms > 5 else None,
            note=(refused or "not refused")
            + ("" if full_count_ms > 5 else f" (a full count takes {full_count_ms:.2f} ms)"),
        ),
    ]
    report.table(f"O5 count with a list, {bed.backend} (median of {reps})", rows, "count(*)")


def reports(bed: Bed, report: Report, reps: int, seconds: float) -> None:
    """O6 through the expression compiler: there is no report API yet (said in the output)."""
    model = bed.model()
    entity = model.entity(ENTITY)
    ctx = bed.eval_context()
    resolve = column_resolver(model, entity, ctx)

    def expr(text: str) -> Any:
        return compile_sql(parse(text), entity.scope, resolve, ctx)

    rows: list[Row] = []
    details: dict[str, Any] = {}
    for groups in (("status",), ("status", "region")):
        keys = [expr(g).label(g) for g in groups]
        statement = (
            sa.select(*keys, sa.func.sum(expr("amount")).label("total"))
            .where(entity.table.c.deleted_at.is_(None))
            .group_by(*keys)
        )
        with bed.store.connect() as connection, bed.capture() as found:
            connection.execute(statement).all()
        metacrm = found[-1]
        names = ", ".join(groups)
        b0 = (
            f"SELECT {names}, sum(amount) AS total FROM {bed.table} "
            f"WHERE deleted_at IS NULL GROUP BY {names}"
        )
        b0_plan, mc_plan = bed.plan(b0, ()), bed.plan(*metacrm)
        stats = _series(
            {"b0": lambda b0=b0: bed.b0(b0, ()), "sql": lambda m=metacrm: bed.replay(m)},
            reps,
            seconds,
        )
        label = f"GROUP BY {names} + SUM"
        rows += [
            Row(
                f"{label} p50",
                stats["sql"].p50,
                baseline=stats["b0"].p50,
                target=Target.ratio_at_most(1.1),
                note=f"n={stats['sql'].n}",
            ),
            Row(
                f"{label} plan shape equal",
                float(mc_plan == b0_plan),
                "",
                target=Target.exactly(1),
                note=mc_plan if mc_plan == b0_plan else f"metacrm: {mc_plan} | B0: {b0_plan}",
            ),
        ]
        details[names] = {"b0_sql": b0, "metacrm_sql": metacrm[0]}
    report.table(f"O6 report SQL, {bed.backend} (median of {reps})", rows, "B0", details)
    report.note(
        "  O6: metacrm has no report API yet; measured is the GROUP BY built from "
        "expressions compiled by metacrm's expression compiler, captured and replayed."
    )


def storage(bed: Bed, report: Report, rows_total: int) -> None:
    """O14: bytes per record with indexes, against a hand-written typed table."""
    typed = "typed_lead"
    schema = bed.store.schema
    qualified = f'"{schema}".{typed}' if schema else typed
    data = (
        "name, company, city, job_title, status, region, amount, employees, close_date, "
        "email, phone"
    )
    if bed.postgresql:
        ddl = [
            f"CREATE TABLE {qualified} (id uuid PRIMARY KEY, owner_id uuid NOT NULL, "
            "created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL, "
            "name varchar(120) NOT NULL, company varchar(120), city varchar(60), "
            "job_title varchar(80), status text, region text, amount numeric(14,2), "
            "employees integer, close_date date, email text, phone text)",
        ]
    else:
        ddl = [
            f"CREATE TABLE {qualified} (id BLOB PRIMARY KEY, owner_id BLOB NOT NULL, "
            "created_at TEXT NOT NULL, updated_at TEXT NOT NULL, name TEXT NOT NULL, "
            "company TEXT, city TEXT, job_title TEXT, status TEXT, region TEXT, amount NUMERIC, "
            "employees INTEGER, close_date TEXT, email TEXT, phone TEXT) WITHOUT ROWID",
        ]
    prefix = f'"{schema}".' if schema else ""
    # The indexes exist before the rows arrive, as they do in D1's table (published,
    # then filled by one INSERT): an index built over loaded rows is packed full,
    # one kept up row by row in random key order is not, and comparing the two
    # measured the load order (an identical (amount) index differed by a third).
    ddl += [
        f"CREATE INDEX typed_status_created ON {qualified} (status, created_at)",
        f"CREATE INDEX typed_created ON {qualified} (created_at)",
        f"CREATE INDEX typed_amount ON {qualified} (amount)",
        f"CREATE INDEX typed_owner ON {qualified} (owner_id)",
        f"INSERT INTO {qualified} SELECT id, owner_id, created_at, updated_at, {data} "
        f"FROM {bed.table}",
    ]
    for statement in ddl:
        bed.raw.execute(statement)
    if bed.postgresql:
        bed.raw.execute(f"VACUUM ANALYZE {qualified}")

        def size(table: str) -> int:
            return int(
                bed.raw.execute(
                    "SELECT pg_total_relation_size(%s::regclass)", (f"{prefix}{table}",)
                ).fetchone()[0]
            )

        mine, theirs = size(f'"{ENTITY}"'), size(typed)
    else:

        def size(table: str) -> int:
            names = [table] + [
                r[0]
                for r in bed.raw.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (table,)
                )
            ]
            marks = ", ".join("?" * len(names))
            return int(
                bed.raw.execute(
                    f"SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name IN ({marks})", names
                ).fetchone()[0]
            )

        mine, theirs = size(ENTITY), size(typed)
    count = max(rows_total, 1)
    rows = [
        Row(
            "bytes per record incl. indexes",
            mine / count,
            "B",
            baseline=theirs / count,
            target=Target.ratio_at_most(1.2),
            note=f"{mine / 2**20:,.0f} MiB vs {theirs / 2**20:,.0f} MiB",
        ),
    ]
    report.table(f"O14 storage, {bed.backend}, {rows_total:,} rows", rows, "typed table")
    report.note(
        "  typed table: id, owner_id, created_at, updated_at and the 11 fields, natively typed, "
        "with indexes (status, created_at), (created_at), (amount), (owner_id), created before "
        "its rows are inserted in the order of D1's; metacrm adds team_id, created_by, "
        "updated_by, version, deleted_at, a recycle-bin index and, on SQLite only, id as the "
        "last key of the keyset indexes."
    )


# -- the API -----------------------------------------------------------------------------------


def _floor_config(bed: Bed, columns: list[str]) -> dict[str, Any]:
    p = bed.placeholder
    names = ", ".join(columns)
    kinds = {
        "id": "uuid",
        "owner_id": "uuid",
        "team_id": "uuid",
        "created_by": "uuid",
        "updated_by": "uuid",
        "created_at": "datetime",
        "updated_at": "datetime",
        "deleted_at": "datetime",
        "amount": "decimal",
    }
    config: dict[str, Any] = {
        "backend": bed.backend,
        "kinds": kinds,
        "get": f"SELECT {names} FROM {bed.table} WHERE id = {p} AND deleted_at IS NULL",
        "lists": {
            op.name: {
                "sql": op.b0_sql(bed.table, names, p),
                "params": [f"p{i}" for i in range(len(op.params))],
            }
            for op in LISTS
        },
    }
    if bed.postgresql:
        config["dsn"] = libpq_url(bed.overrides["database_url"])
    else:
        config["path"] = bed.store.engine.url.database
    return config


def api(
    bed: Bed, report: Report, ops: set[str], reps: int, seconds: float, wrk_seconds: float
) -> None:
    columns = bed.columns()
    env_app = {servers.APP_ENV: json.dumps(bed.overrides)}
    env_floor = {servers.FLOOR_ENV: json.dumps(_floor_config(bed, columns))}
    auth = {"Authorization": f"Bearer {bed.tenant.token}"}
    base = f"/t/{bed.tenant.slug}/api/v1/records/{ENTITY}"
    with bed.store.connect() as connection:
        some_id = connection.execute(
            sa.select(bed.model().entity(ENTITY).table.c.id).limit(1)
        ).scalar_one()
    paths: dict[str, tuple[str, str]] = {}
    for op in LISTS[:2]:
        if op.name in ops:
            query_string = f"filter={quote(op.filter)}&sort={quote(op.sort)}"
            floor_query = "&".join(f"p{i}={v}" for i, v in enumerate(op.params))
            paths[op.name] = (f"{base}?{query_string}", f"/list/{op.name}?{floor_query}")
    if "o7" in ops:
        paths["o7 read"] = (f"{base}/{some_id}", f"/get/{some_id}")
    with (
        servers.serve("metacrm", "bench.servers:metacrm_app()", env_app, "/health") as mine,
        servers.serve(
            "B1", "bench.servers:floor_app()", env_floor, "/get/" + str(some_id)
        ) as floor,
        servers.Client(mine.port, auth) as client,
        servers.Client(floor.port) as floor_client,
    ):
        same: dict[str, bool] = {}
        for name, (path, floor_path) in paths.items():
            # The floor must answer the same JSON, or it would be a floor for something else.
            mine_body = json.loads(client.get(path)[1])
            floor_body = json.loads(floor_client.get(floor_path)[1])
            if "items" in mine_body:
                mine_body = {"items": mine_body["items"]}
                floor_body = {"items": floor_body["items"]}
            same[name] = mine_body == floor_body
        points: dict[str, Callable[[], object]] = {}
        for name, (path, floor_path) in paths.items():
            points[f"{name} b1"] = floor_client.checked(floor_path)
            points[f"{name} api"] = client.checked(path)
        stats = _series(points, reps, seconds)
        throughput: dict[str, list[servers.WrkResult]] = {k: [] for k in points}
        if wrk_seconds and servers.wrk_available():
            for _ in range(reps):
                for name, (path, floor_path) in paths.items():
                    throughput[f"{name} b1"].append(
                        servers.balanced_wrk(floor, floor.base + floor_path, wrk_seconds)
                    )
                    throughput[f"{name} api"].append(
                        servers.balanced_wrk(mine, mine.base + path, wrk_seconds, auth)
                    )
        rows: list[Row] = []
        for name in paths:
            api_stats, b1_stats = stats[f"{name} api"], stats[f"{name} b1"]
            rows.append(
                Row(
                    f"{name} B1 answers the same JSON",
                    float(same[name]),
                    "",
                    target=Target.exactly(1),
                )
            )
            rows.append(
                Row(
                    f"{name} p50 single client",
                    api_stats.p50,
                    baseline=b1_stats.p50,
                    target=Target.ratio_at_most(1.25) if name != "o7 read" else None,
                    note=f"n={api_stats.n}",
                )
            )
            rows.append(Row(f"{name} p95 single client", api_stats.p95, baseline=b1_stats.p95))
            rows.append(Row(f"{name} p99 single client", api_stats.p99, baseline=b1_stats.p99))
            runs, floor_runs = throughput[f"{name} api"], throughput[f"{name} b1"]
            if runs:
                rate = statistics.median(r.requests_per_s for r in runs)
                floor_rate = statistics.median(r.requests_per_s for r in floor_runs)
                errors = sum(r.errors for r in runs)
                redone = sum(r.redone for r in runs), sum(r.redone for r in floor_runs)
                notes = [f"{errors} errors"] if errors else []
                if any(redone):
                    notes.append(f"one-worker runs redone {redone[0]} / {redone[1]}")
                rows.append(
                    Row(
                        f"{name} wrk -c8 req/s",
                        rate,
                        "/s",
                        baseline=floor_rate,
                        target=at_least_ratio(0.8),
                        note="; ".join(notes),
                    )
                )
                rows.append(
                    Row(
                        f"{name} wrk -c8 p50 / p99",
                        statistics.median(r.p50 for r in runs),
                        baseline=statistics.median(r.p50 for r in floor_runs),
                        note=f"p99 {statistics.median(r.p99 for r in runs):.1f} vs "
                        f"{statistics.median(r.p99 for r in floor_runs):.1f} ms",
                    )
                )
        if "o7" in ops:
            rows += _writes(bed, client, base, reps, seconds)
    report.table(
        f"O1/O2/O7 through HTTP, {bed.backend}: metacrm vs B1 under gunicorn "
        f"{' '.join(servers.SERVER_ARGS[:6])} (median of {reps})",
        rows,
        "B1",
    )


def _platform_rows(bed: Bed) -> tuple[int, int]:
    schema = bed.store.schema
    with bed.store.connect() as connection:
        audit = connection.execute(
            sa.text(
                f"SELECT count(*) FROM {f'{chr(34)}{schema}{chr(34)}.' if schema else ''}_audit"
            )
        ).scalar_one()
        outbox = connection.execute(
            sa.text(
                f"SELECT count(*) FROM {f'{chr(34)}{schema}{chr(34)}.' if schema else ''}_outbox"
            )
        ).scalar_one()
    return int(audit), int(outbox)


def _writes(bed: Bed, client: servers.Client, base: str, reps: int, seconds: float) -> list[Row]:
    """O7 create and update through the API, single client, audit and outbox checked."""
    counter = iter(range(10**9))
    made: list[tuple[str, int]] = []

    def create() -> None:
        n = next(counter)
        status, data, _ = client.request(
            "POST",
            base,
            {
                "name": f"Bench {n}",
                "company": "Write Co",
                "status": STATUSES[n % 8],
                "region": "region_07",
                "amount": "1234.50",
                "employees": n % 5000,
                "close_date": "2026-03-01",
                "email": f"w{n}@example.com",
                "phone": "+86 138 0000 0000",
            },
        )
        if status != 201:
            raise RuntimeError(f"create answered {status}: {data[:300]!r}")
        body = json.loads(data)
        made.append((body["id"], body["version"]))

    position = iter(range(10**9))

    def update() -> None:
        k = next(position) % len(made)
        record_id, version = made[k]
        status, data, _ = client.request(
            "PATCH",
            f"{base}/{record_id}",
            # A new value every time: an update that changes nothing writes no audit entry.
            {"amount": f"{next(position)}.25", "status": STATUSES[k % 8]},
            {"If-Match": f'"{version}"'},
        )
        if status != 200:
            raise RuntimeError(f"update answered {status}: {data[:300]!r}")
        made[k] = (record_id, json.loads(data)["version"])

    before = _platform_rows(bed)
    calls = {"create": 0, "update": 0}

    def counted(name: str, fn: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:
            fn()
            calls[name] += 1

        return call

    floor = _write_floor(bed)
    stats = _series(
        {
            "create": counted("create", create),
            "update": counted("update", update),
            "floor": floor,
        },
        reps,
        seconds,
    )
    after = _platform_rows(bed)
    writes = calls["create"] + calls["update"]
    logged = (after[0] - before[0], after[1] - before[1])
    return [
        Row(
            "o7 create p50 single client",
            stats["create"].p50,
            target=Target.at_most(5, "ms"),
            note=f"n={stats['create'].n}",
        ),
        Row("o7 create p95", stats["create"].p95),
        Row(
            "committed one-row INSERT on the raw driver p50",
            stats["floor"].p50,
            note="the disk's part: what any committed write costs here (informative)",
        ),
        Row(
            "o7 update (If-Match) p50 single client",
            stats["update"].p50,
            target=Target.at_most(5, "ms"),
            note=f"n={stats['update'].n}",
        ),
        Row("o7 update p95", stats["update"].p95),
        Row(
            "o7 writes with one audit entry and one outbox event each",
            float(logged == (writes, writes)),
            "",
            target=Target.exactly(1),
            note=f"{writes} writes, {logged[0]} audit, {logged[1]} outbox",
        ),
    ]


def _write_floor(bed: Bed) -> Callable[[], None]:
    """A committed one-row INSERT on the raw driver: the commit (WAL flush) every write pays."""
    schema = bed.store.schema
    table = f'"{schema}".write_floor' if schema else "write_floor"
    kind = "uuid" if bed.postgresql else "TEXT"
    bed.raw.execute(
        f"CREATE TABLE IF NOT EXISTS {table} (id {kind} PRIMARY KEY, name text, amount numeric)"
    )
    sql = f"INSERT INTO {table} (id, name, amount) VALUES ({bed.placeholder}, "
    sql += f"{bed.placeholder}, {bed.placeholder})"

    def write() -> None:
        # Autocommit on both raw connections: the statement is its own committed transaction.
        bed.raw.execute(sql, bed.raw_params((uuid.uuid4(), "floor", 1234.5)))

    return write


# -- O8: bulk import ---------------------------------------------------------------------------


#: D4 columns that name no field of ``lead``: left unmapped with the import's ``skip``. The
#: owner ids are not members of the tenant (the importing user owns the rows), the other
#: two are carried by exports and mapped to nothing.
IMPORT_SKIPPED = ("owner_id", "external_ref", "notes")


def metacrm_import(platform: Platform, store: TenantStore, admin: uuid.UUID, path: Path) -> int:
    """Import D4 as the import endpoint does: ``importer``, all rows in one transaction.

    The file is streamed from disk instead of held in memory as the request body
    would be (a 1,000,000-row file is larger than ``max_import_bytes``); column
    mapping, cell conversion, batches of ``importer.BATCH`` through
    ``records.create_many`` (validated, audited, outbox) are the endpoint's own.
    """
    from metacrm.runtime import importer
    from metacrm.runtime.records import Caller

    caller = Caller(admin, "bench admin")
    with store.connect() as connection:
        model = platform.models.current(store, connection)
    entity = model.entity(ENTITY)
    with path.open(newline="", encoding="utf-8") as source:
        _, rows = importer.csv_rows(entity, source, skip=IMPORT_SKIPPED)
        with store.begin(immediate=True) as connection:
            _, created = importer.import_rows(
                connection, model, entity, rows, caller, platform.cipher
            )
    return created


RAW_COLUMNS = (
    "name text NOT NULL, company text, city text, job_title text, status text, region text, "
    "amount {decimal}, employees integer, close_date date, email text, phone text, "
    "owner_id {uuid}, external_ref text, notes text"
)


def create_raw_target(store: TenantStore) -> None:
    """A hand-written typed table for D4, with the secondary indexes metacrm's ``lead`` has."""
    schema = store.schema
    table = f'"{schema}".raw_lead' if schema else "raw_lead"
    if schema:
        columns = RAW_COLUMNS.format(decimal="numeric(14,2)", uuid="uuid")
        head = (
            "id uuid PRIMARY KEY DEFAULT gen_random_uuid(), created_at timestamptz NOT NULL "
            "DEFAULT now()"
        )
    else:
        columns = RAW_COLUMNS.format(decimal="NUMERIC", uuid="TEXT")
        head = "id TEXT PRIMARY KEY, created_at TEXT NOT NULL"
    with store.engine.begin() as connection:
        connection.exec_driver_sql(f"CREATE TABLE {table} ({head}, {columns})")
        for name, keys in (
            ("status_created", "status, created_at"),
            ("created", "created_at"),
            ("amount", "amount"),
            ("owner", "owner_id"),
        ):
            connection.exec_driver_sql(f"CREATE INDEX raw_lead_{name} ON {table} ({keys})")


def raw_import(store: TenantStore, path: Path, dsn: str | None) -> int:
    """B0 of O8: ``COPY ... FROM STDIN (FORMAT csv, HEADER)`` / sqlite ``executemany``."""
    if store.schema:
        import psycopg

        with psycopg.connect(dsn or "") as connection, connection.cursor() as cursor:
            columns = ", ".join(dataset.D4_COLUMNS)
            with (
                cursor.copy(
                    f'COPY "{store.schema}".raw_lead ({columns}) '
                    "FROM STDIN (FORMAT csv, HEADER true)"
                ) as copy,
                path.open("rb") as source,
            ):
                while block := source.read(1 << 20):
                    copy.write(block)
            return int(cursor.rowcount)
    connection = sqlite3.connect(store.engine.url.database, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        marks = ", ".join("?" * (len(dataset.D4_COLUMNS) + 2))
        sql = (
            f"INSERT INTO raw_lead (id, created_at, {', '.join(dataset.D4_COLUMNS)}) "
            f"VALUES ({marks})"
        )
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        count = 0
        connection.execute("BEGIN")
        with path.open(newline="", encoding="utf-8") as source:
            reader = csv.reader(source)
            next(reader)
            batch: list[tuple[Any, ...]] = []
            for row in reader:
                batch.append((uuid.uuid4().hex, now, *(cell or None for cell in row)))
                if len(batch) == 20_000:
                    connection.executemany(sql, batch)
                    count += len(batch)
                    batch = []
            connection.executemany(sql, batch)
            count += len(batch)
        connection.execute("COMMIT")
        return count
    finally:
        connection.close()


def _import_child(kind: str, overrides: dict[str, Any], slug: str, csv_path: str, out: Any) -> None:
    """Run one import in a fresh process and send (seconds, rows, peak KiB, error) back."""
    try:
        platform = Platform(settings.load(overrides, environ={}))
        with platform.session() as session:
            tenant = platform.tenant(session, slug)
        store = platform.store(tenant)
        dsn = libpq_url(overrides["database_url"]) if store.schema else None
        admin = _admin_of(platform, tenant)
        started = time.perf_counter()
        if kind == "raw":
            rows = raw_import(store, Path(csv_path), dsn)
        else:
            rows = metacrm_import(platform, store, admin, Path(csv_path))
        seconds = time.perf_counter() - started
        platform.close()
        out.send((seconds, rows, memory_kib()["peak"], None))
    except Exception as exc:  # reported in the table
        out.send((0.0, 0, memory_kib()["peak"], repr(exc)[:400]))
    finally:
        out.close()


def _admin_of(platform: Platform, tenant: Any) -> uuid.UUID:
    from metacrm.runtime.control import Membership

    with platform.session() as session:
        return session.scalars(
            sa.select(Membership.user_id).where(Membership.tenant_id == tenant.id)
        ).first()


def _in_child(kind: str, bed: Bed, slug: str, csv_path: Path) -> tuple[float, int, int, str | None]:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=_import_child, args=(kind, bed.overrides, slug, str(csv_path), send)
    )
    child.start()
    send.close()
    result = receive.recv()
    child.join()
    return result


def bulk_import(bed: Bed, report: Report, d4_rows: int, workdir: Path, reps: int) -> None:
    csv_path = dataset.write_d4(workdir / f"d4-{bed.backend}.csv", d4_rows)
    results: dict[str, list[tuple[float, int, int, str | None]]] = {"raw": [], "metacrm": []}
    for n in range(reps):
        slug = f"imp{n}{bed.backend[:2]}"
        tenant = dataset.build_d1(bed.platform, slug, 0)
        create_raw_target(tenant.store)
        for kind in ("raw", "metacrm"):
            results[kind].append(_in_child(kind, bed, slug, csv_path))
    errors = [r[3] for found in results.values() for r in found if r[3]]

    def rate(kind: str) -> float | None:
        found = [r[1] / r[0] for r in results[kind] if not r[3] and r[0]]
        return statistics.median(found) if found else None

    peak = max((r[2] for r in results["metacrm"]), default=0) / 1024
    raw_name = "COPY" if bed.postgresql else "executemany"
    rows = [
        Row(
            "import rows/s",
            rate("metacrm"),
            "/s",
            baseline=rate("raw"),
            target=at_least_ratio(0.5),
            note=f"{d4_rows:,} rows; raw {raw_name}",
        ),
        Row(
            "import peak RSS",
            peak,
            "MiB",
            target=Target.at_most(1024, "MiB"),
            note="whole process, fresh per run",
        ),
        Row(
            "rows created",
            float(statistics.median(r[1] for r in results["metacrm"])),
            "",
            target=Target.exactly(d4_rows),
        ),
    ]
    report.table(f"O8 bulk import of D4, {bed.backend} (median of {reps})", rows, f"raw {raw_name}")
    for error in errors:
        report.note(f"  O8 error: {error}")


# -- running ---------------------------------------------------------------------------------


def measure_backend(
    backend: str, args: Any, report: Report, workdir: Path, pg_url: str | None
) -> None:
    ops = args.ops
    started = time.perf_counter()
    bed = _open_bed(backend, args.rows, workdir, pg_url)
    report.note(
        f"\n{backend}: D1 {args.rows:,} rows loaded in {bed.tenant.load_seconds:.1f} s "
        f"(setup {time.perf_counter() - started:.1f} s)"
    )
    try:
        reps, seconds = args.repetitions, args.seconds
        if ops & {"o1", "o2", "o3"}:
            sql_lists(bed, report, reps, seconds)
        if "o4" in ops:
            deep_paging(bed, report, args.rows, reps, seconds)
        if "o5" in ops:
            counts(bed, report, reps, seconds)
        if "o6" in ops:
            reports(bed, report, reps, seconds)
        if ops & {"o1", "o2", "o7"}:
            api(bed, report, ops, reps, seconds, args.wrk_seconds)
        if "o4" in ops:
            _check_api_offsets(bed, report)
        if ops & {"o1", "o7"}:
            request_breakdown(bed, report, 50 if args.quick else 500)
        if "o14" in ops:
            storage(bed, report, args.rows)
        if "o8" in ops:
            bulk_import(bed, report, args.d4_rows, workdir, args.o8_repetitions)
    finally:
        bed.raw.close()
        bed.platform.close()


@contextlib.contextmanager
def _timers(spent: dict[str, float]) -> Iterator[None]:
    """Time the request path's parts in process, restoring every function afterwards.

    Instrumentation only: the wrapped functions run unchanged, and the few
    microseconds a wrapper costs land in the parts, not in "other".
    """
    from metacrm.runtime import model, tokens
    from metacrm.runtime.api import context
    from metacrm.runtime.api import records as api_records

    wanted = (
        (
            tokens.TokenCache,
            "authenticate",
            "authenticate the token, find the tenant (cache or control database)",
        ),
        (getattr(context, "sessions", None), "tenant_security", "tenant security settings"),
        (context, "access", "permissions"),
        (api_records, "access", "permissions"),
        (model.ModelCache, "current", "published version check"),
        (api_records.query, "list_records", "query layer: list (SQL, rows to JSON)"),
        (api_records.records, "get", "record service: get"),
        (api_records, "jsonify", "JSON serialisation (Flask)"),
    )
    # Parts another change renamed or removed are left out, not failed on.
    parts = [(o, n, label) for o, n, label in wanted if o is not None and hasattr(o, n)]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in parts]
    clock = time.perf_counter

    def timed(function: Callable[..., Any], label: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + clock() - started

        return call

    try:
        for (owner, name, label), (_, _, original) in zip(parts, originals, strict=True):
            setattr(owner, name, timed(original, label))
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def request_breakdown(bed: Bed, report: Report, requests: int) -> None:
    """Where an API request's time goes, in process (Flask test client, no server)."""
    from metacrm.app import create_app

    app = create_app(bed.overrides)
    client = app.test_client()
    headers = {"Authorization": f"Bearer {bed.tenant.token}"}
    base = f"/t/{bed.tenant.slug}/api/v1/records/{ENTITY}"
    with bed.store.connect() as connection:
        some_id = connection.execute(
            sa.select(bed.model().entity(ENTITY).table.c.id).limit(1)
        ).scalar_one()
    paths = {
        "o1 list": f"{base}?filter={quote(LISTS[0].filter)}&sort={quote(LISTS[0].sort)}",
        "o7 read": f"{base}/{some_id}",
    }
    rows: list[Row] = []
    try:
        for name, path in paths.items():
            for _ in range(20):
                client.get(path, headers=headers)
            spent: dict[str, float] = {}
            with _timers(spent):
                started = time.perf_counter()
                for _ in range(requests):
                    answer = client.get(path, headers=headers)
                    if answer.status_code != 200:
                        raise RuntimeError(f"{path} answered {answer.status_code}")
                total = time.perf_counter() - started
            per = 1000 / requests
            rows.append(Row(f"{name}: whole request", total * per, note=f"n={requests}"))
            for label, seconds in spent.items():
                rows.append(Row(f"{name}: {label}", seconds * per, note=f"{seconds / total:.0%}"))
            other = total - sum(spent.values())
            rows.append(
                Row(
                    f"{name}: other (Flask, routing, rate limiter, parsing, pool)",
                    other * per,
                    note=f"{other / total:.0%}",
                )
            )
    finally:
        app.extensions["metacrm"].close()
    report.table(
        f"Where an API request's time goes, {bed.backend} (in process, mean per request)",
        rows,
    )


def _check_api_offsets(bed: Bed, report: Report) -> None:
    """Walk three pages through the API in process and show that no statement used OFFSET."""
    from metacrm.app import create_app

    app = create_app(bed.overrides)
    client = app.test_client()
    headers = {"Authorization": f"Bearer {bed.tenant.token}"}
    path = f"/t/{bed.tenant.slug}/api/v1/records/{ENTITY}?sort=-created_at&limit=100"
    url, pages = path, 0
    with bed.capture() as found:
        for _ in range(3):
            answer = client.get(url, headers=headers)
            if answer.status_code != 200:
                raise RuntimeError(f"API list answered {answer.status_code}: {answer.data[:200]!r}")
            pages += 1
            token = answer.json["next_cursor"]
            if token is None:
                break
            url = f"{path}&cursor={quote(token)}"
    app.extensions["metacrm"].close()
    offsets = sum(1 for s, _ in found if re.search(r"\bOFFSET\b", s, re.I))
    report.table(
        f"O4 API pages by next_cursor, {bed.backend}",
        [
            Row(
                "API statements with OFFSET",
                offsets,
                "",
                target=Target.exactly(0),
                note=f"{pages} pages, {len(found)} statements captured",
            )
        ],
    )


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its tables and return the JSON record."""
    parser = argument_parser(__doc__.split("\n\n")[0])
    backend_argument(parser)
    parser.add_argument("--rows", type=int, default=None, help="D1 rows (1,000,000)")
    parser.add_argument("--d4-rows", type=int, default=None, help="D4 CSV rows (1,000,000)")
    parser.add_argument("--seconds", type=float, default=None, help="max seconds per point (10)")
    parser.add_argument(
        "--wrk-seconds", type=float, default=None, help="wrk duration per run (15; 0 skips wrk)"
    )
    parser.add_argument(
        "--o8-repetitions",
        type=int,
        default=1,
        help="imports per backend (1: a 1,000,000-row import takes minutes)",
    )
    parser.add_argument(
        "--only", default=",".join(OPERATIONS), help=f"operations to run, of {','.join(OPERATIONS)}"
    )
    args = parser.parse_args(argv)
    args.rows = args.rows or (20_000 if args.quick else 1_000_000)
    args.d4_rows = args.d4_rows or (20_000 if args.quick else 1_000_000)
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 10.0)
    if args.wrk_seconds is None:
        args.wrk_seconds = 2.0 if args.quick else 15.0
    args.repetitions = args.repetitions or (1 if args.quick else 3)
    args.ops = {o.strip().lower() for o in args.only.split(",") if o.strip()}
    unknown = args.ops - set(OPERATIONS)
    if unknown:
        parser.error(f"unknown operations: {', '.join(sorted(unknown))}")
    backends = chosen_backends(args.backend)
    options = {
        "rows": args.rows,
        "d4_rows": args.d4_rows,
        "seconds_per_point": args.seconds,
        "wrk_seconds": args.wrk_seconds,
        "repetitions": args.repetitions,
        "o8_repetitions": args.o8_repetitions,
        "operations": sorted(args.ops),
        "backends": backends,
        "server": " ".join(servers.SERVER_ARGS),
        "wrk": " ".join(servers.WRK_ARGS),
    }
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="metacrm-o1-o8-")))
        pg_url = None
        if "postgresql" in backends:
            pg_url = stack.enter_context(private_database(args.pg_url, "metacrm_bench_records"))
        report = Report("o1_o8_records", options, environment(pg_url))
        for backend in backends:
            measure_backend(backend, args, report, tmp, pg_url if backend == "postgresql" else None)
        return report.finish(write_json=not args.no_json)


def main(argv: Sequence[str] | None = None) -> int:
    record = run(argv)
    verdicts = [r["verdict"] for s in record["sections"] for r in s["rows"] if r["verdict"]]
    return 1 if "FAIL" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
