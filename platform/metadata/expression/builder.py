"""Parser callbacks that turn tokens into tree nodes and decode literals as they go."""

from __future__ import annotations

import datetime as dt
import decimal
import re
from typing import Any

from lark import Token, Transformer

from metacrm.metadata.expression.errors import ExpressionError
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

MAX_INTEGER = 2**63 - 1
MAX_DECIMAL_DIGITS = 28

_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "t": "\t"}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})")


def at(item: Token | Node) -> dict[str, int]:
    """Return the position keywords for a node that starts at a token or another node."""
    return {"line": item.line or 1, "column": item.column or 1}


def decode_text(token: Token) -> str:
    """Decode a quoted text token, resolving its escapes."""
    raw = token.value[1:-1]
    out: list[str] = []
    index = 0
    while index < len(raw):
        char = raw[index]
        column = (token.column or 1) + 1 + index
        if char == "\\":
            code = raw[index + 1]
            if code == "u":
                digits = raw[index + 2 : index + 6]
                if not re.fullmatch(r"[0-9A-Fa-f]{4}", digits):
                    raise ExpressionError(
                        "\\u must be followed by four hexadecimal digits, as in \\u00e9",
                        token.line or 1,
                        column,
                    )
                char = chr(int(digits, 16))
                if 0xD800 <= ord(char) <= 0xDFFF:
                    raise ExpressionError(
                        f"\\u{digits} is half of a surrogate pair, not a character",
                        token.line or 1,
                        column,
                    )
                index += 6
            elif code in _ESCAPES:
                char = _ESCAPES[code]
                index += 2
            else:
                raise ExpressionError(
                    f"unknown escape '\\{code}' in text: use \\\\ for a backslash, "
                    '\\" for a quote, \\n, \\t or \\uXXXX',
                    token.line or 1,
                    column,
                )
        else:
            index += 1
        if char == "\0":
            raise ExpressionError(
                "text cannot contain the NUL character (U+0000)", token.line or 1, column
            )
        out.append(char)
    return "".join(out)


def decode_number(token: Token) -> Literal:
    """Decode an unsigned number token into an INTEGER or DECIMAL literal."""
    text = token.value
    if "." in text:
        digits = text.replace(".", "").lstrip("0")
        if len(digits) > MAX_DECIMAL_DIGITS:
            raise ExpressionError(
                f"this number has more than {MAX_DECIMAL_DIGITS} digits", **at(token)
            )
        return Literal(decimal.Decimal(text), ValueType.DECIMAL, **at(token))
    if len(text.lstrip("0")) > 19 or int(text) > MAX_INTEGER:
        raise ExpressionError(
            f"this number is too large (the largest whole number is {MAX_INTEGER})", **at(token)
        )
    return Literal(int(text), ValueType.INTEGER, **at(token))


def date_literal(name: Token, args: list[Node]) -> Literal:
    """Turn ``date("2024-05-01")`` into a DATE literal, or say what is wrong with it."""
    text = _single_text_argument(name, args, 'date("2024-05-01")')
    if not _DATE.fullmatch(text):
        raise ExpressionError(f'"{text}" is not a date: write it as YYYY-MM-DD', **at(args[0]))
    try:
        value = dt.date.fromisoformat(text)
    except ValueError as exc:
        raise ExpressionError(f'"{text}" is not a valid date: {exc}', **at(args[0])) from None
    return Literal(value, ValueType.DATE, **at(name))


def datetime_literal(name: Token, args: list[Node]) -> Literal:
    """Turn ``datetime("2024-05-01T10:00:00Z")`` into a DATETIME literal in UTC."""
    text = _single_text_argument(name, args, 'datetime("2024-05-01T10:00:00Z")')
    if not _DATETIME.fullmatch(text):
        raise ExpressionError(
            f'"{text}" is not a date and time: write it as YYYY-MM-DDTHH:MM:SS with a time '
            'zone, "Z" for UTC or an offset such as "+08:00"',
            **at(args[0]),
        )
    try:
        value = dt.datetime.fromisoformat(text).astimezone(dt.UTC)
    except (ValueError, OverflowError) as exc:
        raise ExpressionError(
            f'"{text}" is not a valid date and time: {exc}', **at(args[0])
        ) from None
    return Literal(value, ValueType.DATETIME, **at(name))


