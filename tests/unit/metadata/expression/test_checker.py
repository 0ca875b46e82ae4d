"""The type checker: the type of every construct and every error, at its position."""

from __future__ import annotations

import pytest

from metacrm.metadata.expression import (
    ExpressionError,
    FieldInfo,
    Scope,
    ValueType,
    check,
    parse,
    references,
)
from metacrm.metadata.expression.nodes import Field, ListValue

from .model import DEAL

T = ValueType


def type_of(text: str) -> ValueType:
    return check(parse(text), DEAL)


def error_of(text: str, scope: Scope = DEAL) -> ExpressionError:
    with pytest.raises(ExpressionError) as caught:
        check(parse(text), scope)
    return caught.value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name", T.TEXT),
        ("customer.level", T.TEXT),
        ("customer.score + 1", T.INTEGER),
        ("qty + 1", T.INTEGER),
        ("qty * qty - 2", T.INTEGER),
        ("qty / 2", T.DECIMAL),
        ("qty + 1.5", T.DECIMAL),
        ("amount * 2", T.DECIMAL),
        ("-amount", T.DECIMAL),
        ("-qty", T.INTEGER),
        ("qty + null", T.INTEGER),
        ("null + null", T.NULL),
        ("len(name)", T.INTEGER),
        ("lower(name)", T.TEXT),
        ("upper(customer.level)", T.TEXT),
        ("days_between(created_at, today())", T.INTEGER),
        ("days_between(close_date, close_date)", T.INTEGER),
        ("add_days(close_date, 3)", T.DATE),
        ("add_days(created_at, -3)", T.DATETIME),
        ("add_days(today(), qty)", T.DATE),
        ("today()", T.DATE),
        ("now()", T.DATETIME),
        ("me()", T.UUID),
        ("coalesce(amount, qty, 0)", T.DECIMAL),
        ("coalesce(qty, 0)", T.INTEGER),
        ("coalesce(null, name)", T.TEXT),
        ("coalesce(close_date, created_at)", T.DATETIME),
        ("coalesce(null, null)", T.NULL),
        ("coalesce(tags, tags)", T.LIST),
        ("round(amount)", T.DECIMAL),
        ("round(amount, 2)", T.DECIMAL),
        ("round(qty, 2)", T.INTEGER),
        ('if(active, name, "none")', T.TEXT),
        ("if(active, qty, 1.5)", T.DECIMAL),
        ("if(null, 1, 2)", T.INTEGER),
        ("amount >= 1000", T.BOOLEAN),
        ("qty = 1.5", T.BOOLEAN),
        ('name < "m"', T.BOOLEAN),
        ("created_at >= today()", T.BOOLEAN),
        ("close_date < now()", T.BOOLEAN),
        ("active = true", T.BOOLEAN),
        ("owner_id = me()", T.BOOLEAN),
        ('owner_id = "00000000-0000-0000-0000-000000000001"', T.BOOLEAN),
        ('owner_id in ("00000000-0000-0000-0000-000000000001", me())', T.BOOLEAN),
        ("team_id in my_team()", T.BOOLEAN),
        ('stage in ("won", "lost")', T.BOOLEAN),
        ("qty in (1, 2.5)", T.BOOLEAN),
        ("qty between 1 and 2.5", T.BOOLEAN),
        ('close_date between date("2024-01-01") and now()', T.BOOLEAN),
        ('name contains "a"', T.BOOLEAN),
        ("name starts_with lower(stage)", T.BOOLEAN),
        ('name like "a%"', T.BOOLEAN),
        ('tags contains "vip"', T.BOOLEAN),
        ("meta is null", T.BOOLEAN),
        ("tags is not null", T.BOOLEAN),
        ("not active", T.BOOLEAN),
        ("active and null", T.BOOLEAN),
        ("active or qty > 1 or null", T.BOOLEAN),
        ("true", T.BOOLEAN),
        ("null", T.NULL),
    ],
)
def test_check_gives_each_construct_its_type(text: str, expected: ValueType) -> None:
    assert type_of(text) is expected


