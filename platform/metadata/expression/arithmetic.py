"""Decimal arithmetic as the language defines it, shared by Python and by SQLite.

Sums, differences and products are exact. A quotient is rounded half away
from zero to ``DIVISION_SCALE`` decimal places, and dividing by zero gives
null, as PostgreSQL's NUMERIC does once compiled that way. SQLite keeps
decimals as REAL, so its registered functions call these same functions on
the shortest decimal form of each float and return the nearest float.
"""

from __future__ import annotations

import decimal

DIVISION_SCALE = 10

_CONTEXT = decimal.Context(
    prec=60,
    rounding=decimal.ROUND_HALF_UP,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)

Number = int | float | decimal.Decimal


def to_decimal(value: Number) -> decimal.Decimal:
    """Convert a number to Decimal; a float becomes the decimal it prints as."""
    if isinstance(value, decimal.Decimal):
        return value
    if isinstance(value, float):
        return decimal.Decimal(repr(value))
    return decimal.Decimal(value)


def add(left: Number, right: Number) -> decimal.Decimal:
    """Add exactly."""
    return _CONTEXT.add(to_decimal(left), to_decimal(right))


def subtract(left: Number, right: Number) -> decimal.Decimal:
    """Subtract exactly."""
    return _CONTEXT.subtract(to_decimal(left), to_decimal(right))


def multiply(left: Number, right: Number) -> decimal.Decimal:
    """Multiply exactly."""
    return _CONTEXT.multiply(to_decimal(left), to_decimal(right))


def divide(left: Number, right: Number) -> decimal.Decimal | None:
    """Divide, rounding to ``DIVISION_SCALE`` places; null when dividing by zero."""
    divisor = to_decimal(right)
    if divisor.is_zero():
        return None
    quotient = _CONTEXT.divide(to_decimal(left), divisor)
    return round_half_up(quotient, DIVISION_SCALE)


def round_half_up(value: Number, digits: int) -> decimal.Decimal:
    """Round half away from zero to ``digits`` decimal places, like NUMERIC round()."""
    return to_decimal(value).quantize(
        decimal.Decimal(1).scaleb(-digits), rounding=decimal.ROUND_HALF_UP, context=_CONTEXT
    )
