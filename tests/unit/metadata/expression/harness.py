"""Run one expression on Python and on a database over the same rows, and compare answers."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from metacrm.metadata.expression import (
    EvalContext,
    ValueType,
    check,
    compile_python,
    compile_sql,
    table_resolver,
)
from metacrm.metadata.expression.nodes import Node

from .conftest import Database
from .model import CUSTOMER_IDS, DEAL

CUSTOMERS = (
    {"id": CUSTOMER_IDS[0], "level": "VIP", "score": 10, "secret": None},
    {"id": CUSTOMER_IDS[1], "level": "", "score": None, "secret": None},
)


def deal_row(**values: Any) -> dict[str, Any]:
    """A full deal row: every column present, unset ones null, a fresh id unless given."""
    row: dict[str, Any] = {name: None for name in DEAL.fields}
    row["id"] = uuid.uuid4()
    row.update(values)
    return row


def python_record(row: Mapping[str, Any], customers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The record a rule sees: the row plus the flattened fields of its customer."""
    record = dict(row)
    customer = next((c for c in customers if c["id"] == row["customer"]), None)
    for name in ("level", "score", "secret"):
        record[f"customer.{name}"] = customer[name] if customer else None
    return record


@dataclass(frozen=True)
class Outcome:
    """What the database said: each row's value and, for conditions, which rows matched."""

    values: dict[uuid.UUID, Any]
    matched: set[uuid.UUID] | None


def run_sql(
    db: Database,
    node: Node,
    rows: Sequence[Mapping[str, Any]],
    ctx: EvalContext,
    customers: Sequence[Mapping[str, Any]] = CUSTOMERS,
) -> Outcome:
    """Insert the rows, evaluate the expression in SQL, and roll everything back."""
    deal = db.tables["deal"]
    expression = compile_sql(node, DEAL, table_resolver(db.tables, DEAL), ctx)
    with db.engine.connect() as connection:
        transaction = connection.begin()
        try:
            connection.execute(db.tables["customer"].insert(), list(customers))
            if rows:
                connection.execute(deal.insert(), list(rows))
            values = dict(connection.execute(sa.select(deal.c.id, expression)).all())
            matched = None
            if check(node, DEAL) in (ValueType.BOOLEAN, ValueType.NULL):
                found = connection.execute(sa.select(deal.c.id).where(expression)).scalars()
                matched = set(found)
        finally:
            transaction.rollback()
    return Outcome(values, matched)


def run_python(
    node: Node,
    rows: Sequence[Mapping[str, Any]],
    ctx: EvalContext,
    customers: Sequence[Mapping[str, Any]] = CUSTOMERS,
) -> dict[uuid.UUID, Any]:
    """Evaluate the expression on each row in Python."""
    evaluate = compile_python(node, DEAL)
    return {row["id"]: evaluate(python_record(row, customers), ctx) for row in rows}


def same_value(python: Any, sql: Any, value_type: ValueType, dialect: str) -> bool:
    """Tell whether a Python result and a SQL result are the same value.

    SQLite keeps decimals as binary floats, so there they only need to agree
    to about fifteen significant digits.
    """
    if python is None or sql is None:
        return python is None and sql is None
    if value_type in (ValueType.INTEGER, ValueType.DECIMAL):
        if isinstance(python, bool) or isinstance(sql, bool):
            return False
        expected, found = Decimal(python), Decimal(repr(sql) if isinstance(sql, float) else sql)
        if dialect == "sqlite" and value_type is ValueType.DECIMAL:
            return abs(expected - found) <= Decimal("1e-12") * max(Decimal(1), abs(expected))
        return expected == found
    if value_type is ValueType.DATETIME:
        return isinstance(sql, dt.datetime) and python == sql
    if value_type is ValueType.DATE:
        return type(python) is type(sql) and python == sql
    return type(python) is type(sql) and python == sql
