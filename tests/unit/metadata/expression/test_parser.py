"""The parser: every construct, positions, precedence, errors and hostile input."""

from __future__ import annotations

import datetime as dt
import pickle
import time
from decimal import Decimal

import pytest

from metacrm.metadata.expression import ExpressionError, ValueType, parse
from metacrm.metadata.expression.nodes import (
    Arithmetic,
    Between,
    Call,
    Compare,
    Field,
    In,
    IsNull,
    ListValue,
    Literal,
    Logical,
    Match,
    Negate,
    Not,
)

T = ValueType


def lit(value: object, value_type: ValueType | None = None) -> Literal:
    if value_type is None:
        value_type = {
            str: T.TEXT,
            int: T.INTEGER,
            Decimal: T.DECIMAL,
            bool: T.BOOLEAN,
            type(None): T.NULL,
            dt.date: T.DATE,
            dt.datetime: T.DATETIME,
        }[type(value)]
    return Literal(value, value_type)  # type: ignore[arg-type]


def f(*path: str) -> Field:
    return Field(path)


def error_of(text: str) -> ExpressionError:
    with pytest.raises(ExpressionError) as caught:
        parse(text)
    return caught.value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"won"', lit("won")),
        ("'won'", lit("won")),
        (r'"say \"hi\" \\ \n \t \u00e9 \' end"', lit('say "hi" \\ \n \t é \' end')),
        (r"'it\'s'", lit("it's")),
        ('"中文 ünïcode 😀"', lit("中文 ünïcode 😀")),
        ('""', lit("")),
        ("42", lit(42)),
        ("007", lit(7)),
        ("12.5", lit(Decimal("12.5"))),
        ("12.50", lit(Decimal("12.50"))),
        ("true", lit(True)),
        ("FALSE", lit(False)),
        ("Null", lit(None)),
        ('date("2024-05-01")', lit(dt.date(2024, 5, 1))),
        (
            'datetime("2024-05-01T10:00:00Z")',
            lit(dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC)),
        ),
        (
            'DATETIME("2024-05-01 18:00:00.25+08:00")',
            lit(dt.datetime(2024, 5, 1, 10, 0, 0, 250000, tzinfo=dt.UTC)),
        ),
        ('datetime("2024-05-01T10:00-02:30")', lit(dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC))),
        ("amount", f("amount")),
        ("customer.level", f("customer", "level")),
        ("customer . level", f("customer", "level")),
        ("today()", Call("today", ())),
        ("TODAY()", Call("today", ())),
        ("coalesce(a, b, 0)", Call("coalesce", (f("a"), f("b"), lit(0)))),
        ("-amount", Negate(f("amount"))),
        ("- -1", Negate(Negate(lit(1)))),
        ("not active", Not(f("active"))),
        ("a = 1", Compare("=", f("a"), lit(1))),
        ("a != 1", Compare("!=", f("a"), lit(1))),
        ("a<1", Compare("<", f("a"), lit(1))),
        ("a <= 1", Compare("<=", f("a"), lit(1))),
        ("a > 1", Compare(">", f("a"), lit(1))),
        ("a >= 1", Compare(">=", f("a"), lit(1))),
        ('s in ("a", "b")', In(f("s"), ListValue((lit("a"), lit("b"))))),
        ('s IN ("a")', In(f("s"), ListValue((lit("a"),)))),
        ('s not in ("a")', In(f("s"), ListValue((lit("a"),)), negated=True)),
        ("team_id in my_team()", In(f("team_id"), Call("my_team", ()))),
        ("team_id NOT IN my_team()", In(f("team_id"), Call("my_team", ()), negated=True)),
        ("x between 1 and 2", Between(f("x"), lit(1), lit(2))),
        ("x not between 1 and 2", Between(f("x"), lit(1), lit(2), negated=True)),
        ('s contains "a"', Match("contains", f("s"), lit("a"))),
        ('s STARTS_WITH "a"', Match("starts_with", f("s"), lit("a"))),
        ('s like "a%"', Match("like", f("s"), lit("a%"))),
        ("s is null", IsNull(f("s"))),
        ("s IS NOT NULL", IsNull(f("s"), negated=True)),
        ("a and b", Logical("and", (f("a"), f("b")))),
        ("a or b or c", Logical("or", (f("a"), f("b"), f("c")))),
        ("a + b", Arithmetic("+", f("a"), f("b"))),
        ("a - b", Arithmetic("-", f("a"), f("b"))),
        ("a * b", Arithmetic("*", f("a"), f("b"))),
        ("a / b", Arithmetic("/", f("a"), f("b"))),
        ("(a)", f("a")),
        ("andrew = 1", Compare("=", f("andrew"), lit(1))),
        ("  a\n=\t1  ", Compare("=", f("a"), lit(1))),
        ("a\u3000=\u00a01", Compare("=", f("a"), lit(1))),
    ],
)
def test_parse_builds_each_construct(text: str, expected: object) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a or b and c", Logical("or", (f("a"), Logical("and", (f("b"), f("c")))))),
        ("(a or b) and c", Logical("and", (Logical("or", (f("a"), f("b"))), f("c")))),
        ("not a and b", Logical("and", (Not(f("a")), f("b")))),
        ("not a = 1", Not(Compare("=", f("a"), lit(1)))),
        ("a + b * c", Arithmetic("+", f("a"), Arithmetic("*", f("b"), f("c")))),
        ("a - b - c", Arithmetic("-", Arithmetic("-", f("a"), f("b")), f("c"))),
        ("a - (b - c)", Arithmetic("-", f("a"), Arithmetic("-", f("b"), f("c")))),
        ("-a * b", Arithmetic("*", Negate(f("a")), f("b"))),
        (
            "a + 1 > b * 2",
            Compare(">", Arithmetic("+", f("a"), lit(1)), Arithmetic("*", f("b"), lit(2))),
        ),
        (
            "x between 1 and 2 and y",
            Logical("and", (Between(f("x"), lit(1), lit(2)), f("y"))),
        ),
        ("a and (b and c)", Logical("and", (f("a"), Logical("and", (f("b"), f("c")))))),
    ],
)
def test_parse_follows_precedence(text: str, expected: object) -> None:
    assert parse(text) == expected


