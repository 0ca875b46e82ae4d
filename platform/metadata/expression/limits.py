"""Size limits that keep hostile input from exhausting the parser, the stack or the CPU.

Every check here is iterative, so an expression that is too big fails with an
``ExpressionError`` instead of a ``RecursionError``.
"""

from __future__ import annotations

from metacrm.metadata.expression.errors import ExpressionError
from metacrm.metadata.expression.nodes import Node, children

MAX_SOURCE_LENGTH = 10_000
MAX_DEPTH = 64
MAX_NODES = 1_000


def position(text: str, index: int) -> tuple[int, int]:
    """Turn a character offset into a 1-based (line, column)."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def check_source(text: str) -> None:
    """Reject over-long text and over-deep or unbalanced parentheses before parsing.

    The scan skips quoted text; if a quote is never closed it stops and leaves
    the lexer to report that, which it does more precisely.
    """
    if len(text) > MAX_SOURCE_LENGTH:
        raise ExpressionError(
            f"the expression is too long ({len(text):,} characters; "
            f"the limit is {MAX_SOURCE_LENGTH:,})",
            *position(text, MAX_SOURCE_LENGTH),
        )
    open_at: list[int] = []
    quote = ""
    escaped = False
    for index, char in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
            elif char == "\n":
                return
        elif char in "\"'":
            quote = char
        elif char == "(":
            open_at.append(index)
            if len(open_at) > MAX_DEPTH:
                raise ExpressionError(
                    f"too many nested parentheses (the limit is {MAX_DEPTH})",
                    *position(text, index),
                )
        elif char == ")":
            if not open_at:
                raise ExpressionError("this ')' has no matching '('", *position(text, index))
            open_at.pop()
    if quote:
        return
    if open_at:
        line, column = position(text, open_at[-1])
        raise ExpressionError(
            f"the '(' at line {line}, column {column} is never closed: add a ')'",
            *position(text, len(text)),
        )


def check_tree(root: Node) -> None:
    """Reject a tree deeper than ``MAX_DEPTH`` or bigger than ``MAX_NODES``."""
    count = 0
    stack: list[tuple[Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise ExpressionError(
                f"the expression is nested too deeply (the limit is {MAX_DEPTH} levels)",
                node.line or 1,
                node.column or 1,
            )
        if count > MAX_NODES:
            raise ExpressionError(
                f"the expression is too big (the limit is {MAX_NODES:,} parts)",
                node.line or 1,
                node.column or 1,
            )
        stack.extend((child, depth + 1) for child in children(node))
