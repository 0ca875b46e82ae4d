"""The JSON Schemas of metadata documents: valid, linked by $id, closed, capped and strict."""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SCHEMA_DIR = Path(__file__).resolve().parents[3] / "platform" / "metadata" / "schemas"
BASE_URI = "https://metacrm.dev/schemas/"
SCHEMA_NAMES = [
    "common",
    "field",
    "entity",
    "layout",
    "pipeline",
    "role",
    "rule",
    "branding",
    "settings",
    "manifest",
    "bundle",
]
# Kinds stored one document per file carry their own "kind" and a $defs/file variant.
FILE_KINDS = ["entity", "layout", "pipeline", "role", "rule", "branding", "settings"]


def load_registry(folder: Path) -> Registry:
    """Return a registry of every schema in *folder*, each found by its $id.

    No retrieve function is given, so a $ref to anything not in the folder
    fails with ``referencing.exceptions.Unresolvable`` instead of a download.
    """
    resources = [
        Resource.from_contents(
            json.loads(path.read_text(encoding="utf-8")), default_specification=DRAFT202012
        )
        for path in sorted(folder.glob("*.json"))
    ]
    return Registry().with_resources((resource.id(), resource) for resource in resources).crawl()


@functools.cache
def registry() -> Registry:
    return load_registry(SCHEMA_DIR)


@functools.cache
def validator(ref: str) -> Draft202012Validator:
    """Return a validator for ``<kind>.json`` or ``<kind>.json#/$defs/...``."""
    return Draft202012Validator({"$ref": BASE_URI + ref}, registry=registry())


def pointer(error: ValidationError) -> str:
    """Return the RFC 6901 JSON pointer of the instance an error is about."""
    return "".join(
        "/" + str(part).replace("~", "~0").replace("/", "~1") for part in error.absolute_path
    )


def error_pointers(ref: str, document: Any) -> set[str]:
    return {pointer(error) for error in validator(ref).iter_errors(document)}


def load_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{name}.json").read_text(encoding="utf-8"))


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Yield every (path, dict) inside a schema, depth first."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}/{index}")


# --------------------------------------------------------------------- the schemas themselves


def test_schema_folder_holds_exactly_the_documented_schemas() -> None:
    assert sorted(p.stem for p in SCHEMA_DIR.glob("*.json")) == sorted(SCHEMA_NAMES)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_is_valid_draft_2020_12_with_id_title_and_description(name: str) -> None:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"{BASE_URI}{name}.json"
    assert schema["title"]
    assert schema["description"]


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_ref_resolves_through_the_registry(name: str) -> None:
    schema = load_schema(name)
    resolver = registry().resolver(base_uri=schema["$id"])
    refs = [node["$ref"] for _, node in walk(schema) if isinstance(node.get("$ref"), str)]
    for ref in refs:
        assert resolver.lookup(ref).contents is not None, ref


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_object_schema_is_closed(name: str) -> None:
    for path, node in walk(load_schema(name)):
        if node.get("type") == "object":
            closed = node.get("additionalProperties", node.get("unevaluatedProperties"))
            assert closed is not None, f"{name}.json{path} lets any key through"
            if "properties" in node:
                assert closed is False, f"{name}.json{path} has properties but is not closed"


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_string_and_array_is_capped(name: str) -> None:
    for path, node in walk(load_schema(name)):
        if node.get("type") == "string":
            assert "maxLength" in node, f"{name}.json{path}: string without maxLength"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{name}.json{path}: array without maxItems"


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_property_has_a_description(name: str) -> None:
    schema = load_schema(name)
    resolver = registry().resolver(base_uri=schema["$id"])
    for path, node in walk(schema):
        # Properties inside if/then/not only narrow keys declared elsewhere.
        if any(f"/{word}/" in f"{path}/" for word in ("if", "then", "not")):
            continue
        for key, sub in node.get("properties", {}).items():
            if isinstance(sub, dict) and "description" not in sub and "$ref" in sub:
                sub = resolver.lookup(sub["$ref"]).contents
            assert isinstance(sub, dict) and sub.get("description"), (
                f"{name}.json{path}/properties/{key} has no description"
            )


