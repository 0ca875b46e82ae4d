"""O11 of BENCHMARKS.md: a row-scoped list over D5 against the same predicate written by hand.

D5 is D1 (``bench.dataset``: 1,000,000 ``lead`` records, owners among 200
users) plus 20 teams: owner ``k`` is in team ``k % 20``, so a team holds ten
owners and about 5 % of the rows, and each record's ``team_id`` is its owner's
team (what the record service stores on create). The owners of D1 become real
members in the control database; the published roles give ``lead`` to the
built-in sales roles as they have the core entities: ``sales_rep`` reads its
``own`` records (owner 7, ~0.5 %), ``sales_manager`` its ``team``'s (owner 27,
team 7: its own and the team's, ~5 %).

Measured through metacrm's **query layer with the Access predicate** (not the
HTTP API, whose overhead O1 measures): ``authz.for_principal`` with the
control database (so a manager's nested teams are looked up as in a request),
``Access.view``, ``Access.where`` and ``query.list_records``. Per role and list
(the default sort ``-created_at``; ``status = "won"`` with it; 50 rows):

- metacrm's SELECT is captured, printed, checked to hold the scope predicate
  (the ``owner_id`` / ``team_id`` condition with the member's own ids as
  parameters), and replayed on a raw driver connection (psycopg 3 / sqlite3)
  next to **B0**, the same list with the same predicate written by hand;
  target: p50 at most 1.5x B0;
- ``EXPLAIN`` plan shapes (node types, index names) of both must be equal, or
  the line FAILs whatever the time; both must return the same ids in order;
- the whole query layer in process (permission, SQL, rows to JSON) is shown
  against B0 for information.

Run: ``.venv/bin/python -m bench.o11_row_scope [--quick] [--backend sqlite] [--rows N]``
"""

from __future__ import annotations

import copy
import hashlib
import random
import re
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from bench import dataset
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
    private_database,
    sample,
)
from bench.dataset import ENTITY, USERS
from bench.o1_o8_records import CURSOR_SECRET, SECRET, Bed
from metacrm.runtime import authz, metastore, query, settings
from metacrm.runtime.control import Membership, Team, User
from metacrm.runtime.platform import Platform
from metacrm.runtime.principal import Principal

TEAMS = 20
#: The measured members: D1 owner index and role.
REP, MANAGER = 7, 27
MEMBERS = {"sales_rep": REP, "sales_manager": MANAGER}
RATIO_TARGET = 1.5


@dataclass(frozen=True)
class ListSpec:
    name: str
    filter: str | None
    b0_where: str  # with {p}, parameters: the filter's values
    params: tuple[Any, ...]


LISTS = (
    ListSpec("default list, sort -created_at", None, "", ()),
    ListSpec('status = "won", sort -created_at', 'status = "won"', " AND status = {p}", ("won",)),
)


def d1_owners(backend: str) -> list[uuid.UUID]:
    """Return D1's 200 owner ids, index k as the loader made them (checked against the data)."""
    if backend == "postgresql":
        # md5('user' || k)::uuid in dataset.load_postgresql
        return [uuid.UUID(hashlib.md5(f"user{k}".encode()).hexdigest()) for k in range(USERS)]
    # uuid.UUID(int=random.Random(u).getrandbits(128)) in dataset.sqlite_rows
    return [uuid.UUID(int=random.Random(k).getrandbits(128)) for k in range(USERS)]


def team_of(k: int) -> int:
    return k % TEAMS


@dataclass
class D5:
    """A D1 tenant turned into D5, with the measured members."""

    bed: Bed
    tenant_id: uuid.UUID
    owners: list[uuid.UUID]
    teams: list[uuid.UUID]
    principals: dict[str, Principal]

    def access(self, who: str) -> authz.Access:
        model = self.bed.model()
        return authz.for_principal(self.principals[who], model, self.bed.platform.control_engine)


