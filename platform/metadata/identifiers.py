"""Identifiers from metadata: the only names ever interpolated into SQL.

An identifier is checked twice: the JSON Schema pattern is a first filter, and
``identifier_problem`` is the authority. Python's ``re`` lets ``$`` match before
a trailing newline, so JSON Schema's pattern accepts ``"lead\\n"``; here we use
``fullmatch`` with ASCII semantics, which refuses it, and which also refuses
Unicode look-alikes such as a Cyrillic ``а``.
"""

from __future__ import annotations

import re

from sqlalchemy.dialects.postgresql.base import RESERVED_WORDS as _PG_RESERVED
from sqlalchemy.dialects.sqlite.base import SQLiteIdentifierPreparer
from sqlalchemy.sql.compiler import RESERVED_WORDS as _ANSI_RESERVED

IDENTIFIER_PATTERN = r"[a-z][a-z0-9_]{0,62}"
_IDENTIFIER = re.compile(IDENTIFIER_PATTERN, re.ASCII)
MAX_LENGTH = 63

#: Columns every entity table has, in table order; the platform sets them, never a client.
SYSTEM_COLUMN_ORDER = (
    "id",
    "owner_id",
    "team_id",
    "created_at",
    "created_by",
    "updated_at",
    "updated_by",
    "version",
    "deleted_at",
)
SYSTEM_COLUMNS = frozenset(SYSTEM_COLUMN_ORDER)

#: Words the REST API and query strings use next to entity and field names.
API_WORDS = frozenset(
    {
        "api",
        "meta",
        "records",
        "record",
        "count",
        "bulk",
        "related",
        "restore",
        "purge",
        "openapi",
        "schemas",
        "filter",
        "sort",
        "fields",
        "limit",
        "cursor",
        "include",
        "q",
        "me",
        "my_team",
        "today",
        "now",
        "null",
        "true",
        "false",
        "and",
        "or",
        "not",
        "in",
        "between",
        "like",
        "contains",
        "starts_with",
        "is",
        "self",
    }
)

#: SQL keywords of the SQL standard, PostgreSQL and SQLite.
SQL_KEYWORDS = frozenset(
    w.lower() for w in (_ANSI_RESERVED | _PG_RESERVED | SQLiteIdentifierPreparer.reserved_words)
)

RESERVED = SQL_KEYWORDS | SYSTEM_COLUMNS | API_WORDS


def identifier_problem(name: object) -> str | None:
    """Return why ``name`` is not a usable identifier, or None when it is."""
    if not isinstance(name, str):
        return "must be a string"
    if not name:
        return "must not be empty"
    if len(name) > MAX_LENGTH:
        return f"is {len(name)} characters long; the limit is {MAX_LENGTH}"
    if not _IDENTIFIER.fullmatch(name):
        if not name.isascii():
            return "may contain only ASCII letters a-z, digits and underscores (no look-alikes)"
        if name.lower() != name:
            return "must be lower case (identifiers are compared without regard to case)"
        if not name[0].isalpha():
            return "must start with a letter a-z"
        return "may contain only lower-case letters a-z, digits and underscores"
    if "__" in name:
        return "must not contain '__' (the platform uses it to join names)"
    if name in RESERVED:
        return "is a reserved word"
    return None


def is_identifier(name: object) -> bool:
    """Tell whether ``name`` is a valid, non-reserved identifier."""
    return identifier_problem(name) is None
