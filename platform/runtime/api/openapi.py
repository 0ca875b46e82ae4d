"""The tenant's OpenAPI 3.1 document, generated from its published metadata.

Every entity becomes a record schema, create and patch payload schemas and
the paths of the record API (``metacrm.runtime.api.records``). The document
describes what the server does, not an ideal of it: the test suite runs
schemathesis against it, so a schema that promises more or less than the
server answers fails there.

``GET /t/<tenant>/api/v1/openapi.json`` serves the document and
``GET /t/<tenant>/api/v1/docs`` a reference page rendered from it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from metacrm.metadata import fieldtypes
from metacrm.metadata.model import FieldDef
from metacrm.runtime import importer, query, search
from metacrm.runtime.api import idempotency, records, reference
from metacrm.runtime.api.context import access, platform, resolve
from metacrm.runtime.model import EntityModel, TenantModel
from metacrm.runtime.query import INCLUDED
from metacrm.runtime.recordschema import COMPUTED_TYPES, MAX_RELATION_ITEMS

bp = Blueprint("openapi", __name__, url_prefix="/t/<tenant>/api/v1", template_folder="templates")

OPENAPI_VERSION = "3.1.0"
PROBLEM = "application/problem+json"
UUID = {"type": "string", "format": "uuid"}
DATETIME = {"type": "string", "format": "date-time"}
#: Decimals leave as strings, so no digit is lost; large or tiny ones may use an exponent.
DECIMAL_OUT = r"^-?[0-9]+(\.[0-9]+)?(E[+-]?[0-9]+)?$"
INT64 = (-(2**63), 2**63 - 1)
MASK = "********"

SYSTEM_SCHEMAS: dict[str, dict[str, Any]] = {
    "id": {**UUID, "description": "Time-ordered UUID (v7), set by the platform."},
    "owner_id": {"type": ["string", "null"], "format": "uuid", "description": "Owning user."},
    "team_id": {"type": ["string", "null"], "format": "uuid", "description": "Owning team."},
    "created_at": {**DATETIME, "description": "When the record was created (UTC)."},
    "created_by": {"type": ["string", "null"], "format": "uuid", "description": "Creator."},
    "updated_at": {**DATETIME, "description": "When the record last changed (UTC)."},
    "updated_by": {"type": ["string", "null"], "format": "uuid", "description": "Last editor."},
    "version": {
        "type": "integer",
        "minimum": 1,
        "description": "Grows by one with every change; the ETag is this number in quotes.",
    },
    "deleted_at": {
        "type": ["string", "null"],
        "format": "date-time",
        "description": "When the record went to the recycle bin; null for live records.",
    },
}

FORMULA_SCHEMAS: dict[str, dict[str, Any]] = {
    "text": {"type": "string"},
    "integer": {"type": "integer"},
    "decimal": {"type": "string", "pattern": DECIMAL_OUT},
    "boolean": {"type": "boolean"},
    "date": {"type": "string", "format": "date"},
    "datetime": DATETIME,
}

_EMAIL = r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+"
_PHONE = r"\+?[0-9 ()\-.]{3,32}"
_URL = r"[Hh][Tt][Tt][Pp][Ss]?://[^\s]+"


# -- field schemas ---------------------------------------------------------------------------


def _label(f: FieldDef) -> str:
    label = f.label
    english = label.get("en", f.name)
    chinese = label.get("zh-CN")
    return f"{english} ({chinese})" if chinese and chinese != english else english


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """Allow null besides the schema's own type(s)."""
    result = dict(schema)
    kind = result.get("type")
    if isinstance(kind, str):
        result["type"] = [kind, "null"]
    elif isinstance(kind, list) and "null" not in kind:
        result["type"] = [*kind, "null"]
    if "enum" in result and None not in result["enum"]:
        result["enum"] = [*result["enum"], None]
    if "anyOf" in result:
        result["anyOf"] = [*result["anyOf"], {"type": "null"}]
    return result


def _options(f: FieldDef, writing: bool) -> list[str]:
    """Return a select's option values; reads may still hold archived options."""
    return [o["value"] for o in f.get("options", []) if not (writing and o.get("archived"))]


