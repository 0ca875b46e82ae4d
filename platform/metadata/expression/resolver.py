"""A ready-made column resolver for callers that hold one SQLAlchemy table per entity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.sql.elements import ColumnElement

from metacrm.metadata.expression.scope import Scope
from metacrm.metadata.expression.sql_compiler import ColumnResolver


def table_resolver(tables: Mapping[str, Table], scope: Scope) -> ColumnResolver:
    """Resolve fields to columns of ``tables[scope.entity]``, lookups to correlated subqueries.

    ``("customer", "level")`` becomes ``(SELECT level FROM customer AS c WHERE
    c.id = source.customer)``. The target is aliased so that a lookup to the
    same entity (a parent account) still correlates with the outer row.
    """
    source = tables[scope.entity]

    def resolve(path: tuple[str, ...]) -> ColumnElement[Any]:
        if len(path) == 1:
            return source.c[path[0]]
        first, second = path
        target_scope = scope.fields[first].target
        if target_scope is None:
            raise KeyError(f"{first!r} is not a lookup")
        target = tables[target_scope.entity].alias()
        return select(target.c[second]).where(target.c.id == source.c[first]).scalar_subquery()

    return resolve
