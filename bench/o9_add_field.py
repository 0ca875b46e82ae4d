"""O9: add a field to a 1,000,000-row entity while 8 readers run the O1 list query.

A tenant gets a D1-like entity ``lead`` (two selects with 8 and 50 values, a
decimal, an integer, a date, four short texts, email, phone; owners spread over
200 users, ``created_at`` over 3 years; a composite index on
``(status, created_at)``), published through ``metastore.publish``. Rows are
loaded directly (PostgreSQL: ``INSERT ... SELECT`` over ``generate_series``
with hashing; SQLite: a seeded generator and ``executemany``). Then 8 reader
threads, each on its own connection from the tenant's engine, run the O1 query
by hand; after a steady window a new bundle version adding one nullable field
is published with ``lock_timeout`` = ``settings.ddl_lock_timeout_ms``.

Reported per backend (median of 3 publishes): the ``ALTER TABLE``'s own
duration (cursor events on the engine), how long the table stayed locked
(``ALTER`` start to ``publish`` returning), the whole publish, its lock-timeout
retries, reader p50/p99 in the steady window and in the publish window
(±1 s around it), and failed reads. Targets (BENCHMARKS O9): DDL <= 50 ms,
reader p99 during <= 2x steady, no failed read.

Run: ``.venv/bin/python -m bench.o9_add_field [--quick] [--rows N] [--backend sqlite]``
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from bench.common import (
    Report,
    Row,
    Stats,
    Target,
    argument_parser,
    backend_argument,
    chosen_backends,
    environment,
    private_database,
)
from bench.dataset import (
    ENTITY,
    LIST_COLUMNS,
    STATUSES,
    _label,
    d1_bundle,
    load_postgresql,
    load_sqlite,
)
from metacrm.runtime import metastore, settings, tenancy
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import TenantStore

AROUND_S = 1.0  # the publish window reaches this far before and after the publish


def with_extra_field(bundle: dict[str, Any], n: int) -> dict[str, Any]:
    """Return ``bundle`` plus one nullable text field on the D1 entity."""
    result = copy.deepcopy(bundle)
    lead = next(e for e in result["entities"] if e["name"] == ENTITY)
    lead["fields"].append(
        {"name": f"extra_{n}", "type": "text", "label": _label(f"extra {n}"), "max_length": 100}
    )
    return result


# -- the O1 query -----------------------------------------------------------------------


def o1_sql(store: TenantStore) -> str:
    """Return the O1 list query, written by hand for this tenant's namespace."""
    table = f'"{store.schema}"."{ENTITY}"' if store.schema else f'"{ENTITY}"'
    return (
        f"SELECT {', '.join(LIST_COLUMNS)} FROM {table} "
        "WHERE status = :s AND deleted_at IS NULL ORDER BY created_at DESC LIMIT 50"
    )


def o1_plan(store: TenantStore) -> str:
    """Return the O1 query's plan shape: node types and index names."""
    sql = o1_sql(store)
    with store.engine.connect() as connection:
        if store.schema:
            raw = connection.execute(
                sa.text("EXPLAIN (FORMAT JSON) " + sql), {"s": STATUSES[0]}
            ).scalar_one()
            plan = raw if isinstance(raw, list) else json.loads(raw)
            nodes: list[str] = []

            def walk(node: dict[str, Any]) -> None:
                index = f" using {node['Index Name']}" if "Index Name" in node else ""
                nodes.append(node["Node Type"] + index)
                for child in node.get("Plans", []):
                    walk(child)

            walk(plan[0]["Plan"])
            return " -> ".join(nodes)
        rows = connection.execute(sa.text("EXPLAIN QUERY PLAN " + sql), {"s": STATUSES[0]})
        return "; ".join(str(row[-1]) for row in rows)


@dataclass
class Read:
    start: float
    end: float
    ok: bool


