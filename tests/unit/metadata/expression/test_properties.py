"""Properties over random input: the printer round-trips, and SQL agrees with Python."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metacrm.metadata.expression import (
    EvalContext,
    ExpressionError,
    ValueType,
    check,
    parse,
    unparse,
)
from metacrm.metadata.expression.nodes import Node

from .conftest import Database
from .harness import run_python, run_sql, same_value
from .model import DEAL
from .strategies import contexts, customers, rows, syntax_trees, typed_expressions


@settings(max_examples=200, deadline=None)
@given(syntax_trees())
def test_unparse_then_parse_gives_the_same_tree(tree: Node) -> None:
    assert parse(unparse(tree)) == tree


@settings(max_examples=200, deadline=None)
@given(typed_expressions())
def test_generated_expressions_type_check_and_round_trip(typed: tuple[ValueType, Node]) -> None:
    kind, node = typed
    found = check(node, DEAL)
    assert found in (kind, ValueType.NULL)
    assert parse(unparse(node)) == node


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    typed=typed_expressions(),
    deals=rows(),
    people=customers(),
    ctx=contexts(),
)
def test_sql_and_python_agree_on_every_row(
    db: Database,
    typed: tuple[ValueType, Node],
    deals: list[dict[str, Any]],
    people: list[dict[str, Any]],
    ctx: EvalContext,
) -> None:
    _, node = typed
    value_type = check(node, DEAL)
    python = run_python(node, deals, ctx, people)
    outcome = run_sql(db, node, deals, ctx, people)
    text = unparse(node)
    for row in deals:
        expected, found = python[row["id"]], outcome.values[row["id"]]
        assert same_value(expected, found, value_type, db.dialect), (text, row, expected, found)
    if outcome.matched is not None:
        assert outcome.matched == {row["id"] for row in deals if python[row["id"]] is True}, text


_TOKENS = ["(", ")", ",", ".", '"', "'", "\\", "=", "<", ">", "!", "+", "-", "*", "/", " "]
_WORDS = ["and", "or", "not", "in", "is", "null", "between", "like", "x", "if", "date", "1", "2.5"]


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=40),
        st.lists(st.sampled_from(_TOKENS + _WORDS), max_size=20).map(" ".join),
        st.lists(st.sampled_from(_TOKENS + _WORDS), max_size=30).map("".join),
    )
)
def test_parse_gives_a_tree_or_an_expression_error_and_nothing_else(text: str) -> None:
    try:
        tree = parse(text)
    except ExpressionError as error:
        assert error.line >= 1 and error.column >= 1
        assert error.message
    else:
        assert parse(unparse(tree)) == tree
