"""What every benchmark shares: timing, statistics, the environment record, a private
PostgreSQL database, and the aligned result table with ratios and verdicts.

BENCHMARKS.md is the method: warm up, take at least 200 samples or 10 s per
point, report p50/p95/p99 as the median of 3 repetitions, compare with a
baseline measured in the same run, and record what the figures were taken on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform as std_platform
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

#: The server's administrative URL; each run creates and drops a database of its own there.
PG_ADMIN_URL = os.environ.get(
    "BENCH_PG_URL",
    os.environ.get("TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test"),
)
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BACKENDS = ("postgresql", "sqlite")

#: PostgreSQL settings that move these figures, recorded with every run.
PG_SETTINGS = (
    "shared_buffers",
    "effective_cache_size",
    "work_mem",
    "maintenance_work_mem",
    "max_connections",
    "max_locks_per_transaction",
    "synchronous_commit",
    "fsync",
    "wal_level",
    "max_wal_size",
    "checkpoint_timeout",
    "jit",
    "random_page_cost",
    "lock_timeout",
    "statement_timeout",
)


# -- statistics -------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Return the q-th percentile (0-100) of sorted values, interpolating linearly."""
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Stats:
    """Latency percentiles of one series of samples, in milliseconds."""

    n: int
    p50: float
    p95: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        """Summarise samples given in seconds."""
        ordered = sorted(s * 1000 for s in seconds)
        if not ordered:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan)
        return cls(
            len(ordered),
            percentile(ordered, 50),
            percentile(ordered, 95),
            percentile(ordered, 99),
            ordered[-1],
            statistics.fmean(ordered),
        )

    @classmethod
    def median(cls, runs: Sequence[Stats]) -> Stats:
        """Return the median of each figure over repetitions (samples are added up)."""
        return cls(
            sum(r.n for r in runs),
            statistics.median(r.p50 for r in runs),
            statistics.median(r.p95 for r in runs),
            statistics.median(r.p99 for r in runs),
            statistics.median(r.max for r in runs),
            statistics.median(r.mean for r in runs),
        )


def sample(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    min_samples: int = 200,
    max_seconds: float = 10.0,
    floor: int = 5,
) -> list[float]:
    """Warm ``fn`` up, then time calls until there are ``min_samples`` or ``max_seconds`` passed.

    At least ``floor`` samples are taken whatever the time, so a slow point still
    has percentiles. Returns the durations in seconds.
    """
    for _ in range(warmup):
        fn()
    durations: list[float] = []
    clock = time.perf_counter
    deadline = clock() + max_seconds
    while len(durations) < min_samples and (len(durations) < floor or clock() < deadline):
        start = clock()
        fn()
        durations.append(clock() - start)
    return durations


def sample_alternating(
    points: dict[str, Callable[[], object]],
    *,
    warmup: int = 3,
    min_samples: int = 200,
    max_seconds: float = 10.0,
    floor: int = 5,
) -> dict[str, list[float]]:
    """Like ``sample`` for several points at once, calling them in turn, one call each.

    A point and its baseline are then timed under the same load, call by call:
    on a shared host the load drifts over seconds, and timing each point in its
    own block of ``max_seconds`` measured the drift as much as the points (the
    same SQL text came out 0.87x and 1.23x of itself). The time budget is
    ``max_seconds`` per point, as with ``sample``.
    """
    for fn in points.values():
        for _ in range(warmup):
            fn()
    durations: dict[str, list[float]] = {name: [] for name in points}
    clock = time.perf_counter
    deadline = clock() + max_seconds * len(points)
    while True:
        taken = min(len(found) for found in durations.values())
        if taken >= min_samples or (taken >= floor and clock() >= deadline):
            return durations
        for name, fn in points.items():
            start = clock()
            fn()
            durations[name].append(clock() - start)


# -- environment ------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        result = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


