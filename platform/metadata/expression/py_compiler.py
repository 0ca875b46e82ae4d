"""Compile a checked tree to a Python function, for rules that decide on one record in memory.

The function follows SQL exactly: null propagates, ``and``/``or``/``not`` are
three-valued, and a condition holds only when the result is ``True``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import operator
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from metacrm.metadata.expression import arithmetic
from metacrm.metadata.expression.casefold import simple_lower, simple_upper
from metacrm.metadata.expression.checker import Typed, annotate
from metacrm.metadata.expression.coercion import comparison_type
from metacrm.metadata.expression.context import EvalContext
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
from metacrm.metadata.expression.pattern import like_tokens, regex
from metacrm.metadata.expression.scope import Scope, ValueType
from metacrm.metadata.expression.value import (
    ValueResolver,
    as_utc,
    default_value_resolver,
    normalise,
)

Record = Mapping[str, Any]
Evaluator = Callable[[Record, EvalContext], Any]

_COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_DECIMAL_OPERATIONS: dict[str, Callable[[Any, Any], Any]] = {
    "+": arithmetic.add,
    "-": arithmetic.subtract,
    "*": arithmetic.multiply,
    "/": arithmetic.divide,
}
_INTEGER_OPERATIONS: dict[str, Callable[[Any, Any], Any]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
}


def compile_python(
    node: Node, scope: Scope, resolve: ValueResolver | None = None
) -> Callable[[Mapping[str, Any], EvalContext], Any]:
    """Type-check an expression and compile it to ``f(record, ctx)``; null is ``None``."""
    typed = annotate(node, scope)
    return _PyCompiler(typed, resolve or default_value_resolver).build(node)


def kleene_and(values: list[Any]) -> bool | None:
    """Combine with SQL's AND: false wins, then null, then true."""
    result: bool | None = True
    for value in values:
        if value is False:
            return False
        if value is None:
            result = None
    return result


def kleene_or(values: list[Any]) -> bool | None:
    """Combine with SQL's OR: true wins, then null, then false."""
    result: bool | None = False
    for value in values:
        if value is True:
            return True
        if value is None:
            result = None
    return result


def _constant(value: Any) -> Evaluator:
    return lambda record, ctx: value


def _days(moved: dt.date, days: int) -> dt.date | None:
    try:
        return moved + dt.timedelta(days=days)
    except OverflowError:
        return None


def _utc_date(value: dt.date) -> dt.date:
    return as_utc(value).date() if isinstance(value, dt.datetime) else value


