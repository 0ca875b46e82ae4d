"""Text to tree: size limits first, then the LALR parser, then the tree limits."""

from __future__ import annotations

from lark.exceptions import UnexpectedInput

from metacrm.metadata.expression.errors import ExpressionError
from metacrm.metadata.expression.grammar import parser
from metacrm.metadata.expression.limits import check_source, check_tree
from metacrm.metadata.expression.nodes import Node
from metacrm.metadata.expression.syntax_error import from_lark


def parse(text: str) -> Node:
    """Parse an expression into a tree, or raise ``ExpressionError`` saying where and why."""
    if not isinstance(text, str):
        raise TypeError(f"an expression is text, not {type(text).__name__}")
    check_source(text)
    if not text.strip():
        raise ExpressionError("the expression is empty", 1, 1)
    lark = parser()
    try:
        tree = lark.parse(text)
    except UnexpectedInput as exc:
        raise from_lark(lark, text, exc) from None
    check_tree(tree)
    return tree