def nproc() -> int:
    """Return the number of CPUs this process may run on (what ``nproc`` prints)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def environment(pg_url: str | None = None) -> dict[str, Any]:
    """Return what the figures were measured on: versions, CPUs, load, settings, commit."""
    dirty = _git("status", "--porcelain", "--", "platform", "config", "tenants")
    env: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": std_platform.node(),
        "python": sys.version.split()[0],
        "sqlalchemy": sa.__version__,
        "psycopg": _version("psycopg"),
        "jsonschema_rs": _version("jsonschema-rs"),
        "sqlite": sqlite3.sqlite_version,
        "nproc": nproc(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "git_commit": _git("rev-parse", "--short=12", "HEAD"),
        "product_code_dirty": bool(dirty and dirty != "unknown"),
    }
    if pg_url:
        engine = sa.create_engine(pg_url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                env["postgresql"] = connection.exec_driver_sql("SHOW server_version").scalar()
                rows = connection.execute(
                    sa.text(
                        "SELECT name, setting, unit FROM pg_settings WHERE name = ANY(:names) "
                        "ORDER BY name"
                    ),
                    {"names": list(PG_SETTINGS)},
                )
                env["postgresql_settings"] = {
                    name: f"{setting}{' ' + unit if unit else ''}" for name, setting, unit in rows
                }
        finally:
            engine.dispose()
    return env


def format_environment(env: dict[str, Any]) -> str:
    """Return the environment record as a few readable lines."""
    lines = [
        f"when {env['when']}  host {env['host']}  nproc {env['nproc']}  load {env['loadavg']}",
        f"git {env['git_commit']}{' (product code modified)' if env['product_code_dirty'] else ''}"
        f"  python {env['python']}  SQLAlchemy {env['sqlalchemy']}  psycopg {env['psycopg']}"
        f"  jsonschema-rs {env['jsonschema_rs']}  SQLite {env['sqlite']}",
    ]
    if "postgresql" in env:
        settings = "  ".join(f"{k}={v}" for k, v in env["postgresql_settings"].items())
        lines.append(f"PostgreSQL {env['postgresql']}: {settings}")
    return "\n".join(lines)


# -- databases and processes ------------------------------------------------------------


@contextlib.contextmanager
def private_database(admin_url: str = PG_ADMIN_URL, prefix: str = "metacrm_bench") -> Iterator[str]:
    """Create a PostgreSQL database for this run, yield its URL, and drop it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def libpq_url(url: str) -> str:
    """Return a SQLAlchemy PostgreSQL URL as a plain libpq URI for psycopg.connect()."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def memory_kib() -> dict[str, int]:
    """Return this process's resident set size now and at its peak, in KiB (/proc)."""
    result = {"rss": 0, "peak": 0}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    result["rss"] = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    result["peak"] = int(line.split()[1])
    except OSError:
        pass
    return result


# -- result tables ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A target a figure must meet: absolute (value ≤ limit) or relative to the baseline."""

    text: str
    limit: float
    relative: bool = False
    at_least: bool = False

    @classmethod
    def at_most(cls, limit: float, unit: str = "") -> Target:
        return cls(f"<= {_number(limit)}{' ' + unit if unit else ''}", limit)

    @classmethod
    def ratio_at_most(cls, limit: float) -> Target:
        return cls(f"<= {_number(limit)}x", limit, relative=True)

    @classmethod
    def exactly(cls, value: float) -> Target:
        return cls(f"= {_number(value)}", value)

    def met(self, value: float | None, baseline: float | None) -> bool | None:
        """Tell whether the figure meets the target; None when it cannot be judged."""
        if value is None or value != value:  # missing or NaN
            return None
        if self.relative:
            if not baseline:
                return None
            value = value / baseline
        if self.text.startswith("="):
            return value == self.limit
        return value >= self.limit if self.at_least else value <= self.limit


@dataclass
class Row:
    """One line of a result table."""

    label: str
    value: float | None
    unit: str = "ms"
    baseline: float | None = None
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        met = self.target.met(self.value, self.baseline)
        return "n/a" if met is None else "PASS" if met else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": self.target.text if self.target else None,
            "verdict": self.verdict or None,
            "note": self.note or None,
        }


