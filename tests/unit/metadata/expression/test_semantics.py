"""What each construct means, checked on Python, SQLite and PostgreSQL with the same rows."""

from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from metacrm.metadata.expression import check, compile_python, parse

from .conftest import Database
from .harness import CUSTOMERS, deal_row, python_record, run_python, run_sql, same_value
from .model import CTX, CUSTOMER_IDS, DEAL, TEAMS, USERS

D = Decimal
UTC = dt.UTC

CASES: list[tuple[str, dict[str, Any], Any]] = [
    # Three-valued logic: a condition is null when it cannot be decided.
    ("active and qty > 0", {"active": True, "qty": 1}, True),
    ("active and qty > 0", {"active": None, "qty": 1}, None),
    ("active and qty > 0", {"active": None, "qty": 0}, False),
    ("active or qty > 0", {"active": None, "qty": 1}, True),
    ("active or qty > 0", {"active": None, "qty": 0}, None),
    ("active or qty > 0 or name = 'x'", {"active": False, "qty": 0, "name": "x"}, True),
    ("not active", {"active": None}, None),
    ("not active", {"active": False}, True),
    ("qty = 1", {"qty": None}, None),
    ("qty != 1", {"qty": None}, None),
    ("active = true", {"active": True}, True),
    ("active != false", {"active": None}, None),
    ("null", {}, None),
    ("true and null", {}, None),
    ("false and null", {}, False),
    ("name is null", {"name": None}, True),
    ("name is null", {"name": ""}, False),
    ("name is not null", {"name": ""}, True),
    ("tags is null", {"tags": None}, True),
    ("tags is null", {"tags": []}, False),
    ("meta is not null", {"meta": {"a": 1}}, True),
    ("meta is null", {"meta": None}, True),
    ("qty + null is null", {"qty": 1}, True),
    # in / not in follow SQL, nulls included.
    ("stage in ('won', 'lost')", {"stage": "won"}, True),
    ("stage in ('won', 'lost')", {"stage": "Won"}, False),
    ("stage in ('won', 'lost')", {"stage": None}, None),
    ("stage not in ('won', 'lost')", {"stage": "open"}, True),
    ("stage not in ('won', 'lost')", {"stage": None}, None),
    ("stage in ('won', note)", {"stage": "open", "note": None}, None),
    ("stage in ('won', note)", {"stage": "won", "note": None}, True),
    ("stage not in ('won', note)", {"stage": "open", "note": None}, None),
    ("stage not in ('won', note)", {"stage": "won", "note": None}, False),
    ("name in (customer.level)", {"name": None, "customer": None}, None),
    ("name in (customer.level)", {"name": "x", "customer": None}, None),
    ("name not in (customer.level)", {"name": "x", "customer": None}, None),
    ("name in (customer.level)", {"name": "VIP", "customer": CUSTOMER_IDS[0]}, True),
    ("qty in (1, 2.5)", {"qty": 1}, True),
    ("amount in (1, 2.5)", {"amount": D("2.5")}, True),
    ("close_date in (today())", {"close_date": CTX.today}, True),
    (
        "created_at in (date('2024-05-01'))",
        {"created_at": dt.datetime(2024, 5, 1, tzinfo=UTC)},
        True,
    ),
    ("team_id in my_team()", {"team_id": TEAMS[0]}, True),
    ("team_id in my_team()", {"team_id": TEAMS[2]}, False),
    ("team_id in my_team()", {"team_id": None}, None),
    ("team_id not in my_team()", {"team_id": TEAMS[2]}, True),
    ("owner_id = me()", {"owner_id": USERS[0]}, True),
    ("owner_id = me()", {"owner_id": USERS[1]}, False),
    ("owner_id = '00000000-0000-0000-0000-000000000002'", {"owner_id": USERS[1]}, True),
    ("owner_id in ('00000000-0000-0000-0000-000000000003', me())", {"owner_id": USERS[0]}, True),
    # between includes both ends.
    ("qty between 1 and 3", {"qty": 3}, True),
    ("qty between 1 and 3", {"qty": 4}, False),
    ("qty between 1 and null + 3", {"qty": 0}, False),
    ("qty between 1 and null + 3", {"qty": 2}, None),
    ("qty not between 1 and 3", {"qty": 0}, True),
    ("name between 'a' and 'c'", {"name": "b"}, True),
    # Text: comparisons are exact and ordered by code point; matching ignores case.
    ("name = 'Acme'", {"name": "acme"}, False),
    ("name < 'a'", {"name": "B"}, True),
    ("name < 'é'", {"name": "z"}, True),
    ("name > ''", {"name": ""}, False),
    ("name contains 'STRASSE'", {"name": "Straße"}, False),
    ("name contains 'STRAßE'", {"name": "straße 1"}, True),
    ("name contains 'ÉCOLE'", {"name": "l'école"}, True),
    ("name contains '中文'", {"name": "我的中文名"}, True),
    ("name contains ''", {"name": ""}, True),
    ("name contains 'x'", {"name": None}, None),
    ("name contains note", {"name": "abc", "note": None}, None),
    ("name contains '%'", {"name": "100%"}, True),
    ("name contains '%'", {"name": "100"}, False),
    ("name contains '_'", {"name": "a-b"}, False),
    ("name contains '!'", {"name": "hi!"}, True),
    ("name contains '!%'", {"name": "a!%b"}, True),
    ("name contains '\\\\'", {"name": "a\\b"}, True),
    ("name contains note", {"name": "50% OFF", "note": "% off"}, True),
    ("name contains note", {"name": "50 OFF", "note": "_off"}, False),
    ("name starts_with 'ac'", {"name": "ACME"}, True),
    ("name starts_with 'cm'", {"name": "ACME"}, False),
    ("name starts_with '%'", {"name": "ACME"}, False),
    ("name starts_with ''", {"name": ""}, True),
    ("name starts_with 'σ'", {"name": "ΣΟΦΙΑ"}, True),
    ("name like 'a%'", {"name": "Acme"}, True),
    ("name like 'a_me'", {"name": "ACME"}, True),
    ("name like 'a_e'", {"name": "ACME"}, False),
    ("name like '%'", {"name": ""}, True),
    ("name like '100\\\\%'", {"name": "100%"}, True),
    ("name like '100\\\\%'", {"name": "1000"}, False),
    ("name like '_\\\\_%'", {"name": "a_b"}, True),
    ("name like '_\\\\_%'", {"name": "ab_"}, False),
    ("name like 'a!b'", {"name": "A!B"}, True),
    ("name like '%中_'", {"name": "我的中文"}, True),
    ("name like 'i%'", {"name": "İstanbul"}, True),
    ("name like '%'", {"name": "line\nbreak"}, True),
    ("tags contains 'vip'", {"tags": ["vip", "new"]}, True),
    ("tags contains 'VIP'", {"tags": ["vip"]}, False),
    ("tags contains 'vi'", {"tags": ["vip"]}, False),
    ("tags contains '中文'", {"tags": ["中文"]}, True),
    ("tags contains ''", {"tags": [""]}, True),
    ("tags contains 'vip'", {"tags": []}, False),
    ("tags contains 'vip'", {"tags": None}, None),
    ("tags contains note", {"tags": ["vip"], "note": None}, None),
    ("not tags contains 'vip'", {"tags": None}, None),
    ("lower(name)", {"name": "ÀÉÎ ΣΟΦΙΑΣ İ Straße"}, "àéî σοφιασ i straße"),
    ("upper(name)", {"name": "àéî straße ﬁ ς"}, "ÀÉÎ STRAßE ﬁ Σ"),
    ("len(name)", {"name": "中文😀é"}, 4),
    ("len(name)", {"name": ""}, 0),
    ("len(name)", {"name": None}, None),
    # Lookups reach one hop; a missing target gives null.
    ("customer.level = 'VIP'", {"customer": CUSTOMER_IDS[0]}, True),
    ("customer.level = 'VIP'", {"customer": None}, None),
    ("customer.level = ''", {"customer": CUSTOMER_IDS[1]}, True),
    ("customer.score + 1", {"customer": CUSTOMER_IDS[0]}, 11),
    # Numbers: integers stay whole, decimals are exact, / is decimal and null on zero.
    ("qty + 1", {"qty": 41}, 42),
    ("qty * qty - 1", {"qty": -3}, 8),
    ("-qty", {"qty": 5}, -5),
    ("qty / 4", {"qty": 10}, D("2.5")),
    ("qty / 3", {"qty": 2}, D("0.6666666667")),
    ("qty / 3", {"qty": -2}, D("-0.6666666667")),
    ("qty / 0", {"qty": 2}, None),
    ("amount / (qty - qty)", {"amount": D("1"), "qty": 3}, None),
    ("amount / 0.0", {"amount": D("1")}, None),
    ("amount * 3", {"amount": D("0.1")}, D("0.3")),
    ("amount * 3 = 0.3", {"amount": D("0.1")}, True),
    ("amount + 0.2 = 0.3", {"amount": D("0.1")}, True),
    ("amount + 0.2 = 1234567.3", {"amount": D("1234567.1")}, True),
    ("amount - 0.1", {"amount": D("0.3")}, D("0.2")),
    ("amount + qty", {"amount": D("0.5"), "qty": 2}, D("2.5")),
    ("amount / 3 * 3 = amount", {"amount": D("1")}, False),
    ("amount > 1000", {"amount": D("1000.0001")}, True),
    ("amount = 1000", {"amount": D("1000")}, True),
    ("round(amount)", {"amount": D("2.5")}, D("3")),
    ("round(amount)", {"amount": D("-2.5")}, D("-3")),
    ("round(amount, 2)", {"amount": D("0.125")}, D("0.13")),
    ("round(amount, 2)", {"amount": D("-0.125")}, D("-0.13")),
    ("round(amount, 1)", {"amount": D("0.15")}, D("0.2")),
    ("round(amount, 2)", {"amount": D("1.005")}, D("1.01")),
    ("round(amount, 2)", {"amount": D("2.675")}, D("2.68")),
    ("round(qty / 3, 4)", {"qty": 2}, D("0.6667")),
    ("round(qty, 2)", {"qty": 7}, 7),
    ("coalesce(amount, qty, 0)", {"amount": None, "qty": None}, D("0")),
    ("coalesce(amount, qty, 0)", {"amount": None, "qty": 4}, D("4")),
    ("coalesce(name, note, 'none')", {"name": None, "note": ""}, ""),
    ("if(active, 'yes', 'no')", {"active": None}, "no"),
    ("if(active, 'yes', 'no')", {"active": True}, "yes"),
    ("if(qty > 1, qty, amount)", {"qty": 2, "amount": D("1.5")}, D("2")),
    # Dates: days_between counts calendar days in UTC; add_days moves by whole days.
    ("days_between(close_date, today())", {"close_date": dt.date(2024, 4, 2)}, 30),
    ("days_between(today(), close_date)", {"close_date": dt.date(2024, 4, 2)}, -30),
    (
        "days_between(created_at, today())",
        {"created_at": dt.datetime(2024, 4, 1, 23, 59, tzinfo=UTC)},
        31,
    ),
    (
        "days_between(created_at, now())",
        {"created_at": dt.datetime(2024, 5, 1, 23, 59, tzinfo=UTC)},
        1,
    ),
    (
        "days_between(created_at, today()) > 30",
        {"created_at": dt.datetime(2024, 4, 1, tzinfo=UTC)},
        True,
    ),
    ("days_between(close_date, null)", {"close_date": dt.date(2024, 4, 2)}, None),
    ("add_days(close_date, 30)", {"close_date": dt.date(2024, 2, 15)}, dt.date(2024, 3, 16)),
    ("add_days(close_date, -31)", {"close_date": dt.date(2024, 3, 31)}, dt.date(2024, 2, 29)),
    ("add_days(close_date, qty)", {"close_date": dt.date(2024, 3, 31), "qty": None}, None),
    (
        "add_days(created_at, 2)",
        {"created_at": dt.datetime(2024, 3, 30, 23, 0, 0, 123456, tzinfo=UTC)},
        dt.datetime(2024, 4, 1, 23, 0, 0, 123456, tzinfo=UTC),
    ),
    ("add_days(now(), -1)", {}, dt.datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)),
    ("today()", {}, dt.date(2024, 5, 2)),
    ("now()", {}, CTX.now),
    ("me()", {}, USERS[0]),
    ("close_date = date('2024-05-01')", {"close_date": dt.date(2024, 5, 1)}, True),
    ("close_date < today()", {"close_date": dt.date(2024, 5, 1)}, True),
    ("created_at >= today()", {"created_at": dt.datetime(2024, 5, 2, tzinfo=UTC)}, True),
    (
        "created_at < today()",
        {"created_at": dt.datetime(2024, 5, 1, 23, 59, 59, 999999, tzinfo=UTC)},
        True,
    ),
    ("created_at = today()", {"created_at": dt.datetime(2024, 5, 2, tzinfo=UTC)}, True),
    (
        "created_at > close_date",
        {
            "created_at": dt.datetime(2024, 5, 2, 0, 0, 1, tzinfo=UTC),
            "close_date": dt.date(2024, 5, 2),
        },
        True,
    ),
    (
        "created_at < now()",
        {"created_at": dt.datetime(2024, 5, 2, 12, 30, 15, 249999, tzinfo=UTC)},
        True,
    ),
    ("created_at = now()", {"created_at": CTX.now}, True),
    ("created_at = datetime('2024-05-02T20:30:15.25+08:00')", {"created_at": CTX.now}, True),
    (
        "coalesce(close_date, created_at)",
        {"close_date": dt.date(2024, 5, 1)},
        dt.datetime(2024, 5, 1, tzinfo=UTC),
    ),
    (
        "if(active, created_at, close_date) < now()",
        {"active": False, "close_date": dt.date(2024, 5, 2)},
        True,
    ),
]


