"""Validate and plan a big bundle: 50 entities x 40 fields of every common type.

Measures ``validate_bundle`` and ``make_plan`` from the empty bundle (what
creating a tenant from a big template does), a second plan from that bundle to
a variant with about 50 changes (what an admin's publish does), and the two
together as a publish preview runs them. Baseline in the same run: the bare
JSON Schema pass (``schemas.iter_errors("bundle", doc)`` consumed), the part
that ``jsonschema-rs`` does in native code. Target: validate + plan < 1 s.

Run: ``.venv/bin/python -m bench.validate_plan [--quick] [--entities 50 --fields 40]``
"""

from __future__ import annotations

import copy
import gc
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from bench.common import (
    Report,
    Row,
    Stats,
    Target,
    argument_parser,
    environment,
    sample,
    stats_rows,
)
from metacrm.metadata import schemas
from metacrm.metadata.model import Bundle, empty_bundle
from metacrm.metadata.plan import make_plan
from metacrm.metadata.validation import validate_bundle

TARGET_MS = 1000.0

#: The mix of field types after the title field, repeated to fill an entity.
KINDS = (
    "text",
    "integer",
    "decimal",
    "currency",
    "date",
    "datetime",
    "single_select",
    "lookup",
    "tags",
    "boolean",
    "email",
    "phone",
    "formula",
)
#: Field types an index can be put on (among KINDS).
INDEXABLE = {
    "text",
    "integer",
    "decimal",
    "currency",
    "date",
    "datetime",
    "single_select",
    "email",
    "phone",
}


def entity_name(i: int) -> str:
    return f"object_{i:02d}"


def _label(text: str) -> dict[str, str]:
    return {"en": text.replace("_", " ").capitalize(), "zh-CN": text}


def make_field(entity: int, position: int, kind: str, entities: int) -> dict[str, Any]:
    """Return the field document at ``position`` (1-based after the title) of an entity."""
    name = f"{kind}_{position:02d}"
    doc: dict[str, Any] = {"name": name, "type": kind, "label": _label(name)}
    if kind == "text":
        doc["max_length"] = 100
    elif kind == "integer":
        doc["min"] = 0
    elif kind == "decimal":
        doc.update(precision=12, scale=3)
    elif kind == "currency":
        doc["min"] = 0
    elif kind == "single_select":
        doc["options"] = [
            {"value": f"option_{k}", "label": _label(f"option {k}")} for k in range(8)
        ]
        if position % 2:
            doc.update(required=True, default="option_0")
    elif kind == "lookup":
        # Each entity points at the one before it (the first at itself): no cycle of tables.
        doc["target"] = entity_name(max(entity - 1, 0))
        doc["on_delete"] = "set_null"
    elif kind == "tags":
        doc["max_items"] = 20
    elif kind == "boolean":
        doc.update(required=True, default=False)
    elif kind == "formula":
        # Refer to the entity's first integer and decimal fields (positions 2 and 3).
        doc.update(expression="integer_02 * 2 + decimal_03", result_type="decimal")
    if kind in INDEXABLE and position % 7 == 0:
        doc["indexed"] = True
    return doc


def make_bundle(entities: int = 50, fields: int = 40) -> dict[str, Any]:
    """Return a valid bundle of ``entities`` entities with ``fields`` fields each."""
    docs = []
    for i in range(entities):
        name = entity_name(i)
        field_docs: list[dict[str, Any]] = [
            {
                "name": "name",
                "type": "text",
                "label": _label("name"),
                "required": True,
                "indexed": True,
                "max_length": 200,
            }
        ]
        for position in range(1, fields):
            field_docs.append(make_field(i, position, KINDS[(position - 1) % len(KINDS)], entities))
        first_select = next(f["name"] for f in field_docs if f["type"] == "single_select")
        docs.append(
            {
                "name": name,
                "label": _label(name),
                "plural_label": _label(name + "s"),
                "title_field": "name",
                "search_fields": ["name", "text_01"],
                "fields": field_docs,
                "indexes": [{"name": "by_state", "fields": [first_select, "created_at"]}],
            }
        )
    return {"format": 1, "entities": docs}