class Readers:
    """Threads running the O1 query in a loop, one transaction per read, each on its own
    connection from the tenant's engine."""

    def __init__(self, store: TenantStore, threads: int) -> None:
        self.store = store
        self.threads = threads
        self.reads: list[Read] = []
        self.errors: list[str] = []
        self.stop_event = threading.Event()
        self._workers: list[threading.Thread] = []
        self._ready = threading.Barrier(threads + 1)

    def start(self) -> None:
        for k in range(self.threads):
            worker = threading.Thread(target=self._loop, args=(k,), name=f"o1-reader-{k}")
            worker.start()
            self._workers.append(worker)
        self._ready.wait()

    def stop(self) -> None:
        self.stop_event.set()
        for worker in self._workers:
            worker.join()

    def _loop(self, k: int) -> None:
        query = sa.text(o1_sql(self.store))
        clock = time.perf_counter
        n = k
        try:
            connection = self.store.engine.connect()
        except Exception as exc:  # reported as a failed reader
            self.errors.append(f"reader {k} could not connect: {exc!r}")
            self._ready.abort()
            return
        try:
            self._ready.wait()
            while not self.stop_event.is_set():
                status = STATUSES[n % len(STATUSES)]
                n += 1
                start = clock()
                ok = True
                try:
                    with connection.begin():
                        rows = connection.execute(query, {"s": status}).all()
                    ok = len(rows) == 50
                    if not ok:
                        self.errors.append(f"reader {k}: {len(rows)} rows instead of 50")
                except Exception as exc:  # every failure is counted
                    ok = False
                    if len(self.errors) < 20:
                        self.errors.append(f"reader {k}: {exc!r}"[:300])
                    if connection.invalidated:
                        connection.close()
                        connection = self.store.engine.connect()
                self.reads.append(Read(start, clock(), ok))
        finally:
            connection.close()


@dataclass
class Statement:
    text: str
    start: float
    seconds: float
    error: str | None = None


@dataclass
class StatementLog:
    """Every statement one thread sends through an engine, with its duration (cursor events)."""

    engine: sa.Engine
    thread: int = field(default_factory=threading.get_ident)
    statements: list[Statement] = field(default_factory=list)
    recording: bool = False

    def __post_init__(self) -> None:
        event.listen(self.engine, "before_cursor_execute", self._before)
        event.listen(self.engine, "after_cursor_execute", self._after)
        event.listen(self.engine, "handle_error", self._error)

    def remove(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)
        event.remove(self.engine, "handle_error", self._error)

    @contextmanager
    def record(self) -> Iterator[list[Statement]]:
        self.statements = []
        self.recording = True
        try:
            yield self.statements
        finally:
            self.recording = False

    def _mine(self) -> bool:
        return self.recording and threading.get_ident() == self.thread

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self._mine():
            conn.info["bench_started"] = time.perf_counter()

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self._mine():
            start = conn.info.pop("bench_started", time.perf_counter())
            self.statements.append(Statement(statement, start, time.perf_counter() - start))

    def _error(self, context: Any) -> None:
        if self._mine() and context.connection is not None:
            start = context.connection.info.pop("bench_started", time.perf_counter())
            code = getattr(context.original_exception, "sqlstate", None)
            self.statements.append(
                Statement(
                    context.statement or "",
                    start,
                    time.perf_counter() - start,
                    code or type(context.original_exception).__name__,
                )
            )


# -- one backend ------------------------------------------------------------------------


@dataclass
class PublishResult:
    seconds: float
    ddl_seconds: float | None
    locked_seconds: float | None
    retries: int
    statements: int
    ddl: list[str]
    error: str | None
    steady: Stats
    during: Stats
    steady_rate: float
    during_rate: float
    failed_steady: int
    failed_during: int


def _window(reads: list[Read], start: float, end: float, overlap: bool) -> list[Read]:
    if overlap:
        return [r for r in reads if r.start <= end and r.end >= start]
    return [r for r in reads if start <= r.start < end]


def _publish_once(
    store: TenantStore,
    log: StatementLog,
    bundle: dict[str, Any],
    version: int,
    lock_timeout_ms: int,
) -> tuple[float, float, list[Statement], str | None]:
    error = None
    with log.record() as statements:
        started = time.perf_counter()
        try:
            metastore.publish(
                store, bundle, expected_version=version, lock_timeout_ms=lock_timeout_ms
            )
        except Exception as exc:  # reported, and the run fails its targets
            error = repr(exc)[:300]
        ended = time.perf_counter()
    return started, ended, list(statements), error


