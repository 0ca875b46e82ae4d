"""Each benchmark runs end to end at tiny sizes: it completes, prints its table, and
measured what it claims to (plan shape). Never a timing assertion (BENCHMARKS.md)."""

from __future__ import annotations

from typing import Any

import pytest

from bench import o9_add_field, o13_tenants, validate_plan

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
