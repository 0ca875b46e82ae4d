"""SQL compilation details: bound clock values, lookups, caching, depth, SQLite functions."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
import uuid
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from metacrm.metadata.expression import (
    ExpressionError,
    FieldInfo,
    Scope,
    ValueType,
    compile_python,
    compile_sql,
    parse,
    register_sqlite_functions,
    table_resolver,
)

from .conftest import Database
from .harness import deal_row, run_python, run_sql
from .model import CTX, DEAL, build_tables

T = ValueType


def _sql(text: str, dialect: sa.Dialect) -> sa.sql.compiler.SQLCompiler:
    tables = build_tables(sa.MetaData())
    expression = compile_sql(parse(text), DEAL, table_resolver(tables, DEAL), CTX)
    return expression.compile(dialect=dialect)


@pytest.mark.parametrize("dialect", [postgresql.psycopg.dialect(), sqlite.dialect()])
def test_clock_and_user_are_bound_parameters_not_database_functions(dialect: sa.Dialect) -> None:
    compiled = _sql(
        "created_at < now() and close_date <= today() and owner_id = me()"
        " and team_id in my_team() and days_between(created_at, today()) > 1",
        dialect,
    )
    text = str(compiled).upper()
    assert "CURRENT_" not in text
    assert "NOW()" not in text
    values = set(compiled.params.values())
    assert {CTX.now, CTX.today, CTX.user_id, *CTX.team_ids} <= values


def test_postgresql_orders_text_by_code_point_and_folds_with_lower() -> None:
    text = str(_sql("name < 'b' and name contains 'x'", postgresql.psycopg.dialect()))
    assert 'COLLATE "C"' in text
    assert "lower(deal.name) LIKE" in text
    assert "ESCAPE '!'" in text


def test_sqlite_folds_text_with_the_registered_function() -> None:
    text = str(_sql("upper(name) starts_with lower(note)", sqlite.dialect()))
    assert "mc_upper(deal.name)" in text
    assert "mc_lower(deal.note)" in text
    assert "COLLATE" not in text


def test_compilers_refuse_ill_typed_expressions() -> None:
    tables = build_tables(sa.MetaData())
    with pytest.raises(ExpressionError, match="cannot compare text with number"):
        compile_sql(parse("name = 1"), DEAL, table_resolver(tables, DEAL), CTX)
    with pytest.raises(ExpressionError, match="unknown field 'nmae'; did you mean 'name'"):
        compile_python(parse("nmae = 'a'"), DEAL)


def test_statement_cache_keeps_similar_constructs_apart(db: Database) -> None:
    row = deal_row(name="Ab", amount=Decimal("2"), close_date=dt.date(2024, 1, 10))
    answers = {
        "lower(name) = 'ab'": True,
        "upper(name) = 'ab'": False,
        "amount + 1 = 3": True,
        "amount - 1 = 3": False,
        "amount * 1.5 = 3": True,
        "amount / 1 = 3": False,
        "add_days(close_date, 1) = date('2024-01-11')": True,
        "add_days(close_date, 2) = date('2024-01-11')": False,
    }
    for text, expected in answers.items():
        assert run_sql(db, parse(text), [row], CTX).values[row["id"]] is expected, text


def test_deep_expressions_compile_and_run(db: Database) -> None:
    # SQLite 3.40's parser overflows past about 30 nested function calls, well
    # below the language's limit of 64 levels; PostgreSQL takes the full depth.
    calls = 60 if db.dialect == "postgresql" else 25
    row = deal_row(qty=2, name="x", active=True)
    deep_numbers = "qty" + " + 1" * 62
    deep_decimals = "amount" + " + 0.5" * (calls - 1)
    deep_calls = "lower(" * calls + "name" + ")" * calls + " = 'x'"
    deep_logic = "(" * 30 + "active" + " and active)" * 30
    if_chain = "".join(f"if(qty = {n}, {n * 10}, " for n in range(40)) + "-1" + ")" * 40
    cases = (
        (deep_numbers, 64),
        (deep_decimals, None),
        (deep_calls, True),
        (deep_logic, True),
        (if_chain, 20),
    )
    for text, expected in cases:
        node = parse(text)
        assert run_python(node, [row], CTX)[row["id"]] == expected
        assert run_sql(db, node, [row], CTX).values[row["id"]] == expected


def test_table_resolver_correlates_a_lookup_to_the_same_entity() -> None:
    account = Scope("account", {"id": FieldInfo(T.UUID), "name": FieldInfo(T.TEXT)})
    fields = dict(account.fields)
    scope = Scope("account", fields)
    fields["parent"] = FieldInfo(T.UUID, target=scope)
    metadata = sa.MetaData()
    table = sa.Table(
        "account",
        metadata,
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("name", sa.String(50)),
        sa.Column("parent", sa.Uuid),
    )
    engine = sa.create_engine("sqlite://")
    metadata.create_all(engine)
    root, child, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with engine.begin() as connection:
        connection.execute(
            table.insert(),
            [
                {"id": root, "name": "Root", "parent": None},
                {"id": child, "name": "Child", "parent": root},
                {"id": other, "name": "Other", "parent": child},
            ],
        )
        condition = compile_sql(
            parse("parent.name = 'Root'"), scope, table_resolver({"account": table}, scope), CTX
        )
        found = connection.execute(sa.select(table.c.id).where(condition)).scalars().all()
    engine.dispose()
    assert found == [child]


def test_register_sqlite_functions_defines_what_compiled_sql_calls() -> None:
    connection = sqlite3.connect(":memory:")
    register_sqlite_functions(connection)
    row = connection.execute(
        "SELECT mc_lower('ÀΣİ'), mc_upper('straße'), mc_lower(NULL), mc_lower(12),"
        " mc_add(0.1, 0.2), mc_sub(1, 0.9), mc_mul(0.1, 3), mc_div(1, 3), mc_div(1, 0),"
        " mc_round(2.675, 2), mc_round(-0.5, 0), mc_add(NULL, 1)"
    ).fetchone()
    connection.close()
    assert row == ("àσi", "STRAßE", None, "12", 0.3, 0.1, 0.3, 0.3333333333, None, 2.68, -1.0, None)


def _nest(start: str, template: str, times: int) -> str:
    text = start
    for _ in range(times):
        text = template.format(text)
    return text


@pytest.mark.parametrize(
    "text",
    [
        _nest("qty", "if({} between 1 and 2, 1, 2)", 30),
        _nest("qty", "if({} not in (1, 2, 3), 1, 2)", 30),
        _nest("name", "if(tags contains {}, 'a', 'b')", 30),
        _nest("created_at", "add_days({}, 1)", 60),
        _nest("qty", "coalesce({}, 1)", 60),
    ],
    ids=["between", "in", "list-contains", "add-days", "coalesce"],
)
def test_nested_constructs_compile_in_linear_time_and_size(text: str) -> None:
    # A construct that named its operand twice would double the work (and the
    # SQL) at every level: 2**30 for these inputs.
    started = time.perf_counter()
    node = parse(text)
    compile_python(node, DEAL)(deal_row(qty=1, name="a", tags=["a"]), CTX)
    for dialect in (postgresql.psycopg.dialect(), sqlite.dialect()):
        assert len(str(_sql(text, dialect))) < 40 * len(text)
    assert time.perf_counter() - started < 2


def test_negating_a_compiled_expression_keeps_its_grouping():
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql, sqlite

    from metacrm.metadata.expression import (
        EvalContext,
        FieldInfo,
        Scope,
        ValueType,
        compile_sql,
        parse,
    )

    table = sa.Table("t", sa.MetaData(), sa.Column("a", sa.String()), sa.Column("b", sa.String()))
    scope = Scope("t", {"a": FieldInfo(ValueType.TEXT), "b": FieldInfo(ValueType.TEXT)})
    import datetime as dt

    now = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    ctx = EvalContext(now=now, today=now.date(), user_id=None, team_ids=())
    expr = compile_sql(parse('a = "x" or b is null'), scope, lambda path: table.c[path[0]], ctx)
    for dialect in (sqlite.dialect(), postgresql.dialect()):
        sql = str(sa.not_(expr).compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        assert sql in (
            "NOT (t.a = 'x' OR t.b IS NULL)",
            "(t.a = 'x' OR t.b IS NULL) = 0",
        )
