"""Tree to canonical text: lower-case keywords, single spaces, only the parentheses needed.

The output parses back to an equal tree, which is what lets the builder
store trees as text and show admins a tidied version of what they typed.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata

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
from metacrm.metadata.expression.scope import ValueType

_OR, _AND, _NOT, _PREDICATE, _SUM, _PRODUCT, _UNARY, _ATOM = range(1, 9)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t"}


def unparse(node: Node) -> str:
    """Write a tree back as canonical expression text."""
    return _text(node)


def _level(node: Node) -> int:
    match node:
        case Logical(op="or"):
            return _OR
        case Logical():
            return _AND
        case Not():
            return _NOT
        case Compare() | Match() | In() | Between() | IsNull():
            return _PREDICATE
        case Arithmetic(op="+" | "-"):
            return _SUM
        case Arithmetic():
            return _PRODUCT
        case Negate():
            return _UNARY
    return _ATOM


def _at_least(node: Node, level: int) -> str:
    text = _text(node)
    return text if _level(node) >= level else f"({text})"


def _text(node: Node) -> str:
    match node:
        case Literal():
            return _literal(node)
        case Field(path=path):
            return ".".join(_name(part) for part in path)
        case Call(name=name, args=args):
            return f"{_name(name)}({', '.join(_text(arg) for arg in args)})"
        case ListValue(items=items):
            return f"({', '.join(_text(item) for item in items)})"
        case Negate(operand=operand):
            return f"-{_at_least(operand, _UNARY)}"
        case Not(operand=operand):
            return f"not {_at_least(operand, _NOT)}"
        case Logical(op=op, operands=operands):
            inner = _level(node) + 1
            return f" {op} ".join(_at_least(operand, inner) for operand in operands)
        case Arithmetic(op=op, left=left, right=right):
            level = _level(node)
            return f"{_at_least(left, level)} {op} {_at_least(right, level + 1)}"
        case Compare(op=op, left=left, right=right) | Match(op=op, left=left, right=right):
            return f"{_at_least(left, _SUM)} {op} {_at_least(right, _SUM)}"
        case In(operand=operand, choices=choices, negated=negated):
            keyword = "not in" if negated else "in"
            return f"{_at_least(operand, _SUM)} {keyword} {_text(choices)}"
        case Between(operand=operand, low=low, high=high, negated=negated):
            keyword = "not between" if negated else "between"
            return (
                f"{_at_least(operand, _SUM)} {keyword} "
                f"{_at_least(low, _SUM)} and {_at_least(high, _SUM)}"
            )
        case IsNull(operand=operand, negated=negated):
            return f"{_at_least(operand, _SUM)} is {'not ' if negated else ''}null"
    raise TypeError(f"not an expression node: {node!r}")


def _name(name: str) -> str:
    if not _NAME.fullmatch(name) or name.lower() in KEYWORDS:
        raise ValueError(f"{name!r} cannot be written as a name in an expression")
    return name


def _literal(node: Literal) -> str:
    value = node.value
    match node.type:
        case ValueType.TEXT:
            return f'"{"".join(_escape(char) for char in value)}"'
        case ValueType.INTEGER:
            return str(value)
        case ValueType.DECIMAL:
            text = format(value, "f")
            return text if "." in text else f"{text}.0"
        case ValueType.BOOLEAN:
            return "true" if value else "false"
        case ValueType.DATE:
            return f'date("{value.isoformat()}")'
        case ValueType.DATETIME:
            stamp = value.astimezone(dt.UTC).isoformat()
            return f'datetime("{stamp.removesuffix("+00:00")}Z")'
    return "null"


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if unicodedata.category(char) == "Cc":
        return f"\\u{ord(char):04x}"
    return char
