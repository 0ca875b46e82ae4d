"""The core bundle every tenant gets: valid documents, consistent references, usable sample."""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[3]
SCHEMA_DIR = ROOT / "platform" / "metadata" / "schemas"
CORE = ROOT / "tenants" / "core"
BASE_URI = "https://metacrm.dev/schemas/"
FOLDERS = {
    "entities": "entity",
    "layouts": "layout",
    "pipelines": "pipeline",
    "roles": "role",
    "rules": "rule",
}
SYSTEM_COLUMNS = {
    "id",
    "owner_id",
    "team_id",
    "created_at",
    "created_by",
    "updated_at",
    "updated_by",
    "version",
    "deleted_at",
}
LISTABLE_SYSTEM_COLUMNS = {"created_at", "updated_at", "owner_id"}
TEXT_LIMITS = {
    "text": 255,
    "long_text": 100_000,
    "rich_text": 1_000_000,
    "encrypted_text": 1_000,
    "email": 254,
    "phone": 32,
    "url": 2048,
}


def read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@functools.cache
def validator(ref: str) -> Draft202012Validator:
    resources = [
        Resource.from_contents(read(path), default_specification=DRAFT202012)
        for path in sorted(SCHEMA_DIR.glob("*.json"))
    ]
    registry = Registry().with_resources((r.id(), r) for r in resources)
    return Draft202012Validator({"$ref": BASE_URI + ref}, registry=registry)


def errors(ref: str, document: Any) -> list[str]:
    return [
        "/" + "/".join(map(str, e.absolute_path)) + ": " + e.message
        for e in validator(ref).iter_errors(document)
    ]


def core_files() -> list[tuple[str, Path]]:
    """Return (schema ref, path) for every document file of the core bundle."""
    files = [
        ("manifest.json", CORE / "bundle.json"),
        ("settings.json#/$defs/file", CORE / "settings.json"),
        ("branding.json#/$defs/file", CORE / "branding.json"),
    ]
    for folder, kind in FOLDERS.items():
        files += [
            (f"{kind}.json#/$defs/file", path) for path in sorted((CORE / folder).glob("*.json"))
        ]
    return files


@functools.cache
def bundle() -> dict[str, Any]:
    """Assemble the core folder into the bundle object the metadata API takes."""
    assembled: dict[str, Any] = {"format": read(CORE / "bundle.json")["format"]}
    for folder in FOLDERS:
        assembled[folder] = [read(path) for path in sorted((CORE / folder).glob("*.json"))]
    assembled["branding"] = read(CORE / "branding.json")
    assembled["settings"] = read(CORE / "settings.json")
    return assembled


@functools.cache
def entities() -> dict[str, dict[str, Any]]:
    return {doc["name"]: doc for doc in bundle()["entities"]}


def fields_of(entity: str) -> dict[str, dict[str, Any]]:
    return {field["name"]: field for field in entities()[entity]["fields"]}


def options_of(field: dict[str, Any]) -> list[str]:
    return [option["value"] for option in field["options"] if not option.get("archived")]


@functools.cache
def sample() -> dict[str, list[dict[str, Any]]]:
    return read(CORE / "sample" / "records.json")


def walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from walk(value, f"{path}/{index}")


# --------------------------------------------------------------------- documents


@pytest.mark.parametrize(
    ("ref", "path"), core_files(), ids=[str(p.relative_to(CORE)) for _, p in core_files()]
)
def test_core_document_validates_against_its_schema(ref: str, path: Path) -> None:
    assert errors(ref, read(path)) == []


def test_core_bundle_object_validates() -> None:
    assert errors("bundle.json", bundle()) == []


def test_core_has_the_five_entities_and_the_documented_settings() -> None:
    assert sorted(entities()) == ["contact", "customer", "deal", "interaction", "task"]
    settings = bundle()["settings"]
    assert (settings["default_locale"], settings["timezone"], settings["currency"]) == (
        "en",
        "Asia/Shanghai",
        "CNY",
    )


def test_file_names_match_document_names() -> None:
    for folder in FOLDERS:
        for path in (CORE / folder).glob("*.json"):
            doc = read(path)
            assert path.stem == doc.get("name", doc.get("entity")), path


