"""A readable API reference page, rendered on the server from the OpenAPI document.

The page is plain HTML and CSS (no script, nothing from a CDN): a table of
contents, then per entity its operations with their parameters, bodies and
answers, and the fields of its record and payloads. It is built from the same
document clients and schemathesis read, so it cannot drift from it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flask import render_template
from markupsafe import Markup, escape

METHODS = ("get", "post", "patch", "put", "delete")
#: Longer patterns (lists of field names) are left to the JSON document.
MAX_SHOWN_PATTERN = 60
_CODE = re.compile(r"`([^`]+)`")


@dataclass
class Row:
    """One parameter or field, as a table row."""

    name: str
    kind: str
    required: bool
    notes: str


@dataclass
class Operation:
    """One method on one path."""

    method: str
    path: str
    short: str
    anchor: str
    summary: str
    description: str
    parameters: list[Row]
    body: str | None
    body_anchor: str | None
    responses: list[tuple[str, str, str]]


@dataclass
class SchemaView:
    """One named schema with its fields."""

    name: str
    anchor: str
    title: str
    description: str
    rows: list[Row]


@dataclass
class Section:
    """One tag (an entity, or the API itself)."""

    name: str
    description: str
    operations: list[Operation] = field(default_factory=list)
    schemas: list[SchemaView] = field(default_factory=list)


def _resolve(doc: Mapping[str, Any], item: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = item.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return item
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _ref_name(schema: Mapping[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def anchor(text: str) -> str:
    """Return an HTML id for a schema or operation name."""
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def describe(schema: Mapping[str, Any]) -> str:
    """Summarise a schema in a few words: type, format, limits, choices."""
    if not schema:
        return "any JSON"
    name = _ref_name(schema)
    if name:
        return name
    if "anyOf" in schema:
        return " or ".join(describe(s) for s in schema["anyOf"])
    kind = schema.get("type", "any")
    kinds = [kind] if isinstance(kind, str) else list(kind)
    nullable = "null" in kinds
    kinds = [k for k in kinds if k != "null"]
    text = " | ".join(kinds) or "any"
    if "format" in schema:
        text += f" ({schema['format']})"
    if "enum" in schema:
        values = [v for v in schema["enum"] if v is not None]
        text = "one of " + ", ".join(f"“{v}”" for v in values)
    if kinds == ["array"] and "items" in schema:
        text = f"array of {describe(schema['items'])}"
    if kinds == ["object"] and "properties" in schema and not schema.get("title"):
        text = "object {" + ", ".join(schema["properties"]) + "}"
    if nullable:
        text += ", or null"
    return text


def _limits(schema: Mapping[str, Any]) -> list[str]:
    notes = []
    for key, label in (
        ("minLength", "at least {} characters"),
        ("maxLength", "at most {} characters"),
        ("minItems", "at least {} items"),
        ("maxItems", "at most {} items"),
        ("minimum", "≥ {}"),
        ("maximum", "≤ {}"),
        ("pattern", "matches {}"),
        ("default", "default {}"),
    ):
        if key not in schema:
            continue
        value = schema[key]
        if key == "pattern" and len(value) > MAX_SHOWN_PATTERN:
            continue
        if key == "default":
            value = json.dumps(value, ensure_ascii=False)
        notes.append(label.format(value))
    if schema.get("uniqueItems"):
        notes.append("no repeats")
    if schema.get("readOnly"):
        notes.append("read-only")
    if schema.get("writeOnly"):
        notes.append("write-only")
    return notes


def _row(name: str, schema: Mapping[str, Any], required: bool, description: str = "") -> Row:
    notes = [n for n in (schema.get("title"), description or schema.get("description")) if n]
    notes.extend(_limits(schema))
    return Row(name, describe(schema), required, " · ".join(str(n).rstrip(".") for n in notes))


def _schema_view(doc: Mapping[str, Any], name: str, schema: Mapping[str, Any]) -> SchemaView:
    required = set(schema.get("required", []))
    rows = [_row(prop, sub, prop in required) for prop, sub in schema.get("properties", {}).items()]
    return SchemaView(
        name, anchor(name), schema.get("title", name), schema.get("description", ""), rows
    )


def _operation(
    doc: Mapping[str, Any], path: str, method: str, item: Mapping[str, Any]
) -> Operation:
    operation = item[method]
    params = [
        _resolve(doc, p) for p in [*item.get("parameters", []), *operation.get("parameters", [])]
    ]
    rows = [
        _row(
            f"{p['name']} ({p['in']})",
            p.get("schema", {}),
            bool(p.get("required")),
            p.get("description", ""),
        )
        for p in params
    ]
    body = body_anchor = None
    if "requestBody" in operation:
        content = operation["requestBody"]["content"]
        media, spec = next(iter(content.items()))
        body = f"{describe(spec['schema'])} ({media})"
        name = _ref_name(spec["schema"])
        body_anchor = anchor(name) if name else None
    responses = []
    for status, response in operation["responses"].items():
        response = _resolve(doc, response)
        content = response.get("content", {})
        what = ", ".join(
            f"{describe(spec.get('schema', {}))} ({media})" for media, spec in content.items()
        )
        responses.append((status, response.get("description", ""), what))
    parts = path.split("/")
    short = "/" + "/".join(parts[3:]) if path.startswith("/records/") else path
    return Operation(
        method.upper(),
        path,
        short if short != "/" else f"/records/{parts[2]}",
        anchor(operation.get("operationId", f"{method}-{path}")),
        operation.get("summary", ""),
        operation.get("description", ""),
        rows,
        body,
        body_anchor,
        responses,
    )


def sections(doc: Mapping[str, Any]) -> list[Section]:
    """Group the document's operations and schemas by tag, in the document's tag order."""
    by_tag = {t["name"]: Section(t["name"], t.get("description", "")) for t in doc["tags"]}
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                tag = item[method].get("tags", ["api"])[0]
                by_tag.setdefault(tag, Section(tag, "")).operations.append(
                    _operation(doc, path, method, item)
                )
    for name, schema in doc["components"]["schemas"].items():
        owner = name.split(".", 1)[0] if "." in name else "api"
        by_tag.setdefault(owner, Section(owner, "")).schemas.append(_schema_view(doc, name, schema))
    return list(by_tag.values())


def inline_code(text: str) -> Markup:
    """Escape text and show its `backquoted` parts as code."""
    return Markup(_CODE.sub(r"<code>\1</code>", str(escape(text))))


def render(doc: Mapping[str, Any]) -> str:
    """Return the reference page of an OpenAPI document as HTML."""
    codes = []
    for name, response in doc["components"]["responses"].items():
        codes.append((name, response["description"]))
    return render_template(
        "api/reference.html",
        doc=doc,
        info=doc["info"],
        server=doc["servers"][0]["url"],
        sections=sections(doc),
        responses=codes,
        code=inline_code,
    )