def _text_schema(f: FieldDef, writing: bool) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "maxLength": fieldtypes.max_length(f)}
    if not writing:
        return schema
    if f.type == "text":
        if f.get("min_length"):
            schema["minLength"] = f.get("min_length")
        if f.get("pattern"):
            # An empty value is not checked against the pattern.
            schema["pattern"] = f"^$|^(?:{f.get('pattern')})$"
    elif f.type == "email":
        schema["pattern"] = f"^$|^{_EMAIL}$"
    elif f.type == "phone":
        schema["pattern"] = f"^$|^{_PHONE}$"
    elif f.type == "url":
        schema["pattern"] = f"^$|^{_URL}$"
    return schema


def _decimal_in(f: FieldDef) -> dict[str, Any]:
    precision, scale = fieldtypes.decimal_shape(f)
    whole = precision - scale
    fraction = rf"(\.[0-9]{{1,{scale}}})?" if scale else ""
    number: dict[str, Any] = {"type": "number"}
    if f.get("min") is not None:
        number["minimum"] = f.get("min")
    if f.get("max") is not None:
        number["maximum"] = f.get("max")
    return {
        "anyOf": [
            {"type": "string", "pattern": rf"^-?[0-9]{{1,{whole}}}{fraction}$"},
            number,
        ],
        "description": f"A decimal with up to {whole} digits before the point and {scale} after, "
        "best sent as a string; a JSON number is accepted too.",
    }


def value_schema(f: FieldDef, writing: bool) -> dict[str, Any]:
    """Return the JSON Schema of one field's value, as sent (``writing``) or as returned."""
    t = f.type
    schema: dict[str, Any]
    if t in ("text", "long_text", "rich_text", "email", "phone", "url"):
        return _text_schema(f, writing)
    if t == "encrypted_text":
        if writing:
            return {"type": "string", "maxLength": fieldtypes.max_length(f)}
        return {"type": "string", "enum": [MASK], "description": "Encrypted; always masked."}
    if t == "integer":
        low = f.get("min") if f.get("min") is not None else INT64[0]
        high = f.get("max") if f.get("max") is not None else INT64[1]
        return {"type": "integer", "format": "int64", "minimum": low, "maximum": high}
    if t in ("decimal", "currency", "percent"):
        if writing:
            return _decimal_in(f)
        return {"type": "string", "pattern": DECIMAL_OUT}
    if t == "boolean":
        return {"type": "boolean"}
    if t == "date":
        return {"type": "string", "format": "date"}
    if t == "datetime":
        schema = dict(DATETIME)
        if writing:
            schema["maxLength"] = 40
        return schema
    if t == "single_select":
        return {"type": "string", "enum": _options(f, writing)}
    if t in ("multi_select", "tags"):
        if t == "multi_select":
            items: dict[str, Any] = {"type": "string", "enum": _options(f, writing)}
        else:
            items = {"type": "string", "minLength": 1, "maxLength": 64}
        schema = {"type": "array", "items": items}
        if writing:
            schema.update(uniqueItems=True, maxItems=f.get("max_items", 100))
        return schema
    if t in ("lookup", "user"):
        schema = dict(UUID)
        if t == "lookup":
            schema["description"] = f"Id of a {f.get('target')} record."
        return schema
    if t == "related_to":
        return {
            "type": "object",
            "properties": {
                "entity": {"type": "string", "enum": list(f.get("targets"))},
                "id": UUID,
            },
            "required": ["entity", "id"],
            "additionalProperties": False,
        }
    if t == "many_to_many":
        schema = {"type": "array", "items": UUID}
        if writing:
            schema.update(uniqueItems=True, maxItems=MAX_RELATION_ITEMS)
        schema["description"] = f"Ids of linked {f.get('target')} records."
        return schema
    if t == "formula":
        return dict(FORMULA_SCHEMAS.get(f.get("result_type"), {"type": "string"}))
    if t == "auto_number":
        return {"type": "string"}
    # json, file and types a plugin adds: any JSON value.
    return {}


def _required_value(f: FieldDef, schema: dict[str, Any]) -> dict[str, Any]:
    """Tighten a required field's write schema: no null, no empty text or list."""
    result = dict(schema)
    if result.get("type") == "string" and "enum" not in result:
        result["minLength"] = max(1, result.get("minLength", 0))
        if "pattern" in result and result["pattern"].startswith("^$|"):
            result["pattern"] = result["pattern"][3:]
    if result.get("type") == "array":
        result["minItems"] = 1
    return result


def _describe(f: FieldDef, schema: dict[str, Any]) -> dict[str, Any]:
    result = {"title": _label(f), **schema}
    help_text = f.get("help", {}).get("en") if isinstance(f.get("help"), dict) else None
    notes = [n for n in (schema.get("description"), help_text) if n]
    if f.unique:
        notes.append("Unique.")
    if notes:
        result["description"] = " ".join(notes)
    return result