def _set_teams(bed: Bed, owners: list[uuid.UUID], teams: list[uuid.UUID]) -> None:
    """Store each record's team: its owner's (one UPDATE joined to a 200-row map)."""
    pairs = [(owners[k], teams[team_of(k)]) for k in range(USERS)]
    store = bed.store
    if bed.postgresql:
        table = f'"{store.schema}"."{ENTITY}"'
        with store.engine.begin() as connection:
            connection.exec_driver_sql(
                "CREATE TEMP TABLE d5_team (owner uuid PRIMARY KEY, team uuid)"
            )
            connection.execute(
                sa.text("INSERT INTO d5_team VALUES (:owner, :team)"),
                [{"owner": o, "team": t} for o, t in pairs],
            )
            connection.exec_driver_sql(
                f"UPDATE {table} AS l SET team_id = m.team FROM d5_team AS m "
                "WHERE l.owner_id = m.owner"
            )
            connection.exec_driver_sql("DROP TABLE d5_team")
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            # FULL: the UPDATE left a dead version of every row in the table and its indexes.
            c.exec_driver_sql(f"VACUUM FULL ANALYZE {table}")
        return
    connection = sqlite3.connect(store.engine.url.database, isolation_level=None)
    try:
        connection.execute("CREATE TEMP TABLE d5_team (owner TEXT PRIMARY KEY, team TEXT)")
        connection.executemany(
            "INSERT INTO d5_team VALUES (?, ?)", [(o.hex, t.hex) for o, t in pairs]
        )
        connection.execute("BEGIN")
        connection.execute(
            f'UPDATE "{ENTITY}" SET team_id = (SELECT team FROM d5_team WHERE owner = owner_id)'
        )
        connection.execute("COMMIT")
        connection.execute("ANALYZE")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def _grant_leads(bed: Bed) -> None:
    """Publish the roles with ``lead`` granted like the core entities (own / team)."""
    with bed.store.connect() as connection:
        current = metastore.current(connection)
    bundle = copy.deepcopy(current.bundle)
    for role in bundle["roles"]:
        if role["name"] == "sales_rep":
            role["permissions"].append(
                {
                    "entity": ENTITY,
                    "actions": ["create", "read", "update", "delete"],
                    "scope": "own",
                }
            )
        elif role["name"] == "sales_manager":
            role["permissions"].append(
                {
                    "entity": ENTITY,
                    "actions": ["read", "update", "delete", "export"],
                    "scope": "team",
                }
            )
    metastore.publish(bed.store, bundle, expected_version=current.version)


def open_d5(backend: str, rows: int, workdir: Path, pg_url: str | None) -> D5:
    """Build D1 on a fresh platform, then the teams, members and roles of D5."""
    overrides: dict[str, Any] = {
        "instance_dir": str(workdir / backend),
        "secret_key": SECRET,
        "api_rate_limit": "100000000 per minute",
    }
    if pg_url:
        overrides["database_url"] = pg_url
    platform = Platform(settings.load(overrides, environ={}))
    platform.init_control()
    tenant = dataset.build_d1(platform, "bench", rows)
    if tenant.store.schema:
        import psycopg

        raw: Any = psycopg.connect(libpq_url(pg_url or ""), autocommit=True)
    else:
        raw = sqlite3.connect(tenant.store.engine.url.database, isolation_level=None)
    bed = Bed(backend, platform, tenant, raw, overrides)
    owners = d1_owners(backend)
    with platform.session() as session:
        row = platform.tenant(session, tenant.slug)
        assert row is not None
        tenant_id = row.id
        teams = []
        for i in range(TEAMS):
            team = Team(tenant_id=tenant_id, name=f"team_{i:02d}", label=f"Team {i}")
            session.add(team)
            session.flush()
            teams.append(team.id)
        for role, k in MEMBERS.items():
            session.add(User(id=owners[k], email=f"user{k}@bench.example", display_name=role))
            session.flush()
            session.add(
                Membership(
                    tenant_id=tenant_id,
                    user_id=owners[k],
                    roles=[role],
                    team_id=teams[team_of(k)],
                )
            )
    _set_teams(bed, owners, teams)
    _grant_leads(bed)
    principals = {}
    with Session(platform.control_engine, expire_on_commit=False) as session:
        for role, k in MEMBERS.items():
            user = session.get(User, owners[k])
            membership = session.scalars(
                sa.select(Membership).where(
                    Membership.tenant_id == tenant_id, Membership.user_id == owners[k]
                )
            ).one()
            principals[role] = Principal(user, membership)
    return D5(bed, tenant_id, owners, teams, principals)


