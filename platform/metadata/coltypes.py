"""Column types that behave the same on PostgreSQL and SQLite.

SQLite has no DECIMAL, no time-zone aware timestamps and no JSONB; these types
hide the difference so that records, filters and sorts give the same answers
on both backends.
"""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

from sqlalchemy import JSON, DateTime, Float, Numeric
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored in UTC and always returned time-zone aware.

    PostgreSQL keeps ``timestamptz``; SQLite keeps a naive UTC string, which
    sorts and compares correctly as text because the format is fixed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(DateTime(timezone=False))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None:
            raise ValueError("naive datetimes are refused: give a time zone")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


#: Significant digits a REAL holds exactly; larger decimals need PostgreSQL.
SQLITE_DIGITS = 15


class ExactDecimal(TypeDecorator[decimal.Decimal]):
    """NUMERIC(precision, scale) on PostgreSQL; REAL on SQLite, read back as Decimal.

    SQLite has no exact decimal type. REAL keeps comparison and sorting
    numeric; values are quantised to ``scale`` when read, which is exact for
    up to 15 significant digits.
    """

    impl = Numeric
    cache_ok = True

    def __init__(self, precision: int = 18, scale: int = 4) -> None:
        super().__init__()
        self.precision = precision
        self.scale = scale
        self._quantum = decimal.Decimal(1).scaleb(-scale)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Float())
        return dialect.type_descriptor(Numeric(self.precision, self.scale, asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float | decimal.Decimal):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        if dialect.name == "sqlite":
            digits = decimal.Decimal(value).normalize().as_tuple().digits
            if len(digits) > SQLITE_DIGITS:
                # REAL would round it silently; refuse instead of losing a digit.
                raise ValueError(
                    f"{value} has more than {SQLITE_DIGITS} significant digits, "
                    "which SQLite cannot store exactly"
                )
            return float(value)
        return decimal.Decimal(value) if not isinstance(value, decimal.Decimal) else value

    def process_result_value(self, value: Any, dialect: Dialect) -> decimal.Decimal | None:
        if value is None:
            return None
        return decimal.Decimal(repr(value) if isinstance(value, float) else value).quantize(
            self._quantum, rounding=decimal.ROUND_HALF_EVEN
        )

    @property
    def python_type(self) -> type:
        return decimal.Decimal


class JSONValue(TypeDecorator[Any]):
    """JSON stored as JSONB on PostgreSQL (indexable, compact) and JSON text on SQLite."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.JSONB(none_as_null=True))
        return dialect.type_descriptor(JSON(none_as_null=True))
