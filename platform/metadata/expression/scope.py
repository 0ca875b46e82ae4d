"""What an expression can see: value types, fields, and the entity they belong to."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class ValueType(enum.Enum):
    """The type of a field or of any part of an expression."""

    TEXT = "text"
    INTEGER = "integer"
    DECIMAL = "decimal"
    BOOLEAN = "boolean"
    DATE = "date"
    DATETIME = "datetime"
    UUID = "uuid"
    LIST = "list"
    JSON = "json"
    NULL = "null"

    @property
    def label(self) -> str:
        """Name the type the way an admin reads it in an error message."""
        return _LABELS[self]


_LABELS = {
    ValueType.TEXT: "text",
    ValueType.INTEGER: "number",
    ValueType.DECIMAL: "number",
    ValueType.BOOLEAN: "true/false",
    ValueType.DATE: "date",
    ValueType.DATETIME: "date and time",
    ValueType.UUID: "record id",
    ValueType.LIST: "list",
    ValueType.JSON: "JSON",
    ValueType.NULL: "null",
}


@dataclass(frozen=True)
class FieldInfo:
    """One field as the expression language sees it.

    ``target`` is set for lookups: the scope of the entity the lookup points
    to, which is what allows one hop such as ``customer.level``.
    """

    type: ValueType
    target: Scope | None = None
    filterable: bool = True


@dataclass(frozen=True)
class Scope:
    """The fields of one entity, by name."""

    entity: str
    fields: Mapping[str, FieldInfo]
