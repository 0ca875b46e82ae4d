"""The syntax tree: frozen dataclasses that compare by structure, not by position.

``line`` and ``column`` locate a node in the source for error messages; they
are excluded from equality so that ``parse(unparse(tree)) == tree``. A node
sits at its first character, except operators, which sit at the operator
(``a + b`` is located at ``+``) so that an error names the right one in a
chain; an ``and``/``or`` chain sits where its first operand does.
"""

from __future__ import annotations

import datetime as dt
import decimal
from dataclasses import dataclass, field
from typing import Literal as TypingLiteral

from metacrm.metadata.expression.scope import ValueType

LiteralValue = str | int | decimal.Decimal | bool | dt.date | dt.datetime | None

CompareOp = TypingLiteral["=", "!=", "<", "<=", ">", ">="]
ArithmeticOp = TypingLiteral["+", "-", "*", "/"]
MatchOp = TypingLiteral["contains", "starts_with", "like"]
LogicalOp = TypingLiteral["and", "or"]

_LITERAL_TYPES: dict[ValueType, tuple[type, ...]] = {
    ValueType.TEXT: (str,),
    ValueType.INTEGER: (int,),
    ValueType.DECIMAL: (decimal.Decimal,),
    ValueType.BOOLEAN: (bool,),
    ValueType.DATE: (dt.date,),
    ValueType.DATETIME: (dt.datetime,),
    ValueType.NULL: (type(None),),
}


@dataclass(frozen=True, slots=True)
class Node:
    """Base of every tree node; holds only the source position."""

    line: int = field(default=0, compare=False, repr=False, kw_only=True)
    column: int = field(default=0, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class Literal(Node):
    """A constant written in the source: text, number, true/false, null, date or datetime.

    Numbers are never negative here: ``-5`` is a ``Negate`` of ``5``, exactly
    as it is written, which keeps unparsing exact.
    """

    value: LiteralValue
    type: ValueType

    def __post_init__(self) -> None:
        allowed = _LITERAL_TYPES.get(self.type)
        if allowed is None or not isinstance(self.value, allowed):
            raise TypeError(f"{self.value!r} is not a {self.type.name} literal")
        if self.type is ValueType.INTEGER and isinstance(self.value, bool):
            raise TypeError("a boolean is not an INTEGER literal")
        if self.type is ValueType.DATE and isinstance(self.value, dt.datetime):
            raise TypeError("a datetime is not a DATE literal")
        if self.type is ValueType.DATETIME and self.value.tzinfo is None:  # type: ignore[union-attr]
            raise ValueError("a DATETIME literal must be time-zone aware")
        if self.type is ValueType.DECIMAL and not self.value.is_finite():  # type: ignore[union-attr]
            raise ValueError("a DECIMAL literal must be finite")
        if self.type is ValueType.DECIMAL and self.value.is_signed():  # type: ignore[union-attr]
            raise ValueError("numeric literals are not negative: wrap them in Negate")
        if self.type is ValueType.INTEGER and self.value < 0:  # type: ignore[operator]
            raise ValueError("numeric literals are not negative: wrap them in Negate")


@dataclass(frozen=True, slots=True)
class Field(Node):
    """A field of the record, or of the record a lookup points to (two segments)."""

    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Call(Node):
    """A function call such as ``days_between(created_at, today())``; names are lower case."""

    name: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class ListValue(Node):
    """The parenthesised list on the right of ``in``: ``("won", "lost")``."""

    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Negate(Node):
    """Unary minus."""

    operand: Node


@dataclass(frozen=True, slots=True)
class Not(Node):
    """Logical negation, three-valued: ``not null`` is null."""

    operand: Node


@dataclass(frozen=True, slots=True)
class Arithmetic(Node):
    """``+ - * /`` on numbers; ``/`` always gives a decimal."""

    op: ArithmeticOp
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Compare(Node):
    """``= != < <= > >=``."""

    op: CompareOp
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Match(Node):
    """``contains``, ``starts_with`` and ``like``: case-insensitive text matching."""

    op: MatchOp
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class In(Node):
    """``x in (...)`` or ``x in my_team()``; ``negated`` for ``not in``."""

    operand: Node
    choices: ListValue | Call
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Between(Node):
    """``x between low and high``, both ends included; ``negated`` for ``not between``."""

    operand: Node
    low: Node
    high: Node
    negated: bool = False


@dataclass(frozen=True, slots=True)
class IsNull(Node):
    """``x is null``; ``negated`` for ``is not null``."""

    operand: Node
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Logical(Node):
    """A chain of ``and`` or of ``or``, kept flat so long chains do not nest deeply."""

    op: LogicalOp
    operands: tuple[Node, ...]


def children(node: Node) -> tuple[Node, ...]:
    """Return the direct sub-nodes of a node, left to right."""
    match node:
        case Literal() | Field():
            return ()
        case Call(args=args):
            return args
        case ListValue(items=items):
            return items
        case Negate(operand=operand) | Not(operand=operand) | IsNull(operand=operand):
            return (operand,)
        case Arithmetic(left=left, right=right) | Compare(left=left, right=right):
            return (left, right)
        case Match(left=left, right=right):
            return (left, right)
        case In(operand=operand, choices=choices):
            return (operand, choices)
        case Between(operand=operand, low=low, high=high):
            return (operand, low, high)
        case Logical(operands=operands):
            return operands
    raise TypeError(f"not an expression node: {node!r}")
