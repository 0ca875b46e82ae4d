"""What a record payload may hold, read by converters chosen from field metadata.

Each field's value goes through its field type's ``coerce`` (the same rules the
metadata validator applies to defaults), so there is one definition of what a
valid value is. Unknown fields, system columns, computed and read-only fields
are refused here with messages that say why.
"""

from __future__ import annotations

import datetime as dt
import decimal
import difflib
import functools
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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


def _related_to(f: FieldDef, value: Any) -> tuple[str, uuid.UUID]:
    targets = f.get("targets", [])
    if not isinstance(value, Mapping) or set(value) != {"entity", "id"}:
        raise ValueProblem('must be {"entity": …, "id": …}')
    if value["entity"] not in targets:
        raise ValueProblem(f"entity must be one of: {', '.join(targets)}")
    return value["entity"], _uuid(value["id"])


def _relation(f: FieldDef, value: Any) -> list[uuid.UUID]:
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


Converter = Callable[[Any], Any]


@dataclass(frozen=True)
class PayloadPlan:
    """How one entity's payloads are read: a converter per writable field, chosen once.

    A record write reads a payload a field at a time; a schema library's machinery
    per field (the marshmallow schema this replaced) cost more than the rest of a
    bulk create together, about 0.17 ms a row. The converters are the field types'
    own ``coerce`` (so there is still one definition of a valid value), each behind
    a check that accepts the common, plainly valid value (a short string, a listed
    option, a whole number in range) without the call.
    """

    #: (field name, converter) of every field a payload may write, in field order.
    converters: tuple[tuple[str, Converter], ...]
    writable: frozenset[str]
    #: Per field, where there is one: whether a whole column of values is plainly
    #: valid as it is (checked in C over the column, no call per value).
    column_checks: Mapping[str, ColumnCheck]
    #: Per field, where there is one: a whole column of plainly valid values read at
    #: once (None when any is not, and the converter reads each).
    column_readers: Mapping[str, ColumnReader]


ColumnCheck = Callable[[list[Any]], bool]
ColumnReader = Callable[[list[Any]], "list[Any] | None"]


def _format_column(shortest: int, longest: int, pattern: re.Pattern[str]) -> ColumnCheck:
    """Check a column of an e-mail, phone or URL field: text of the right length and form."""

    def check(values: list[Any]) -> bool:
        return (
            set(map(type, values)) == {str}
            and shortest <= min(map(len, values))
            and max(map(len, values)) <= longest
            and all(map(pattern.fullmatch, values))
        )

    return check


_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)


def _date_column(values: list[Any]) -> list[Any] | None:
    """Read a column of a date field written ``YYYY-MM-DD`` (what ``coerce`` gives for each)."""
    if set(map(type, values)) != {str} or not all(map(_ISO_DATE.fullmatch, values)):
        return None
    try:
        return list(map(dt.date.fromisoformat, values))
    except ValueError:
        return None  # not a calendar date: the converter words it


def _text_column(shortest: int, longest: int) -> ColumnCheck:
    def check(values: list[Any]) -> bool:
        return (
            set(map(type, values)) == {str}
            and shortest <= min(map(len, values))
            and max(map(len, values)) <= longest
        )

    return check


def _option_column(options: frozenset[str]) -> ColumnCheck:
    def check(values: list[Any]) -> bool:
        return set(map(type, values)) == {str} and options.issuperset(values)

    return check


def _integer_column(low: Any, high: Any) -> ColumnCheck:
    def check(values: list[Any]) -> bool:
        return set(map(type, values)) == {int} and low <= min(values) and max(values) <= high

    return check


def _accepting(f: FieldDef, accept: Callable[[Any], bool]) -> Converter:
    """Return a converter that keeps what ``accept`` passes and asks ``coerce`` otherwise.

    ``accept`` only ever passes values that ``coerce`` would return unchanged, so
    the answer (value or message) is the same either way.
    """
    coerce = fieldtypes.get(f.type).coerce

    def convert(value: Any) -> Any:
        return value if accept(value) else coerce(f, value)

    return convert


