"""Hypothesis strategies: random syntax trees, well-typed expressions, rows and contexts."""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from decimal import Decimal

from hypothesis import strategies as st

from metacrm.metadata.expression import EvalContext, ValueType
from metacrm.metadata.expression.grammar import KEYWORDS
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
    Node,
    Not,
)
from metacrm.metadata.expression.pattern import like_tokens

from .model import CUSTOMER_IDS, TEAMS, USERS

T = ValueType
UTC = dt.UTC

#: Characters that stress case folding, LIKE escaping and code-point ordering on every backend.
ALPHABET = "aAbzZ éÉßΣσςİiK中文😀%_!\\'\"\n"

_MIN_DATE, _MAX_DATE = dt.date(2000, 1, 1), dt.date(2030, 12, 31)
_MIN_DATETIME, _MAX_DATETIME = dt.datetime(2000, 1, 1), dt.datetime(2030, 12, 31)

texts = st.text(alphabet=ALPHABET, max_size=6)
cents = st.integers(-(10**6), 10**6).map(lambda n: Decimal(n).scaleb(-2))
dates = st.dates(_MIN_DATE, _MAX_DATE)
datetimes = st.datetimes(_MIN_DATETIME, _MAX_DATETIME, timezones=st.just(UTC))

NULL = Literal(None, T.NULL)

FIELDS: dict[ValueType, list[tuple[str, ...]]] = {
    T.TEXT: [("name",), ("note",), ("stage",), ("customer", "level")],
    T.INTEGER: [("qty",), ("customer", "score")],
    T.DECIMAL: [("amount",)],
    T.BOOLEAN: [("active",)],
    T.DATE: [("close_date",)],
    T.DATETIME: [("created_at",)],
    T.UUID: [("id",), ("owner_id",), ("team_id",), ("customer",)],
    T.LIST: [("tags",)],
    T.JSON: [("meta",)],
}

_LITERALS: dict[ValueType, st.SearchStrategy[Node]] = {
    T.TEXT: texts.map(lambda v: Literal(v, T.TEXT)),
    T.INTEGER: st.integers(0, 1000).map(lambda v: Literal(v, T.INTEGER)),
    T.DECIMAL: st.integers(0, 10**6).map(lambda n: Literal(Decimal(n).scaleb(-2), T.DECIMAL)),
    T.BOOLEAN: st.booleans().map(lambda v: Literal(v, T.BOOLEAN)),
    T.DATE: dates.map(lambda v: Literal(v, T.DATE)),
    T.DATETIME: datetimes.map(lambda v: Literal(v, T.DATETIME)),
}
_CLOCK: dict[ValueType, Node] = {
    T.DATE: Call("today", ()),
    T.DATETIME: Call("now", ()),
    T.UUID: Call("me", ()),
}

# The types each type can be compared with, as the checker allows.
_FAMILY = {
    T.TEXT: [T.TEXT],
    T.INTEGER: [T.INTEGER, T.DECIMAL],
    T.DECIMAL: [T.INTEGER, T.DECIMAL],
    T.BOOLEAN: [T.BOOLEAN],
    T.DATE: [T.DATE, T.DATETIME],
    T.DATETIME: [T.DATE, T.DATETIME],
    T.UUID: [T.UUID],
}
_ORDERED = [T.TEXT, T.INTEGER, T.DECIMAL, T.DATE, T.DATETIME]
_ANY = [*_FAMILY, T.LIST, T.JSON]


def _leaf(value_type: ValueType) -> st.SearchStrategy[Node]:
    options: list[st.SearchStrategy[Node]] = [
        st.sampled_from([Field(path) for path in FIELDS[value_type]])
    ]
    if value_type in _LITERALS:
        options.append(_LITERALS[value_type])
    if value_type in _CLOCK:
        options.append(st.just(_CLOCK[value_type]))
    return st.one_of(options)


