"""Marshmallow schemas generated from field metadata: what a record payload may hold.

Each field's value goes through its field type's ``coerce`` (the same rules the
metadata validator applies to defaults), so there is one definition of what a
valid value is. Unknown fields, system columns, computed and read-only fields
are refused here with messages that say why.
"""

from __future__ import annotations

import difflib
import functools
import uuid
from collections.abc import Mapping
from typing import Any

import marshmallow as ma

from metacrm.metadata import fieldtypes
from metacrm.metadata.fieldtypes import ValueProblem
from metacrm.metadata.model import FieldDef
from metacrm.runtime.model import EntityModel
from metacrm.runtime.recordview import SYSTEM_FIELDS

MAX_RELATION_ITEMS = 1000
COMPUTED_TYPES = ("formula", "auto_number")


def _uuid(value: Any) -> uuid.UUID:
    if not isinstance(value, str) or len(value) > 36:
        raise ValueProblem("must be a record id (a UUID string)")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValueProblem("must be a record id (a UUID string)") from None


class MetadataField(ma.fields.Field):
    """A marshmallow field whose rules come from a metadata field definition."""

    def __init__(self, definition: FieldDef, **kwargs: Any) -> None:
        super().__init__(allow_none=True, **kwargs)
        self.definition = definition

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        f = self.definition
        try:
            if f.type in ("lookup", "user"):
                return _uuid(value)
            if f.type == "related_to":
                return self._related_to(value)
            if f.type == "many_to_many":
                return self._relation(value)
            return fieldtypes.get(f.type).coerce(f, value)
        except ValueProblem as exc:
            raise ma.ValidationError(str(exc)) from None

    def _related_to(self, value: Any) -> tuple[str, uuid.UUID]:
        targets = self.definition.get("targets", [])
        if not isinstance(value, Mapping) or set(value) != {"entity", "id"}:
            raise ValueProblem('must be {"entity": …, "id": …}')
        if value["entity"] not in targets:
            raise ValueProblem(f"entity must be one of: {', '.join(targets)}")
        return value["entity"], _uuid(value["id"])

    def _relation(self, value: Any) -> list[uuid.UUID]:
        if not isinstance(value, list):
            raise ValueProblem("must be a list of record ids")
        if len(value) > MAX_RELATION_ITEMS:
            raise ValueProblem(f"has {len(value)} items; the limit is {MAX_RELATION_ITEMS}")
        ids = [_uuid(v) for v in value]
        if len(set(ids)) != len(ids):
            raise ValueProblem("must not repeat a record id")
        return ids


def _refusal(entity: EntityModel, name: str) -> str | None:
    if name in SYSTEM_FIELDS:
        return "is set by the platform and cannot be written"
    f = entity.entity.fields.get(name)
    if f is None or f.archived:
        close = difflib.get_close_matches(name, [x.name for x in entity.entity.active_fields()], 1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"is not a field of '{entity.name}'{hint}"
    if f.type in COMPUTED_TYPES:
        return "is computed by the platform and cannot be written"
    if f.read_only:
        return "is read-only"
    return None


@functools.lru_cache(maxsize=1024)
def payload_schema(entity: EntityModel) -> ma.Schema:
    """Return the schema of a payload for one entity (all fields optional)."""
    declared = {
        f.name: MetadataField(f)
        for f in entity.entity.active_fields()
        if f.type not in COMPUTED_TYPES and not f.read_only
    }
    return ma.Schema.from_dict(declared, name=f"{entity.name.title()}PayloadSchema")(
        unknown=ma.RAISE
    )


def load_payload(entity: EntityModel, data: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
    """Return (values, errors): coerced values, and a message per refused field."""
    errors: dict[str, str] = {}
    for name in data:
        problem = _refusal(entity, str(name))
        if problem:
            errors[str(name)] = problem
    allowed = {k: v for k, v in data.items() if k not in errors}
    try:
        values = payload_schema(entity).load(allowed)
    except ma.ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"": exc.messages}
        for name, problem in messages.items():
            errors[str(name)] = problem[0] if isinstance(problem, list) else str(problem)
        values = dict(exc.valid_data or {}) if isinstance(exc.valid_data, dict) else {}
    return values, errors