def _ids(case: tuple[str, dict[str, Any], Any]) -> str:
    return f"{case[0]} | {case[1]}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(case) for case in CASES])
def test_python_gives_the_documented_answer(case: tuple[str, dict[str, Any], Any]) -> None:
    text, values, expected = case
    row = deal_row(**values)
    found = run_python(parse(text), [row], CTX)[row["id"]]
    assert found == expected and type(found) is type(expected)


@pytest.mark.parametrize("case", CASES, ids=[_ids(case) for case in CASES])
def test_sql_gives_the_documented_answer(
    db: Database, case: tuple[str, dict[str, Any], Any]
) -> None:
    text, values, expected = case
    node = parse(text)
    row = deal_row(**values)
    outcome = run_sql(db, node, [row], CTX)
    assert same_value(expected, outcome.values[row["id"]], check(node, DEAL), db.dialect)
    if outcome.matched is not None:
        assert outcome.matched == ({row["id"]} if expected is True else set())


def test_my_team_without_teams_matches_nothing_and_keeps_null(db: Database) -> None:
    ctx = dataclasses.replace(CTX, team_ids=())
    rows = [deal_row(team_id=TEAMS[0]), deal_row(team_id=None)]
    for text, expected in (
        ("team_id in my_team()", [False, None]),
        ("team_id not in my_team()", [True, None]),
    ):
        node = parse(text)
        python = run_python(node, rows, ctx)
        sql = run_sql(db, node, rows, ctx)
        assert [python[row["id"]] for row in rows] == expected
        assert [sql.values[row["id"]] for row in rows] == expected


