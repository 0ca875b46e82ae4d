"""unparse: canonical text that parses back to the same tree."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from metacrm.metadata.expression import ValueType, parse, unparse
from metacrm.metadata.expression.nodes import Arithmetic, Call, Field, Literal, Logical, Negate

T = ValueType


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        (
            'AMOUNT >= 1000 AND Stage IN ("won","lost") and owner_id=ME()',
            'AMOUNT >= 1000 and Stage in ("won", "lost") and owner_id = me()',
        ),
        ("customer . level = 'vip'", 'customer.level = "vip"'),
        ("days_between( created_at , today() ) > 30", "days_between(created_at, today()) > 30"),
        ("((a))", "a"),
        ("(a or b) and c", "(a or b) and c"),
        ("a or (b and c)", "a or b and c"),
        ("a or (b or c)", "a or (b or c)"),
        ("not (a = 1)", "not a = 1"),
        ("not (a and b)", "not (a and b)"),
        ("(not a) = true", "(not a) = true"),
        ("(a = 1) = (b = 2)", "(a = 1) = (b = 2)"),
        ("a - (b - c)", "a - (b - c)"),
        ("(a - b) - c", "a - b - c"),
        ("a * (b / c)", "a * (b / c)"),
        ("(a + b) * c", "(a + b) * c"),
        ("-(a + b)", "-(a + b)"),
        ("- - 1", "--1"),
        ("a - -1", "a - -1"),
        ("x between (1 + 1) and 2 * 3", "x between 1 + 1 and 2 * 3"),
        ("x NOT BETWEEN 1 AND 2", "x not between 1 and 2"),
        ("x is NOT null", "x is not null"),
        ("t not in my_team()", "t not in my_team()"),
        ('x in ("a")', 'x in ("a")'),
        (r"'say \"hi\"\n'", r'"say \"hi\"\n"'),
        ('"tab\there"', '"tab\\there"'),
        (r'"\u0007 bell"', r'"\u0007 bell"'),
        ('"中文 😀"', '"中文 😀"'),
        ("12.50", "12.50"),
        ("True", "true"),
        ("NULL", "null"),
        ('date("2024-05-01")', 'date("2024-05-01")'),
        ('datetime("2024-05-01 18:00:00.5+08:00")', 'datetime("2024-05-01T10:00:00.500000Z")'),
        ('s LIKE "a\\\\%"', 's like "a\\\\%"'),
    ],
)
def test_unparse_writes_canonical_text(text: str, canonical: str) -> None:
    assert unparse(parse(text)) == canonical
    assert parse(canonical) == parse(text)


@pytest.mark.parametrize(
    ("node", "text"),
    [
        (Literal(Decimal("5"), T.DECIMAL), "5.0"),
        (Literal(Decimal("1E+3"), T.DECIMAL), "1000.0"),
        (Literal(Decimal("0.00"), T.DECIMAL), "0.00"),
        (
            Literal(dt.datetime(2024, 1, 1, tzinfo=dt.UTC), T.DATETIME),
            'datetime("2024-01-01T00:00:00Z")',
        ),
        (Negate(Literal(5, T.INTEGER)), "-5"),
        (Arithmetic("-", Field(("a",)), Negate(Field(("b",)))), "a - -b"),
        (
            Logical("and", (Field(("a",)), Logical("and", (Field(("b",)), Field(("c",)))))),
            "a and (b and c)",
        ),
    ],
)
def test_unparse_round_trips_hand_built_trees(node: object, text: str) -> None:
    assert unparse(node) == text  # type: ignore[arg-type]
    assert parse(text) == node


@pytest.mark.parametrize(
    "node",
    [
        Field(("and",)),
        Field(("not a name",)),
        Call("Null", ()),
        Field(("ünïcode",)),
    ],
)
def test_unparse_refuses_names_the_grammar_cannot_read(node: object) -> None:
    with pytest.raises(ValueError):
        unparse(node)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "value_type"),
    [
        (-1, T.INTEGER),
        (Decimal("-0"), T.DECIMAL),
        (Decimal("NaN"), T.DECIMAL),
        (True, T.INTEGER),
        ("1", T.INTEGER),
        (dt.datetime(2024, 1, 1), T.DATETIME),
        (dt.datetime(2024, 1, 1, tzinfo=dt.UTC), T.DATE),
        (None, T.TEXT),
    ],
)
def test_literal_refuses_values_the_source_cannot_spell(
    value: object, value_type: ValueType
) -> None:
    with pytest.raises((TypeError, ValueError)):
        Literal(value, value_type)  # type: ignore[arg-type]
