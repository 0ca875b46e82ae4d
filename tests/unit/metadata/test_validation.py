"""Bad metadata gets a complete list of precise problems, never an exception."""

from __future__ import annotations

import json

import pytest

from metacrm.metadata.jsondoc import DocumentError, loads
from metacrm.metadata.loader import template_folder, validate_folder
from metacrm.metadata.validation import validate_bundle

from .bundles import bundle, entity, text


def pointers(doc) -> dict[str, str]:
    return {p.pointer: p.message for p in validate_bundle(doc)}


def test_core_template_is_valid():
    _, problems = validate_folder(template_folder("core"))
    assert problems == []


def test_valid_bundle_has_no_problems():
    assert validate_bundle(bundle(entity("lead", text("city")))) == []


@pytest.mark.parametrize(
    "name",
    ["x; drop table t", "Lead", "lead\n", "lеad", "x" * 64, "select", "created_at", "1x"],
)
def test_hostile_entity_names_are_refused(name):
    found = pointers(bundle(entity(name)))
    assert "/entities/0/name" in found


@pytest.mark.parametrize("name", ["x; drop table t", "City", "city\n", "ciтy", "y" * 64, "id"])
def test_hostile_field_names_are_refused(name):
    found = pointers(bundle(entity("lead", text(name))))
    assert "/entities/0/fields/1/name" in found


def test_every_problem_is_reported_at_once():
    doc = bundle(
        entity(
            "lead",
            text("bad name"),
            {
                "name": "n",
                "type": "integer",
                "label": {"en": "N"},
                "options": [{"value": "a", "label": {"en": "A"}}],
            },
        ),
        entity("lead"),
        entity(
            "deal", {"name": "who", "type": "lookup", "target": "nobody", "label": {"en": "Who"}}
        ),
    )
    found = pointers(doc)
    assert "/entities/0/fields/1/name" in found
    assert "/entities/0/fields/2/options" in found
    assert "/entities/1/name" in found and "twice" in found["/entities/1/name"]
    assert "/entities/2/fields/1/target" in found


def test_unknown_reference_has_a_hint():
    doc = bundle(
        entity("lead"),
        entity("deal", {"name": "who", "type": "lookup", "target": "leed", "label": {"en": "Who"}}),
    )
    (problem,) = validate_bundle(doc)
    assert problem.hint == "did you mean 'lead'?"


def test_duplicate_field_names():
    found = pointers(bundle(entity("lead", text("city"), text("city"))))
    assert "twice" in found["/entities/0/fields/2/name"]


def test_derived_column_names_must_not_clash():
    doc = bundle(
        entity(
            "lead",
            {"name": "about", "type": "related_to", "targets": ["lead"], "label": {"en": "About"}},
            text("about_id"),
        )
    )
    assert "/entities/0/fields/2/name" in pointers(doc)


def test_options_that_do_not_fit_the_type():
    doc = bundle(
        entity(
            "lead",
            text("city", min=3),
            {"name": "n", "type": "integer", "label": {"en": "N"}, "min": 5, "max": 1},
        )
    )
    found = pointers(doc)
    assert "/entities/0/fields/1/min" in found
    assert "/entities/0/fields/2/min" in found


def test_default_must_fit_the_field():
    doc = bundle(
        entity(
            "lead",
            {
                "name": "level",
                "type": "single_select",
                "label": {"en": "L"},
                "default": "platinum",
                "options": [{"value": "gold", "label": {"en": "Gold"}}],
            },
        )
    )
    assert "must be one of: gold" in pointers(doc)["/entities/0/fields/1/default"]


def test_layout_and_pipeline_references_are_checked():
    doc = bundle(
        entity(
            "deal",
            {
                "name": "stage",
                "type": "single_select",
                "label": {"en": "Stage"},
                "options": [{"value": "open", "label": {"en": "Open"}}],
            },
            text("note"),
        ),
        layouts=[{"entity": "deal", "list": {"columns": [{"field": "nope"}]}}],
        pipelines=[
            {
                "name": "sales",
                "label": {"en": "Sales"},
                "entity": "deal",
                "field": "note",
                "stages": [{"name": "open", "label": {"en": "Open"}}],
            },
            {
                "name": "other",
                "label": {"en": "Other"},
                "entity": "deal",
                "field": "missing",
                "stages": [{"name": "open", "label": {"en": "Open"}}],
            },
            {
                "name": "third",
                "label": {"en": "Third"},
                "entity": "deal",
                "field": "stage",
                "stages": [{"name": "won", "label": {"en": "Won"}}],
            },
        ],
    )
    found = pointers(doc)
    assert "/layouts/0/list/columns/0/field" in found
    assert "single_select" in found["/pipelines/0/field"]
    assert "/pipelines/1/field" in found
    assert "/pipelines/2/stages/0/name" in found


