"""Compile a checked tree to a SQLAlchemy Core expression for lists, reports and permissions."""

from __future__ import annotations

import operator
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    Boolean,
    Integer,
    and_,
    case,
    cast,
    func,
    literal,
    not_,
    null,
    or_,
    type_coerce,
)
from sqlalchemy.sql.elements import ColumnElement

from metacrm.metadata.expression.checker import Typed, annotate
from metacrm.metadata.expression.coercion import comparison_type
from metacrm.metadata.expression.construct import (
    AddDaysToDate,
    AddDaysToDateTime,
    CodepointOrder,
    DateAsDateTime,
    DayDifference,
    DecimalAdd,
    DecimalDivide,
    DecimalMultiply,
    DecimalRound,
    DecimalSubtract,
    FoldLower,
    FoldUpper,
    ListContains,
    UtcDate,
)
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
from metacrm.metadata.expression.pattern import SQL_ESCAPE, like_tokens, sql_like
from metacrm.metadata.expression.scope import Scope, ValueType
from metacrm.metadata.expression.sqltype import sql_type

ColumnResolver = Callable[[tuple[str, ...]], ColumnElement[Any]]

_COMPARISONS: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_DECIMAL_OPERATIONS = {
    "+": DecimalAdd,
    "-": DecimalSubtract,
    "*": DecimalMultiply,
    "/": DecimalDivide,
}
_INTEGER_OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def compile_sql(
    node: Node, scope: Scope, resolve: ColumnResolver, ctx: EvalContext
) -> ColumnElement[Any]:
    """Type-check an expression and compile it to SQL for a WHERE clause or a select list.

    ``resolve`` maps each field path to a column or a correlated subquery;
    ``today()``, ``now()``, ``me()`` and ``my_team()`` become bound parameters
    taken from ``ctx``, never the database clock.
    """
    typed = annotate(node, scope)
    compiled = _SqlCompiler(typed, resolve, ctx).expr(node)
    if isinstance(node, Field):
        return compiled
    # Grouped, because SQLAlchemy renders not_() of a bare TypeCoerce as "x = 0"
    # without parentheses, which binds tighter than an OR inside it.
    return type_coerce(compiled, sql_type(typed.type_of(node))).self_group()


def _escaped(text: ColumnElement[Any]) -> ColumnElement[Any]:
    """Escape LIKE wildcards in a text expression, in SQL, so it matches itself."""
    for char in (SQL_ESCAPE, "%", "_"):
        text = func.replace(text, char, SQL_ESCAPE + char, type_=text.type)
    return text