def test_every_label_has_english_and_chinese() -> None:
    for path in [CORE / "bundle.json", *(p for _, p in core_files())]:
        for where, node in walk(read(path)):
            if "en" in node and set(node) <= {"en", "zh-CN"}:
                assert node.get("zh-CN"), f"{path.relative_to(CORE)}{where} has no zh-CN"


def test_entity_references_name_existing_fields_and_entities() -> None:
    for name, entity in entities().items():
        fields = fields_of(name)
        assert len(fields) == len(entity["fields"]), f"{name}: duplicate field names"
        assert not SYSTEM_COLUMNS & set(fields), f"{name}: a field reuses a system column"
        assert entity["title_field"] in fields
        for field in entity.get("search_fields", []):
            assert fields[field]["type"] in {"text", "email", "phone", "auto_number"}, field
        for index in entity.get("indexes", []):
            assert set(index["fields"]) <= set(fields), index["name"]
        for field in fields.values():
            for target in [field.get("target"), *field.get("targets", [])]:
                assert target is None or target in entities(), f"{name}.{field['name']}"
            if "options" in field:
                values = [option["value"] for option in field["options"]]
                assert len(values) == len(set(values)), f"{name}.{field['name']}"
            if "default" in field and "options" in field:
                assert field["default"] in options_of(field), f"{name}.{field['name']}"


def test_layouts_name_existing_fields() -> None:
    layouts = bundle()["layouts"]
    assert sorted(layout["entity"] for layout in layouts) == sorted(entities())
    for layout in layouts:
        entity = layout["entity"]
        fields = set(fields_of(entity))
        listable = fields | LISTABLE_SYSTEM_COLUMNS
        placed = [
            field
            for tab in layout["form"]["tabs"]
            for section in tab["sections"]
            for field in section["fields"]
        ]
        assert set(placed) <= fields, entity
        assert len(placed) == len(set(placed)), f"{entity}: a field is placed twice"
        assert {c["field"] for c in layout["list"]["columns"]} <= listable, entity
        assert {s["field"] for s in layout["list"]["default_sort"]} <= listable, entity
        assert set(layout["record_page"].get("highlights", [])) <= listable, entity
        for related in layout["record_page"].get("related_lists", []):
            link = fields_of(related["entity"])[related["field"]]
            assert link.get("target") == entity or entity in link.get("targets", []), related
            assert set(related.get("columns", [])) <= set(fields_of(related["entity"]))


def test_sales_pipeline_matches_the_deal_stage_options() -> None:
    (pipeline,) = bundle()["pipelines"]
    stage_field = fields_of(pipeline["entity"])[pipeline["field"]]
    assert stage_field["type"] == "single_select"
    assert [stage["name"] for stage in pipeline["stages"]] == options_of(stage_field)
    assert stage_field["default"] == pipeline["stages"][0]["name"]
    for stage in pipeline["stages"]:
        assert set(stage.get("required_fields", [])) <= set(fields_of("deal")), stage["name"]
    assert [s["name"] for s in pipeline["stages"] if s.get("won")] == ["won"]
    assert [s["name"] for s in pipeline["stages"] if s.get("lost")] == ["lost"]


def test_roles_name_existing_entities_and_roles() -> None:
    roles = {role["name"]: role for role in bundle()["roles"]}
    assert sorted(roles) == ["admin", "read_only", "sales_manager", "sales_rep", "service_agent"]
    for role in roles.values():
        assert set(role.get("inherits", [])) <= set(roles), role["name"]
        for permission in role.get("permissions", []):
            assert permission["entity"] == "*" or permission["entity"] in entities()
    read_only = roles["read_only"]
    assert "export" not in read_only.get("capabilities", [])
    assert all("export" not in p["actions"] for p in read_only["permissions"])


# --------------------------------------------------------------------- sample records

OFFSET_KEYS = {"days_ago", "in_days"}
TIME = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def is_offset(value: Any, with_time: bool) -> bool:
    if not isinstance(value, dict):
        return False
    allowed = OFFSET_KEYS | ({"at"} if with_time else set())
    offsets = OFFSET_KEYS & set(value)
    if len(offsets) != 1 or not set(value) <= allowed:
        return False
    days = value[offsets.pop()]
    at = value.get("at", "09:00")
    return type(days) is int and 0 <= days <= 3650 and isinstance(at, str) and bool(TIME.match(at))