def measure_backend(
    backend: str,
    rows: int,
    readers: int,
    steady_s: float,
    warmup_s: float,
    repetitions: int,
    pg_url: str | None,
    workdir: Path,
) -> tuple[dict[str, Any], list[PublishResult]]:
    """Build the tenant, load it, and publish ``repetitions`` added fields under load."""
    overrides: dict[str, Any] = {
        "instance_dir": str(workdir / backend),
        "secret_key": "bench-secret-key-0123456789",
    }
    if pg_url:
        overrides["database_url"] = pg_url
    config = settings.load(overrides, environ={})
    platform = Platform(config)
    info: dict[str, Any] = {"backend": backend, "rows": rows}
    try:
        platform.init_control()
        created = tenancy.create_tenant(platform, "o9", "O9 benchmark")
        store = platform.store(created.tenant)
        bundle = d1_bundle()
        metastore.publish(store, bundle, expected_version=1)
        version = 2
        started = time.perf_counter()
        (load_postgresql if store.schema else load_sqlite)(store, rows)
        info["load_seconds"] = round(time.perf_counter() - started, 1)
        info["plan"] = o1_plan(store)
        gc.collect()

        log = StatementLog(store.engine)
        pool = Readers(store, readers)
        results: list[PublishResult] = []
        pool.start()
        try:
            time.sleep(warmup_s)
            for n in range(repetitions):
                time.sleep(steady_s + AROUND_S)
                bundle = with_extra_field(bundle, n)
                start, end, statements, error = _publish_once(
                    store, log, bundle, version, config.ddl_lock_timeout_ms
                )
                if error is None:
                    version += 1
                time.sleep(AROUND_S)
                results.append(_result(pool.reads, start, end, steady_s, statements, error))
        finally:
            pool.stop()
            log.remove()
        info["reads"] = len(pool.reads)
        info["failed_reads"] = sum(1 for r in pool.reads if not r.ok)
        info["reader_errors"] = pool.errors[:10]
        with store.connect() as connection:
            columns = {c["name"] for c in sa.inspect(connection).get_columns(ENTITY, store.schema)}
        info["added_columns"] = sorted(c for c in columns if c.startswith("extra_"))
        return info, results
    finally:
        platform.close()


