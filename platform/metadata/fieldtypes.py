"""The field-type registry: what each field type stores and which options it takes.

Built-in types register here through the same ``register`` a plugin uses, so a
new type is one class, not edits scattered over the code (STYLE rule 6).
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nh3
import sqlalchemy as sa

from metacrm.metadata.coltypes import ExactDecimal, JSONValue, UTCDateTime
from metacrm.metadata.model import FieldDef

#: Keys every field may carry, whatever its type.
COMMON_KEYS = frozenset(
    {
        "name",
        "type",
        "label",
        "help",
        "required",
        "unique",
        "indexed",
        "read_only",
        "default",
        "archived",
    }
)

ON_DELETE = {"restrict": "RESTRICT", "set_null": "SET NULL", "cascade": "CASCADE"}

_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s]+", re.ASCII)
_PHONE = re.compile(r"\+?[0-9 ()\-.]{3,32}")
_URL = re.compile(r"https?://[^\s]+", re.IGNORECASE)
#: The pattern a non-empty value of these string types must match (their ``coerce`` checks it).
FORMATS = {"email": _EMAIL, "phone": _PHONE, "url": _URL}


class ValueProblem(ValueError):
    """A value does not fit its field; the message is shown to the person who gave it."""


@dataclass(frozen=True)
class FieldType:
    """How one field type is stored, sorted, filtered and checked."""

    name: str
    #: The expression language's value type (``metacrm.metadata.expression.ValueType`` name).
    value_type: str
    #: Type-specific document keys this type accepts.
    keys: frozenset[str] = frozenset()
    #: False for types without a column of their own (formula, many_to_many).
    stored: bool = True
    #: Whether an index, a unique constraint and sorting make sense.
    indexable: bool = True
    sortable: bool = True
    #: Text-like types can be title and search fields.
    text_like: bool = False
    column_type: Callable[[FieldDef], sa.types.TypeEngine[Any]] | None = None
    coerce: Callable[[FieldDef, Any], Any] = field(default=lambda f, v: v)

    def columns(self, f: FieldDef) -> list[sa.Column[Any]]:
        """Return the column(s) that store this field."""
        if not self.stored or self.column_type is None:
            return []
        return [
            sa.Column(
                f.name,
                self.column_type(f),
                nullable=not f.required or f.archived,
                server_default=server_default(f),
            )
        ]

    def column_names(self, f: FieldDef) -> list[str]:
        """Return the names of the columns that store this field."""
        return [f.name] if self.stored else []


_REGISTRY: dict[str, FieldType] = {}


def register(field_type: FieldType) -> FieldType:
    """Make a field type available to metadata; refuse a second type of the same name."""
    if field_type.name in _REGISTRY:
        raise ValueError(f"field type {field_type.name!r} is already registered")
    _REGISTRY[field_type.name] = field_type
    return field_type


def get(name: str) -> FieldType:
    """Return the field type called ``name``; KeyError when there is none."""
    return _REGISTRY[name]


def names() -> list[str]:
    """Return the names of all registered field types."""
    return sorted(_REGISTRY)


def server_default(f: FieldDef) -> sa.TextClause | None:
    """Give a required field with a scalar default a server default.

    Adding such a column to a big table is then a catalog-only change on both
    PostgreSQL (11+) and SQLite: existing rows read the default, nothing is rewritten.
    """
    if not (f.required and f.has_default) or f.default is None:
        return None
    value = f.default
    if isinstance(value, bool):
        return sa.text("true" if value else "false")
    if isinstance(value, int | float):
        return sa.text(repr(value))
    if isinstance(value, str):
        # text() reads ":word" as a bind parameter; a backslash keeps the colon literal.
        return sa.text("'" + value.replace("'", "''").replace(":", "\\:") + "'")
    return None


# -- value coercion: JSON value -> Python value, or ValueProblem --------------------------


def _text(f: FieldDef, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueProblem("must be a string")
    limit = f.get("max_length", _DEFAULT_MAX_LENGTH.get(f.type, 255))
    if len(value) > limit:
        raise ValueProblem(f"is {len(value)} characters long; the limit is {limit}")
    if len(value) < f.get("min_length", 0):
        raise ValueProblem(f"must be at least {f.get('min_length')} characters long")
    pattern = f.get("pattern")
    if pattern and value and not re.fullmatch(pattern, value):
        raise ValueProblem(f"does not match the pattern {pattern}")
    return value


def _matching(regex: re.Pattern[str], what: str) -> Callable[[FieldDef, Any], str]:
    def coerce(f: FieldDef, value: Any) -> str:
        value = _text(f, value)
        if value and not regex.fullmatch(value):
            raise ValueProblem(f"is not a valid {what}")
        return value

    return coerce


def _number_bounds(f: FieldDef, value: Any) -> None:
    if f.get("min") is not None and value < f.get("min"):
        raise ValueProblem(f"must be at least {f.get('min')}")
    if f.get("max") is not None and value > f.get("max"):
        raise ValueProblem(f"must be at most {f.get('max')}")


def _integer(f: FieldDef, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueProblem("must be a whole number")
    if not -(2**63) <= value < 2**63:
        raise ValueProblem("is out of range for a 64-bit integer")
    _number_bounds(f, value)
    return value


def _decimal(f: FieldDef, value: Any) -> decimal.Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | decimal.Decimal):
        raise ValueProblem("must be a number")
    try:
        number = decimal.Decimal(str(value))
    except decimal.InvalidOperation:
        raise ValueProblem("must be a number") from None
    if not number.is_finite():
        raise ValueProblem("must be a finite number")
    precision, scale = decimal_shape(f)
    # Magnitude first: quantising a huge number overflows the decimal context.
    if abs(number) >= decimal.Decimal(10) ** (precision - scale):
        raise ValueProblem(f"has more than {precision - scale} digits before the point")
    if number != number.quantize(decimal.Decimal(1).scaleb(-scale), decimal.ROUND_HALF_EVEN):
        raise ValueProblem(f"has more than {scale} decimal places")
    _number_bounds(f, number)
    return number


def _boolean(f: FieldDef, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueProblem("must be true or false")
    return value


def _date(f: FieldDef, value: Any) -> dt.date:
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueProblem("must be a date written YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise ValueProblem("is not a calendar date") from None


def _datetime(f: FieldDef, value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        parsed = value
    else:
        if not isinstance(value, str) or len(value) > 40:
            raise ValueProblem("must be a date and time in ISO 8601, e.g. 2024-05-01T09:30:00Z")
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueProblem(
                "must be a date and time in ISO 8601, e.g. 2024-05-01T09:30:00Z"
            ) from None
    if parsed.tzinfo is None:
        raise ValueProblem("must include a time zone (Z or +08:00)")
    return parsed.astimezone(dt.UTC)


def _option_values(f: FieldDef) -> set[str]:
    return {o["value"] for o in f.get("options", []) if not o.get("archived", False)}


def _single_select(f: FieldDef, value: Any) -> str:
    if not isinstance(value, str) or value not in _option_values(f):
        raise ValueProblem(f"must be one of: {', '.join(sorted(_option_values(f)))}")
    return value


def _string_list(f: FieldDef, value: Any, allowed: set[str] | None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueProblem("must be a list of strings")
    limit = f.get("max_items", 100)
    if len(value) > limit:
        raise ValueProblem(f"has {len(value)} items; the limit is {limit}")
    if len(set(value)) != len(value):
        raise ValueProblem("must not repeat an item")
    for item in value:
        if allowed is not None and item not in allowed:
            raise ValueProblem(f"{item!r} is not one of: {', '.join(sorted(allowed))}")
        if allowed is None and not 1 <= len(item) <= 64:
            raise ValueProblem("each tag must be 1 to 64 characters long")
    return value


def _rich_text(f: FieldDef, value: Any) -> str:
    """Check length, then keep only safe HTML (no scripts, handlers or javascript: links)."""
    return nh3.clean(_text(f, value))


def _user(f: FieldDef, value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str) or len(value) > 36:
        raise ValueProblem("must be a user id (a UUID string)")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValueProblem("must be a user id (a UUID string)") from None


def _json(f: FieldDef, value: Any) -> Any:
    return value


_DEFAULT_MAX_LENGTH = {
    "text": 255,
    "long_text": 100_000,
    "rich_text": 1_000_000,
    "email": 254,
    "phone": 32,
    "url": 2048,
    "encrypted_text": 1000,
}

_DECIMAL_DEFAULTS = {"decimal": (18, 4), "currency": (18, 2), "percent": (9, 4)}


def decimal_shape(f: FieldDef) -> tuple[int, int]:
    """Return (precision, scale) of a decimal-like field, defaults applied."""
    precision, scale = _DECIMAL_DEFAULTS.get(f.type, (18, 4))
    return f.get("precision", precision), f.get("scale", scale)


def max_length(f: FieldDef) -> int:
    """Return the maximum length of a text-like field, default applied."""
    return f.get("max_length", _DEFAULT_MAX_LENGTH.get(f.type, 255))


_TEXT_KEYS = frozenset({"max_length"})
_NUMBER_KEYS = frozenset({"min", "max"})
_DECIMAL_KEYS = frozenset({"min", "max", "precision", "scale"})


class RelatedToFieldType(FieldType):
    """A polymorphic pointer: the target entity's name and the target's id."""

    def columns(self, f: FieldDef) -> list[sa.Column[Any]]:
        nullable = not f.required or f.archived
        return [
            sa.Column(f"{f.name}_entity", sa.String(63), nullable=nullable),
            sa.Column(f"{f.name}_id", sa.Uuid(), nullable=nullable),
        ]

    def column_names(self, f: FieldDef) -> list[str]:
        return [f"{f.name}_entity", f"{f.name}_id"]


class LookupFieldType(FieldType):
    """A reference to one record of another entity, enforced by a foreign key."""

    def columns(self, f: FieldDef) -> list[sa.Column[Any]]:
        on_delete = f.get("on_delete", "set_null")
        fk = sa.ForeignKey(
            f"{f.get('target')}.id",
            ondelete=ON_DELETE[on_delete],
            name=constraint_name("fk", f.entity, f.name),
        )
        return [sa.Column(f.name, sa.Uuid(), fk, nullable=not f.required or f.archived)]


def constraint_name(prefix: str, table: str, *parts: str) -> str:
    """Return a constraint or index name that fits PostgreSQL's 63-character limit."""
    name = f"{prefix}_{table}__{'__'.join(parts)}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[:52]}_{digest}"