def test_parse_places_nodes_at_their_source_position() -> None:
    tree = parse('amount >= 1000\n  and stage in ("won", "lost")')
    assert isinstance(tree, Logical)
    compare, membership = tree.operands
    assert (tree.line, tree.column) == (1, 8)
    assert (compare.line, compare.column) == (1, 8)
    assert isinstance(compare, Compare)
    assert (compare.right.line, compare.right.column) == (1, 11)
    assert (membership.line, membership.column) == (2, 13)
    assert isinstance(membership, In)
    assert (membership.choices.line, membership.choices.column) == (2, 16)


def test_equal_trees_ignore_positions() -> None:
    assert parse("a=1") == parse("  a   =   1")
    assert hash(parse("a=1")) == hash(parse("\n\na = 1"))


def test_literals_keep_their_python_types() -> None:
    assert parse("1") != parse("true")
    assert parse("1") != parse("1.0")
    assert isinstance(parse("12.5").value, Decimal)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "message", "line", "column"),
    [
        ("", "the expression is empty", 1, 1),
        ("   ", "the expression is empty", 1, 1),
        ("amount >=", "expected a value after '>=', found the end of the expression", 1, 10),
        ("amount = = 1", "use a single '=' to compare", 1, 10),
        ("amount == 1", "use a single '=' to compare", 1, 9),
        ("amount <> 1", "use '!=' for 'is not equal to'", 1, 9),
        (
            "amount 5",
            "expected an operator such as '=', '+', 'and' or 'or', found the number 5",
            1,
            8,
        ),
        ('x in "a"', "expected a list in parentheses after 'in'", 1, 6),
        ("x in ()", "expected a value after '('", 1, 7),
        ("x in (1,)", "expected a value after ','", 1, 9),
        ("x in (1 2)", "expected ',' or ')', found the number 2", 1, 9),
        ("f(a b)", "expected ',' or ')', found 'b'", 1, 5),
        ("x is 5", "expected 'null' or 'not null' after 'is'", 1, 6),
        ("x not 5", "expected 'in' or 'between' after 'not'", 1, 7),
        ("x between 1 or 2", "expected 'and' to finish 'between", 1, 13),
        ("a = b = c", "'=' cannot follow a comparison: join conditions with 'and' or 'or'", 1, 7),
        ("x.", "expected a field name after '.'", 1, 3),
        ("a and", "expected a value after 'and', found the end of the expression", 1, 6),
        ("not", "expected a value after 'not'", 1, 4),
        (".5", "expected a value, found '.'", 1, 1),
        ("(a", "the '(' at line 1, column 1 is never closed", 1, 3),
        ("a)", "this ')' has no matching '('", 1, 2),
        ('x = "abc', 'this text is never closed: add a closing "', 1, 5),
        ("x = 'abc", "this text is never closed: add a closing '", 1, 5),
        ('x = "a\nb"', 'this text is never closed: add a closing "', 1, 5),
        ("a && b", "write 'and' to combine conditions", 1, 3),
        ("a || b", "write 'or' to combine conditions", 1, 3),
        ("!a", "write 'not' to negate a condition", 1, 1),
        ("1=1; drop table t", "unexpected character ';'", 1, 4),
        ("x = [1]", "write a list in parentheses", 1, 5),
        ("x = #", "unexpected character '#'", 1, 5),
        ("x = “a”", "put text between straight quotes", 1, 5),
        ("x（1）", "use the plain '(' instead", 1, 2),
        ("x ＝ 1", "use the plain '=' instead", 1, 3),
        ("x ≥ 1", "use the plain '>=' instead", 1, 3),
        ("аmount > 1", "U+0430 CYRILLIC SMALL LETTER A", 1, 1),
        ("amount > 1 and stagе = 1", "U+0435 CYRILLIC SMALL LETTER IE", 1, 20),
        ("ａｍｏｕｎｔ = 1", "U+FF41 FULLWIDTH LATIN SMALL LETTER A", 1, 1),
        ("金额 > 1", "names of fields and functions use only the letters a-z", 1, 1),
        ('x = "a\\q"', "unknown escape '\\q' in text", 1, 7),
        ('x = "\\u12"', "\\u must be followed by four hexadecimal digits", 1, 6),
        ('x = "\\ud800"', "half of a surrogate pair", 1, 6),
        ('x = "\\u0000"', "NUL character", 1, 6),
        ('x = "a\0b"', "NUL character", 1, 7),
        ("a.b.c = 1", "a field can reach only one lookup away", 1, 4),
        ("99999999999999999999", "this number is too large", 1, 1),
        ("1." + "1" * 40, "more than 28 digits", 1, 1),
        ('date("2024-02-30")', '"2024-02-30" is not a valid date: day is out of range', 1, 6),
        ('date("01/05/2024")', "is not a date: write it as YYYY-MM-DD", 1, 6),
        (
            "date(created_at)",
            'date() takes one value written as text, like date("2024-05-01")',
            1,
            1,
        ),
        ('date("2024-05-01", 1)', "date() takes one value written as text", 1, 1),
        ('datetime("2024-05-01T10:00:00")', "with a time zone", 1, 10),
        ('datetime("2024-13-01T10:00:00Z")', "is not a valid date and time", 1, 10),
        ("a\n  and\n b b", "expected an operator", 3, 4),
    ],
)
def test_parse_reports_errors_in_plain_words_at_their_position(
    text: str, message: str, line: int, column: int
) -> None:
    error = error_of(text)
    assert message in error.message
    assert (error.line, error.column) == (line, column)