def test_unknown_ref_is_unresolvable_not_fetched() -> None:
    from referencing.exceptions import Unresolvable

    with pytest.raises(Unresolvable):
        registry().resolver().lookup("https://metacrm.dev/schemas/missing.json")


# --------------------------------------------------------------------- documents

LABEL = {"en": "Customer", "zh-CN": "客户"}


def entity(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "customer",
        "label": LABEL,
        "plural_label": {"en": "Customers", "zh-CN": "客户"},
        "title_field": "name",
        "fields": [{"name": "name", "type": "text", "label": {"en": "Name"}}],
    }
    doc.update(overrides)
    return doc


def with_field(**field: Any) -> dict[str, Any]:
    return entity(fields=[{"name": "f", "label": {"en": "F"}, **field}])


def layout(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "kind": "layout",
        "entity": "customer",
        "form": {
            "tabs": [
                {
                    "name": "main",
                    "label": LABEL,
                    "sections": [{"name": "basics", "columns": 2, "fields": ["name", "level"]}],
                }
            ]
        },
        "list": {
            "columns": [{"field": "name", "width": 240}, {"field": "owner_id"}],
            "default_sort": [{"field": "created_at", "direction": "desc"}],
            "page_size": 50,
        },
        "record_page": {
            "highlights": ["level", "owner_id"],
            "related_lists": [
                {"entity": "contact", "field": "customer", "label": LABEL, "columns": ["name"]}
            ],
        },
    }
    doc.update(overrides)
    return doc


def pipeline(**stage: Any) -> dict[str, Any]:
    return {
        "kind": "pipeline",
        "name": "sales",
        "label": {"en": "Sales"},
        "entity": "deal",
        "field": "stage",
        "default": True,
        "stages": [
            {
                "name": "qualify",
                "label": {"en": "Qualify"},
                "probability": 10,
                "color": "#5b8def",
                "won": False,
                "lost": False,
                "required_fields": ["amount"],
                "entry_criteria": "amount > 0",
                **stage,
            }
        ],
    }


def role(**permission: Any) -> dict[str, Any]:
    return {
        "kind": "role",
        "name": "sales_rep",
        "label": {"en": "Sales rep"},
        "description": {"en": "Sells."},
        "inherits": ["read_only"],
        "permissions": [
            {
                "entity": "customer",
                "actions": ["read", "update"],
                "scope": "own",
                "effect": "allow",
                "fields": {"lifetime_value": "read_only"},
                **permission,
            }
        ],
        "capabilities": ["export"],
    }


def rule(**trigger: Any) -> dict[str, Any]:
    return {
        "kind": "rule",
        "name": "vip_follow_up",
        "label": {"en": "VIP follow-up"},
        "entity": "customer",
        "enabled": True,
        "trigger": trigger or {"type": "on_update", "fields": ["level"]},
        "condition": 'level = "vip"',
        "actions": [{"type": "create_task", "params": {"subject": "Call {{ record.name }}"}}],
    }