def _string_type(name: str, coerce: Callable[[FieldDef, Any], Any], **extra: Any) -> FieldType:
    """A type stored as VARCHAR(max_length): text, email, phone, url."""
    keys = extra.pop("keys", _TEXT_KEYS)
    return FieldType(
        name,
        "TEXT",
        keys,
        text_like=True,
        column_type=lambda f: sa.String(max_length(f)),
        coerce=coerce,
        **extra,
    )


def _decimal_type(name: str) -> FieldType:
    """A type stored as an exact decimal: decimal, currency, percent."""
    return FieldType(
        name,
        "DECIMAL",
        _DECIMAL_KEYS,
        column_type=lambda f: ExactDecimal(*decimal_shape(f)),
        coerce=_decimal,
    )


def _large_text_type(
    name: str, text_like: bool, coerce: Callable[[FieldDef, Any], Any] = _text
) -> FieldType:
    """A type stored as TEXT, which is neither indexed nor sorted: long and rich text."""
    return FieldType(
        name,
        "TEXT",
        _TEXT_KEYS,
        indexable=False,
        sortable=False,
        text_like=text_like,
        column_type=lambda f: sa.Text(),
        coerce=coerce,
    )


def _json_type(
    name: str, value_type: str, keys: frozenset[str], coerce: Callable[[FieldDef, Any], Any]
) -> FieldType:
    """A type stored as JSON: multi-select, tags, file, json."""
    return FieldType(
        name,
        value_type,
        keys,
        indexable=False,
        sortable=False,
        column_type=lambda f: JSONValue(),
        coerce=coerce,
    )