def test_expression_error_formats_and_serialises() -> None:
    error = ExpressionError("unknown field 'amout'", 2, 7)
    assert str(error) == "line 2, column 7: unknown field 'amout'"
    assert error.to_dict() == {"message": "unknown field 'amout'", "line": 2, "column": 7}
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.message, copy.line, copy.column) == (error.message, 2, 7)
    assert isinstance(error, Exception)


def test_parse_refuses_what_is_not_text() -> None:
    with pytest.raises(TypeError):
        parse(b"a = 1")  # type: ignore[arg-type]


def _hostile(text: str) -> ExpressionError:
    started = time.perf_counter()
    error = error_of(text)
    assert time.perf_counter() - started < 1.0
    return error


def test_parse_refuses_text_longer_than_the_limit() -> None:
    error = _hostile("a" * 100_000)
    assert "too long (100,000 characters; the limit is 10,000)" in error.message
    assert (error.line, error.column) == (1, 10_001)


def test_parse_refuses_ten_thousand_nested_parentheses_cheaply() -> None:
    error = _hostile("(" * 10_000 + "1" + ")" * 10_000)
    assert "too long" in error.message
    error = _hostile("(" * 4_000 + "1" + ")" * 4_000)
    assert "too many nested parentheses (the limit is 64)" in error.message
    assert (error.line, error.column) == (1, 65)


def test_parse_accepts_sixty_four_nested_parentheses() -> None:
    assert parse("(" * 60 + "1" + ")" * 60) == lit(1)


def test_parse_ignores_parentheses_inside_text_when_counting_depth() -> None:
    assert parse('x = "' + "(" * 100 + '"') == Compare("=", f("x"), lit("(" * 100))


@pytest.mark.parametrize(
    "text",
    [
        "not " * 2_000 + "x",
        "-" * 5_000 + "1",
        "+".join(["1"] * 3_000),
        " * ".join(["a"] * 1_500),
        "x = " + "- " * 100 + "1",
    ],
)
def test_parse_refuses_trees_nested_deeper_than_the_limit(text: str) -> None:
    assert "nested too deeply (the limit is 64 levels)" in _hostile(text).message


def test_parse_keeps_long_and_or_chains_flat() -> None:
    tree = parse(" or ".join(f"stage = 's{index}'" for index in range(200)))
    assert isinstance(tree, Logical)
    assert len(tree.operands) == 200


def test_parse_refuses_trees_with_too_many_nodes() -> None:
    error = _hostile(" or ".join(["a"] * 1_200))
    assert "too big (the limit is 1,000 parts)" in error.message


def test_parse_handles_an_unterminated_text_as_long_as_the_limit() -> None:
    error = _hostile('"' + "x" * 9_990)
    assert "never closed" in error.message


def test_parse_rejects_garbage_quickly() -> None:
    _hostile("a " * 4_999)
    _hostile("= " * 4_999)
    _hostile("\\" * 9_999)
    _hostile("é" * 9_999)
