"""``like`` patterns: read the admin's pattern once, then render it for SQL or for Python.

In a pattern ``%`` stands for any run of characters, ``_`` for exactly one,
and a backslash makes the next character literal. SQL gets the pattern with
``!`` as its escape character, spelled out in every query, because PostgreSQL
and SQLite disagree on the default.
"""

from __future__ import annotations

import re

SQL_ESCAPE = "!"

ANY = object()
ONE = object()

PatternToken = str | object


def like_tokens(pattern: str) -> list[PatternToken]:
    """Split a pattern into literal characters and the ``ANY`` / ``ONE`` wildcards."""
    tokens: list[PatternToken] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            if index + 1 == len(pattern):
                raise ValueError(
                    "a like pattern cannot end with a backslash, which makes the next "
                    "character literal"
                )
            tokens.append(pattern[index + 1])
            index += 2
            continue
        tokens.append(ANY if char == "%" else ONE if char == "_" else char)
        index += 1
    return tokens


def sql_like(tokens: list[PatternToken]) -> str:
    """Render tokens as a SQL LIKE pattern escaped with ``SQL_ESCAPE``."""
    return "".join(
        "%" if token is ANY else "_" if token is ONE else escape_like(token)  # type: ignore[arg-type]
        for token in tokens
    )


def escape_like(text: str) -> str:
    """Make text match itself inside a SQL LIKE pattern escaped with ``SQL_ESCAPE``."""
    return (
        text.replace(SQL_ESCAPE, SQL_ESCAPE * 2)
        .replace("%", SQL_ESCAPE + "%")
        .replace("_", SQL_ESCAPE + "_")
    )


def regex(tokens: list[PatternToken]) -> re.Pattern[str]:
    """Compile tokens to a regular expression that must match a whole string."""
    parts = [
        ".*" if token is ANY else "." if token is ONE else re.escape(str(token)) for token in tokens
    ]
    return re.compile("".join(parts), re.DOTALL)
