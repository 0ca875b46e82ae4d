"""The type checker: every node gets a type, or the admin gets an error at its position."""

from __future__ import annotations

import difflib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from metacrm.metadata.expression.coercion import (
    NUMERIC,
    ORDERED,
    TEMPORAL,
    arithmetic_type,
    comparison_type,
    unify,
)
from metacrm.metadata.expression.errors import ExpressionError
from metacrm.metadata.expression.limits import check_tree
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
from metacrm.metadata.expression.scope import FieldInfo, Scope, ValueType

FUNCTIONS = (
    "today",
    "now",
    "me",
    "my_team",
    "days_between",
    "add_days",
    "lower",
    "upper",
    "len",
    "coalesce",
    "round",
    "if",
)
MAX_ROUND_DIGITS = 10

_CONDITION = frozenset({ValueType.BOOLEAN, ValueType.NULL})


@dataclass(frozen=True)
class Typed:
    """A checked tree with the type of each of its nodes, for the compilers."""

    root: Node
    types: Mapping[int, ValueType]

    def type_of(self, node: Node) -> ValueType:
        """Return the type the checker gave a node of this tree."""
        return self.types[id(node)]


def check(node: Node, scope: Scope, *, expect: ValueType | None = None) -> ValueType:
    """Type-check an expression against an entity's fields and return its type.

    With ``expect=ValueType.BOOLEAN`` the expression must be a condition, as
    filters, rule conditions and validation rules need.
    """
    typed = annotate(node, scope)
    found = typed.type_of(node)
    if expect is not None and unify(found, expect) is not expect:
        raise ExpressionError(
            f"the expression must give {_a(expect)}, but it gives {_a(found)}",
            *_at(node),
        )
    return found


def annotate(node: Node, scope: Scope) -> Typed:
    """Type-check a tree and return the type of every node in it."""
    check_tree(node)
    checker = _Checker(scope)
    checker.visit(node)
    return Typed(node, checker.types)


def _at(node: Node) -> tuple[int, int]:
    return node.line or 1, node.column or 1


def _a(value_type: ValueType) -> str:
    if value_type is ValueType.BOOLEAN:
        return "a condition (true/false)"
    if value_type in (ValueType.NULL, ValueType.TEXT):
        return value_type.label
    label = value_type.label
    return f"{'an' if label[0] in 'aeiou' else 'a'} {label}"