# -- the lists ----------------------------------------------------------------------------


def b0_sql(d5: D5, who: str, spec: ListSpec) -> tuple[str, tuple[Any, ...]]:
    """The list written by hand: the same columns, predicate, order and page size."""
    bed = d5.bed
    p = bed.placeholder
    k = MEMBERS[who]
    if who == "sales_rep":
        scope, params = f"owner_id = {p}", (d5.owners[k],)
    else:
        scope, params = (
            f"(team_id IN ({p}) OR owner_id = {p})",
            (d5.teams[team_of(k)], d5.owners[k]),
        )
    sql = (
        f"SELECT {', '.join(bed.columns())} FROM {bed.table} WHERE deleted_at IS NULL"
        f"{spec.b0_where.replace('{p}', p)} AND {scope} "
        "ORDER BY created_at DESC, id DESC LIMIT 50"
    )
    return sql, (*spec.params, *params)


def _request(spec: ListSpec) -> query.ListRequest:
    return query.ListRequest(filter=spec.filter, sort="-created_at", limit=50)


def metacrm_sql(d5: D5, who: str, spec: ListSpec) -> tuple[str, Any]:
    """Run metacrm's scoped list once; return the SELECT it sent and its parameters."""
    bed = d5.bed
    model = bed.model()
    access = authz.for_principal(d5.principals[who], model, bed.platform.control_engine)
    view = access.view(model)
    shown = view.entities[ENTITY]
    scope = access.where(shown, "read")
    with bed.store.connect() as connection, bed.capture() as found:
        query.list_records(
            connection, view, shown, _request(spec), bed.eval_context(), CURSOR_SECRET, scope
        )
    selects = [s for s in found if s[0].lstrip().upper().startswith("SELECT")]
    return selects[-1]


def query_layer(d5: D5, who: str, spec: ListSpec) -> Callable[[], None]:
    """The request's path below HTTP: model, Access (teams from the control DB), list."""
    bed = d5.bed
    platform, store, principal = bed.platform, bed.store, d5.principals[who]
    request = _request(spec)

    def call() -> None:
        with store.connect() as connection:
            model = platform.models.current(store, connection)
            access = authz.for_principal(principal, model, platform.control_engine)
            view = access.view(model)
            shown = view.entities[ENTITY]
            scope = access.where(shown, "read")
            page = query.list_records(
                connection, view, shown, request, bed.eval_context(), CURSOR_SECRET, scope
            )
        if page.items and page.items[0]["id"] is None:
            raise RuntimeError("the scoped list returned a record without id")

    return call


def _values(params: Any) -> set[str]:
    """Every parameter value as text, UUIDs both with and without dashes."""
    items = params.values() if isinstance(params, dict) else params or ()
    found = set()
    for value in items:
        found.add(str(value))
        if isinstance(value, uuid.UUID):
            found.add(value.hex)
    return found


def predicate_in(d5: D5, who: str, statement: tuple[str, Any]) -> tuple[bool, str]:
    """Check that the captured SELECT holds the member's scope condition and ids."""
    sql, params = statement
    sql = " ".join(sql.split())
    # The WHERE clause alone: the select list names owner_id and team_id too.
    sql = sql.split(" WHERE ", 1)[-1].split(" ORDER BY ", 1)[0] if " WHERE " in sql else ""
    values = _values(params)
    k = MEMBERS[who]
    owner_ok = bool(re.search(r"\bowner_id = ", sql)) and (
        str(d5.owners[k]) in values or d5.owners[k].hex in values
    )
    if who == "sales_rep":
        return owner_ok and "team_id" not in sql, "owner_id = <the rep>"
    team = d5.teams[team_of(k)]
    team_ok = bool(re.search(r"\bteam_id IN \(", sql)) and (
        str(team) in values or team.hex in values
    )
    return owner_ok and team_ok, "team_id IN (<the team and its sub-teams>) OR owner_id = <me>"