def _writable(entity: EntityModel) -> Iterator[FieldDef]:
    for f in entity.entity.active_fields():
        if f.type not in COMPUTED_TYPES and not f.read_only:
            yield f


# -- entity schemas --------------------------------------------------------------------------


def record_schema(model: TenantModel, entity: EntityModel, *, partial: bool) -> dict[str, Any]:
    """Return the schema of a record as the API returns it (``partial``: as lists may)."""
    properties: dict[str, Any] = {n: {**s, "readOnly": True} for n, s in SYSTEM_SCHEMAS.items()}
    for f in entity.entity.active_fields():
        schema = value_schema(f, writing=False)
        always = f.type == "many_to_many" or (
            f.required and f.type not in ("formula", "json", "file")
        )
        if not always and schema:
            schema = _nullable(schema)
        if f.type in COMPUTED_TYPES or f.read_only:
            schema["readOnly"] = True
        properties[f.name] = _describe(f, schema)
    names = list(SYSTEM_SCHEMAS) if partial else list(properties)
    lookups = {
        f.name: f.get("target")
        for f in entity.entity.active_fields()
        if f.type == "lookup" and f.get("target") in model.entities
    }
    if partial and lookups:
        properties[INCLUDED] = {
            "type": "object",
            "readOnly": True,
            "description": "With include=: the records the named lookups point at "
            "(null when the lookup is empty or its target is deleted).",
            "properties": {
                name: {"anyOf": [_ref(f"{target}.Record"), {"type": "null"}]}
                for name, target in lookups.items()
            },
            "additionalProperties": False,
        }
    return {
        "type": "object",
        "title": entity.entity.label.get("en", entity.name),
        "properties": properties,
        "required": names,
        "additionalProperties": False,
    }


def payload_schema(entity: EntityModel, *, creating: bool) -> dict[str, Any]:
    """Return the schema of a create or patch payload: writable fields only."""
    properties: dict[str, Any] = {}
    required = []
    for f in _writable(entity):
        schema = value_schema(f, writing=True)
        if f.required:
            schema = _required_value(f, schema)
        elif schema:
            schema = _nullable(schema)
        properties[f.name] = _describe(f, schema)
        if creating and f.required and not f.has_default and f.type != "many_to_many":
            required.append(f.name)
    payload: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
        "description": (
            "Fields of a new record. Defaults fill what is left out; system fields, "
            "formulas and auto-numbers are set by the platform."
            if creating
            else "Fields to change; fields left out keep their values, null clears one."
        )
        + " Validation rules and pipeline stage requirements are checked too.",
    }
    if required:
        payload["required"] = required
    return payload


# -- the document ----------------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _problems(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/{_RESPONSES[s][0]}"} for s in statuses}


_RESPONSES = {
    400: ("BadRequest", "The request is malformed: JSON, query, header or body shape."),
    401: ("Unauthorized", "No API token, or an unknown, expired or revoked one."),
    403: ("Forbidden", "The API token is read-only."),
    404: ("NotFound", "No such tenant, entity or record (ids that are not UUIDs name none)."),
    409: ("Conflict", "The record is not in the recycle bin, or other records point at it."),
    412: ("PreconditionFailed", "If-Match or a version does not match the record's version."),
    413: ("PayloadTooLarge", "The body is larger than the server accepts."),
    415: ("UnsupportedMediaType", "The body is not application/json."),
    422: ("Unprocessable", "The payload breaks the entity's rules; errors point at each problem."),
    428: ("PreconditionRequired", "The tenant requires If-Match (or versions) on updates."),
    503: ("Busy", "The database is busy with other changes; nothing changed, retry shortly."),
}

_CODES = {
    400: [
        "bad_request",
        "malformed_json",
        "invalid_query",
        "invalid_if_match",
        "invalid_idempotency_key",
    ],
    401: ["unauthorized"],
    403: ["forbidden"],
    404: ["not_found"],
    409: ["not_in_recycle_bin", "still_referenced"],
    412: ["version_mismatch"],
    413: ["payload_too_large"],
    415: ["unsupported_media_type"],
    422: ["validation_failed", "idempotency_key_reused"],
    428: ["precondition_required"],
    503: ["busy"],
}


