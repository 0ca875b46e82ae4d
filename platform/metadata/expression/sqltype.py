"""The SQLAlchemy type each value type is bound and read back with."""

from __future__ import annotations

import decimal
from typing import Any

from sqlalchemy import BigInteger, Boolean, Date, Float, Numeric, String, Uuid
from sqlalchemy.engine import Dialect
from sqlalchemy.types import NullType, TypeDecorator, TypeEngine

from metacrm.metadata.coltypes import JSONValue, UTCDateTime
from metacrm.metadata.expression.arithmetic import to_decimal
from metacrm.metadata.expression.scope import ValueType


class DecimalValue(TypeDecorator[decimal.Decimal]):
    """A computed decimal: NUMERIC on PostgreSQL, REAL on SQLite, read back as Decimal.

    Unlike a decimal column it is not quantised on the way out, so a quotient
    keeps the places the language gives it.
    """

    impl = Numeric
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Float())
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        return float(value) if dialect.name == "sqlite" else to_decimal(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> decimal.Decimal | None:
        return None if value is None else to_decimal(value)


def sql_type(value_type: ValueType) -> TypeEngine[Any]:
    """Return the type that binds and reads values of a language type on every backend."""
    match value_type:
        case ValueType.TEXT:
            return String()
        case ValueType.INTEGER:
            return BigInteger()
        case ValueType.DECIMAL:
            return DecimalValue()
        case ValueType.BOOLEAN:
            return Boolean()
        case ValueType.DATE:
            return Date()
        case ValueType.DATETIME:
            return UTCDateTime()
        case ValueType.UUID:
            return Uuid()
        case ValueType.LIST | ValueType.JSON:
            return JSONValue()
    return NullType()