def test_me_without_a_user_is_null(db: Database) -> None:
    ctx = dataclasses.replace(CTX, user_id=None)
    rows = [deal_row(owner_id=USERS[0])]
    node = parse("owner_id = me()")
    assert run_python(node, rows, ctx)[rows[0]["id"]] is None
    assert run_sql(db, node, rows, ctx).values[rows[0]["id"]] is None


def test_python_reads_nested_lookups_and_flattened_keys() -> None:
    evaluate = compile_python(parse("customer.level = 'VIP'"), DEAL)
    assert evaluate({"customer": {"level": "VIP"}}, CTX) is True
    assert evaluate({"customer": CUSTOMER_IDS[0], "customer.level": "VIP"}, CTX) is True
    assert evaluate({"customer": None}, CTX) is None
    assert evaluate({}, CTX) is None


def test_python_normalises_values_from_json_payloads() -> None:
    record = {
        "amount": 0.1,
        "qty": "3",
        "owner_id": str(USERS[0]),
        "created_at": "2024-05-02T12:30:15.250000+00:00",
        "close_date": "2024-05-01",
        "tags": '["vip"]',
    }
    text = (
        "amount * 3 = 0.3 and qty = 3 and owner_id = me() and created_at = now()"
        " and close_date < today() and tags contains 'vip'"
    )
    assert compile_python(parse(text), DEAL)(record, CTX) is True
    naive = {"created_at": dt.datetime(2024, 5, 2, 12, 30, 15, 250000)}
    assert compile_python(parse("created_at = now()"), DEAL)(naive, CTX) is True
    assert compile_python(parse("amount = 0.1"), DEAL)({"amount": "0.10"}, CTX) is True


def test_python_accepts_a_custom_resolver() -> None:
    def resolve(record: Any, path: tuple[str, ...]) -> Any:
        return record["fields"].get("/".join(path))

    evaluate = compile_python(parse("customer.level = 'VIP' and qty > 1"), DEAL, resolve)
    assert evaluate({"fields": {"customer/level": "VIP", "qty": 2}}, CTX) is True


def test_python_record_helper_flattens_the_customer() -> None:
    row = deal_row(customer=CUSTOMER_IDS[0])
    assert python_record(row, CUSTOMERS)["customer.level"] == "VIP"


def test_eval_context_refuses_a_naive_clock() -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(CTX, now=dt.datetime(2024, 1, 1))
    with pytest.raises(TypeError):
        dataclasses.replace(CTX, today=dt.datetime(2024, 1, 1, tzinfo=UTC))
