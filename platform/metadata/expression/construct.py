"""SQL constructs whose spelling differs between PostgreSQL and SQLite.

Each is a ``FunctionElement`` so SQLAlchemy's statement cache keys on its
arguments; ``@compiles`` gives the SQLite spelling and the default one, which
is PostgreSQL's. SQLite stores dates as ``YYYY-MM-DD`` text and datetimes as
``YYYY-MM-DD HH:MM:SS.ffffff`` UTC text, which the SQLite spellings rely on.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Boolean, Date, String
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from metacrm.metadata.coltypes import UTCDateTime
from metacrm.metadata.expression.arithmetic import DIVISION_SCALE
from metacrm.metadata.expression.sqltype import DecimalValue


def _args(element: FunctionElement[Any], compiler: SQLCompiler, **kw: Any) -> list[str]:
    return [compiler.process(clause, **kw) for clause in element.clauses]


class FoldLower(FunctionElement[str]):
    """lower() that knows every script, not only ASCII (SQLite: a registered function)."""

    inherit_cache = True
    type = String()


class FoldUpper(FunctionElement[str]):
    """upper() that knows every script, not only ASCII (SQLite: a registered function)."""

    inherit_cache = True
    type = String()


@compiles(FoldLower)
def _fold_lower(element: FoldLower, compiler: SQLCompiler, **kw: Any) -> str:
    return "lower({})".format(*_args(element, compiler, **kw))


@compiles(FoldLower, "sqlite")
def _fold_lower_sqlite(element: FoldLower, compiler: SQLCompiler, **kw: Any) -> str:
    return "mc_lower({})".format(*_args(element, compiler, **kw))


@compiles(FoldUpper)
def _fold_upper(element: FoldUpper, compiler: SQLCompiler, **kw: Any) -> str:
    return "upper({})".format(*_args(element, compiler, **kw))


@compiles(FoldUpper, "sqlite")
def _fold_upper_sqlite(element: FoldUpper, compiler: SQLCompiler, **kw: Any) -> str:
    return "mc_upper({})".format(*_args(element, compiler, **kw))


class CodepointOrder(FunctionElement[str]):
    """Text that sorts by code point, as Python and SQLite do, whatever the column collation."""

    inherit_cache = True
    type = String()


@compiles(CodepointOrder)
def _codepoint_order(element: CodepointOrder, compiler: SQLCompiler, **kw: Any) -> str:
    return '({} COLLATE "C")'.format(*_args(element, compiler, **kw))


@compiles(CodepointOrder, "sqlite")
def _codepoint_order_sqlite(element: CodepointOrder, compiler: SQLCompiler, **kw: Any) -> str:
    return "({})".format(*_args(element, compiler, **kw))


class ListContains(FunctionElement[bool]):
    """Whether a JSON list holds an element equal to a text; null if either is null.

    Each argument appears once in the SQL, so nesting never repeats SQL text.
    """

    inherit_cache = True
    type = Boolean()


@compiles(ListContains)
def _list_contains(element: ListContains, compiler: SQLCompiler, **kw: Any) -> str:
    items, value = _args(element, compiler, **kw)
    # jsonb ? text: true when the text is an element of the array; strict, so null in, null out.
    return f"(CAST({items} AS JSONB) ? CAST({value} AS TEXT))"


@compiles(ListContains, "sqlite")
def _list_contains_sqlite(element: ListContains, compiler: SQLCompiler, **kw: Any) -> str:
    items, value = _args(element, compiler, **kw)
    # The one-row derived table names each argument once for the null test and the search.
    return (
        "(SELECT CASE WHEN mc_args.items IS NULL OR mc_args.value IS NULL THEN NULL"
        " ELSE EXISTS (SELECT 1 FROM json_each(mc_args.items)"
        " WHERE json_each.value = mc_args.value) END"
        f" FROM (SELECT {items} AS items, {value} AS value) AS mc_args)"
    )


class UtcDate(FunctionElement[Any]):
    """The calendar date, in UTC, of a datetime."""

    inherit_cache = True
    type = Date()


@compiles(UtcDate)
def _utc_date(element: UtcDate, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST(timezone('UTC', {}) AS DATE)".format(*_args(element, compiler, **kw))


@compiles(UtcDate, "sqlite")
def _utc_date_sqlite(element: UtcDate, compiler: SQLCompiler, **kw: Any) -> str:
    return "date({})".format(*_args(element, compiler, **kw))


class DateAsDateTime(FunctionElement[Any]):
    """Midnight UTC of a date, so that a date can be compared with a datetime."""

    inherit_cache = True
    type = UTCDateTime()


@compiles(DateAsDateTime)
def _date_as_datetime(element: DateAsDateTime, compiler: SQLCompiler, **kw: Any) -> str:
    return "timezone('UTC', CAST({} AS TIMESTAMP))".format(*_args(element, compiler, **kw))


@compiles(DateAsDateTime, "sqlite")
def _date_as_datetime_sqlite(element: DateAsDateTime, compiler: SQLCompiler, **kw: Any) -> str:
    return "({} || ' 00:00:00.000000')".format(*_args(element, compiler, **kw))


class DayDifference(FunctionElement[int]):
    """Whole days from the first date to the second (second minus first)."""

    inherit_cache = True
    type = BigInteger()


@compiles(DayDifference)
def _day_difference(element: DayDifference, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = _args(element, compiler, **kw)
    return f"({end} - {start})"


@compiles(DayDifference, "sqlite")
def _day_difference_sqlite(element: DayDifference, compiler: SQLCompiler, **kw: Any) -> str:
    start, end = _args(element, compiler, **kw)
    return f"CAST(julianday({end}) - julianday({start}) AS INTEGER)"


class AddDaysToDate(FunctionElement[Any]):
    """A date moved by a whole number of days."""

    inherit_cache = True
    type = Date()


@compiles(AddDaysToDate)
def _add_days_to_date(element: AddDaysToDate, compiler: SQLCompiler, **kw: Any) -> str:
    moved, days = _args(element, compiler, **kw)
    return f"({moved} + CAST({days} AS INTEGER))"


@compiles(AddDaysToDate, "sqlite")
def _add_days_to_date_sqlite(element: AddDaysToDate, compiler: SQLCompiler, **kw: Any) -> str:
    moved, days = _args(element, compiler, **kw)
    return f"date({moved}, ({days}) || ' days')"


class AddDaysToDateTime(FunctionElement[Any]):
    """A datetime moved by whole days of 24 hours, whatever the session time zone."""

    inherit_cache = True
    type = UTCDateTime()


@compiles(AddDaysToDateTime)
def _add_days_to_datetime(element: AddDaysToDateTime, compiler: SQLCompiler, **kw: Any) -> str:
    moved, days = _args(element, compiler, **kw)
    return f"({moved} + ({days}) * INTERVAL '24 hours')"


@compiles(AddDaysToDateTime, "sqlite")
def _add_days_to_datetime_sqlite(
    element: AddDaysToDateTime, compiler: SQLCompiler, **kw: Any
) -> str:
    moved, days = _args(element, compiler, **kw)
    # Whole days never change the UTC time of day, so the stored time part is kept;
    # the derived table names the datetime once, so nesting never repeats SQL text.
    return (
        "(SELECT date(mc_args.moved, mc_args.days || ' days') || substr(mc_args.moved, 11)"
        f" FROM (SELECT {moved} AS moved, {days} AS days) AS mc_args)"
    )


class DecimalArithmetic(FunctionElement[Any]):
    """Exact decimal arithmetic: NUMERIC on PostgreSQL, registered functions on SQLite."""

    inherit_cache = True
    type = DecimalValue()
    sql_operator = "+"
    sqlite_function = "mc_add"


class DecimalAdd(DecimalArithmetic):
    """``a + b`` on decimals."""

    inherit_cache = True


class DecimalSubtract(DecimalArithmetic):
    """``a - b`` on decimals."""

    inherit_cache = True
    sql_operator = "-"
    sqlite_function = "mc_sub"


class DecimalMultiply(DecimalArithmetic):
    """``a * b`` on decimals."""

    inherit_cache = True
    sql_operator = "*"
    sqlite_function = "mc_mul"


class DecimalDivide(DecimalArithmetic):
    """``a / b`` rounded to the language's division scale; null when b is zero."""

    inherit_cache = True
    sql_operator = "/"
    sqlite_function = "mc_div"