def _or_null(strategy: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    return st.one_of(strategy, strategy, strategy, st.just(NULL))


def _uuid_side() -> st.SearchStrategy[Node]:
    """An id written as text, which a record id can be compared with."""
    return st.sampled_from([Literal(str(user), T.TEXT) for user in USERS])


@functools.cache
def expressions(value_type: ValueType, depth: int = 3) -> st.SearchStrategy[Node]:
    """Well-typed expressions of a type, at most ``depth`` operators deep."""
    if value_type in (T.LIST, T.JSON):
        return st.sampled_from([Field(path) for path in FIELDS[value_type]])
    leaf = _leaf(value_type)
    if depth == 0:
        return leaf
    below = functools.partial(expressions, depth=depth - 1)
    builders = [leaf, _conditional(value_type, depth), _coalesce(value_type, depth)]
    if value_type is T.BOOLEAN:
        builders += _conditions(depth)
    elif value_type is T.TEXT:
        builders.append(
            st.builds(
                lambda name, arg: Call(name, (arg,)),
                st.sampled_from(["lower", "upper"]),
                below(T.TEXT),
            )
        )
    elif value_type is T.INTEGER:
        builders += _integers(depth)
    elif value_type is T.DECIMAL:
        builders += _decimals(depth)
    elif value_type in (T.DATE, T.DATETIME):
        days = st.one_of(
            _leaf(T.INTEGER),
            st.integers(1, 400).map(lambda n: Negate(Literal(n, T.INTEGER))),
        )
        builders.append(
            st.builds(lambda moved, n: Call("add_days", (moved, n)), below(value_type), days)
        )
    return st.one_of(builders)


def _members(value_type: ValueType, depth: int) -> st.SearchStrategy[Node]:
    """Expressions that can stand in for a value of this type without changing the type."""
    widened = {T.DECIMAL: [T.INTEGER, T.DECIMAL], T.DATETIME: [T.DATE, T.DATETIME]}
    return st.sampled_from(widened.get(value_type, [value_type])).flatmap(
        functools.partial(expressions, depth=depth - 1)
    )


def _conditional(value_type: ValueType, depth: int) -> st.SearchStrategy[Node]:
    return st.builds(
        lambda condition, then, otherwise: Call("if", (condition, then, otherwise)),
        _or_null(expressions(T.BOOLEAN, depth - 1)),
        _or_null(_members(value_type, depth)),
        st.just(Field(FIELDS[value_type][0])),
    )


def _coalesce(value_type: ValueType, depth: int) -> st.SearchStrategy[Node]:
    return st.builds(
        lambda first, rest: Call("coalesce", (first, *rest)),
        st.just(Field(FIELDS[value_type][0])),
        st.lists(_or_null(_members(value_type, depth)), min_size=1, max_size=2),
    )


def _integers(depth: int) -> list[st.SearchStrategy[Node]]:
    below = functools.partial(expressions, depth=depth - 1)
    temporal = st.sampled_from([T.DATE, T.DATETIME]).flatmap(below)
    return [
        # Products take leaves only, so that no value leaves the 64-bit range.
        st.builds(Arithmetic, st.just("*"), _leaf(T.INTEGER), _leaf(T.INTEGER)),
        st.builds(
            Arithmetic,
            st.sampled_from(["+", "-"]),
            _or_null(below(T.INTEGER)),
            below(T.INTEGER),
        ),
        st.builds(Negate, below(T.INTEGER)),
        below(T.TEXT).map(lambda text: Call("len", (text,))),
        st.builds(lambda a, b: Call("days_between", (a, b)), temporal, temporal),
        below(T.INTEGER).map(lambda value: Call("round", (value,))),
    ]


def _decimals(depth: int) -> list[st.SearchStrategy[Node]]:
    below = functools.partial(expressions, depth=depth - 1)
    number = st.sampled_from([T.INTEGER, T.DECIMAL]).flatmap(below)
    decimal_leaf = _leaf(T.DECIMAL)
    number_leaf = st.one_of(_leaf(T.INTEGER), decimal_leaf)
    return [
        st.builds(Arithmetic, st.sampled_from(["+", "-"]), below(T.DECIMAL), _or_null(number)),
        st.builds(Arithmetic, st.sampled_from(["+", "-"]), number, below(T.DECIMAL)),
        st.builds(Arithmetic, st.just("*"), decimal_leaf, number_leaf),
        st.builds(Arithmetic, st.just("/"), number, number),
        st.builds(Negate, below(T.DECIMAL)),
        st.builds(
            lambda value, digits: Call("round", (value, *digits)),
            below(T.DECIMAL),
            st.lists(st.integers(0, 4).map(lambda n: Literal(n, T.INTEGER)), max_size=1),
        ),
    ]


def _like_patterns() -> st.SearchStrategy[Node]:
    def valid(pattern: str) -> bool:
        try:
            like_tokens(pattern)
        except ValueError:
            return False
        return True

    return (
        st.text(alphabet="aAé中%_!\\", max_size=5).filter(valid).map(lambda p: Literal(p, T.TEXT))
    )


def _conditions(depth: int) -> list[st.SearchStrategy[Node]]:
    below = functools.partial(expressions, depth=depth - 1)

    def compare(value_type: ValueType) -> st.SearchStrategy[Node]:
        ops = ["=", "!=", "<", "<=", ">", ">="] if value_type in _ORDERED else ["=", "!="]
        side = st.sampled_from(_FAMILY[value_type]).flatmap(below)
        right = side if value_type is not T.UUID else st.one_of(side, _uuid_side())
        return st.builds(Compare, st.sampled_from(ops), below(value_type), right)

    def membership(value_type: ValueType) -> st.SearchStrategy[Node]:
        item = st.sampled_from(_FAMILY[value_type]).flatmap(below)
        if value_type is T.UUID:
            item = st.one_of(item, _uuid_side())
        return st.builds(
            lambda operand, items, negated: In(operand, ListValue(tuple(items)), negated),
            below(value_type),
            st.lists(item, min_size=1, max_size=3),
            st.booleans(),
        )

    def between(value_type: ValueType) -> st.SearchStrategy[Node]:
        side = st.sampled_from(_FAMILY[value_type]).flatmap(below)
        return st.builds(Between, below(value_type), side, side, st.booleans())

    comparable = st.sampled_from(list(_FAMILY))
    ordered = st.sampled_from(_ORDERED)
    team = st.sampled_from([Field(("team_id",)), Field(("owner_id",))])
    return [
        comparable.flatmap(compare),
        comparable.flatmap(membership),
        ordered.flatmap(between),
        st.builds(In, team, st.just(Call("my_team", ())), st.booleans()),
        st.builds(
            Match,
            st.sampled_from(["contains", "starts_with"]),
            below(T.TEXT),
            below(T.TEXT),
        ),
        st.builds(Match, st.just("like"), below(T.TEXT), _like_patterns()),
        st.builds(Match, st.just("contains"), st.just(Field(("tags",))), below(T.TEXT)),
        st.builds(IsNull, st.sampled_from(_ANY).flatmap(below), st.booleans()),
        st.builds(
            Logical,
            st.sampled_from(["and", "or"]),
            st.lists(_or_null(below(T.BOOLEAN)), min_size=2, max_size=3).map(tuple),
        ),
        st.builds(Not, below(T.BOOLEAN)),
    ]


def typed_expressions() -> st.SearchStrategy[tuple[ValueType, Node]]:
    """A value type, conditions most often, and a well-typed expression of it."""
    kinds = st.sampled_from(
        [T.BOOLEAN] * 6 + [T.TEXT, T.INTEGER, T.DECIMAL, T.DATE, T.DATETIME, T.UUID]
    )
    return kinds.flatmap(lambda kind: st.tuples(st.just(kind), expressions(kind)))


def rows() -> st.SearchStrategy[list[dict[str, object]]]:
    """Up to six deal rows with nulls, empty strings, unicode, decimals, dates and lists."""
    row = st.fixed_dictionaries(
        {
            "name": st.none() | texts,
            "note": st.none() | texts,
            "stage": st.none() | st.sampled_from(["won", "lost", "", "Won"]) | texts,
            "amount": st.none() | cents,
            "qty": st.none() | st.integers(-1000, 1000),
            "active": st.none() | st.booleans(),
            "close_date": st.none() | dates,
            "created_at": st.none() | datetimes,
            "owner_id": st.none() | st.sampled_from(USERS),
            "team_id": st.none() | st.sampled_from(TEAMS),
            "customer": st.none() | st.sampled_from(CUSTOMER_IDS),
            "tags": st.none() | st.lists(texts, max_size=3),
            "meta": st.none() | st.just({"source": "web"}),
            "hidden": st.none(),
        }
    )
    return st.lists(row, max_size=6).map(
        lambda found: [
            dict(values, id=uuid.UUID(int=1000 + index)) for index, values in enumerate(found)
        ]
    )


def customers() -> st.SearchStrategy[list[dict[str, object]]]:
    """The two customers the deals may point to."""
    customer = st.fixed_dictionaries(
        {"level": st.none() | texts, "score": st.none() | st.integers(-1000, 1000)}
    )
    return st.tuples(customer, customer).map(
        lambda pair: [
            dict(values, id=CUSTOMER_IDS[index], secret=None) for index, values in enumerate(pair)
        ]
    )


def contexts() -> st.SearchStrategy[EvalContext]:
    """Any clock, any tenant date, any user, any set of teams."""
    return st.builds(
        EvalContext,
        now=datetimes,
        today=dates,
        user_id=st.none() | st.sampled_from(USERS),
        team_ids=st.lists(st.sampled_from(TEAMS), unique=True, max_size=3).map(tuple),
    )


_NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda name: name not in KEYWORDS and name not in ("date", "datetime")
)
_ANY_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=8
)