def _single_text_argument(name: Token, args: list[Node], example: str) -> str:
    if len(args) != 1 or not (isinstance(args[0], Literal) and args[0].type is ValueType.TEXT):
        raise ExpressionError(
            f"{name.value.lower()}() takes one value written as text, like {example}", **at(name)
        )
    return args[0].value


class Builder(Transformer[Token, Node]):
    """Callbacks the LALR parser calls on each reduction; one method per grammar alias."""

    def or_expr(self, operands: list[Node]) -> Node:
        return Logical("or", tuple(operands), **at(operands[0]))

    def and_expr(self, operands: list[Node]) -> Node:
        return Logical("and", tuple(operands), **at(operands[0]))

    def negation(self, items: list[Any]) -> Node:
        keyword, operand = items
        return Not(operand, **at(keyword))

    def compare(self, items: list[Any]) -> Node:
        left, op, right = items
        return Compare(op.value, left, right, **at(op))

    def in_list(self, items: list[Any]) -> Node:
        operand, keyword, choices = items
        return In(operand, choices, False, **at(keyword))

    def not_in_list(self, items: list[Any]) -> Node:
        operand, keyword, _, choices = items
        return In(operand, choices, True, **at(keyword))

    def between(self, items: list[Any]) -> Node:
        operand, keyword, low, high = items
        return Between(operand, low, high, False, **at(keyword))

    def not_between(self, items: list[Any]) -> Node:
        operand, keyword, _, low, high = items
        return Between(operand, low, high, True, **at(keyword))

    def match(self, items: list[Any]) -> Node:
        left, op, right = items
        return Match(op.value.lower(), left, right, **at(op))

    def is_null(self, items: list[Any]) -> Node:
        operand, keyword, _ = items
        return IsNull(operand, False, **at(keyword))

    def is_not_null(self, items: list[Any]) -> Node:
        operand, keyword, _, _ = items
        return IsNull(operand, True, **at(keyword))

    def list_value(self, items: list[Any]) -> Node:
        paren, *values = items
        return ListValue(tuple(values), **at(paren))

    def function_choices(self, items: list[Any]) -> Node:
        (call,) = items
        return call

    def arithmetic(self, items: list[Any]) -> Node:
        left, op, right = items
        return Arithmetic(op.value, left, right, **at(op))

    def negate(self, items: list[Any]) -> Node:
        sign, operand = items
        return Negate(operand, **at(sign))

    def text(self, items: list[Token]) -> Node:
        (token,) = items
        return Literal(decode_text(token), ValueType.TEXT, **at(token))

    def number(self, items: list[Token]) -> Node:
        (token,) = items
        return decode_number(token)

    def true(self, items: list[Token]) -> Node:
        return Literal(True, ValueType.BOOLEAN, **at(items[0]))

    def false(self, items: list[Token]) -> Node:
        return Literal(False, ValueType.BOOLEAN, **at(items[0]))

    def null(self, items: list[Token]) -> Node:
        return Literal(None, ValueType.NULL, **at(items[0]))

    def field(self, items: list[Token]) -> Node:
        names = [token.value for token in items if token.type == "NAME"]
        if len(names) > 2:
            dot = [token for token in items if token.type == "DOT"][1]
            raise ExpressionError(
                "a field can reach only one lookup away, as in customer.level: "
                "remove this second '.'",
                **at(dot),
            )
        return Field(tuple(names), **at(items[0]))

    def group(self, items: list[Any]) -> Node:
        _, inner = items
        return inner

    def call(self, items: list[Any]) -> Node:
        name, _, *args = items
        lowered = name.value.lower()
        if lowered == "date":
            return date_literal(name, args)
        if lowered == "datetime":
            return datetime_literal(name, args)
        return Call(lowered, tuple(args), **at(name))