for _ft in (
    _string_type("text", _text, keys=frozenset({"max_length", "min_length", "pattern"})),
    _large_text_type("long_text", text_like=True),
    _large_text_type("rich_text", text_like=False, coerce=_rich_text),
    FieldType(
        "integer", "INTEGER", _NUMBER_KEYS, column_type=lambda f: sa.BigInteger(), coerce=_integer
    ),
    _decimal_type("decimal"),
    _decimal_type("currency"),
    _decimal_type("percent"),
    FieldType("boolean", "BOOLEAN", column_type=lambda f: sa.Boolean(), coerce=_boolean),
    FieldType("date", "DATE", column_type=lambda f: sa.Date(), coerce=_date),
    FieldType("datetime", "DATETIME", column_type=lambda f: UTCDateTime(), coerce=_datetime),
    _string_type("email", _matching(_EMAIL, "email"), keys=frozenset()),
    _string_type("phone", _matching(_PHONE, "phone"), keys=frozenset()),
    _string_type("url", _matching(_URL, "URL"), keys=frozenset()),
    FieldType(
        "single_select",
        "TEXT",
        frozenset({"options"}),
        column_type=lambda f: sa.String(63),
        coerce=_single_select,
    ),
    _json_type(
        "multi_select",
        "LIST",
        frozenset({"options", "max_items"}),
        lambda f, v: _string_list(f, v, _option_values(f)),
    ),
    _json_type("tags", "LIST", frozenset({"max_items"}), lambda f, v: _string_list(f, v, None)),
    LookupFieldType("lookup", "UUID", frozenset({"target", "on_delete"})),
    FieldType(
        "many_to_many",
        "LIST",
        frozenset({"target", "inverse_label"}),
        stored=False,
        indexable=False,
        sortable=False,
    ),
    RelatedToFieldType("related_to", "UUID", frozenset({"targets"}), sortable=False),
    FieldType("user", "UUID", column_type=lambda f: sa.Uuid(), coerce=_user),
    FieldType(
        "formula",
        "TEXT",
        frozenset({"expression", "result_type", "scale"}),
        stored=False,
        indexable=False,
    ),
    FieldType(
        "auto_number",
        "TEXT",
        frozenset({"prefix", "padding", "start"}),
        text_like=True,
        column_type=lambda f: sa.String(63),
    ),
    _json_type("file", "JSON", frozenset({"max_size", "accept"}), _json),
    FieldType(
        "encrypted_text",
        "TEXT",
        _TEXT_KEYS,
        indexable=False,
        sortable=False,
        column_type=lambda f: sa.Text(),
        coerce=_text,
    ),
    _json_type("json", "JSON", frozenset(), _json),
):
    register(_ft)