def is_iso_date(value: Any) -> bool:
    try:
        dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def value_problem(field: dict[str, Any], value: Any, keys: dict[str, set[str]]) -> str | None:
    """Return why *value* is not a sample value of *field*, or None when it is."""
    kind = field["type"]
    if kind in TEXT_LIMITS:
        limit = field.get("max_length", TEXT_LIMITS[kind])
        if not isinstance(value, str) or not 0 < len(value) <= limit:
            return f"not a string of 1-{limit} characters"
        if kind == "email" and not EMAIL.match(value):
            return "not an email address"
        if kind == "url" and not value.startswith(("https://", "http://")):
            return "not an http(s) URL"
    elif kind == "single_select":
        if value not in options_of(field):
            return "not an option"
    elif kind == "tags":
        if not isinstance(value, list) or len(value) > field.get("max_items", 500):
            return "not a list of tags"
        if not all(isinstance(tag, str) and 0 < len(tag) <= 64 for tag in value):
            return "a tag is not a string of 1-64 characters"
    elif kind in {"integer", "decimal", "currency", "percent"}:
        if not is_number(value) or (kind == "integer" and type(value) is not int):
            return "not a number"
        if value < field.get("min", value) or value > field.get("max", value):
            return "out of range"
    elif kind == "boolean":
        if not isinstance(value, bool):
            return "not a boolean"
    elif kind == "date":
        if not (is_offset(value, with_time=False) or is_iso_date(value)):
            return "not a date offset or ISO date"
    elif kind == "datetime":
        if not is_offset(value, with_time=True):
            return "not a datetime offset"
    elif kind == "lookup":
        if value not in keys[field["target"]]:
            return f"not the key of a {field['target']}"
    elif kind == "related_to":
        if not isinstance(value, dict) or set(value) != {"entity", "key"}:
            return "not {entity, key}"
        if value["entity"] not in field["targets"] or value["key"] not in keys[value["entity"]]:
            return "does not name a record of one of the targets"
    else:
        return f"{kind} fields are not given in the sample"
    return None


def test_sample_has_records_of_every_core_entity() -> None:
    assert sorted(sample()) == sorted(entities())
    counts = {entity: len(records) for entity, records in sample().items()}
    assert counts["customer"] >= 20 and counts["interaction"] >= 50, counts


def test_sample_keys_are_unique() -> None:
    keys = [record["_key"] for records in sample().values() for record in records]
    assert len(keys) == len(set(keys))


def test_sample_records_use_existing_fields_with_valid_values() -> None:
    keys = {entity: {r["_key"] for r in records} for entity, records in sample().items()}
    problems = []
    for entity, records in sample().items():
        fields = fields_of(entity)
        required = {name for name, field in fields.items() if field.get("required")}
        for record in records:
            where = f"{entity} {record['_key']}"
            missing = required - set(record)
            if missing:
                problems.append(f"{where}: missing {sorted(missing)}")
            for name, value in record.items():
                if name == "_key":
                    continue
                if name not in fields:
                    problems.append(f"{where}: no field {name}")
                    continue
                problem = value_problem(fields[name], value, keys)
                if problem:
                    problems.append(f"{where}.{name} = {value!r}: {problem}")
    assert problems == []


def test_sample_deals_meet_their_stage_requirements() -> None:
    (pipeline,) = bundle()["pipelines"]
    stages = {stage["name"]: stage for stage in pipeline["stages"]}
    seen = set()
    for deal in sample()["deal"]:
        stage = stages[deal["stage"]]
        seen.add(stage["name"])
        assert set(stage.get("required_fields", [])) <= set(deal), deal["_key"]
        assert deal["probability"] == stage["probability"], deal["_key"]
        closed = stage.get("won") or stage.get("lost")
        assert ("closed_on" in deal) == bool(closed), deal["_key"]
        assert ("lost_reason" in deal) == bool(stage.get("lost")), deal["_key"]
    assert seen == set(stages), "every stage has sample deals"


def test_sample_links_agree_on_the_customer() -> None:
    by_key = {r["_key"]: r for records in sample().values() for r in records}
    for deal in sample()["deal"]:
        assert by_key[deal["primary_contact"]]["customer"] == deal["customer"], deal["_key"]
    for interaction in sample()["interaction"]:
        if "contact" in interaction:
            contact = by_key[interaction["contact"]]
            assert contact["customer"] == interaction["customer"], interaction["_key"]
        related = by_key[interaction["related_to"]["key"]]
        assert related.get("customer", related["_key"]) == interaction["customer"]
