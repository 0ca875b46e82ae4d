"""Defects found in review of the foundation (issue 2) that show without a database."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from metacrm.metadata.model import Bundle
from metacrm.metadata.plan import make_plan
from metacrm.metadata.validation import validate_bundle

MINIMAL: dict[str, Any] = {
    "format": 1,
    "entities": [
        {
            "name": "lead",
            "label": {"en": "Lead"},
            "plural_label": {"en": "Leads"},
            "title_field": "name",
            "fields": [
                {"name": "name", "type": "text", "label": {"en": "Name"}, "required": True},
                {"name": "city", "type": "text", "label": {"en": "City"}},
                {"name": "amount", "type": "currency", "label": {"en": "Amount"}},
                {"name": "secret", "type": "encrypted_text", "label": {"en": "Secret"}},
            ],
        }
    ],
}


def bundle() -> dict[str, Any]:
    return copy.deepcopy(MINIMAL)


def field(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in doc["entities"][0]["fields"] if f["name"] == name)


@pytest.mark.parametrize("timezone", [5, True, ["UTC"], {"name": "UTC"}])
def test_time_zone_of_the_wrong_type_is_a_problem_not_a_crash(timezone):
    doc = bundle()
    doc["settings"] = {"timezone": timezone}
    problems = validate_bundle(doc)  # raises TypeError today
    assert any(p.pointer == "/settings/timezone" for p in problems)


def test_encrypted_text_max_length_change_is_planned_not_refused():
    new = bundle()
    field(new, "secret")["max_length"] = 5000
    plan = make_plan(Bundle.from_doc(bundle()), new)  # BundleInvalid today
    assert plan.operations


@pytest.mark.parametrize(
    ("name", "key", "value", "old"),
    [("city", "max_length", 100, "255"), ("amount", "precision", 12, "18")],
)
def test_storage_change_sentence_names_the_current_shape(name, key, value, old):
    new = bundle()
    field(new, name)[key] = value
    (op,) = make_plan(Bundle.from_doc(bundle()), new).operations
    assert "None" not in op.description, op.description
    assert f"{old} → {value}" in op.description, op.description


def test_null_default_is_not_described_as_filling_the_records():
    new = bundle()
    field(new, "city").update(required=True, default=None)
    try:
        plan = make_plan(Bundle.from_doc(bundle()), new)
    except Exception:
        return  # refusing a null default outright is a fine fix
    (op,) = plan.operations
    assert "None" not in op.description, op.description
