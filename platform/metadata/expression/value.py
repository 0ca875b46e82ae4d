"""Record values as the Python evaluator sees them: read through a resolver, then normalised.

Records come from the ORM, from JSON request bodies or from rule payloads, so
a decimal may arrive as a float or a string and an id as a string; each value
is brought to the one Python type its ValueType stands for.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from metacrm.metadata.expression.arithmetic import to_decimal
from metacrm.metadata.expression.scope import ValueType

ValueResolver = Callable[[Mapping[str, Any], tuple[str, ...]], Any]


def default_value_resolver(record: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """Read ``path`` from a record: ``record[name]``, or one hop through a nested mapping.

    For ``customer.level`` it reads ``record["customer"]["level"]`` when the
    lookup holds a mapping, else the flattened key ``record["customer.level"]``.
    """
    if len(path) == 1:
        return record.get(path[0])
    first = record.get(path[0])
    if isinstance(first, Mapping):
        return first.get(path[1])
    return record.get(".".join(path))


def normalise(value: Any, value_type: ValueType) -> Any:
    """Bring a raw record value to the Python type of its ValueType."""
    if value is None:
        return None
    match value_type:
        case ValueType.TEXT:
            return value if isinstance(value, str) else str(value)
        case ValueType.INTEGER:
            return int(value)
        case ValueType.DECIMAL:
            if isinstance(value, str):
                return decimal.Decimal(value)
            return to_decimal(value)
        case ValueType.BOOLEAN:
            return bool(value)
        case ValueType.DATE:
            if isinstance(value, str):
                return dt.date.fromisoformat(value)
            return value.date() if isinstance(value, dt.datetime) else value
        case ValueType.DATETIME:
            return as_utc(value)
        case ValueType.UUID:
            return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
        case ValueType.LIST:
            if isinstance(value, str):
                value = json.loads(value)
            return list(value) if isinstance(value, list | tuple) else value
    return value


def as_utc(value: Any) -> dt.datetime:
    """Return an aware UTC datetime; naive values are taken as UTC, dates as their midnight."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if not isinstance(value, dt.datetime):
        return dt.datetime.combine(value, dt.time(), tzinfo=dt.UTC)
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)