MANIFEST = {
    "kind": "bundle",
    "format": 1,
    "name": "core",
    "label": {"en": "Core"},
    "description": {"en": "What every tenant gets."},
    "version": "1.0.0",
}
BRANDING = {
    "kind": "branding",
    "name": "Acme CRM",
    "logo_url": "/static/logo.svg",
    "colors": {"primary": "#1f6feb", "secondary": "#0d1117", "accent": "#f78166"},
}
SETTINGS = {
    "kind": "settings",
    "default_locale": "en",
    "timezone": "Asia/Shanghai",
    "currency": "CNY",
    "require_if_match": False,
}
SELECT_OPTIONS = [
    {"value": "normal", "label": {"en": "Normal", "zh-CN": "普通会员"}},
    {"value": "vip", "label": {"en": "VIP"}, "color": "#c41d7f", "archived": False},
]
ONE_FIELD_OF_EVERY_TYPE = [
    {"type": "text", "max_length": 10000, "min_length": 2, "pattern": "^[A-Z]+$"},
    {"type": "long_text", "max_length": 1000000},
    {"type": "rich_text", "max_length": 5000000},
    {"type": "integer", "min": 0, "max": 100, "default": 5},
    {"type": "decimal", "precision": 38, "scale": 10, "min": -1.5, "max": 1e9},
    {"type": "currency", "precision": 18, "scale": 2, "min": 0},
    {"type": "percent", "min": 0, "max": 100},
    {"type": "boolean", "default": False},
    {"type": "date", "indexed": True},
    {"type": "datetime", "required": True},
    {"type": "email", "unique": True},
    {"type": "phone", "read_only": True},
    {"type": "url", "archived": True, "help": {"en": "Home page", "zh-CN": "主页"}},
    {"type": "single_select", "options": SELECT_OPTIONS, "default": "normal"},
    {"type": "multi_select", "options": SELECT_OPTIONS, "max_items": 2, "default": ["vip"]},
    {"type": "tags", "max_items": 20, "default": ["a", "b"]},
    {"type": "lookup", "target": "customer", "on_delete": "cascade"},
    {"type": "many_to_many", "target": "product", "inverse_label": {"en": "Customers"}},
    {"type": "related_to", "targets": ["customer", "deal"]},
    {"type": "user", "indexed": True},
    {"type": "formula", "expression": "amount * probability / 100", "result_type": "decimal"},
    {"type": "auto_number", "prefix": "D-", "padding": 5, "start": 1000},
    {"type": "file", "max_size": 10485760, "accept": ["application/pdf", "image/*"]},
    {"type": "encrypted_text", "max_length": 1000},
    {"type": "json", "default": {"any": ["json", 1, None, {"nested": True}]}},
]

VALID = [
    ("entity.json", entity()),
    (
        "entity.json",
        entity(
            kind="entity",
            description={"en": "People and companies we sell to."},
            icon="building",
            search_fields=["name"],
            indexes=[{"name": "customer_name", "fields": ["name"], "unique": False}],
            validation_rules=[
                {"name": "positive", "expression": "amount >= 0", "message": {"en": "No."}}
            ],
            archived=False,
        ),
    ),
    (
        "entity.json",
        entity(
            fields=[
                {"name": f"f_{i}", "label": {"en": field["type"]}, **field}
                for i, field in enumerate(ONE_FIELD_OF_EVERY_TYPE)
            ]
        ),
    ),
    ("entity.json#/$defs/file", entity(kind="entity")),
    ("layout.json", layout()),
    ("layout.json", {"entity": "customer"}),
    ("pipeline.json", pipeline()),
    ("pipeline.json", pipeline(won=True, lost=False)),
    ("role.json", role()),
    ("role.json", role(entity="*", actions=["read"], scope="all", effect="deny")),
    ("role.json", {"name": "read_only", "label": {"en": "Read only"}}),
    ("rule.json", rule()),
    ("rule.json", rule(type="on_field_change", fields=["level", "status"])),
    ("rule.json", rule(type="scheduled", cron="0 9 * * MON-FRI")),
    ("rule.json", rule(type="date_relative", date_field="next_follow_up_on", offset_days=-1)),
    ("rule.json", rule(type="on_create")),
    ("branding.json", BRANDING),
    ("branding.json", {"logo_url": "https://cdn.acme.example/logo.png?v=2"}),
    ("branding.json", {}),
    ("settings.json", SETTINGS),
    ("settings.json", {}),
    ("settings.json#/$defs/file", {"kind": "settings"}),
    ("manifest.json", MANIFEST),
    ("manifest.json", {**MANIFEST, "version": "2.10.0-rc.1"}),
    ("bundle.json", {"format": 1, "entities": [entity()]}),
    (
        "bundle.json",
        {
            "format": 1,
            "entities": [entity(kind="entity")],
            "layouts": [layout()],
            "pipelines": [pipeline()],
            "roles": [role()],
            "rules": [rule()],
            "branding": BRANDING,
            "settings": SETTINGS,
        },
    ),
]


@pytest.mark.parametrize(("ref", "document"), VALID, ids=lambda v: v if isinstance(v, str) else "")
def test_valid_document_passes(ref: str, document: dict[str, Any]) -> None:
    assert error_pointers(ref, document) == set()


def test_every_field_type_has_a_valid_example() -> None:
    field_types = load_schema("field")["$defs"]["FieldType"]["enum"]
    assert sorted(field["type"] for field in ONE_FIELD_OF_EVERY_TYPE) == sorted(field_types)