def _result(
    reads: list[Read],
    start: float,
    end: float,
    steady_s: float,
    statements: list[Statement],
    error: str | None,
) -> PublishResult:
    reads = list(reads)
    steady = _window(reads, start - AROUND_S - steady_s, start - AROUND_S, overlap=False)
    window_start, window_end = start - AROUND_S, end + AROUND_S
    during = _window(reads, window_start, window_end, overlap=True)
    alters = [s for s in statements if s.text.lstrip().upper().startswith("ALTER TABLE")]
    done = [s for s in alters if s.error is None]
    retries = sum(1 for s in statements if s.error == metastore.LOCK_NOT_AVAILABLE)
    return PublishResult(
        seconds=end - start,
        ddl_seconds=sum(s.seconds for s in done) if done else None,
        locked_seconds=end - done[0].start if done else None,
        retries=retries,
        statements=len(statements),
        ddl=[" ".join(s.text.split())[:160] for s in alters],
        error=error,
        steady=Stats.of([r.end - r.start for r in steady if r.ok]),
        during=Stats.of([r.end - r.start for r in during if r.ok]),
        steady_rate=len(steady) / steady_s,
        during_rate=len(during) / (window_end - window_start),
        failed_steady=sum(1 for r in steady if not r.ok),
        failed_during=sum(1 for r in during if not r.ok),
    )


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def backend_rows(info: dict[str, Any], results: list[PublishResult]) -> list[Row]:
    """Return the table rows of one backend: medians over the publishes."""
    steady = Stats.median([r.steady for r in results])
    during = Stats.median([r.during for r in results])
    per = "/".join
    return [
        Row(
            "ALTER TABLE duration",
            _ms(_median([r.ddl_seconds for r in results])),
            target=Target.at_most(50, "ms"),
            note="each: " + per(f"{_ms(r.ddl_seconds) or 0:.1f}" for r in results),
        ),
        Row(
            "table locked (ALTER -> publish returned)",
            _ms(_median([r.locked_seconds for r in results])),
            note="each: " + per(f"{_ms(r.locked_seconds) or 0:.1f}" for r in results),
        ),
        Row(
            "whole publish",
            _ms(_median([r.seconds for r in results])),
            note="each: " + per(f"{r.seconds * 1000:.0f}" for r in results),
        ),
        Row(
            "publish retries (lock timeouts)",
            sum(r.retries for r in results),
            "",
            note=f"{sum(1 for r in results if r.error)} publish(es) failed",
        ),
        Row("reader p50 steady", steady.p50, note=f"n={steady.n}"),
        Row("reader p50 during publish", during.p50, baseline=steady.p50, note=f"n={during.n}"),
        Row("reader p99 steady", steady.p99),
        Row(
            "reader p99 during publish",
            during.p99,
            baseline=steady.p99,
            target=Target.ratio_at_most(2),
        ),
        Row("reader max during publish", during.max, baseline=steady.max),
        Row(
            "reads/s during publish",
            _median([r.during_rate for r in results]),
            "/s",
            baseline=_median([r.steady_rate for r in results]),
        ),
        Row(
            "failed reads (whole run)",
            info["failed_reads"],
            "",
            target=Target.exactly(0),
            note=f"of {info['reads']:,}",
        ),
    ]


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its tables and return the JSON record."""
    parser = argument_parser(__doc__.split("\n\n")[0])
    backend_argument(parser)
    parser.add_argument("--rows", type=int, default=None, help="rows in the D1 table (1,000,000)")
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--window", type=float, default=None, help="steady window in s (10)")
    args = parser.parse_args(argv)
    rows = args.rows or (20_000 if args.quick else 1_000_000)
    steady_s = args.window or (2.0 if args.quick else 10.0)
    warmup_s = min(2.0, steady_s)
    repetitions = args.repetitions or 3
    backends = chosen_backends(args.backend)
    options = {
        "rows": rows,
        "readers": args.readers,
        "steady_window_s": steady_s,
        "publish_window": f"+-{AROUND_S} s",
        "repetitions": repetitions,
        "backends": backends,
    }
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="metacrm-o9-"))
        pg_url = None
        if "postgresql" in backends:
            pg_url = stack.enter_context(private_database(args.pg_url, "metacrm_bench_o9"))
        report = Report("o9_add_field", options, environment(pg_url))
        details: dict[str, Any] = {}
        for backend in backends:
            info, results = measure_backend(
                backend,
                rows,
                args.readers,
                steady_s,
                warmup_s,
                repetitions,
                pg_url if backend == "postgresql" else None,
                Path(tmp),
            )
            report.note(
                f"\n{backend}: loaded {rows:,} rows in {info['load_seconds']} s; "
                f"O1 plan: {info['plan']}"
            )
            for n, r in enumerate(results):
                report.note(
                    f"  publish {n + 1}: {r.statements} statements, "
                    f"{r.retries} lock timeout(s), DDL: {' | '.join(r.ddl) or 'none'}"
                    + (f", FAILED: {r.error}" if r.error else "")
                )
            for error in info["reader_errors"]:
                report.note(f"  reader error: {error}")
            details[backend] = {
                **info,
                "publishes": [
                    {**r.__dict__, "steady": r.steady.__dict__, "during": r.during.__dict__}
                    for r in results
                ],
            }
            report.table(
                f"O9 add a field, {backend}, {rows:,} rows, {args.readers} readers "
                f"(median of {repetitions} publishes)",
                backend_rows(info, results),
                baseline_label="steady",
                details=details[backend],
            )
        return report.finish(write_json=not args.no_json)


def main(argv: Sequence[str] | None = None) -> int:
    record = run(argv)
    verdicts = [r["verdict"] for s in record["sections"] for r in s["rows"] if r["verdict"]]
    return 1 if "FAIL" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