def syntax_trees() -> st.SearchStrategy[Node]:
    """Random trees of any shape, typed or not, for the printer and the parser."""
    leaves = st.one_of(
        _ANY_TEXT.map(lambda v: Literal(v, T.TEXT)),
        st.integers(0, 2**63 - 1).map(lambda v: Literal(v, T.INTEGER)),
        st.decimals(min_value=0, max_value=10**12, places=4).map(lambda v: Literal(v, T.DECIMAL)),
        st.booleans().map(lambda v: Literal(v, T.BOOLEAN)),
        st.just(NULL),
        st.dates().map(lambda v: Literal(v, T.DATE)),
        st.datetimes(
            min_value=dt.datetime(1, 1, 2),
            max_value=dt.datetime(9999, 12, 30),
            timezones=st.just(UTC),
        ).map(lambda v: Literal(v, T.DATETIME)),
        st.lists(_NAMES, min_size=1, max_size=2).map(lambda path: Field(tuple(path))),
        _NAMES.map(lambda name: Call(name, ())),
    )

    def extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
        pair = st.tuples(children, children)
        return st.one_of(
            st.builds(Negate, children),
            st.builds(Not, children),
            st.builds(Arithmetic, st.sampled_from(["+", "-", "*", "/"]), children, children),
            st.builds(
                Compare, st.sampled_from(["=", "!=", "<", "<=", ">", ">="]), children, children
            ),
            st.builds(
                Match, st.sampled_from(["contains", "starts_with", "like"]), children, children
            ),
            st.builds(
                In,
                children,
                st.one_of(
                    st.lists(children, min_size=1, max_size=3).map(
                        lambda items: ListValue(tuple(items))
                    ),
                    st.just(Call("my_team", ())),
                ),
                st.booleans(),
            ),
            st.builds(Between, children, children, children, st.booleans()),
            st.builds(IsNull, children, st.booleans()),
            st.builds(
                Logical,
                st.sampled_from(["and", "or"]),
                st.lists(children, min_size=2, max_size=4).map(tuple),
            ),
            st.builds(Call, _NAMES, st.lists(children, max_size=3).map(tuple)),
            pair.map(lambda p: Call("if", (p[0], p[1], p[0]))),
        )

    return st.recursive(leaves, extend, max_leaves=25)