class _SqlCompiler:
    def __init__(self, typed: Typed, resolve: ColumnResolver, ctx: EvalContext) -> None:
        self.typed = typed
        self.resolve = resolve
        self.ctx = ctx

    def type_of(self, node: Node) -> ValueType:
        return self.typed.type_of(node)

    def expr(self, node: Node) -> ColumnElement[Any]:
        if self.type_of(node) is ValueType.NULL:
            return null()
        match node:
            case Literal(value=value, type=value_type):
                return literal(value, sql_type(value_type))
            case Field(path=path):
                return self.resolve(path)
            case Negate(operand=operand):
                return -self.expr(operand)
            case Not(operand=operand):
                return not_(self.expr(operand))
            case Logical(op=op, operands=operands):
                combine = and_ if op == "and" else or_
                return combine(*(self.expr(operand) for operand in operands))
            case Arithmetic():
                return self._arithmetic(node)
            case Compare(op=op, left=left, right=right):
                return self._compare(op, left, right)
            case Between():
                return self._between(node)
            case IsNull(operand=operand, negated=negated):
                compiled = self.expr(operand)
                return compiled.is_not(None) if negated else compiled.is_(None)
            case In():
                return self._in(node)
            case Match():
                return self._match(node)
            case Call():
                return self._call(node)
        raise TypeError(f"cannot compile {node!r} to SQL")

    def coerced(self, node: Node, target: ValueType) -> ColumnElement[Any]:
        """Compile a node as a value of a wider type it mixes with."""
        found = self.type_of(node)
        if found is ValueType.DATE and target is ValueType.DATETIME:
            return DateAsDateTime(self.expr(node))
        if found is ValueType.TEXT and target is ValueType.UUID and isinstance(node, Literal):
            return literal(uuid.UUID(node.value), sql_type(ValueType.UUID))
        return self.expr(node)

    def _common(self, *nodes: Node) -> ValueType:
        common = ValueType.NULL
        for node in nodes:
            common = comparison_type(common, self.type_of(node)) or common
        return common

    def _compare(self, op: str, left: Node, right: Node) -> ColumnElement[Any]:
        common = self._common(left, right)
        left_sql = self.coerced(left, common)
        right_sql = self.coerced(right, common)
        if common is ValueType.TEXT and op not in ("=", "!="):
            left_sql = CodepointOrder(left_sql)
        return _COMPARISONS[op](left_sql, right_sql)

    def _between(self, node: Between) -> ColumnElement[Any]:
        # BETWEEN names the operand once, so nesting never repeats SQL text.
        common = self._common(node.operand, node.low, node.high)
        operand = self.coerced(node.operand, common)
        if common is ValueType.TEXT:
            operand = CodepointOrder(operand)
        inside = operand.between(self.coerced(node.low, common), self.coerced(node.high, common))
        return not_(inside) if node.negated else inside

    def _arithmetic(self, node: Arithmetic) -> ColumnElement[Any]:
        if ValueType.NULL in (self.type_of(node.left), self.type_of(node.right)):
            return self._typed_null(node)
        left = self.expr(node.left)
        right = self.expr(node.right)
        if self.type_of(node) is ValueType.INTEGER:
            return _INTEGER_OPERATIONS[node.op](left, right)
        return _DECIMAL_OPERATIONS[node.op](left, right)

    def _in(self, node: In) -> ColumnElement[Any]:
        if isinstance(node.choices, Call):
            operand = self.expr(node.operand)
            if not self.ctx.team_ids:
                # No teams: the answer is false, and null for a null id, as for any list.
                found: ColumnElement[Any] = case(
                    (operand.is_(None), null()), else_=literal(False, Boolean())
                )
            else:
                uuid_type = sql_type(ValueType.UUID)
                found = operand.in_([literal(team, uuid_type) for team in self.ctx.team_ids])
        else:
            items = node.choices.items if isinstance(node.choices, ListValue) else ()
            common = self._common(node.operand, *items)
            operand = self.coerced(node.operand, common)
            values = [self.coerced(item, common) for item in items]
            # A lone lookup in IN (...) would read as IN (subquery), which is false,
            # not null, when the lookup is empty; x = a means the same and cannot.
            found = operand == values[0] if len(values) == 1 else operand.in_(values)
        return not_(found) if node.negated else found

    def _match(self, node: Match) -> ColumnElement[Any]:
        left = self.expr(node.left)
        if self.type_of(node.left) is ValueType.LIST:
            return ListContains(left, self.expr(node.right))
        folded = FoldLower(left)
        if node.op == "like":
            pattern = sql_like(like_tokens(node.right.value))
            return folded.like(
                FoldLower(literal(pattern, sql_type(ValueType.TEXT))), escape=SQL_ESCAPE
            )
        needle = _escaped(FoldLower(self.expr(node.right)))
        if node.op == "contains":
            needle = literal("%", sql_type(ValueType.TEXT)).concat(needle)
        return folded.like(needle.concat("%"), escape=SQL_ESCAPE)

    def _call(self, node: Call) -> ColumnElement[Any]:
        args = node.args
        match node.name:
            case "today":
                return literal(self.ctx.today, sql_type(ValueType.DATE))
            case "now":
                return literal(self.ctx.now, sql_type(ValueType.DATETIME))
            case "me":
                return literal(self.ctx.user_id, sql_type(ValueType.UUID))
            case "days_between":
                if ValueType.NULL in (self.type_of(args[0]), self.type_of(args[1])):
                    return self._typed_null(node)
                return DayDifference(self._as_date(args[0]), self._as_date(args[1]))
            case "add_days":
                if self.type_of(args[1]) is ValueType.NULL:
                    return self._typed_null(node)
                moved, days = self.expr(args[0]), self.expr(args[1])
                if self.type_of(args[0]) is ValueType.DATE:
                    return AddDaysToDate(moved, days)
                return AddDaysToDateTime(moved, days)
            case "lower":
                return FoldLower(self.expr(args[0]))
            case "upper":
                return FoldUpper(self.expr(args[0]))
            case "len":
                return func.length(self.expr(args[0]), type_=sql_type(ValueType.INTEGER))
            case "coalesce":
                common = self.type_of(node)
                return func.coalesce(
                    *(self.coerced(arg, common) for arg in args), type_=sql_type(common)
                )
            case "round":
                value = self.expr(args[0])
                if self.type_of(args[0]) is ValueType.INTEGER:
                    return value
                digits = args[1].value if len(args) == 2 else 0
                return DecimalRound(value, literal(digits, Integer()))
            case "if":
                return self._if_chain(node)
        raise TypeError(f"cannot compile {node.name}() to SQL")

    def _if_chain(self, node: Call) -> ColumnElement[Any]:
        """Compile ``if(a, x, if(b, y, z))`` as one CASE with a WHEN per condition.

        A null condition falls through to the else branch in both spellings;
        the flat one keeps long chains within SQLite's parser stack, which
        overflows at about 18 nested CASE expressions.
        """
        common = self.type_of(node)
        whens: list[tuple[ColumnElement[Any], ColumnElement[Any]]] = []
        current: Node = node
        while isinstance(current, Call) and current.name == "if":
            condition, then, otherwise = current.args
            if self.type_of(condition) is not ValueType.NULL:
                whens.append((self.expr(condition), self.coerced(then, common)))
            current = otherwise
        fallback = self.coerced(current, common)
        return case(*whens, else_=fallback) if whens else fallback

    def _typed_null(self, node: Node) -> ColumnElement[Any]:
        """A null of the node's type: SQLAlchemy would turn ``x = NULL`` into ``x IS NULL``."""
        return cast(null(), sql_type(self.type_of(node)))

    def _as_date(self, node: Node) -> ColumnElement[Any]:
        compiled = self.expr(node)
        if self.type_of(node) is ValueType.DATETIME:
            return UtcDate(compiled)
        return compiled
