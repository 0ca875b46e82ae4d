"""Each benchmark runs end to end at tiny sizes: it completes, prints its table, and
measured what it claims to (plan shape). Never a timing assertion (BENCHMARKS.md)."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from bench import (
    dataset,
    o1_o8_records,
    o9_add_field,
    o10_permission,
    o11_row_scope,
    o13_tenants,
    servers,
    validate_plan,
)

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def rows_by_label(record: dict[str, Any], section: int = 0) -> dict[str, dict[str, Any]]:
    return {row["label"]: row for row in record["sections"][section]["rows"]}


def test_validate_plan_runs_and_plans_every_entity(capsys):
    record = validate_plan.run(
        ["--quick", "--no-json", "--entities", "4", "--fields", "14", "--seconds", "0.02"]
    )
    out = capsys.readouterr().out
    assert "== validate + plan, 4 entities x 14 fields" in out
    shape = record["sections"][0]["details"]["shape"]
    assert shape["plan_new_operations"] == {"create_entity": 4}
    assert sum(shape["plan_change_operations"].values()) >= 4
    rows = rows_by_label(record)
    assert rows["validate + plan empty->v1 p95"]["target"] == "<= 1,000 ms"
    assert rows["JSON Schema pass (baseline) p50"]["value"] > 0


def test_generated_bundle_has_every_field_type_of_the_mix():
    doc = validate_plan.make_bundle(3, 40)
    types = {f["type"] for e in doc["entities"] for f in e["fields"]}
    assert types == set(validate_plan.KINDS)
    variant, changes = validate_plan.make_variant(doc)
    assert changes == 3 and variant != doc


@pytest.mark.parametrize("backend", BACKENDS)
def test_o9_sees_the_alter_table_and_no_failed_read(backend, capsys):
    record = o9_add_field.run(
        [
            "--quick",
            "--no-json",
            "--backend",
            backend,
            "--rows",
            "2000",
            "--window",
            "0.3",
            "--repetitions",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert f"== O9 add a field, {backend}, 2,000 rows" in out
    details = record["sections"][0]["details"]
    assert details["added_columns"] == ["extra_0"]
    assert details["failed_reads"] == 0 and details["reads"] > 0
    assert "ix_lead__status_created" in details["plan"]
    (publish,) = details["publishes"]
    assert publish["error"] is None
    assert len(publish["ddl"]) == 1 and "ADD COLUMN extra_0" in publish["ddl"][0]
    assert publish["ddl_seconds"] is not None
    rows = rows_by_label(record)
    assert rows["failed reads (whole run)"]["verdict"] == "PASS"


@pytest.mark.parametrize("backend", BACKENDS)
def test_o13_creates_the_same_tables_as_the_floor(backend, capsys):
    record = o13_tenants.run(["--quick", "--no-json", "--backend", backend, "--tenants", "3"])
    out = capsys.readouterr().out
    assert f"== O13 create 3 tenants from core, {backend}" in out
    rows = rows_by_label(record)
    objects = rows["tables+indexes+triggers per tenant"]
    assert objects["value"] == objects["baseline"] > 10
    assert objects["note"] == "same objects"
    assert rows["create one tenant p50"]["note"] == "n=3"
    if backend == "postgresql":
        assert 1 <= rows["server connections, peak"]["value"] <= 15


def test_result_table_is_aligned_with_ratio_and_verdict():
    from bench.common import Row, Target, format_table

    text = format_table(
        "t",
        [
            Row("fast", 1.0, baseline=2.0, target=Target.ratio_at_most(1)),
            Row("slow", 300.0, baseline=2.0, target=Target.at_most(100, "ms")),
        ],
    )
    lines = text.splitlines()
    assert lines[0] == "== t"
    assert "0.50x" in lines[3] and "PASS" in lines[3]
    assert "150.00x" in lines[4] and "FAIL" in lines[4]
    assert len({len(line) for line in lines[1:3]}) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_records_benchmark_matches_plans_never_offsets_and_logs_every_write(backend, capsys):
    record = o1_o8_records.run(
        [
            "--quick",
            "--no-json",
            "--backend",
            backend,
            "--rows",
            "3000",
            "--d4-rows",
            "300",
            "--seconds",
            "0.05",
            "--wrk-seconds",
            "0",
            "--repetitions",
            "1",
        ]
    )
    out = capsys.readouterr().out
    for title in (
        f"== O1-O3 list SQL, {backend}",
        f"== O4 deep paging by cursor, {backend}, 3,000 rows",
        f"== O5 count with a list, {backend}",
        f"== O6 report SQL, {backend}",
        f"== O1/O2/O7 through HTTP, {backend}",
        f"== O14 storage, {backend}, 3,000 rows",
        f"== O8 bulk import of D4, {backend}",
        "O6: metacrm has no report API yet",
        f"== Where an API request's time goes, {backend}",
    ):
        assert title in out
    rows = {row["label"]: row for section in record["sections"] for row in section["rows"]}
    for op in ("o1", "o2", "o3"):
        assert rows[f"{op} plan shape equal"]["verdict"] == "PASS", rows[f"{op} plan shape equal"]
        assert rows[f"{op} same ids in the same order as B0"]["verdict"] == "PASS"
    for label in ("GROUP BY status + SUM", "GROUP BY status, region + SUM"):
        assert rows[f"{label} plan shape equal"]["verdict"] == "PASS"
    assert rows["statements with OFFSET sent by metacrm"]["value"] == 0
    assert rows["API statements with OFFSET"]["value"] == 0
    assert "3 pages" in rows["API statements with OFFSET"]["note"]
    assert rows["o7 writes with one audit entry and one outbox event each"]["verdict"] == "PASS"
    assert rows["o1 p50 single client"]["baseline"] > 0
    for name in ("o1", "o2", "o7 read"):
        assert rows[f"{name} B1 answers the same JSON"]["verdict"] == "PASS"
    assert rows["rows created"]["value"] == 300
    assert rows["import rows/s"]["baseline"] > 0
    assert rows["bytes per record incl. indexes"]["baseline"] > 0
    parts = [label for label in rows if label.startswith("o1 list: ")]
    assert "o1 list: query layer: list (SQL, rows to JSON)" in parts
    assert (
        rows["o1 list: whole request"]["value"] > rows["o1 list: published version check"]["value"]
    )


WRK_OUTPUT = """Running 15s test @ http://127.0.0.1:8000/x
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.52ms  810.23us  21.02ms   88.10%
    Req/Sec     2.29k   151.32     2.54k    74.00%
  Latency Distribution
     50%    3.38ms
     75%    3.71ms
     90%    4.21ms
     99%    1.02s
  34150 requests in 15.00s, 9.41MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   2276.54
