"""Planning is pure: operations, their order, their sentences and their flags."""

from __future__ import annotations

import copy

import pytest

from metacrm.metadata.model import Bundle, empty_bundle
from metacrm.metadata.plan import make_plan
from metacrm.metadata.validation import BundleInvalid

from .bundles import bundle, entity, text


def planned(old, new, purge=()):
    return make_plan(Bundle.from_doc(old), new, purge)


def kinds(plan):
    return [op.kind for op in plan.operations]


def test_first_publish_creates_every_entity():
    plan = planned(empty_bundle(), bundle(entity("lead"), entity("deal")))
    assert kinds(plan) == ["create_entity", "create_entity"]
    assert plan.operations[0].description == "Create entity 'Lead' (lead) with 1 field"


def test_no_change_is_an_empty_plan():
    doc = bundle(entity("lead", text("city")))
    assert planned(doc, copy.deepcopy(doc)).empty


def test_removed_entity_is_archived_and_carried_forward():
    old = bundle(entity("lead"), entity("deal"))
    plan = planned(old, bundle(entity("lead")))
    assert kinds(plan) == ["archive_entity"]
    stored = {e["name"]: e for e in plan.result["entities"]}
    assert stored["deal"]["archived"] is True


def test_adding_required_field_without_default_is_risky():
    plan = planned(bundle(entity("lead")), bundle(entity("lead", text("city", required=True))))
    assert plan.operations[0].risky
    assert "needs the table to be empty" in plan.operations[0].description


def test_order_creates_before_it_archives():
    old = bundle(entity("lead", text("city")))
    new = bundle(entity("lead", text("town")), entity("deal"))
    assert kinds(planned(old, new)) == ["create_entity", "add_field", "archive_field"]


def test_type_change_without_conversion_is_refused():
    old = bundle(entity("lead", {"name": "n", "type": "integer", "label": {"en": "N"}}))
    new = bundle(entity("lead", {"name": "n", "type": "json", "label": {"en": "N"}}))
    with pytest.raises(BundleInvalid) as info:
        planned(old, new)
    assert info.value.problems[0].pointer == "/entities/0/fields/1/type"


def test_lookup_target_cannot_change():
    def lookup(target):
        return {"name": "ref", "type": "lookup", "target": target, "label": {"en": "Ref"}}

    old = bundle(entity("a"), entity("b"), entity("c", lookup("a")))
    new = bundle(entity("a"), entity("b"), entity("c", lookup("b")))
    with pytest.raises(BundleInvalid, match="problem"):
        planned(old, new)


def test_purge_is_destructive_and_needs_archived_first():
    old = bundle(entity("lead", text("city", archived=True)))
    plan = planned(old, bundle(entity("lead")), purge=["lead.city"])
    assert kinds(plan) == ["purge_field"] and plan.destructive
    with pytest.raises(BundleInvalid, match="problem"):
        planned(bundle(entity("lead", text("city"))), bundle(entity("lead")), ["lead.city"])
    with pytest.raises(BundleInvalid):
        planned(old, bundle(entity("lead")), purge=["lead.nothing"])


def test_document_changes_are_listed():
    roles = [{"name": "rep", "label": {"en": "Rep"}, "permissions": []}]
    old = bundle(entity("lead"))
    new = bundle(entity("lead"), roles=roles, settings={"timezone": "Asia/Shanghai"})
    assert kinds(planned(old, new)) == ["add_document", "update_document"]


def test_plan_of_fifty_entities_is_complete():
    entities = [
        entity(f"e{i}", *(text(f"f{j}", indexed=j % 5 == 0) for j in range(40))) for i in range(50)
    ]
    plan = planned(empty_bundle(), bundle(*entities))
    assert len(plan.operations) == 50