def make_variant(bundle: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Return a copy of ``bundle`` with one change per entity (five kinds, in turn)."""
    variant = copy.deepcopy(bundle)
    changes = 0
    for i, entity in enumerate(variant["entities"]):
        fields = entity["fields"]
        by_name = {f["name"]: f for f in fields}
        kind = i % 5
        if kind == 0:
            fields.append({"name": "added_note", "type": "text", "label": _label("added note")})
        elif kind == 1:
            by_name["text_01"]["label"] = {"en": "Renamed", "zh-CN": "改名"}
        elif kind == 2:
            by_name["email_11"]["indexed"] = True
        elif kind == 3:
            by_name["text_01"]["max_length"] = 200
        else:
            tags = next(f for f in fields if f["type"] == "tags")
            fields.remove(tags)
        changes += 1
    return variant, changes


def _points(
    doc: dict[str, Any], variant: dict[str, Any]
) -> tuple[dict[str, Callable[[], object]], Bundle]:
    empty = Bundle.from_doc(empty_bundle())
    first = make_plan(empty, doc)
    v1 = Bundle.from_doc(first.result)

    def schema_pass() -> object:
        return list(schemas.iter_errors("bundle", doc))

    def schema_pass_variant() -> object:
        return list(schemas.iter_errors("bundle", variant))

    def validate() -> object:
        problems = validate_bundle(doc)
        assert not problems, problems[:3]
        return problems

    def plan_new() -> object:
        return make_plan(empty, doc)

    def plan_change() -> object:
        return make_plan(v1, variant)

    def preview_new() -> object:
        assert not validate_bundle(doc)
        return make_plan(empty, doc)

    def preview_change() -> object:
        assert not validate_bundle(variant)
        return make_plan(v1, variant)

    points = {
        "schema": schema_pass,
        "schema_variant": schema_pass_variant,
        "validate": validate,
        "plan_new": plan_new,
        "plan_change": plan_change,
        "preview_new": preview_new,
        "preview_change": preview_change,
    }
    return points, v1


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its tables and return the JSON record."""
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=50)
    parser.add_argument("--fields", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=None, help="time budget per point")
    args = parser.parse_args(argv)
    repetitions = args.repetitions or (1 if args.quick else 3)
    seconds = args.seconds if args.seconds is not None else (0.5 if args.quick else 10.0)
    min_samples = 20 if args.quick else 200

    doc = make_bundle(args.entities, args.fields)
    variant, changes = make_variant(doc)
    problems = validate_bundle(doc)
    if problems:
        raise SystemExit(f"the generated bundle is invalid: {problems[:5]}")
    report = Report(
        "validate_plan",
        {
            "entities": args.entities,
            "fields": args.fields,
            "changes": changes,
            "repetitions": repetitions,
            "seconds_per_point": seconds,
        },
        environment(),
    )
    points, v1 = _points(doc, variant)
    new_plan = make_plan(Bundle.from_doc(empty_bundle()), doc)
    change_plan = make_plan(v1, variant)
    shape = {
        "field_types": dict(Counter(f["type"] for e in doc["entities"] for f in e["fields"])),
        "indexed_fields": sum(1 for e in doc["entities"] for f in e["fields"] if f.get("indexed")),
        "plan_new_operations": dict(Counter(op.kind for op in new_plan.operations)),
        "plan_change_operations": dict(Counter(op.kind for op in change_plan.operations)),
    }
    report.note(
        f"bundle: {args.entities} entities x {args.fields} fields; types "
        + ", ".join(f"{k} {v}" for k, v in sorted(shape["field_types"].items()))
        + f"; {shape['indexed_fields']} marked indexed"
    )
    report.note(
        "plan empty->v1: " + ", ".join(f"{k} {v}" for k, v in shape["plan_new_operations"].items())
    )
    report.note(
        f"plan v1->v2 ({changes} edits): "
        + ", ".join(f"{k} {v}" for k, v in shape["plan_change_operations"].items())
    )

    runs: dict[str, list[Stats]] = {name: [] for name in points}
    gc.collect()
    for _ in range(repetitions):
        # Interleave the points in each repetition so that noise hits them alike.
        for name, fn in points.items():
            runs[name].append(
                Stats.of(sample(fn, warmup=2, min_samples=min_samples, max_seconds=seconds))
            )
    stats = {name: Stats.median(r) for name, r in runs.items()}
    base = stats["schema"]
    under_1s = {"p95": Target.at_most(TARGET_MS, "ms")}
    rows: list[Row] = [
        *stats_rows("JSON Schema pass (baseline)", base, base),
        *stats_rows("validate_bundle", stats["validate"], base),
        *stats_rows("make_plan empty->v1", stats["plan_new"], base),
        *stats_rows(f"make_plan v1->v2 ({changes} edits)", stats["plan_change"], base),
        *stats_rows("validate + plan empty->v1", stats["preview_new"], base, under_1s),
        *stats_rows(
            "validate + plan v1->v2",
            stats["preview_change"],
            stats["schema_variant"],
            under_1s,
        ),
    ]
    report.table(
        f"validate + plan, {args.entities} entities x {args.fields} fields "
        f"(median of {repetitions})",
        rows,
        baseline_label="schema pass",
        details={"stats": {name: s.__dict__ for name, s in stats.items()}, "shape": shape},
    )
    report.note(
        "ratio = metacrm / bare JSON Schema pass at the same percentile; make_plan "
        "validates the new document, and the stored result again when archived items "
        "are carried forward (v1->v2 archives fields)"
    )
    return report.finish(write_json=not args.no_json)


def main(argv: Sequence[str] | None = None) -> int:
    record = run(argv)
    verdicts = [r["verdict"] for s in record["sections"] for r in s["rows"] if r["verdict"]]
    return 1 if "FAIL" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