Transfer/sec:    642.05KB
"""


def test_wrk_output_is_read_with_its_units_and_errors():
    result = servers.WrkResult.parse(WRK_OUTPUT)
    assert result.requests_per_s == 2276.54
    assert (result.p50, result.p90, result.p99) == (3.38, 4.21, 1020.0)
    assert result.requests == 34150
    assert result.errors == 7


def test_worker_ticks_reads_each_child_of_the_server_process():
    process = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        server = servers.Server("two children", 0, process)
        deadline = time.monotonic() + 5
        while len(ticks := server.worker_ticks()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(ticks) == 2 and all(isinstance(t, int) and t >= 0 for t in ticks.values())
    finally:
        process.kill()
        process.wait()


def test_balanced_wrk_runs_again_while_one_worker_sat_idle(monkeypatch):
    """A run whose connections all went to one worker is done again, at most ATTEMPTS times."""

    class FakeServer:
        def __init__(self, runs: list[tuple[int, int]]) -> None:
            self.totals, self.runs = [0, 0], runs

        def worker_ticks(self) -> dict[int, int]:
            return {1: self.totals[0], 2: self.totals[1]}

    def fake_wrk(server: FakeServer) -> Any:
        def run(url: str, seconds: float, headers: Any = None) -> servers.WrkResult:
            first, second = server.runs.pop(0)
            server.totals[0] += first
            server.totals[1] += second
            return servers.WrkResult.parse(WRK_OUTPUT)

        return run

    skewed_then_fair = FakeServer([(100, 0), (90, 10), (55, 45)])
    monkeypatch.setattr(servers, "wrk", fake_wrk(skewed_then_fair))
    result = servers.balanced_wrk(skewed_then_fair, "http://127.0.0.1:1/", 1)  # type: ignore[arg-type]
    assert result.redone == 2 and result.worker_shares == (0.55, 0.45)
    assert result.requests_per_s == 2276.54

    never_fair = FakeServer([(100, 0)] * servers.ATTEMPTS)
    monkeypatch.setattr(servers, "wrk", fake_wrk(never_fair))
    result = servers.balanced_wrk(never_fair, "http://127.0.0.1:1/", 1)  # type: ignore[arg-type]
    assert result.redone == servers.ATTEMPTS - 1 and result.worker_shares == (1.0, 0.0)
    assert never_fair.runs == []


def test_wrk_refuses_hosts_other_than_loopback():
    with pytest.raises(ValueError):
        servers.wrk("http://example.com/", 1)


def test_d4_has_fourteen_columns_and_is_deterministic(tmp_path):
    first = list(dataset.d4_rows(50))
    assert first == list(dataset.d4_rows(50))
    assert all(len(row) == len(dataset.D4_COLUMNS) == 14 for row in first)
    path = dataset.write_d4(tmp_path / "d4.csv", 10)
    assert path.read_text("utf-8").splitlines()[0] == ",".join(dataset.D4_COLUMNS)


def test_o10_decides_through_metacrm_and_the_bare_enforcer_agrees(capsys):
    record = o10_permission.run(
        ["--quick", "--no-json", "--tenants", "1,3", "--seconds", "0.05", "--samples", "200"]
    )
    out = capsys.readouterr().out
    assert "== O10 permission decision, 3 tenant(s)" in out
    assert "== O10 flatness: 3 tenants against 1" in out
    one, three = record["sections"][0]["details"], record["sections"][1]["details"]
    # D3's shape: ~195 policy lines per tenant, every tenant with its own policy.
    assert 150 <= one["policy_lines"] <= 250
    assert three["policy_lines"] == 3 * one["policy_lines"]
    assert three["questions"] == 3 * one["questions"] > 50
    assert one["traced_bytes_per_tenant"] > 0
    rows = rows_by_label(record)
    assert rows["decision p50 (for_principal+require+view+where)"]["baseline"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_o11_puts_the_scope_in_the_sql_with_b0s_plan(backend, capsys):
    record = o11_row_scope.run(
        ["--quick", "--no-json", "--backend", backend, "--rows", "10000", "--seconds", "0.05"]
    )
    out = capsys.readouterr().out
    assert f"== O11 row-scoped list, {backend}, sales_rep" in out
    assert "lead.owner_id = " in out and "lead.team_id IN (" in out  # the captured SQL
    scoped = [s for s in record["sections"] if s["title"].startswith("O11 row-scoped list")]
    assert len(scoped) == 2  # the rep and the manager
    for section in scoped:
        rows = {row["label"]: row for row in section["rows"]}
        for spec in o11_row_scope.LISTS:
            assert rows[f"{spec.name}: scope predicate in the SQL"]["verdict"] == "PASS"
            assert rows[f"{spec.name}: plan shape equal"]["verdict"] == "PASS"
            assert rows[f"{spec.name}: same ids in the same order as B0"]["verdict"] == "PASS"
    manager = scoped[1]["details"]
    assert 0.03 < manager["visible"] / manager["total"] < 0.08  # own + team: ~5 %
    (what_if,) = [s for s in record["sections"] if s["title"].startswith("O11 what if")]
    # The rep's default list (owner = me, newest first) is what the wider index serves.
    assert "o11_whatif_owner_created" in what_if["rows"][0]["note"]