def _components_responses() -> dict[str, Any]:
    result = {}
    for status, (name, description) in _RESPONSES.items():
        codes = ", ".join(f"`{c}`" for c in _CODES[status])
        result[name] = {
            "description": f"{description} Codes: {codes}.",
            "content": {PROBLEM: {"schema": _ref("Problem")}},
        }
    return result


_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An RFC 9457 problem document; branch on `code`.",
    "required": ["type", "title", "status", "code"],
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "code": {"type": "string", "pattern": "^[a-z][a-z_]*$"},
        "detail": {"type": "string"},
        "instance": {"type": ["string", "null"]},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["pointer", "message"],
                "properties": {
                    "pointer": {
                        "type": "string",
                        "description": "JSON Pointer into the body, or /<parameter>.",
                    },
                    "message": {"type": "string"},
                    "line": {"type": "integer", "minimum": 1},
                    "column": {"type": "integer", "minimum": 1},
                    "current_version": {"type": "integer", "minimum": 1},
                },
            },
        },
        "current_version": {"type": "integer", "minimum": 1},
        "query_code": {"type": "string"},
    },
}


def _parameters() -> dict[str, Any]:
    limit = {
        "type": "integer",
        "minimum": 1,
        "maximum": records.MAX_LIMIT,
        "default": records.DEFAULT_LIMIT,
    }
    return {
        "filter": {
            "name": "filter",
            "in": "query",
            "description": "An expression in metacrm's expression language, e.g. "
            '`amount >= 1000 and stage in ("won", "lost")`. Errors say the line and column.',
            "schema": {"type": "string"},
        },
        "limit": {
            "name": "limit",
            "in": "query",
            "description": f"Records per page, 1 to {records.MAX_LIMIT}.",
            "schema": limit,
        },
        "cursor": {
            "name": "cursor",
            "in": "query",
            "description": "The `next_cursor` of the previous page, unchanged (signed; "
            "valid only with the same filter, sort and search).",
            "schema": {"type": "string"},
        },
        "deleted": {
            "name": "deleted",
            "in": "query",
            "description": "true: the recycle bin instead of live records.",
            "schema": {"type": "boolean", "default": False},
        },
        "exact": {
            "name": "exact",
            "in": "query",
            "description": f"true: count exactly even above {records.COUNT_THRESHOLD:,} matches.",
            "schema": {"type": "boolean", "default": False},
        },
        "id": {
            "name": "id",
            "in": "path",
            "required": True,
            "description": "The record's id.",
            "schema": UUID,
        },
        "if_match": {
            "name": "If-Match",
            "in": "header",
            "description": 'The record\'s ETag (`"<version>"`), or `*`: the change is made only '
            "if the record is still at that version (else 412).",
            "schema": {"type": "string"},
        },
        "idempotency_key": {
            "name": idempotency.HEADER,
            "in": "header",
            "description": "A key of your choice: a retry with the same key and body returns the "
            "first answer (marked `Idempotent-Replayed: true`) and changes nothing again; the "
            "same key with another body is refused (422 idempotency_key_reused). Kept 24 hours.",
            "schema": {"type": "string", "pattern": f"^{idempotency.KEY_PATTERN}$"},
        },
    }


