"""Explain a lark parse failure in plain words, at the right line and column."""

from __future__ import annotations

import unicodedata

from lark import Lark, Token
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from metacrm.metadata.expression.errors import ExpressionError
from metacrm.metadata.expression.limits import position

_VALUE_STARTS = {"NAME", "STRING", "NUMBER", "TRUE", "FALSE", "NULL", "LPAR", "MINUS"}
_OPERATORS = {"COMPARE", "PLUS", "STAR", "SLASH", "_AND", "_OR"}
_PREDICATES = {"COMPARE", "IN", "BETWEEN", "IS", "CONTAINS", "STARTS_WITH", "LIKE"}

_LOOK_ALIKES = {
    "\u201c": '"',
    "\u201d": '"',
    "\u201e": '"',
    "\u00ab": '"',
    "\u00bb": '"',
    "\u2018": "'",
    "\u2019": "'",
    "\u2013": "-",
    "\u2014": "-",
    "\u2212": "-",
    "\u00d7": "*",
    "\u00f7": "/",
    "\u2264": "<=",
    "\u2265": ">=",
    "\u2260": "!=",
}

_PLAIN_HINTS = {
    "&": "write 'and' to combine conditions",
    "|": "write 'or' to combine conditions",
    "!": "write 'not' to negate a condition, or '!=' for 'is not equal to'",
    ";": "an expression is a single condition or value, with no ';'",
    "[": 'write a list in parentheses, as in ("a", "b")',
    "]": 'write a list in parentheses, as in ("a", "b")',
}


def from_lark(parser: Lark, text: str, exc: UnexpectedInput) -> ExpressionError:
    """Turn a lark exception into an ``ExpressionError`` an admin can act on."""
    if isinstance(exc, UnexpectedCharacters):
        return _bad_character(text, exc)
    if isinstance(exc, UnexpectedToken):
        return _bad_token(parser, text, exc)
    return ExpressionError("the expression could not be read", *_lark_position(exc))


def _lark_position(exc: UnexpectedInput) -> tuple[int, int]:
    line = exc.line if isinstance(exc.line, int) else 1
    column = exc.column if isinstance(exc.column, int) else 1
    return line, column


def _bad_character(text: str, exc: UnexpectedCharacters) -> ExpressionError:
    line, column = _lark_position(exc)
    char = exc.char
    if char in "\"'":
        return ExpressionError(f"this text is never closed: add a closing {char}", line, column)
    plain = _LOOK_ALIKES.get(char) or _ascii_form(char)
    if plain in ("'", '"'):
        return ExpressionError(
            f"unexpected character '{char}': put text between straight quotes \" or '",
            line,
            column,
        )
    if plain:
        return ExpressionError(
            f"unexpected character '{char}': use the plain '{plain}' instead", line, column
        )
    if char in _PLAIN_HINTS:
        return ExpressionError(f"unexpected character '{char}': {_PLAIN_HINTS[char]}", line, column)
    if not char.isascii():
        name = unicodedata.name(char, "unnamed character")
        hint = (
            ": names of fields and functions use only the letters a-z, digits and '_'"
            if char.isalnum()
            else ""
        )
        return ExpressionError(
            f"unexpected character '{char}' (U+{ord(char):04X} {name}){hint}", line, column
        )
    shown = char if char.isprintable() else f"U+{ord(char):04X}"
    return ExpressionError(f"unexpected character '{shown}'", line, column)


def _ascii_form(char: str) -> str:
    """Give the ASCII character a full-width one (as typed with a CJK input method) stands for."""
    folded = unicodedata.normalize("NFKC", char)
    if folded != char and folded.isascii() and folded.isprintable() and not folded.isalnum():
        return folded
    return ""


def _bad_token(parser: Lark, text: str, exc: UnexpectedToken) -> ExpressionError:
    token = exc.token
    expected = set(exc.expected)
    at_end = token.type == "$END"
    if at_end:
        line, column = position(text, len(text))
        found = "the end of the expression"
        previous = _previous_token(parser, text, len(text))
    else:
        line, column = token.line or 1, token.column or 1
        found = _describe(token)
        previous = _previous_token(parser, text, token.start_pos or 0)
    after = f" after '{previous.value}'" if previous is not None else ""
    if not expected:
        return ExpressionError(f"unexpected {found}", line, column)

    if expected <= {"LPAR", "NAME"} and previous is not None and previous.type == "IN":
        return ExpressionError(
            f'expected a list in parentheses after \'in\', like ("a", "b"), or my_team(); '
            f"found {found}",
            line,
            column,
        )
    if expected <= {"NOT", "NULL"}:
        return ExpressionError(
            f"expected 'null' or 'not null' after 'is', found {found}", line, column
        )
    if expected <= {"BETWEEN", "IN"}:
        return ExpressionError(
            f"expected 'in' or 'between' after 'not', found {found}", line, column
        )
    if expected == {"NAME"}:
        return ExpressionError(f"expected a field name after '.', found {found}", line, column)
    if expected & _VALUE_STARTS and not expected & _OPERATORS:
        hint = ""
        if previous is not None and previous.value == "=" and token.value == "=":
            hint = ": use a single '=' to compare"
        elif previous is not None and previous.value == "<" and token.value == ">":
            hint = ": use '!=' for 'is not equal to'"
        return ExpressionError(f"expected a value{after}, found {found}{hint}", line, column)
    if "_AND" in expected and "_OR" not in expected:
        return ExpressionError(
            f"expected 'and' to finish 'between … and …', found {found}", line, column
        )
    if token.type in _PREDICATES:
        return ExpressionError(
            f"{found} cannot follow a comparison: join conditions with 'and' or 'or'",
            line,
            column,
        )
    if _inside_list(parser, text, token.start_pos or 0):
        return ExpressionError(f"expected ',' or ')', found {found}", line, column)
    return ExpressionError(
        f"expected an operator such as '=', '+', 'and' or 'or', found {found}", line, column
    )


def _describe(token: Token) -> str:
    value = token.value if len(token.value) <= 30 else token.value[:27] + "..."
    if token.type == "STRING":
        return f"the text {value}"
    if token.type == "NUMBER":
        return f"the number {value}"
    return f"'{value}'"


def _previous_token(parser: Lark, text: str, before: int) -> Token | None:
    """Find the last token that ends before an offset, for 'after X' in messages."""
    previous = None
    try:
        for token in parser.lex(text):
            if (token.start_pos or 0) >= before:
                break
            previous = token
    except LarkError:
        pass
    return previous


def _inside_list(parser: Lark, text: str, before: int) -> bool:
    """Tell whether an offset lies in the arguments of a call or in a list after 'in'."""
    stack: list[bool] = []
    previous: Token | None = None
    try:
        for token in parser.lex(text):
            if (token.start_pos or 0) >= before:
                break
            if token.type == "LPAR":
                stack.append(previous is not None and previous.type in ("NAME", "IN"))
            elif token.type == "_RPAR" and stack:
                stack.pop()
            previous = token
    except LarkError:
        pass
    return bool(stack) and stack[-1]