@compiles(DecimalArithmetic)
def _decimal_arithmetic(element: DecimalArithmetic, compiler: SQLCompiler, **kw: Any) -> str:
    left, right = _args(element, compiler, **kw)
    if element.sql_operator == "/":
        # Rounding the dividend to 20 places first makes PostgreSQL compute the
        # quotient to at least 20 places, whatever the size of the numbers.
        return (
            f"round(round(CAST({left} AS NUMERIC), 20) / "
            f"NULLIF(CAST({right} AS NUMERIC), 0), {DIVISION_SCALE})"
        )
    return f"(CAST({left} AS NUMERIC) {element.sql_operator} CAST({right} AS NUMERIC))"


@compiles(DecimalArithmetic, "sqlite")
def _decimal_arithmetic_sqlite(element: DecimalArithmetic, compiler: SQLCompiler, **kw: Any) -> str:
    left, right = _args(element, compiler, **kw)
    return f"{element.sqlite_function}({left}, {right})"


class DecimalRound(FunctionElement[Any]):
    """round(x, digits) half away from zero."""

    inherit_cache = True
    type = DecimalValue()


@compiles(DecimalRound)
def _decimal_round(element: DecimalRound, compiler: SQLCompiler, **kw: Any) -> str:
    value, digits = _args(element, compiler, **kw)
    return f"round(CAST({value} AS NUMERIC), {digits})"


@compiles(DecimalRound, "sqlite")
def _decimal_round_sqlite(element: DecimalRound, compiler: SQLCompiler, **kw: Any) -> str:
    value, digits = _args(element, compiler, **kw)
    return f"mc_round({value}, {digits})"
