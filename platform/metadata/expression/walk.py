"""Questions about a tree answered by walking it, iteratively so depth never matters."""

from __future__ import annotations

from collections.abc import Iterator

from metacrm.metadata.expression.nodes import Field, Node, children


def iter_nodes(root: Node) -> Iterator[Node]:
    """Yield every node of a tree, parents before children."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(children(node)))


def references(node: Node) -> set[tuple[str, ...]]:
    """Return the field paths an expression reads, e.g. ``{("amount",), ("customer", "level")}``.

    Callers use this to know which columns to load for a rule, which lookups
    to join for a list, and which fields a formula depends on.
    """
    return {found.path for found in iter_nodes(node) if isinstance(found, Field)}