def _series(points: dict[str, Callable[[], object]], reps: int, seconds: float) -> dict[str, Stats]:
    runs: dict[str, list[Stats]] = {name: [] for name in points}
    for _ in range(reps):
        for name, fn in points.items():
            runs[name].append(Stats.of(sample(fn, max_seconds=seconds)))
    return {name: Stats.median(found) for name, found in runs.items()}


def measure(d5: D5, report: Report, reps: int, seconds: float) -> None:
    bed = d5.bed
    with bed.store.connect() as connection:
        total = connection.execute(
            sa.text(f"SELECT count(*) FROM {bed.table} WHERE deleted_at IS NULL")
        ).scalar_one()
    for who in MEMBERS:
        rows: list[Row] = []
        details: dict[str, Any] = {}
        b0_count_sql, b0_count_params = b0_sql(d5, who, LISTS[0])
        count_sql = re.sub(
            r"^SELECT .*? FROM", "SELECT count(*) FROM", b0_count_sql.split(" ORDER BY")[0]
        )
        visible = bed.b0(count_sql, b0_count_params)[0][0]
        for spec in LISTS:
            b0, params = b0_sql(d5, who, spec)
            statement = metacrm_sql(d5, who, spec)
            if "OFFSET" in statement[0].upper():
                raise AssertionError("metacrm's scoped list holds OFFSET")
            found, predicate = predicate_in(d5, who, statement)
            report.note(f"\n{bed.backend} {who} {spec.name}: metacrm SQL\n  {statement[0]}")
            b0_rows = bed.b0(b0, params)
            mc_rows = bed.replay(statement)
            same = [r[0] for r in b0_rows] == [r[0] for r in mc_rows[:50]] and len(b0_rows) > 0
            b0_plan = bed.plan(b0, bed.raw_params(params))
            mc_plan = bed.plan(*statement)
            stats = _series(
                {
                    "b0": lambda b0=b0, params=params: bed.b0(b0, params),
                    "sql": lambda s=statement: bed.replay(s),
                    "layer": query_layer(d5, who, spec),
                },
                reps,
                seconds,
            )
            label = spec.name
            rows += [
                Row(
                    f"{label}: SQL p50",
                    stats["sql"].p50,
                    baseline=stats["b0"].p50,
                    target=Target.ratio_at_most(RATIO_TARGET),
                    note=f"n={stats['sql'].n}",
                ),
                Row(f"{label}: SQL p95", stats["sql"].p95, baseline=stats["b0"].p95),
                Row(
                    f"{label}: scope predicate in the SQL",
                    float(found),
                    "",
                    target=Target.exactly(1),
                    note=predicate,
                ),
                Row(
                    f"{label}: plan shape equal",
                    float(mc_plan == b0_plan),
                    "",
                    target=Target.exactly(1),
                    note=mc_plan if mc_plan == b0_plan else f"metacrm: {mc_plan} | B0: {b0_plan}",
                ),
                Row(
                    f"{label}: same ids in the same order as B0",
                    float(same),
                    "",
                    target=Target.exactly(1),
                    note=f"{len(b0_rows)} rows",
                ),
                Row(
                    f"{label}: query layer p50 (Access + SQL + JSON)",
                    stats["layer"].p50,
                    baseline=stats["b0"].p50,
                    note="in process; informative",
                ),
            ]
            details[spec.name] = {
                "b0_sql": b0,
                "metacrm_sql": statement[0],
                "b0_plan": b0_plan,
                "metacrm_plan": mc_plan,
                "stats": {k: v.__dict__ for k, v in stats.items()},
            }
        share = visible / total if total else 0.0
        report.table(
            f"O11 row-scoped list, {bed.backend}, {who}: {visible:,} of {total:,} rows visible "
            f"({share:.1%}) (median of {reps})",
            rows,
            "B0",
            {"visible": visible, "total": total, **details},
        )