def without(document: dict[str, Any], key: str) -> dict[str, Any]:
    document = copy.deepcopy(document)
    del document[key]
    return document


LONG_NAME = "a" * 64
INVALID_ENTITIES = [  # entity.json
    ("entity: SQL in a name", entity(name="X; drop table t"), "/name"),
    ("entity: capitalised name", entity(name="Lead"), "/name"),
    ("entity: 64-character name", entity(name=LONG_NAME), "/name"),
    ("entity: empty name", entity(name=""), "/name"),
    ("entity: name starting with a digit", entity(name="1lead"), "/name"),
    ("entity: name with a hyphen", entity(name="sales-lead"), "/name"),
    ("entity: name not a string", entity(name=7), "/name"),
    ("entity: name with a trailing newline", entity(name="lead\n"), "/name"),
    ("field: capitalised name", with_field(name="Amount", type="integer"), "/fields/0/name"),
    (
        "index: bad field name",
        entity(indexes=[{"name": "ix", "fields": ["Name"]}]),
        "/indexes/0/fields/0",
    ),
    ("label: unknown locale", entity(label={"en": "Lead", "fr": "Piste"}), "/label"),
    ("label: no English", entity(label={"zh-CN": "线索"}), "/label"),
    ("label: not an object", entity(label="Lead"), "/label"),
    ("label: 201 characters", entity(label={"en": "x" * 201}), "/label/en"),
    ("label: empty text", entity(label={"en": ""}), "/label/en"),
    ("label: text not a string", entity(label={"en": 5}), "/label/en"),
    (
        "option: unknown locale",
        with_field(type="single_select", options=[{"value": "a", "label": {"en": "A", "de": "A"}}]),
        "/fields/0/options/0/label",
    ),
    ("entity: missing label", without(entity(), "label"), ""),
    ("entity: missing title_field", without(entity(), "title_field"), ""),
    ("entity: unknown key", entity(table="crm_customer"), ""),
    ("entity: no fields", entity(fields=[]), "/fields"),
    (
        "entity: 501 fields",
        entity(
            fields=[{"name": f"f{i}", "type": "text", "label": {"en": "F"}} for i in range(501)]
        ),
        "/fields",
    ),
    ("entity: fields not an array", entity(fields={"name": {}}), "/fields"),
    ("entity: wrong kind", entity(kind="layout"), "/kind"),
    ("entity: archived not a boolean", entity(archived="no"), "/archived"),
    ("entity: bad icon", entity(icon="<svg>"), "/icon"),
    (
        "index: 9 fields",
        entity(indexes=[{"name": "ix", "fields": [f"f{i}" for i in range(9)]}]),
        "/indexes/0/fields",
    ),
    (
        "validation rule: no message",
        entity(validation_rules=[{"name": "r", "expression": "amount > 0"}]),
        "/validation_rules/0",
    ),
    (
        "validation rule: 10,001-character expression",
        entity(validation_rules=[{"name": "r", "expression": "a" * 10001, "message": {"en": "x"}}]),
        "/validation_rules/0/expression",
    ),
    ("field: missing type", entity(fields=[{"name": "f", "label": {"en": "F"}}]), "/fields/0"),
    ("field: missing label", entity(fields=[{"name": "f", "type": "text"}]), "/fields/0"),
    ("field: unknown type", with_field(type="strng"), "/fields/0/type"),
    ("field: unknown key", with_field(type="text", colour="red"), "/fields/0"),
    (
        "field: required not a boolean",
        with_field(type="text", required="yes"),
        "/fields/0/required",
    ),
    ("lookup: no target", with_field(type="lookup"), "/fields/0"),
    ("lookup: bad target", with_field(type="lookup", target="Customer"), "/fields/0/target"),
    (
        "lookup: unknown on_delete",
        with_field(type="lookup", target="customer", on_delete="nullify"),
        "/fields/0/on_delete",
    ),
    ("many_to_many: no target", with_field(type="many_to_many"), "/fields/0"),
    ("related_to: no targets", with_field(type="related_to"), "/fields/0"),
    ("related_to: empty targets", with_field(type="related_to", targets=[]), "/fields/0/targets"),
    (
        "related_to: 21 targets",
        with_field(type="related_to", targets=[f"e{i}" for i in range(21)]),
        "/fields/0/targets",
    ),
    ("single_select: no options", with_field(type="single_select"), "/fields/0"),
    ("multi_select: no options", with_field(type="multi_select"), "/fields/0"),
    (
        "single_select: empty options",
        with_field(type="single_select", options=[]),
        "/fields/0/options",
    ),
    (
        "single_select: 501 options",
        with_field(
            type="single_select",
            options=[{"value": f"o{i}", "label": {"en": "O"}} for i in range(501)],
        ),
        "/fields/0/options",
    ),
    (
        "option: bad value",
        with_field(type="single_select", options=[{"value": "Gold", "label": {"en": "Gold"}}]),
        "/fields/0/options/0/value",
    ),
    (
        "option: no label",
        with_field(type="single_select", options=[{"value": "a"}]),
        "/fields/0/options/0",
    ),
    (
        "option: colour name",
        with_field(
            type="single_select", options=[{"value": "a", "label": {"en": "A"}, "color": "red"}]
        ),
        "/fields/0/options/0/color",
    ),
    (
        "option: short colour",
        with_field(
            type="single_select", options=[{"value": "a", "label": {"en": "A"}, "color": "#12345"}]
        ),
        "/fields/0/options/0/color",
    ),
    (
        "option: colour with a trailing newline",
        with_field(
            type="single_select",
            options=[{"value": "a", "label": {"en": "A"}, "color": "#123456\n"}],
        ),
        "/fields/0/options/0/color",
    ),
    ("formula: no expression", with_field(type="formula", result_type="integer"), "/fields/0"),
    ("formula: no result_type", with_field(type="formula", expression="a + 1"), "/fields/0"),
    (
        "formula: unknown result_type",
        with_field(type="formula", expression="a + 1", result_type="money"),
        "/fields/0/result_type",
    ),
    ("text: max_length 10,001", with_field(type="text", max_length=10001), "/fields/0/max_length"),
    ("text: max_length 0", with_field(type="text", max_length=0), "/fields/0/max_length"),
    (
        "long_text: max_length over 1,000,000",
        with_field(type="long_text", max_length=1000001),
        "/fields/0/max_length",
    ),
    ("decimal: precision 39", with_field(type="decimal", precision=39), "/fields/0/precision"),
    ("integer: fractional min", with_field(type="integer", min=1.5), "/fields/0/min"),
    (
        "auto_number: 17-character prefix",
        with_field(type="auto_number", prefix="P" * 17),
        "/fields/0/prefix",
    ),
    ("auto_number: padding 13", with_field(type="auto_number", padding=13), "/fields/0/padding"),
    ("file: bad content type", with_field(type="file", accept=["pdf"]), "/fields/0/accept/0"),
    ("tags: max_items 0", with_field(type="tags", max_items=0), "/fields/0/max_items"),
    ("integer: options", with_field(type="integer", options=SELECT_OPTIONS), "/fields/0/options"),
    ("integer: max_length", with_field(type="integer", max_length=5), "/fields/0/max_length"),
    ("text: min", with_field(type="text", min=0), "/fields/0/min"),
    ("text: target", with_field(type="text", target="customer"), "/fields/0/target"),
    (
        "many_to_many: on_delete",
        with_field(type="many_to_many", target="product", on_delete="cascade"),
        "/fields/0/on_delete",
    ),
    ("date: expression", with_field(type="date", expression="today()"), "/fields/0/expression"),
    ("email: pattern", with_field(type="email", pattern=".*"), "/fields/0/pattern"),
    ("long_text: min_length", with_field(type="long_text", min_length=1), "/fields/0/min_length"),
    ("boolean: prefix", with_field(type="boolean", prefix="B"), "/fields/0/prefix"),
    ("currency: targets", with_field(type="currency", targets=["deal"]), "/fields/0/targets"),
    (
        "default: 10,001-character string",
        with_field(type="text", default="x" * 10001),
        "/fields/0/default",
    ),
    (
        "default: oversized nested string",
        with_field(type="json", default={"a": ["x" * 10001]}),
        "/fields/0/default/a/0",
    ),
    ("default: 501-item array", with_field(type="tags", default=["t"] * 501), "/fields/0/default"),
    ("pattern: 1,001 characters", with_field(type="text", pattern="a" * 1001), "/fields/0/pattern"),
]
INVALID_ENTITY_FILES = [  # entity.json#/$defs/file
    ("entity file: no kind", entity(), ""),
]
INVALID_LAYOUTS = [  # layout.json
    ("layout: no entity", without(layout(), "entity"), ""),
    ("layout: unknown key", layout(kanban={}), ""),
    (
        "layout: 4 columns",
        layout(
            form={
                "tabs": [
                    {
                        "name": "t",
                        "label": LABEL,
                        "sections": [{"name": "s", "columns": 4, "fields": ["name"]}],
                    }
                ]
            }
        ),
        "/form/tabs/0/sections/0/columns",
    ),
    (
        "layout: tab without sections",
        layout(form={"tabs": [{"name": "t", "label": LABEL}]}),
        "/form/tabs/0",
    ),
    (
        "layout: unknown sort direction",
        layout(
            list={
                "columns": [{"field": "name"}],
                "default_sort": [{"field": "name", "direction": "down"}],
            }
        ),
        "/list/default_sort/0/direction",
    ),
    (
        "layout: width 10 000",
        layout(list={"columns": [{"field": "name", "width": 10000}]}),
        "/list/columns/0/width",
    ),
    (
        "layout: related list without field",
        layout(record_page={"related_lists": [{"entity": "contact"}]}),
        "/record_page/related_lists/0",
    ),
]
INVALID_LAYOUT_FILES = [  # layout.json#/$defs/file
    ("layout file: no kind", without(layout(), "kind"), ""),
]
INVALID_PIPELINES = [  # pipeline.json
    ("stage: won and lost", pipeline(won=True, lost=True), "/stages/0"),
    ("stage: probability 101", pipeline(probability=101), "/stages/0/probability"),
    ("stage: negative probability", pipeline(probability=-1), "/stages/0/probability"),
    ("stage: bad colour", pipeline(color="#zzzzzz"), "/stages/0/color"),
    (
        "stage: entry criteria not a string",
        pipeline(entry_criteria=True),
        "/stages/0/entry_criteria",
    ),
    ("pipeline: no stages", {**pipeline(), "stages": []}, "/stages"),
    ("pipeline: field not an identifier", {**pipeline(), "field": "Stage"}, "/field"),
]
INVALID_ROLES = [  # role.json
    ("role: unknown action", role(actions=["approve"]), "/permissions/0/actions/0"),
    ("role: repeated action", role(actions=["read", "read"]), "/permissions/0/actions"),
    ("role: unknown scope", role(scope="company"), "/permissions/0/scope"),
    ("role: unknown effect", role(effect="maybe"), "/permissions/0/effect"),
    ("role: bad entity", role(entity="Customer"), "/permissions/0/entity"),
    (
        "role: unknown field access",
        role(fields={"amount": "write"}),
        "/permissions/0/fields/amount",
    ),
    ("role: bad field name", role(fields={"Amount": "hidden"}), "/permissions/0/fields"),
    ("role: unknown capability", {**role(), "capabilities": ["sudo"]}, "/capabilities/0"),
    ("role: no label", without(role(), "label"), ""),
]
INVALID_RULES = [  # rule.json
    ("rule: on_field_change without fields", rule(type="on_field_change"), "/trigger"),
    ("rule: scheduled without cron", rule(type="scheduled"), "/trigger"),
    ("rule: cron in words", rule(type="scheduled", cron="every day"), "/trigger/cron"),
    ("rule: six-field cron", rule(type="scheduled", cron="0 0 9 * * *"), "/trigger/cron"),
    ("rule: cron on on_create", rule(type="on_create", cron="0 9 * * *"), "/trigger/cron"),
    (
        "rule: date_relative without offset",
        rule(type="date_relative", date_field="due_on"),
        "/trigger",
    ),
    ("rule: unknown trigger", rule(type="on_save"), "/trigger/type"),
    ("rule: no actions", {**rule(), "actions": []}, "/actions"),
    (
        "rule: action type not an identifier",
        {**rule(), "actions": [{"type": "send email"}]},
        "/actions/0/type",
    ),
]
INVALID_BRANDINGS = [  # branding.json
    ("branding: javascript logo", {"logo_url": "javascript:alert(1)"}, "/logo_url"),
    ("branding: protocol-relative logo", {"logo_url": "//evil.example/x.svg"}, "/logo_url"),
    ("branding: http logo", {"logo_url": "http://cdn.example/logo.png"}, "/logo_url"),
    ("branding: colour name", {"colors": {"primary": "blue"}}, "/colors/primary"),
    ("branding: unknown colour", {"colors": {"danger": "#ff0000"}}, "/colors"),
    ("branding: 101-character name", {"name": "n" * 101}, "/name"),
]
INVALID_SETTINGS = [  # settings.json
    ("settings: unknown locale", {"default_locale": "fr"}, "/default_locale"),
    ("settings: lower-case currency", {"currency": "cny"}, "/currency"),
    ("settings: bad time zone", {"timezone": "../../etc/passwd"}, "/timezone"),
    ("settings: string boolean", {"require_if_match": "false"}, "/require_if_match"),
]
INVALID_SETTINGS_FILES = [  # settings.json#/$defs/file
    ("settings file: no kind", {"currency": "CNY"}, ""),
]
INVALID_MANIFESTS = [  # manifest.json
    ("manifest: format 2", {**MANIFEST, "format": 2}, "/format"),
    ("manifest: two-part version", {**MANIFEST, "version": "1.0"}, "/version"),
    ("manifest: no kind", without(MANIFEST, "kind"), ""),
    ("manifest: wrong kind", {**MANIFEST, "kind": "entity"}, "/kind"),
]
INVALID_BUNDLES = [  # bundle.json
    ("bundle: no format", {"entities": [entity()]}, ""),
    ("bundle: no entities", {"format": 1}, ""),
    ("bundle: empty entities", {"format": 1, "entities": []}, "/entities"),
    ("bundle: unknown key", {"format": 1, "entities": [entity()], "extras": []}, ""),
    (
        "bundle: bad entity name",
        {"format": 1, "entities": [entity(name="Lead")]},
        "/entities/0/name",
    ),
    (
        "bundle: kind does not match its array",
        {"format": 1, "entities": [entity()], "layouts": [layout(kind="entity")]},
        "/layouts/0/kind",
    ),
    (
        "bundle: lookup without target",
        {"format": 1, "entities": [with_field(type="lookup")]},
        "/entities/0/fields/0",
    ),
    (
        "bundle: bad settings",
        {"format": 1, "entities": [entity()], "settings": {"currency": "yuan"}},
        "/settings/currency",
    ),
]
INVALID = [
    *((case, "entity.json", doc, at) for case, doc, at in INVALID_ENTITIES),
    *((case, "entity.json#/$defs/file", doc, at) for case, doc, at in INVALID_ENTITY_FILES),
    *((case, "layout.json", doc, at) for case, doc, at in INVALID_LAYOUTS),
    *((case, "layout.json#/$defs/file", doc, at) for case, doc, at in INVALID_LAYOUT_FILES),
    *((case, "pipeline.json", doc, at) for case, doc, at in INVALID_PIPELINES),
    *((case, "role.json", doc, at) for case, doc, at in INVALID_ROLES),
    *((case, "rule.json", doc, at) for case, doc, at in INVALID_RULES),
    *((case, "branding.json", doc, at) for case, doc, at in INVALID_BRANDINGS),
    *((case, "settings.json", doc, at) for case, doc, at in INVALID_SETTINGS),
    *((case, "settings.json#/$defs/file", doc, at) for case, doc, at in INVALID_SETTINGS_FILES),
    *((case, "manifest.json", doc, at) for case, doc, at in INVALID_MANIFESTS),
    *((case, "bundle.json", doc, at) for case, doc, at in INVALID_BUNDLES),
]


@pytest.mark.parametrize(
    ("ref", "document", "expected"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
def test_invalid_document_fails_at_pointer(ref: str, document: Any, expected: str) -> None:
    assert error_pointers(ref, document) == {expected}


def test_unknown_field_type_does_not_also_flag_its_keys() -> None:
    document = with_field(type="strng", options=SELECT_OPTIONS, target="customer")
    assert error_pointers("entity.json", document) == {"/fields/0/type"}