@pytest.mark.parametrize(
    ("text", "message", "line", "column"),
    [
        ("amout > 1", "unknown field 'amout'; did you mean 'amount'?", 1, 1),
        ("Amount > 1", "unknown field 'Amount'; did you mean 'amount'?", 1, 1),
        ("zzz > 1", "unknown field 'zzz'", 1, 1),
        ("customer.levle = 'a'", "unknown field 'levle' of customer; did you mean 'level'?", 1, 1),
        ("stage.name = 'a'", "'stage' is not a lookup, so 'stage.name' does not exist", 1, 1),
        ("hidden = 'a'", "the field 'hidden' cannot be used in expressions", 1, 1),
        ("customer.secret = 'a'", "the field 'secret' of customer cannot be used", 1, 1),
        ("todya()", "unknown function 'todya'; did you mean 'today'?", 1, 1),
        ("frobnicate(1)", "unknown function 'frobnicate'", 1, 1),
        ("today(1)", "today() takes no values, got 1", 1, 1),
        ("days_between(today())", "days_between() takes 2 values, got 1", 1, 1),
        ("lower()", "lower() takes 1 value, got 0", 1, 1),
        ("round()", "round() takes 1 or 2 values, got 0", 1, 1),
        ("coalesce(a)", "coalesce() takes at least 2 values, got 1", 1, 1),
        ("if(active, 1)", "if() takes 3 values, got 2", 1, 1),
        ("name = 5", "cannot compare text with number", 1, 6),
        ('amount >= "1000"', "cannot compare number with text", 1, 8),
        ("close_date = 5", "cannot compare date with number", 1, 12),
        ("active < true", "true/false values can only be compared with '=' or '!='", 1, 8),
        ("owner_id > me()", "record id values can only be compared with '=' or '!='", 1, 10),
        ('owner_id = "bob"', '"bob" is not a valid record id', 1, 12),
        ("owner_id = name", "cannot compare record id with text", 1, 10),
        ("tags = tags", "lists cannot be compared: use 'contains'", 1, 6),
        ("meta = meta", "JSON values cannot be compared or sorted", 1, 6),
        ("amount = null", "comparing with null never matches: write 'x is null'", 1, 8),
        ("qty in (1, null)", "a list after 'in' cannot hold null", 1, 12),
        ('qty in (1, "a")', "cannot compare number with text", 1, 12),
        ("qty between 1 and 'z'", "cannot compare number with text", 1, 5),
        ("name in my_team()", "the left side must be a team id, not text", 1, 6),
        ("team_id in today()", "after 'in' write a list like", 1, 12),
        ("team_id in my_team(1)", "my_team() takes no values, got 1", 1, 12),
        ("my_team() = team_id", "my_team() can only follow 'in' or 'not in'", 1, 1),
        ("name + 1", "'+' needs numbers, not text", 1, 1),
        ("close_date + 1", "'+' needs numbers, not a date (use add_days to move a date)", 1, 1),
        ("-name", "'-' needs a number, not text", 1, 2),
        (
            "amount and active",
            "'and' needs conditions (true/false) on both sides; this is a number",
            1,
            1,
        ),
        ("not name", "'not' needs a condition (true/false); this is text", 1, 5),
        ("qty contains 'a'", "'contains' needs text, not a number", 1, 1),
        ("name contains 5", "'contains' needs text on its right, not a number", 1, 15),
        ("name like stage", "the pattern after 'like' must be text in quotes", 1, 11),
        ('name like "abc\\\\"', "a like pattern cannot end with a backslash", 1, 11),
        ("tags like 'a'", "'like' works on text; for a list use 'contains'", 1, 6),
        ("name contains null", "matching null never matches", 1, 6),
        ("days_between(name, today())", "days_between() needs a date, not text", 1, 14),
        (
            "add_days(close_date, 1.5)",
            "add_days() needs a whole number of days, not a number",
            1,
            22,
        ),
        ("len(qty)", "len() needs text, not a number", 1, 5),
        ("round(name)", "round() needs a number, not text", 1, 7),
        ("round(amount, 11)", "whole number from 0 to 10", 1, 15),
        ("round(amount, qty)", "whole number from 0 to 10", 1, 15),
        ("if(qty, 1, 2)", "if() needs a condition (true/false), not a number", 1, 4),
        ("if(active, 1, 'a')", "if() cannot mix number with text", 1, 15),
        ("coalesce(qty, name)", "coalesce() cannot mix number with text", 1, 15),
    ],
)
def test_check_reports_errors_at_the_culprit(
    text: str, message: str, line: int, column: int
) -> None:
    error = error_of(text)
    assert message in error.message
    assert (error.line, error.column) == (line, column)


def test_check_with_expect_demands_a_condition() -> None:
    assert check(parse("qty > 1"), DEAL, expect=T.BOOLEAN) is T.BOOLEAN
    assert check(parse("null"), DEAL, expect=T.BOOLEAN) is T.NULL
    with pytest.raises(
        ExpressionError, match="must give a condition .true/false., but it gives a number"
    ):
        check(parse("qty + 1"), DEAL, expect=T.BOOLEAN)
    assert check(parse("qty + 1"), DEAL, expect=T.DECIMAL) is T.INTEGER


def test_check_refuses_a_list_outside_in() -> None:
    with pytest.raises(ExpressionError, match="can only follow 'in'"):
        check(ListValue((Field(("name",)),)), DEAL)


def test_check_refuses_hand_built_trees_beyond_the_limits() -> None:
    deep = Field(("active",))
    from metacrm.metadata.expression.nodes import Not

    for _ in range(100):
        deep = Not(deep)
    with pytest.raises(ExpressionError, match="nested too deeply"):
        check(deep, DEAL)


def test_lookup_reaches_only_fields_of_the_target_scope() -> None:
    target = Scope("account", {"tier": FieldInfo(T.INTEGER)})
    scope = Scope("deal", {"account": FieldInfo(T.UUID, target=target)})
    assert check(parse("account.tier > 1"), scope) is T.BOOLEAN
    assert check(parse("account is null"), scope) is T.BOOLEAN


def test_references_lists_every_field_path() -> None:
    tree = parse(
        'amount >= 1000 and customer.level = "vip" and days_between(created_at, today()) > 30'
        " and (amount > 1 or stage in (note, 'x'))"
    )
    assert references(tree) == {
        ("amount",),
        ("customer", "level"),
        ("created_at",),
        ("stage",),
        ("note",),
    }
    assert references(parse("today() = today()")) == set()
