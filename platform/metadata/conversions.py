"""Which field-type changes keep data, and how each value converts.

A change of type is allowed only where a value-by-value rule exists. The same
rule serves three purposes: finding the rows that would not convert (so a
refusal can name them), converting values on SQLite, and choosing the
``USING`` cast on PostgreSQL, which accepts everything the check accepts.
"""

from __future__ import annotations

import datetime as dt
import decimal
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metacrm.metadata import fieldtypes
from metacrm.metadata.fieldtypes import ValueProblem
from metacrm.metadata.model import FieldDef

TEXT_TYPES = {"text", "long_text", "rich_text", "email", "phone", "url", "single_select"}
DECIMAL_TYPES = {"decimal", "currency", "percent"}
#: The whitespace both sides strip: Python's str.strip() would also strip Unicode
#: spaces, which PostgreSQL's btrim() keeps, and the backends must agree.
_SPACE = " \t\n\r\f\v"
_PG_TRIM = "btrim({col}, E' \\t\\n\\r\\f\\v')"
_INTEGER_TEXT = re.compile(r"[+-]?\d{1,18}", re.ASCII)
_DECIMAL_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)", re.ASCII)


@dataclass(frozen=True)
class Conversion:
    """How stored values of one field shape become values of another."""

    #: Value as read from the old column -> value for the new column; raises ValueProblem.
    convert: Callable[[Any], Any]
    #: PostgreSQL ``USING`` expression; ``{col}`` is the quoted column name.
    using: str
    #: True when every old value converts, so no rows need checking.
    always: bool = False


def _then_coerce(new: FieldDef, step: Callable[[Any], Any]) -> Callable[[Any], Any]:
    ft = fieldtypes.get(new.type)

    def convert(value: Any) -> Any:
        return ft.coerce(new, step(value))

    return convert


def _text_to_int(value: str) -> int:
    text = value.strip(_SPACE)
    if not _INTEGER_TEXT.fullmatch(text):
        raise ValueProblem(f"{value!r} is not a whole number")
    return int(text)


def _text_to_decimal(value: str) -> decimal.Decimal:
    text = value.strip(_SPACE)
    if not _DECIMAL_TEXT.fullmatch(text):
        raise ValueProblem(f"{value!r} is not a number")
    return decimal.Decimal(text)


def _decimal_to_int(value: Any) -> int:
    number = decimal.Decimal(value)
    if number != number.to_integral_value():
        raise ValueProblem(f"{value} has a fractional part")
    return int(number)


def _text_to_bool(value: str) -> bool:
    text = value.strip(_SPACE).lower()
    if text not in ("true", "false"):
        raise ValueProblem(f"{value!r} is neither true nor false")
    return text == "true"


def _number_text(value: Any) -> str:
    return str(value)


def _sql_type(f: FieldDef) -> str:
    """Return the PostgreSQL type a field's column has."""
    if f.type in DECIMAL_TYPES:
        precision, scale = fieldtypes.decimal_shape(f)
        return f"numeric({precision},{scale})"
    if f.type in ("long_text", "rich_text"):
        return "text"
    if f.type in TEXT_TYPES:
        return f"varchar({fieldtypes.max_length(f) if f.type != 'single_select' else 63})"
    return {"integer": "bigint", "date": "date", "boolean": "boolean"}.get(f.type, "text")


def conversion(old: FieldDef, new: FieldDef) -> Conversion | None:
    """Return how ``old``'s stored values become ``new``'s, or None when they cannot."""
    o, n = old.type, new.type
    target = _sql_type(new)
    if o in TEXT_TYPES and n in TEXT_TYPES:
        return Conversion(_then_coerce(new, str), f"{{col}}::{target}")
    if o == "integer" and n in DECIMAL_TYPES:
        return Conversion(_then_coerce(new, decimal.Decimal), f"{{col}}::{target}")
    if o in DECIMAL_TYPES and n in DECIMAL_TYPES:
        return Conversion(_then_coerce(new, decimal.Decimal), f"{{col}}::{target}")
    if o in DECIMAL_TYPES and n == "integer":
        return Conversion(_then_coerce(new, _decimal_to_int), "{col}::bigint")
    if o in ("integer", *DECIMAL_TYPES) and n in ("text", "long_text"):
        return Conversion(_then_coerce(new, _number_text), f"{{col}}::{target}")
    if o == "date" and n in ("text", "long_text"):
        return Conversion(_then_coerce(new, lambda v: v.isoformat()), f"{{col}}::{target}")
    if o == "boolean" and n in ("text", "long_text"):
        return Conversion(
            _then_coerce(new, lambda v: "true" if v else "false"), f"{{col}}::{target}"
        )
    if o in TEXT_TYPES and n == "integer":
        return Conversion(_then_coerce(new, _text_to_int), _PG_TRIM + "::bigint")
    if o in TEXT_TYPES and n in DECIMAL_TYPES:
        return Conversion(_then_coerce(new, _text_to_decimal), _PG_TRIM + f"::{target}")
    if o in TEXT_TYPES and n == "date":
        return Conversion(_then_coerce(new, lambda v: v.strip(_SPACE)), _PG_TRIM + "::date")
    if o in TEXT_TYPES and n == "boolean":
        return Conversion(_then_coerce(new, _text_to_bool), _PG_TRIM + "::boolean")
    if o == "date" and n == "datetime":
        return Conversion(
            lambda v: dt.datetime(v.year, v.month, v.day, tzinfo=dt.UTC),
            "({col}::timestamp AT TIME ZONE 'UTC')",
            always=True,
        )
    if o == "datetime" and n == "date":
        return Conversion(
            lambda v: v.astimezone(dt.UTC).date(), "({col} AT TIME ZONE 'UTC')::date", always=True
        )
    if o == "single_select" and n == "multi_select":
        return Conversion(_then_coerce(new, lambda v: [v]), "jsonb_build_array({col})")
    if {o, n} <= {"multi_select", "tags"}:
        return Conversion(_then_coerce(new, list), "{col}")
    return None