def _suggest(name: str, candidates: Iterable[str]) -> str:
    options = list(candidates)
    folded = [option for option in options if option.lower() == name.lower()]
    close = folded or difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class _Checker:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.types: dict[int, ValueType] = {}

    def visit(self, node: Node) -> ValueType:
        result = self._visit(node)
        self.types[id(node)] = result
        return result

    def _visit(self, node: Node) -> ValueType:
        match node:
            case Literal(type=value_type):
                return value_type
            case Field():
                return self._field(node).type
            case Call():
                return self._call(node)
            case Negate(operand=operand):
                found = self.visit(operand)
                if found not in NUMERIC | {ValueType.NULL}:
                    raise ExpressionError(f"'-' needs a number, not {_a(found)}", *_at(operand))
                return found
            case Not(operand=operand):
                self._condition(operand, "'not' needs a condition (true/false)")
                return ValueType.BOOLEAN
            case Logical(op=op, operands=operands):
                for operand in operands:
                    self._condition(operand, f"'{op}' needs conditions (true/false) on both sides")
                return ValueType.BOOLEAN
            case Arithmetic():
                return self._arithmetic(node)
            case Compare():
                self._compare(node)
                return ValueType.BOOLEAN
            case Match():
                self._match(node)
                return ValueType.BOOLEAN
            case In():
                self._in(node)
                return ValueType.BOOLEAN
            case Between():
                self._between(node)
                return ValueType.BOOLEAN
            case IsNull(operand=operand):
                self.visit(operand)
                return ValueType.BOOLEAN
            case ListValue():
                raise ExpressionError(
                    "a list in parentheses can only follow 'in' or 'not in'", *_at(node)
                )
        raise TypeError(f"not an expression node: {node!r}")

    def _field(self, node: Field) -> FieldInfo:
        first, *rest = node.path
        info = self._lookup_field(self.scope, first, node, "")
        if not rest:
            return info
        if info.target is None:
            raise ExpressionError(
                f"'{first}' is not a lookup, so '{first}.{rest[0]}' does not exist", *_at(node)
            )
        if len(rest) > 1:
            raise ExpressionError(
                "a field can reach only one lookup away, as in customer.level", *_at(node)
            )
        return self._lookup_field(info.target, rest[0], node, f" of {first}")

    def _lookup_field(self, scope: Scope, name: str, node: Field, where: str) -> FieldInfo:
        info = scope.fields.get(name)
        if info is None:
            raise ExpressionError(
                f"unknown field '{name}'{where}{_suggest(name, scope.fields)}", *_at(node)
            )
        if not info.filterable:
            raise ExpressionError(
                f"the field '{name}'{where} cannot be used in expressions", *_at(node)
            )
        return info

    def _condition(self, operand: Node, need: str) -> None:
        found = self.visit(operand)
        if found not in _CONDITION:
            raise ExpressionError(f"{need}; this is {_a(found)}", *_at(operand))

    def _arithmetic(self, node: Arithmetic) -> ValueType:
        left = self.visit(node.left)
        right = self.visit(node.right)
        for side, found in ((node.left, left), (node.right, right)):
            if found not in NUMERIC | {ValueType.NULL}:
                hint = " (use add_days to move a date)" if found in TEMPORAL else ""
                raise ExpressionError(
                    f"'{node.op}' needs numbers, not {_a(found)}{hint}", *_at(side)
                )
        return arithmetic_type(node.op, left, right)

    def _comparable(self, op: str, left: Node, right: Node, at: Node) -> ValueType:
        """Check that two visited sides can be compared with ``op``; return their common type.

        Sides are visited by the caller, once each: visiting them here would
        visit a shared operand (of ``between`` or ``in``) again for every
        comparison, which nested constructs would make exponential.
        """
        left_type = self.types[id(left)]
        right_type = self.types[id(right)]
        for found in (left_type, right_type):
            if found is ValueType.NULL:
                raise ExpressionError(
                    "comparing with null never matches: write 'x is null' or 'x is not null'",
                    *_at(at),
                )
        common = unify(left_type, right_type)
        if common is None and comparison_type(left_type, right_type) is ValueType.UUID:
            common = self._uuid_text(left, left_type, right, right_type)
        if common is None:
            raise ExpressionError(
                f"cannot compare {left_type.label} with {right_type.label}", *_at(at)
            )
        if common is ValueType.LIST:
            raise ExpressionError(
                "lists cannot be compared: use 'contains' to look for an element", *_at(at)
            )
        if common is ValueType.JSON:
            raise ExpressionError("JSON values cannot be compared or sorted", *_at(at))
        if op in ("=", "!=") or common in ORDERED:
            return common
        raise ExpressionError(
            f"{common.label} values can only be compared with '=' or '!=', not '{op}'", *_at(at)
        )

    @staticmethod
    def _uuid_text(
        left: Node, left_type: ValueType, right: Node, right_type: ValueType
    ) -> ValueType | None:
        """Allow a record id to be compared with an id written as text."""
        for node, found, other in ((left, left_type, right_type), (right, right_type, left_type)):
            if other is ValueType.UUID and isinstance(node, Literal) and found is ValueType.TEXT:
                try:
                    uuid.UUID(node.value)
                except ValueError:
                    raise ExpressionError(
                        f'"{node.value}" is not a valid record id', *_at(node)
                    ) from None
                return ValueType.UUID
        return None

    def _compare(self, node: Compare) -> None:
        self.visit(node.left)
        self.visit(node.right)
        self._comparable(node.op, node.left, node.right, node)

    def _between(self, node: Between) -> None:
        for side in (node.operand, node.low, node.high):
            self.visit(side)
        self._comparable("<=", node.operand, node.low, node)
        self._comparable("<=", node.operand, node.high, node)

    def _in(self, node: In) -> None:
        choices = node.choices
        if isinstance(choices, Call):
            if choices.name != "my_team":
                raise ExpressionError(
                    'after \'in\' write a list like ("a", "b") or my_team()', *_at(choices)
                )
            self._arity(choices, 0, 0)
            self.types[id(choices)] = ValueType.UUID
            found = self.visit(node.operand)
            if found is not ValueType.UUID:
                raise ExpressionError(
                    f"my_team() holds teams, so the left side must be a team id, not {_a(found)}",
                    *_at(node),
                )
            return
        if not isinstance(choices, ListValue) or not choices.items:
            raise ExpressionError("'in' needs a list with at least one value", *_at(node))
        self.visit(node.operand)
        for item in choices.items:
            self.visit(item)
            if isinstance(item, Literal) and item.type is ValueType.NULL:
                raise ExpressionError(
                    "a list after 'in' cannot hold null: add 'or x is null' instead",
                    *_at(item),
                )
            self._comparable("=", node.operand, item, item)
        self.types[id(choices)] = self.types[id(node.operand)]

    def _match(self, node: Match) -> None:
        left = self.visit(node.left)
        right = self.visit(node.right)
        if left is ValueType.LIST:
            if node.op != "contains":
                raise ExpressionError(
                    f"'{node.op}' works on text; for a list use 'contains'", *_at(node)
                )
        elif left not in (ValueType.TEXT, ValueType.NULL):
            raise ExpressionError(f"'{node.op}' needs text, not {_a(left)}", *_at(node.left))
        if right is ValueType.NULL or left is ValueType.NULL:
            raise ExpressionError(
                "matching null never matches: write 'x is null' or 'x is not null'", *_at(node)
            )
        if right is not ValueType.TEXT:
            raise ExpressionError(
                f"'{node.op}' needs text on its right, not {_a(right)}", *_at(node.right)
            )
        if node.op == "like":
            if not (isinstance(node.right, Literal) and node.right.type is ValueType.TEXT):
                raise ExpressionError(
                    "the pattern after 'like' must be text in quotes, as in \"A%\"",
                    *_at(node.right),
                )
            try:
                like_tokens(node.right.value)
            except ValueError as exc:
                raise ExpressionError(str(exc), *_at(node.right)) from None

    def _arity(self, node: Call, least: int, most: int | None) -> None:
        count = len(node.args)
        if least <= count and (most is None or count <= most):
            return
        if most == 0:
            expected = "no values"
        elif most is None:
            expected = f"at least {least} values"
        elif least == most:
            expected = f"{least} value{'s' if least != 1 else ''}"
        else:
            expected = f"{least} or {most} values"
        raise ExpressionError(f"{node.name}() takes {expected}, got {count}", *_at(node))

    def _argument(
        self, node: Call, index: int, allowed: frozenset[ValueType], what: str
    ) -> ValueType:
        arg = node.args[index]
        found = self.visit(arg)
        if found not in allowed | {ValueType.NULL}:
            raise ExpressionError(f"{node.name}() needs {what}, not {_a(found)}", *_at(arg))
        return found

    def _call(self, node: Call) -> ValueType:
        name = node.name
        if name in ("today", "now", "me"):
            self._arity(node, 0, 0)
            return {
                "today": ValueType.DATE,
                "now": ValueType.DATETIME,
                "me": ValueType.UUID,
            }[name]
        if name == "my_team":
            raise ExpressionError(
                "my_team() can only follow 'in' or 'not in', as in team_id in my_team()",
                *_at(node),
            )
        if name == "days_between":
            self._arity(node, 2, 2)
            self._argument(node, 0, TEMPORAL, "a date")
            self._argument(node, 1, TEMPORAL, "a date")
            return ValueType.INTEGER
        if name == "add_days":
            self._arity(node, 2, 2)
            moved = self._argument(node, 0, TEMPORAL, "a date")
            self._argument(node, 1, frozenset({ValueType.INTEGER}), "a whole number of days")
            return moved
        if name in ("lower", "upper"):
            self._arity(node, 1, 1)
            self._argument(node, 0, frozenset({ValueType.TEXT}), "text")
            return ValueType.TEXT
        if name == "len":
            self._arity(node, 1, 1)
            self._argument(node, 0, frozenset({ValueType.TEXT}), "text")
            return ValueType.INTEGER
        if name == "coalesce":
            self._arity(node, 2, None)
            return self._common(node, node.args)
        if name == "round":
            return self._round(node)
        if name == "if":
            self._arity(node, 3, 3)
            self._argument(node, 0, frozenset({ValueType.BOOLEAN}), "a condition (true/false)")
            return self._common(node, node.args[1:])
        raise ExpressionError(f"unknown function '{name}'{_suggest(name, FUNCTIONS)}", *_at(node))

    def _round(self, node: Call) -> ValueType:
        self._arity(node, 1, 2)
        found = self._argument(node, 0, NUMERIC, "a number")
        if len(node.args) == 2:
            digits = node.args[1]
            if not (
                isinstance(digits, Literal)
                and digits.type is ValueType.INTEGER
                and 0 <= digits.value <= MAX_ROUND_DIGITS
            ):
                raise ExpressionError(
                    f"round() takes the number of decimal places as a whole number "
                    f"from 0 to {MAX_ROUND_DIGITS}, as in round(amount, 2)",
                    *_at(digits),
                )
            self.visit(digits)
        return found

    def _common(self, node: Call, args: tuple[Node, ...]) -> ValueType:
        common = ValueType.NULL
        for arg in args:
            found = self.visit(arg)
            mixed = unify(common, found)
            if mixed is None:
                raise ExpressionError(
                    f"{node.name}() cannot mix {common.label} with {found.label}", *_at(arg)
                )
            common = mixed
        return common