def _converter(f: FieldDef) -> tuple[Converter, ColumnCheck | None]:
    """Return a field's converter, and its column check where the field type has one."""
    if f.type in ("lookup", "user"):
        return _uuid, None
    if f.type == "related_to":
        return functools.partial(_related_to, f), None
    if f.type == "many_to_many":
        return functools.partial(_relation, f), None
    if f.type in fieldtypes.FORMATS and not f.get("pattern"):
        shortest, longest = f.get("min_length", 0), fieldtypes.max_length(f)
        return (
            functools.partial(fieldtypes.get(f.type).coerce, f),
            _format_column(shortest, longest, fieldtypes.FORMATS[f.type]),
        )
    if f.type in ("text", "long_text", "encrypted_text") and not f.get("pattern"):
        shortest, longest = f.get("min_length", 0), fieldtypes.max_length(f)
        return (
            _accepting(f, lambda v: type(v) is str and shortest <= len(v) <= longest),
            _text_column(shortest, longest),
        )
    if f.type == "single_select":
        options = frozenset(
            o["value"] for o in f.get("options", []) if not o.get("archived", False)
        )
        return _accepting(f, lambda v: type(v) is str and v in options), _option_column(options)
    if f.type == "integer":
        low = -(2**63) if f.get("min") is None else max(f.get("min"), -(2**63))
        high = 2**63 - 1 if f.get("max") is None else min(f.get("max"), 2**63 - 1)
        return (
            _accepting(f, lambda v: type(v) is int and low <= v <= high),
            _integer_column(low, high),
        )
    if fieldtypes.get(f.type).coerce is fieldtypes.get("decimal").coerce:
        return _decimal_converter(f), None
    return functools.partial(fieldtypes.get(f.type).coerce, f), None


def _decimal_converter(f: FieldDef) -> Converter:
    """Return ``coerce`` of a decimal-like field with its shape and bounds worked out once.

    Text and whole numbers that fit become their Decimal here; anything else (a
    float, a value out of shape) goes to ``coerce``, which returns or refuses it.
    """
    coerce = fieldtypes.get(f.type).coerce
    precision, scale = fieldtypes.decimal_shape(f)
    limit = decimal.Decimal(10) ** (precision - scale)
    quantum = decimal.Decimal(1).scaleb(-scale)
    low, high = f.get("min"), f.get("max")

    def convert(value: Any) -> Any:
        kind = type(value)
        if kind is str or kind is int:
            try:
                number = decimal.Decimal(value)
            except decimal.InvalidOperation:
                return coerce(f, value)
            if (
                number.is_finite()
                and abs(number) < limit
                and number == number.quantize(quantum, decimal.ROUND_HALF_EVEN)
                and (low is None or number >= low)
                and (high is None or number <= high)
            ):
                return number
        return coerce(f, value)

    return convert


@functools.lru_cache(maxsize=1024)
def payload_plan(entity: EntityModel) -> PayloadPlan:
    """Return the converters of one entity's payloads (cached with the entity)."""
    fields = [
        f for f in entity.entity.active_fields() if f.type not in COMPUTED_TYPES and not f.read_only
    ]
    chosen = {f.name: _converter(f) for f in fields}
    return PayloadPlan(
        tuple((name, convert) for name, (convert, _) in chosen.items()),
        frozenset(f.name for f in fields if f.name not in SYSTEM_FIELDS),
        {name: check for name, (_, check) in chosen.items() if check is not None},
        {f.name: _date_column for f in fields if f.type == "date"},
    )


def load_column(entity: EntityModel, name: str, values: list[Any]) -> list[Any] | None:
    """Return a column of one field's values (none of them null) as ``load_payload``
    would, or None when any of them is refused (the caller then reads the payloads
    one by one, which words the problems)."""
    plan = payload_plan(entity)
    check = plan.column_checks.get(name)
    if check is not None and check(values):
        return values
    read = plan.column_readers.get(name)
    if read is not None:
        loaded = read(values)
        if loaded is not None:
            return loaded
    convert = dict(plan.converters)[name]
    try:
        return list(map(convert, values))
    except ValueProblem:
        return None


def load_payload(entity: EntityModel, data: Mapping[str, Any]) -> tuple[dict[str, Any], dict]:
    """Return (values, errors): coerced values, and a message per refused field.

    Refused names come first, in the payload's order; then each field's problem,
    in field order (the order values come in too). Null is taken for any field:
    whether it may be empty is the caller's question (``required``).
    """
    plan = payload_plan(entity)
    errors: dict[str, str] = {}
    if not plan.writable.issuperset(data):
        for name in data:
            problem = _refusal(entity, str(name))
            if problem:
                errors[str(name)] = problem
    values: dict[str, Any] = {}
    for name, convert in plan.converters:
        if name not in data:
            continue
        value = data[name]
        if value is None:
            values[name] = None
            continue
        try:
            values[name] = convert(value)
        except ValueProblem as exc:
            errors[name] = str(exc)
    return values, errors
