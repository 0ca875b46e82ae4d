"""Strict JSON decoding for documents that come from outside.

``json.loads`` accepts what a metadata or record document must not contain:
duplicate keys (the last silently wins), ``NaN`` and ``Infinity``, and nesting
deep enough to exhaust the stack. This decoder refuses them with a message that
says where, before any of it reaches validation or the database.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64
MAX_BYTES = 5 * 1024 * 1024
MAX_INT_DIGITS = 40


class DocumentError(ValueError):
    """A document could not be decoded; ``message`` says why and ``position`` where."""

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message if position is None else f"{message} (at byte {position})")
        self.message = message
        self.position = position


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DocumentError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise DocumentError(f"{name} is not a JSON number")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if value in (float("inf"), float("-inf")):
        raise DocumentError(f"the number {literal[:40]} is too large")
    return value


def _bounded_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise DocumentError(f"a whole number has more than {MAX_INT_DIGITS} digits")
    return int(literal)


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse nesting deeper than ``max_depth`` with one linear scan, before parsing."""
    depth = 0
    in_string = False
    escaped = False
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise DocumentError(f"nesting deeper than {max_depth} levels", index)
        elif char in "]}":
            depth -= 1


def loads(data: bytes | str, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Decode one JSON document strictly, or raise DocumentError."""
    if isinstance(data, bytes):
        if len(data) > max_bytes:
            raise DocumentError(f"document is {len(data)} bytes; the limit is {max_bytes}")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DocumentError("document is not valid UTF-8", exc.start) from None
    else:
        text = data
        if len(text) > max_bytes:
            raise DocumentError(f"document is {len(text)} characters; the limit is {max_bytes}")
    if text.startswith("\ufeff"):
        text = text[1:]
    _check_depth(text, max_depth)
    try:
        document = json.loads(
            text,
            object_pairs_hook=_refuse_duplicates,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except json.JSONDecodeError as exc:
        raise DocumentError(
            f"invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    _check_strings(document)
    return document


def _check_strings(document: Any) -> None:
    """Refuse NUL characters and lone surrogates (\\ud800), which no database stores."""
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            if "\x00" in value:
                raise DocumentError("a string contains a NUL character")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise DocumentError(
                    "a string contains a lone surrogate (an unpaired \\u escape)"
                ) from None