class _PyCompiler:
    def __init__(self, typed: Typed, resolve: ValueResolver) -> None:
        self.typed = typed
        self.resolve = resolve

    def type_of(self, node: Node) -> ValueType:
        return self.typed.type_of(node)

    def build(self, node: Node) -> Evaluator:
        if self.type_of(node) is ValueType.NULL:
            return _constant(None)
        match node:
            case Literal(value=value):
                return _constant(value)
            case Field(path=path):
                return self._field(path, self.type_of(node))
            case Negate(operand=operand):
                inner = self.build(operand)
                return lambda record, ctx: _negate(inner(record, ctx))
            case Not(operand=operand):
                inner = self.build(operand)
                return lambda record, ctx: _not(inner(record, ctx))
            case Logical(op=op, operands=operands):
                parts = [self.build(operand) for operand in operands]
                combine = kleene_and if op == "and" else kleene_or
                return lambda record, ctx: combine([part(record, ctx) for part in parts])
            case Arithmetic():
                return self._arithmetic(node)
            case Compare(op=op, left=left, right=right):
                return self._compare(op, left, right)
            case Between():
                return self._between(node)
            case IsNull(operand=operand, negated=negated):
                inner = self.build(operand)
                return lambda record, ctx: (inner(record, ctx) is None) is not negated
            case In():
                return self._in(node)
            case Match():
                return self._match(node)
            case Call():
                return self._call(node)
        raise TypeError(f"cannot compile {node!r} to Python")

    def _field(self, path: tuple[str, ...], value_type: ValueType) -> Evaluator:
        resolve = self.resolve
        return lambda record, ctx: normalise(resolve(record, path), value_type)

    def coerced(self, node: Node, target: ValueType) -> Evaluator:
        """Build a node as a value of a wider type it mixes with."""
        found = self.type_of(node)
        if found is ValueType.DATE and target is ValueType.DATETIME:
            inner = self.build(node)
            return lambda record, ctx: _maybe(as_utc, inner(record, ctx))
        if found is ValueType.INTEGER and target is ValueType.DECIMAL:
            inner = self.build(node)
            return lambda record, ctx: _maybe(decimal.Decimal, inner(record, ctx))
        if found is ValueType.TEXT and target is ValueType.UUID and isinstance(node, Literal):
            return _constant(uuid.UUID(node.value))
        return self.build(node)

    def _common(self, *nodes: Node) -> ValueType:
        common = ValueType.NULL
        for node in nodes:
            common = comparison_type(common, self.type_of(node)) or common
        return common

    def _compare(self, op: str, left: Node, right: Node) -> Evaluator:
        common = self._common(left, right)
        left_value = self.coerced(left, common)
        right_value = self.coerced(right, common)
        compare = _COMPARISONS[op]

        def evaluate(record: Record, ctx: EvalContext) -> bool | None:
            return _compared(compare, left_value(record, ctx), right_value(record, ctx))

        return evaluate

    def _between(self, node: Between) -> Evaluator:
        common = self._common(node.operand, node.low, node.high)
        # Each side is built once; the operand's value is shared by both comparisons.
        operand = self.coerced(node.operand, common)
        low = self.coerced(node.low, common)
        high = self.coerced(node.high, common)
        negated = node.negated

        def between(record: Record, ctx: EvalContext) -> bool | None:
            value = operand(record, ctx)
            inside = kleene_and(
                [
                    _compared(operator.ge, value, low(record, ctx)),
                    _compared(operator.le, value, high(record, ctx)),
                ]
            )
            return _not(inside) if negated else inside

        return between

    def _arithmetic(self, node: Arithmetic) -> Evaluator:
        left = self.build(node.left)
        right = self.build(node.right)
        if self.type_of(node) is ValueType.INTEGER:
            operation = _INTEGER_OPERATIONS[node.op]
        else:
            operation = _DECIMAL_OPERATIONS[node.op]

        def evaluate(record: Record, ctx: EvalContext) -> Any:
            first = left(record, ctx)
            second = right(record, ctx)
            if first is None or second is None:
                return None
            return operation(first, second)

        return evaluate

    def _in(self, node: In) -> Evaluator:
        operand: Evaluator
        items: list[Evaluator]
        if isinstance(node.choices, Call):
            operand = self.build(node.operand)
            items = [lambda record, ctx: list(ctx.team_ids)]
            spread = True
        else:
            choices = node.choices.items if isinstance(node.choices, ListValue) else ()
            common = self._common(node.operand, *choices)
            operand = self.coerced(node.operand, common)
            items = [self.coerced(item, common) for item in choices]
            spread = False
        negated = node.negated

        def evaluate(record: Record, ctx: EvalContext) -> bool | None:
            value = operand(record, ctx)
            if value is None:
                return None
            values = items[0](record, ctx) if spread else [item(record, ctx) for item in items]
            # SQL's IN: true on a match; otherwise null if the list held a null, else false.
            found: bool | None = False
            for candidate in values:
                if candidate is None:
                    found = None
                elif candidate == value:
                    found = True
                    break
            return _not(found) if negated else found

        return evaluate

    def _match(self, node: Match) -> Evaluator:
        left = self.build(node.left)
        right = self.build(node.right)
        test: Callable[[Any, Any], bool]
        if self.type_of(node.left) is ValueType.LIST:
            test = _has_element
        elif node.op == "like":
            test = _like(node.right.value)
        elif node.op == "contains":
            test = _contains
        else:
            test = _starts_with

        def evaluate(record: Record, ctx: EvalContext) -> bool | None:
            first = left(record, ctx)
            second = right(record, ctx)
            if first is None or second is None:
                return None
            return test(first, second)

        return evaluate

    def _call(self, node: Call) -> Evaluator:
        if node.name in ("coalesce", "if"):
            return self._choice(node)
        args = [self.build(arg) for arg in node.args]
        match node.name:
            case "today":
                return lambda record, ctx: ctx.today
            case "now":
                return lambda record, ctx: as_utc(ctx.now)
            case "me":
                return lambda record, ctx: ctx.user_id
            case "days_between":
                start, end = args

                def days_between(record: Record, ctx: EvalContext) -> int | None:
                    first, second = start(record, ctx), end(record, ctx)
                    if first is None or second is None:
                        return None
                    return (_utc_date(second) - _utc_date(first)).days

                return days_between
            case "add_days":
                moved, days = args

                def add_days(record: Record, ctx: EvalContext) -> dt.date | None:
                    first, second = moved(record, ctx), days(record, ctx)
                    if first is None or second is None:
                        return None
                    return _days(first, second)

                return add_days
            case "lower":
                (text,) = args
                return lambda record, ctx: _maybe(simple_lower, text(record, ctx))
            case "upper":
                (text,) = args
                return lambda record, ctx: _maybe(simple_upper, text(record, ctx))
            case "len":
                (text,) = args
                return lambda record, ctx: _maybe(len, text(record, ctx))
            case "round":
                number = args[0]
                if self.type_of(node.args[0]) is ValueType.INTEGER:
                    return number
                digits = node.args[1].value if len(node.args) == 2 else 0
                return lambda record, ctx: _maybe(
                    lambda value: arithmetic.round_half_up(value, digits), number(record, ctx)
                )
        raise TypeError(f"cannot compile {node.name}() to Python")

    def _choice(self, node: Call) -> Evaluator:
        """Build ``coalesce`` and ``if``, whose values are widened to the call's type."""
        common = self.type_of(node)
        if node.name == "coalesce":
            values = [self.coerced(arg, common) for arg in node.args]

            def coalesce(record: Record, ctx: EvalContext) -> Any:
                for value in values:
                    found = value(record, ctx)
                    if found is not None:
                        return found
                return None

            return coalesce
        condition = self.build(node.args[0])
        then = self.coerced(node.args[1], common)
        otherwise = self.coerced(node.args[2], common)

        def if_(record: Record, ctx: EvalContext) -> Any:
            chosen = then if condition(record, ctx) is True else otherwise
            return chosen(record, ctx)

        return if_


def _compared(compare: Callable[[Any, Any], bool], left: Any, right: Any) -> bool | None:
    return None if left is None or right is None else compare(left, right)


def _maybe(function: Callable[[Any], Any], value: Any) -> Any:
    return None if value is None else function(value)


def _negate(value: Any) -> Any:
    return None if value is None else -value


def _not(value: bool | None) -> bool | None:
    return None if value is None else not value


def _has_element(items: list[Any], element: str) -> bool:
    return element in items


def _contains(text: str, part: str) -> bool:
    return simple_lower(part) in simple_lower(text)


def _starts_with(text: str, part: str) -> bool:
    return simple_lower(text).startswith(simple_lower(part))


def _like(pattern: str) -> Callable[[str, str], bool]:
    tokens = like_tokens(pattern)
    compiled = regex([simple_lower(t) if isinstance(t, str) else t for t in tokens])

    def like(text: str, _: str) -> bool:
        return compiled.fullmatch(simple_lower(text)) is not None

    return like
