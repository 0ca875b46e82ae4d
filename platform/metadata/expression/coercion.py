"""Which types mix, order and compare: the rules both compilers rely on."""

from __future__ import annotations

from metacrm.metadata.expression.scope import ValueType

NUMERIC = frozenset({ValueType.INTEGER, ValueType.DECIMAL})
TEMPORAL = frozenset({ValueType.DATE, ValueType.DATETIME})
EQUATABLE = frozenset(
    {
        ValueType.TEXT,
        ValueType.INTEGER,
        ValueType.DECIMAL,
        ValueType.BOOLEAN,
        ValueType.DATE,
        ValueType.DATETIME,
        ValueType.UUID,
    }
)
ORDERED = frozenset(
    {ValueType.TEXT, ValueType.INTEGER, ValueType.DECIMAL, ValueType.DATE, ValueType.DATETIME}
)


def unify(first: ValueType, second: ValueType) -> ValueType | None:
    """Return the type two values share once mixed, or None when they do not mix.

    Null mixes with anything; an integer mixed with a decimal is a decimal; a
    date mixed with a datetime is the datetime at midnight UTC of that date.
    """
    if first is second:
        return first
    if first is ValueType.NULL:
        return second
    if second is ValueType.NULL:
        return first
    if {first, second} == NUMERIC:
        return ValueType.DECIMAL
    if {first, second} == TEMPORAL:
        return ValueType.DATETIME
    return None


def arithmetic_type(op: str, left: ValueType, right: ValueType) -> ValueType:
    """Return the type of ``left op right`` for numeric (or null) operands."""
    if left is ValueType.NULL and right is ValueType.NULL:
        return ValueType.NULL
    if op == "/":
        return ValueType.DECIMAL
    if ValueType.DECIMAL in (left, right):
        return ValueType.DECIMAL
    return ValueType.INTEGER


def comparison_type(first: ValueType, second: ValueType) -> ValueType | None:
    """Return the type two sides of a comparison are compared as, or None.

    Like ``unify``, and a record id can also be compared with text; the checker
    only lets that through when the text is a literal that spells an id.
    """
    mixed = unify(first, second)
    if mixed is None and {first, second} == {ValueType.UUID, ValueType.TEXT}:
        return ValueType.UUID
    return mixed