def test_role_inheritance_cycle():
    roles = [
        {"name": "a", "label": {"en": "A"}, "inherits": ["b"], "permissions": []},
        {"name": "b", "label": {"en": "B"}, "inherits": ["a"], "permissions": []},
    ]
    found = pointers(bundle(entity("lead"), roles=roles))
    assert any("cycle" in message for message in found.values())


def test_formula_cycle_is_reported():
    doc = bundle(
        entity(
            "deal",
            {
                "name": "a",
                "type": "formula",
                "expression": "b + 1",
                "result_type": "integer",
                "label": {"en": "A"},
            },
            {
                "name": "b",
                "type": "formula",
                "expression": "a * 2",
                "result_type": "integer",
                "label": {"en": "B"},
            },
        )
    )
    messages = [p.message for p in validate_bundle(doc)]
    assert any("cycle" in m and "deal.a" in m for m in messages)


def test_formula_type_errors_are_reported_with_position():
    doc = bundle(
        entity(
            "deal",
            {
                "name": "a",
                "type": "formula",
                "expression": "name + 1",
                "result_type": "integer",
                "label": {"en": "A"},
            },
        )
    )
    found = pointers(doc)
    assert "line 1" in found["/entities/0/fields/1/expression"]


def test_validation_rule_must_be_boolean():
    doc = bundle(
        entity(
            "deal", validation_rules=[{"name": "r", "expression": "name", "message": {"en": "bad"}}]
        )
    )
    assert "/entities/0/validation_rules/0/expression" in pointers(doc)


def test_bad_time_zone():
    doc = bundle(entity("lead"), settings={"timezone": "Mars/Olympus"})
    assert "/settings/timezone" in pointers(doc)


@pytest.mark.parametrize("doc", [None, [], "x", 3, {"entities": "x"}, {"format": 2}])
def test_wrong_shapes_are_problems_not_exceptions(doc):
    assert validate_bundle(doc)


def test_ten_megabyte_document_is_refused_before_validation():
    huge = json.dumps(bundle(entity("lead", text("city", help={"en": "x" * 10_000_000}))))
    with pytest.raises(DocumentError, match="limit"):
        loads(huge.encode())


def test_huge_strings_are_capped_by_the_schemas():
    found = pointers(bundle(entity("lead", text("city", help={"en": "x" * 1_000_000}))))
    assert "/entities/0/fields/1/help/en" in found
    assert all(len(message) <= 300 for message in found.values())


def test_deep_nesting_built_in_python_is_refused_without_recursion():
    nested: object = 1
    for _ in range(10_000):
        nested = [nested]
    doc = bundle(entity("lead"))
    doc["entities"][0]["fields"].append(
        {"name": "data", "type": "json", "label": {"en": "D"}, "default": nested}
    )
    (problem,) = validate_bundle(doc)
    assert "deeper than 64" in problem.message


def test_a_broken_field_is_reported_once_not_again_as_missing():
    doc = bundle(entity("lead", text("city"), search_fields=["name", "city"]))
    doc["entities"][0]["fields"][1]["type"] = "txet"
    doc["entities"][0]["title_field"] = "city"
    problems = validate_bundle(doc)
    assert [p.pointer for p in problems] == ["/entities/0/fields/1/type"]


def test_reserved_word_message_names_the_word_once():
    (problem,) = validate_bundle(bundle(entity("lead", text("select"))))
    assert problem.message == "field name 'select' is a reserved word"


def test_folder_needs_a_valid_manifest_and_no_stray_folders(tmp_path):
    import shutil

    from metacrm.metadata.loader import template_folder, validate_folder

    shutil.copytree(str(template_folder("core")), tmp_path / "b")
    (tmp_path / "b" / "rule").mkdir()
    (tmp_path / "b" / "bundle.json").write_text('{"kind": "bundle", "format": 7}')
    _, problems = validate_folder(tmp_path / "b")
    where = {p.pointer for p in problems}
    assert "rule" in where and "bundle.json#/format" in where
    (tmp_path / "b" / "bundle.json").unlink()
    _, problems = validate_folder(tmp_path / "b")
    assert "bundle.json" in {p.pointer for p in problems}