WHAT_IF_INDEX = "o11_whatif_owner_created"


def what_if_owner_index(d5: D5, report: Report, reps: int, seconds: float) -> None:
    """Informative: the rep's lists again with an (owner_id, created_at, id) index.

    metacrm's system index on owner alone makes a rep's list sorted by
    ``created_at`` either walk the date index filtering on owner (~200 rows read
    per row shown) or sort all the rep's rows; this shows what the wider index
    would buy, for the decision whether to make it a system index. The index is
    dropped again afterwards.
    """
    bed = d5.bed
    table = bed.table
    create = f"CREATE INDEX {WHAT_IF_INDEX} ON {table} (owner_id, created_at, id)"
    if bed.postgresql:
        drop = f'DROP INDEX "{bed.store.schema}".{WHAT_IF_INDEX}'
    else:
        drop = f"DROP INDEX {WHAT_IF_INDEX}"
    before = {}
    for spec in LISTS:
        b0, params = b0_sql(d5, "sales_rep", spec)
        before[spec.name] = (
            b0,
            params,
            _series({"b0": lambda b0=b0, p=params: bed.b0(b0, p)}, reps, seconds)["b0"],
        )
    started = time.perf_counter()
    bed.raw.execute(create)
    bed.raw.execute(f"ANALYZE {table}")
    built = time.perf_counter() - started
    rows: list[Row] = []
    try:
        for spec in LISTS:
            b0, params, old = before[spec.name]
            statement = metacrm_sql(d5, "sales_rep", spec)
            stats = _series({"sql": lambda s=statement: bed.replay(s)}, reps, seconds)
            plan = bed.plan(*statement)
            rows.append(
                Row(
                    f"{spec.name}: metacrm SQL p50 with the index",
                    stats["sql"].p50,
                    baseline=old.p50,
                    note=plan,
                )
            )
    finally:
        bed.raw.execute(drop)
        bed.raw.execute(f"ANALYZE {table}")
    report.table(
        f"O11 what if: sales_rep lists with an (owner_id, created_at, id) index, {bed.backend} "
        f"(built in {built:.1f} s; informative)",
        rows,
        "B0 without it",
    )


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its tables and return the JSON record."""
    parser = argument_parser(__doc__.split("\n\n")[0])
    backend_argument(parser)
    parser.add_argument("--rows", type=int, default=None, help="D5 rows (1,000,000)")
    parser.add_argument("--seconds", type=float, default=None, help="max seconds per point (10)")
    args = parser.parse_args(argv)
    rows = args.rows or (20_000 if args.quick else 1_000_000)
    seconds = args.seconds if args.seconds is not None else (0.5 if args.quick else 10.0)
    reps = args.repetitions or (1 if args.quick else 3)
    backends = chosen_backends(args.backend)
    with (
        private_database(args.pg_url, "metacrm_bench_o11")
        if "postgresql" in backends
        else _no_database()
    ) as pg_url:
        report = Report(
            "o11_row_scope",
            {"backends": backends, "rows": rows, "seconds": seconds, "repetitions": reps},
            environment(pg_url),
        )
        with tempfile.TemporaryDirectory(prefix="metacrm-o11-") as folder:
            for backend in backends:
                started = time.perf_counter()
                d5 = open_d5(
                    backend, rows, Path(folder), pg_url if backend == "postgresql" else None
                )
                report.note(
                    f"\n{backend}: D5 {rows:,} rows, {TEAMS} teams, ready in "
                    f"{time.perf_counter() - started:.1f} s"
                )
                try:
                    measure(d5, report, reps, seconds)
                    what_if_owner_index(d5, report, reps, seconds)
                finally:
                    d5.bed.raw.close()
                    d5.bed.platform.close()
    return report.finish(write_json=not args.no_json)


class _no_database:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    record = run(argv)
    failed = [r for s in record["sections"] for r in s["rows"] if r["verdict"] == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