def _number(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    if float(value).is_integer():
        return f"{int(value):,}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _quantity(value: float | None, unit: str) -> str:
    text = _number(value)
    return f"{text} {unit}" if unit and text != "-" else text


def format_table(title: str, rows: Sequence[Row], baseline_label: str = "baseline") -> str:
    """Return rows as an aligned text table with ratio to baseline and verdict."""
    header = ["metric", "value", baseline_label, "ratio", "target", "result", "note"]
    body = [
        [
            row.label,
            _quantity(row.value, row.unit),
            _quantity(row.baseline, row.unit) if row.baseline is not None else "",
            f"{row.ratio:.2f}x" if row.ratio is not None else "",
            row.target.text if row.target else "",
            row.verdict,
            row.note,
        ]
        for row in rows
    ]
    # Drop empty trailing columns (a table without baselines or notes stays narrow).
    keep = [i for i in range(len(header)) if i < 2 or any(line[i] for line in body)]
    header = [header[i] for i in keep]
    body = [[line[i] for i in keep] for line in body]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    numeric = {1, 2, 3} & set(range(len(header)))

    def render(line: list[str]) -> str:
        cells = [
            cell.rjust(widths[i]) if i in numeric and line is not header else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([f"== {title}", render(header), rule, *(render(line) for line in body)])


@dataclass
class Section:
    title: str
    rows: list[Row]
    baseline_label: str = "baseline"
    details: dict[str, Any] = field(default_factory=dict)


class Report:
    """The printed tables of one benchmark run, and their JSON record."""

    def __init__(self, name: str, options: dict[str, Any], env: dict[str, Any]) -> None:
        self.name = name
        self.options = options
        self.env = env
        self.sections: list[Section] = []
        self.notes: list[str] = []
        print(f"# {name}  {json.dumps(options, default=str)}")
        print(format_environment(env), flush=True)

    def table(
        self,
        title: str,
        rows: list[Row],
        baseline_label: str = "baseline",
        details: dict[str, Any] | None = None,
    ) -> Section:
        """Print one table now and keep it (and its details) for the JSON record."""
        section = Section(title, rows, baseline_label, details or {})
        self.sections.append(section)
        print()
        print(format_table(title, rows, baseline_label), flush=True)
        return section

    def note(self, text: str) -> None:
        """Print a line that explains the figures, and keep it."""
        self.notes.append(text)
        print(text, flush=True)

    @property
    def verdicts(self) -> list[str]:
        return [row.verdict for s in self.sections for row in s.rows if row.verdict]

    def finish(self, write_json: bool = True) -> dict[str, Any]:
        """Print the overall verdict, write bench/results/<name>-<time>.json, return the record."""
        failed = self.verdicts.count("FAIL")
        print()
        print(f"{self.name}: {len(self.verdicts) - failed} target(s) met, {failed} missed")
        record = {
            "benchmark": self.name,
            "options": self.options,
            "environment": self.env,
            "sections": [
                {
                    "title": s.title,
                    "baseline": s.baseline_label,
                    "rows": [r.to_dict() for r in s.rows],
                    "details": s.details,
                }
                for s in self.sections
            ],
            "notes": self.notes,
        }
        if write_json:
            RESULTS_DIR.mkdir(exist_ok=True)
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = RESULTS_DIR / f"{self.name}-{stamp}.json"
            path.write_text(json.dumps(record, indent=2, default=str), "utf-8")
            print(f"written to {path.relative_to(REPO)}")
        return record


def stats_rows(
    label: str,
    stats: Stats,
    baseline: Stats | None = None,
    targets: dict[str, Target] | None = None,
    figures: Sequence[str] = ("p50", "p95", "p99"),
) -> list[Row]:
    """Return one row per percentile of a series, each against the baseline's same percentile."""
    targets = targets or {}
    return [
        Row(
            f"{label} {name}",
            getattr(stats, name),
            "ms",
            getattr(baseline, name) if baseline else None,
            targets.get(name),
            note=f"n={stats.n}" if name == figures[0] else "",
        )
        for name in figures
    ]


def as_dict(value: Any) -> Any:
    """Return a dataclass (or a list of them) as plain data for the JSON record."""
    if isinstance(value, list):
        return [as_dict(v) for v in value]
    return asdict(value)


# -- command line -----------------------------------------------------------------------


def argument_parser(description: str) -> argparse.ArgumentParser:
    """Return a parser with the options every benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes and short windows")
    parser.add_argument(
        "--repetitions", type=int, default=None, help="repetitions to take the median of (3)"
    )
    parser.add_argument("--no-json", action="store_true", help="do not write bench/results/")
    parser.add_argument(
        "--pg-url", default=PG_ADMIN_URL, help="PostgreSQL server to create a private database on"
    )
    return parser


def backend_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--backend`` (postgresql, sqlite, or both by default)."""
    parser.add_argument(
        "--backend",
        choices=[*BACKENDS, "both"],
        default="both",
        help="which database backend to measure",
    )


def chosen_backends(choice: str) -> list[str]:
    """Return the backends a ``--backend`` value names."""
    return list(BACKENDS) if choice == "both" else [choice]