def _param(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/parameters/{name}"}


def _names_pattern(names: list[str], sign: bool = False) -> str:
    one = ("[-+]?" if sign else "") + "(?:" + "|".join(names) + ")"
    return f"^{one}(?:,{one})*$"


def sortable_fields(entity: EntityModel) -> list[str]:
    """Return the names a list of this entity can be sorted by (system columns first)."""
    names = ["id", "owner_id", "created_at", "updated_at", "deleted_at"]
    for f in entity.entity.active_fields():
        info = entity.scope.fields.get(f.name)
        ft = fieldtypes.get(f.type)
        if info is None or not (ft.sortable and info.filterable):
            continue
        if f.type == "formula" or (ft.stored and ft.column_names(f) == [f.name]):
            names.append(f.name)
    return names


def _list_parameters(model: TenantModel, entity: EntityModel) -> list[dict[str, Any]]:
    """Return the parameters of a list of one entity, with its own field names."""
    fields = [*SYSTEM_SCHEMAS, *(f.name for f in entity.entity.active_fields())]
    lookups = [
        f.name
        for f in entity.entity.active_fields()
        if f.type == "lookup" and f.get("target") in model.entities
    ]
    sortable = sortable_fields(entity)
    searchable = search.search_fields(entity)
    params: list[dict[str, Any]] = [
        _param("filter"),
        {
            "name": "sort",
            "in": "query",
            "description": "Comma-separated fields, `-` before a name for descending (default "
            f"`{query.DEFAULT_SORT}`). Sortable: {', '.join(sortable)}.",
            "schema": {"type": "string", "pattern": _names_pattern(sortable, sign=True)},
        },
        {
            "name": "fields",
            "in": "query",
            "description": "Comma-separated fields to return; system fields always come.",
            "schema": {"type": "string", "pattern": _names_pattern(fields)},
        },
        _param("limit"),
        _param("cursor"),
        {
            "name": "q",
            "in": "query",
            "description": (
                f"Search text, found as a substring of {', '.join(searchable)} (any case)."
                if searchable
                else "This entity has no search fields: any search is refused (400)."
            ),
            "schema": {"type": "string", "maxLength": query.MAX_SEARCH_LENGTH},
        },
    ]
    if lookups:
        params.append(
            {
                "name": "include",
                "in": "query",
                "description": "Comma-separated lookup fields whose records are embedded "
                "under `_included`.",
                "schema": {"type": "string", "pattern": _names_pattern(lookups)},
            }
        )
    return params


_ETAG_HEADER = {
    "ETag": {
        "description": 'The record\'s version as a strong tag: `"3"`.',
        "schema": {"type": "string"},
    }
}
_REPLAYED_HEADER = {
    idempotency.REPLAYED_HEADER: {
        "description": "`true` when the answer is replayed for a repeated Idempotency-Key.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}


def _body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"required": True, "description": description, "content": _json(schema)}


def _entity_paths(model: TenantModel, entity: EntityModel) -> dict[str, Any]:
    name = entity.name
    label = entity.entity.doc.get("plural_label", {}).get("en", name)
    tag = name
    record, create, patch, page = (
        _ref(f"{name}.Record"),
        _ref(f"{name}.Create"),
        _ref(f"{name}.Patch"),
        _ref(f"{name}.Page"),
    )
    base = f"/records/{name}"
    one = f"{base}/{{id}}"
    ok_record = {
        "description": "The record.",
        "headers": _ETAG_HEADER,
        "content": _json(record),
    }
    no_content = {"description": "Done; no body."}
    paths: dict[str, Any] = {
        base: {
            "get": {
                "tags": [tag],
                "operationId": f"list_{name}",
                "summary": f"List {label}",
                "description": "Keyset pages: follow `next_cursor` until it is null.",
                "parameters": [*_list_parameters(model, entity), _param("deleted")],
                "responses": {
                    "200": {"description": "One page.", "content": _json(page)},
                    **_problems(400, 401, 404),
                },
            },
            "post": {
                "tags": [tag],
                "operationId": f"create_{name}",
                "summary": f"Create a {entity.entity.label.get('en', name)}",
                "parameters": [_param("idempotency_key")],
                "requestBody": _body(create, "The new record's fields."),
                "responses": {
                    "201": {
                        "description": "Created.",
                        "headers": {
                            "Location": {
                                "description": "The record's URL.",
                                "schema": {"type": "string"},
                            },
                            **_ETAG_HEADER,
                            **_REPLAYED_HEADER,
                        },
                        "content": _json(record),
                    },
                    **_problems(400, 401, 403, 404, 413, 415, 422, 503),
                },
            },
        },
        f"{base}/count": {
            "get": {
                "tags": [tag],
                "operationId": f"count_{name}",
                "summary": f"Count {label}",
                "description": f"Exact up to {records.COUNT_THRESHOLD:,} matches; above that an "
                "estimate with `exact: false`, unless `exact=true` is asked for.",
                "parameters": [
                    _param("filter"),
                    next(p for p in _list_parameters(model, entity) if p.get("name") == "q"),
                    _param("deleted"),
                    _param("exact"),
                ],
                "responses": {
                    "200": {"description": "The count.", "content": _json(_ref("Count"))},
                    **_problems(400, 401, 404),
                },
            }
        },
        f"{base}/export": {
            "get": {
                "tags": [tag],
                "operationId": f"export_{name}",
                "summary": f"Export {label}",
                "description": "Every record the caller may export (the `export` action's "
                "scope), streamed as CSV or JSON Lines; audited. CSV cells that a spreadsheet "
                "would run as formulas start with `'`.",
                "parameters": [
                    {
                        "name": "format",
                        "in": "query",
                        "description": "`csv` (default) or `jsonl` (one JSON object per line).",
                        "schema": {"type": "string", "enum": ["csv", "jsonl"], "default": "csv"},
                    },
                    *(
                        p
                        for p in _list_parameters(model, entity)
                        if p.get("name") in ("sort", "fields")
                    ),
                    _param("filter"),
                    {
                        "name": "bom",
                        "in": "query",
                        "description": "true: start the CSV with a UTF-8 byte order mark "
                        "(Microsoft Excel needs it to read UTF-8).",
                        "schema": {"type": "boolean", "default": False},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The file, as an attachment.",
                        "content": {
                            "text/csv": {"schema": {"type": "string"}},
                            "application/x-ndjson": {"schema": {"type": "string"}},
                        },
                    },
                    **_problems(400, 401, 403, 404),
                },
            }
        },
        f"{base}/import": {
            "post": {
                "tags": [tag],
                "operationId": f"import_{name}",
                "summary": f"Import {label}",
                "description": "Create records from a CSV or JSON Lines file, all or none, "
                "through the same checks as a create (needs the `import` and `create` "
                "actions); audited. CSV columns are field API names or labels; errors name "
                "the file's `row` and point at `/rows/<row>/<field>`.",
                "parameters": [
                    {
                        "name": "format",
                        "in": "query",
                        "description": "`csv` or `jsonl`; by default from the Content-Type.",
                        "schema": {"type": "string", "enum": list(importer.FORMATS)},
                    },
                    {
                        "name": "encoding",
                        "in": "query",
                        "description": "`utf-8` (default; a byte order mark is skipped) or "
                        "`gb18030` (files saved by a Chinese Excel).",
                        "schema": {
                            "type": "string",
                            "enum": list(importer.ENCODINGS),
                            "default": "utf-8",
                        },
                    },
                    {
                        "name": "delimiter",
                        "in": "query",
                        "description": "CSV only: `,` (default), `;` or `tab`.",
                        "schema": {
                            "type": "string",
                            "enum": list(importer.DELIMITERS),
                            "default": ",",
                        },
                    },
                    {
                        "name": "skip",
                        "in": "query",
                        "description": "CSV only: header texts of columns to leave out, "
                        "comma-separated (every one must be a column of the file).",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "dry_run",
                        "in": "query",
                        "description": "true: check every row, store nothing (answers 200).",
                        "schema": {"type": "boolean", "default": False},
                    },
                    _param("idempotency_key"),
                ],
                "requestBody": {
                    "required": True,
                    "description": "The file.",
                    "content": {
                        "text/csv": {"schema": {"type": "string"}},
                        "application/x-ndjson": {"schema": {"type": "string"}},
                    },
                },
                "responses": {
                    "200": {
                        "description": "Dry run: every row passed; nothing was stored.",
                        "content": _json(_ref("ImportResult")),
                    },
                    "201": {
                        "description": "Imported.",
                        "headers": _REPLAYED_HEADER,
                        "content": _json(_ref("ImportResult")),
                    },
                    **_problems(400, 401, 403, 404, 413, 415, 422, 503),
                },
            }
        },
        one: {
            "parameters": [_param("id")],
            "get": {
                "tags": [tag],
                "operationId": f"get_{name}",
                "summary": "Read one record",
                "parameters": [
                    {**_parameters()["deleted"], "description": "true: read from the bin."}
                ],
                "responses": {"200": ok_record, **_problems(400, 401, 404)},
            },
            "patch": {
                "tags": [tag],
                "operationId": f"update_{name}",
                "summary": "Change fields of a record",
                "parameters": [_param("if_match")],
                "requestBody": _body(patch, "The fields to change."),
                "responses": {
                    "200": ok_record,
                    **_problems(400, 401, 403, 404, 412, 413, 415, 422, 428, 503),
                },
            },
            "delete": {
                "tags": [tag],
                "operationId": f"delete_{name}",
                "summary": "Move a record to the recycle bin",
                "parameters": [_param("if_match")],
                "responses": {"204": no_content, **_problems(400, 401, 403, 404, 412, 503)},
            },
        },
        f"{one}/restore": {
            "parameters": [_param("id")],
            "post": {
                "tags": [tag],
                "operationId": f"restore_{name}",
                "summary": "Bring a record back from the recycle bin",
                "parameters": [_param("idempotency_key")],
                "responses": {
                    "200": {
                        **ok_record,
                        "headers": {**_ETAG_HEADER, **_REPLAYED_HEADER},
                    },
                    **_problems(400, 401, 403, 404, 422, 503),
                },
            },
        },
        f"{one}/purge": {
            "parameters": [_param("id")],
            "delete": {
                "tags": [tag],
                "operationId": f"purge_{name}",
                "summary": "Delete a record from the recycle bin for good",
                "responses": {"204": no_content, **_problems(400, 401, 403, 404, 409, 503)},
            },
        },
        f"{base}/bulk": {
            "post": {
                "tags": [tag],
                "operationId": f"bulk_create_{name}",
                "summary": f"Create up to {records.MAX_BULK_ITEMS} records, all or none",
                "description": "Errors point at `/items/<index>/<field>`.",
                "parameters": [_param("idempotency_key")],
                "requestBody": _body(_ref(f"{name}.BulkCreate"), "The records to create."),
                "responses": {
                    "201": {
                        "description": "Created, in the order sent.",
                        "headers": _REPLAYED_HEADER,
                        "content": _json(_ref(f"{name}.Items")),
                    },
                    **_problems(400, 401, 403, 404, 413, 415, 422, 503),
                },
            },
            "patch": {
                "tags": [tag],
                "operationId": f"bulk_update_{name}",
                "summary": f"Change up to {records.MAX_BULK_ITEMS} records, all or none",
                "description": "Errors point at `/items/<index>/fields/<field>`; a stale "
                "`version` answers 412 with an error per stale item.",
                "requestBody": _body(_ref(f"{name}.BulkPatch"), "The changes."),
                "responses": {
                    "200": {
                        "description": "The changed records, in the order sent.",
                        "content": _json(_ref(f"{name}.Items")),
                    },
                    **_problems(400, 401, 403, 404, 412, 413, 415, 422, 428, 503),
                },
            },
        },
        f"{base}/bulk/delete": {
            "post": {
                "tags": [tag],
                "operationId": f"bulk_delete_{name}",
                "summary": f"Move up to {records.MAX_BULK_ITEMS} records to the recycle bin",
                "parameters": [_param("idempotency_key")],
                "requestBody": _body(_ref("BulkDelete"), "The ids."),
                "responses": {
                    "204": {"description": "Done; no body.", "headers": _REPLAYED_HEADER},
                    **_problems(400, 401, 403, 404, 413, 415, 422, 503),
                },
            }
        },
    }
    for other in model.entities.values():
        if _points_at(other, name):
            paths[f"{one}/related/{other.name}"] = {
                "parameters": [_param("id")],
                "get": {
                    "tags": [tag],
                    "operationId": f"related_{name}_{other.name}",
                    "summary": f"List the {other.name} records that point at this {name}",
                    "parameters": _list_parameters(model, other),
                    "responses": {
                        "200": {
                            "description": "One page.",
                            "content": _json(_ref(f"{other.name}.Page")),
                        },
                        **_problems(400, 401, 404),
                    },
                },
            }
    return paths


def _points_at(other: EntityModel, name: str) -> bool:
    for f in other.entity.active_fields():
        if f.type in ("lookup", "many_to_many") and f.get("target") == name:
            return True
        if f.type == "related_to" and name in f.get("targets", []):
            return True
    return False


def _entity_schemas(model: TenantModel, entity: EntityModel) -> dict[str, Any]:
    name = entity.name
    return {
        f"{name}.Record": record_schema(model, entity, partial=False),
        f"{name}.ListItem": record_schema(model, entity, partial=True),
        f"{name}.Create": payload_schema(entity, creating=True),
        f"{name}.Patch": payload_schema(entity, creating=False),
        f"{name}.Page": {
            "type": "object",
            "required": ["items", "next_cursor"],
            "properties": {
                "items": {"type": "array", "items": _ref(f"{name}.ListItem")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "Pass as `cursor` for the next page; null on the last.",
                },
            },
            "additionalProperties": False,
        },
        f"{name}.Items": {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": _ref(f"{name}.Record")}},
            "additionalProperties": False,
        },
        f"{name}.BulkCreate": {
            "type": "object",
            "required": ["items"],
            "properties": {
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": records.MAX_BULK_ITEMS,
                    "items": _ref(f"{name}.Create"),
                }
            },
            "additionalProperties": False,
        },
        f"{name}.BulkPatch": {
            "type": "object",
            "required": ["items"],
            "properties": {
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": records.MAX_BULK_ITEMS,
                    "items": {
                        "type": "object",
                        "required": ["id", "fields"],
                        "properties": {
                            "id": UUID,
                            "version": {
                                "type": "integer",
                                "minimum": 1,
                                "description": "Change only if the record is at this version.",
                            },
                            "fields": _ref(f"{name}.Patch"),
                        },
                        "additionalProperties": False,
                    },
                }
            },
            "additionalProperties": False,
        },
    }


@functools.lru_cache(maxsize=64)
def _document(model: TenantModel, slug: str, tenant_name: str) -> dict[str, Any]:
    schemas: dict[str, Any] = {
        "Problem": _PROBLEM_SCHEMA,
        "Count": {
            "type": "object",
            "required": ["count", "exact"],
            "properties": {
                "count": {"type": "integer", "minimum": 0},
                "exact": {"type": "boolean", "description": "false: the count is an estimate."},
            },
            "additionalProperties": False,
        },
        "ImportResult": {
            "type": "object",
            "required": ["entity", "format", "dry_run", "rows", "created", "columns"],
            "properties": {
                "entity": {"type": "string"},
                "format": {"type": "string", "enum": list(importer.FORMATS)},
                "dry_run": {"type": "boolean"},
                "rows": {"type": "integer", "minimum": 0, "description": "Records read."},
                "created": {"type": "integer", "minimum": 0, "description": "0 on a dry run."},
                "columns": {
                    "type": "object",
                    "description": "CSV: each used column's header and the field it fills.",
                    "additionalProperties": {"type": "string"},
                },
                "ignored_columns": {
                    "type": "array",
                    "description": "CSV: columns of system values and computed fields.",
                    "items": {"type": "string"},
                },
            },
            "additionalProperties": False,
        },
        "BulkDelete": {
            "type": "object",
            "required": ["ids"],
            "properties": {
                "ids": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": records.MAX_BULK_ITEMS,
                    "uniqueItems": True,
                    "items": UUID,
                }
            },
            "additionalProperties": False,
        },
    }
    paths: dict[str, Any] = {}
    tags = []
    for entity in sorted(model.entities.values(), key=lambda e: e.name):
        schemas.update(_entity_schemas(model, entity))
        paths.update(_entity_paths(model, entity))
        label = entity.entity.doc.get("plural_label", {})
        tags.append({"name": entity.name, "description": label.get("en", entity.name)})
    paths["/openapi.json"] = {
        "get": {
            "tags": ["api"],
            "operationId": "openapi",
            "summary": "This document",
            "responses": {
                "200": {
                    "description": "The OpenAPI 3.1 document of this tenant's API.",
                    "content": _json({"type": "object"}),
                },
                **_problems(401, 404),
            },
        }
    }
    paths["/docs"] = {
        "get": {
            "tags": ["api"],
            "operationId": "docs",
            "summary": "This document as a reference page",
            "responses": {
                "200": {
                    "description": "An HTML page.",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                },
                **_problems(401, 404),
            },
        }
    }
    tags.append({"name": "api", "description": "The API's own description"})
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": f"{tenant_name} — metacrm API",
            "version": f"{model.version}",
            "description": (
                "The record API of this tenant, generated from its published metadata "
                f"(version {model.version}). Every error is an RFC 9457 problem document "
                "(`application/problem+json`) with a stable `code`."
            ),
        },
        "servers": [{"url": f"/t/{slug}/api/v1"}],
        "security": [{"bearer": []}],
        "tags": tags,
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token: `Authorization: Bearer mcrm_…`.",
                }
            },
            "schemas": schemas,
            "parameters": _parameters(),
            "responses": _components_responses(),
        },
    }


def document(model: TenantModel, slug: str, tenant_name: str) -> dict[str, Any]:
    """Return the OpenAPI document of a tenant's published model (cached per version)."""
    return _document(model, slug, tenant_name)


def _current_document(tenant: str) -> dict[str, Any]:
    """The caller's document: only the entities it may read, without its hidden fields."""
    context = resolve(tenant)
    with context.store.connect() as connection:
        model = platform().models.current(context.store, connection)
    view = access(context, model).view(model, readable_only=True)
    return document(view, context.tenant.slug, context.tenant.name)


@bp.get("/openapi.json")
def openapi_json(tenant: str) -> Response:
    """Return the tenant's OpenAPI 3.1 document."""
    return jsonify(_current_document(tenant))


@bp.get("/docs")
def docs(tenant: str) -> Response:
    """Return a readable API reference page, rendered from the OpenAPI document."""
    return Response(reference.render(_current_document(tenant)), mimetype="text/html")
