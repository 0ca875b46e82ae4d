"""What the caller of an audit or notification request may see.

Two questions: which tenant-wide capabilities the caller's roles hold, and
which fields of an entity field-level security hides from them. Audit views
and the notification inbox ask only these, so the rules live in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from metacrm.runtime.authz import capabilities
from metacrm.runtime.principal import Principal

#: Every field of the entity: the caller may not read the entity at all.
EVERYTHING = frozenset({"*"})


def capabilities_of(principal: Principal, bundle: Mapping[str, Any]) -> set[str]:
    """Return the capabilities the caller's roles hold under the published bundle."""
    return capabilities(bundle, principal.membership.roles)


def _roles(bundle: Mapping[str, Any], names: list[str]) -> list[Mapping[str, Any]]:
    listed = bundle.get("roles", [])
    by_name = {
        r["name"]: r
        for r in (listed if isinstance(listed, list) else [])
        if isinstance(r, Mapping) and isinstance(r.get("name"), str)
    }
    found: list[Mapping[str, Any]] = []
    pending, seen = list(names), set()
    while pending:
        name = pending.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        found.append(by_name[name])
        inherits = by_name[name].get("inherits", [])
        pending.extend(
            i for i in (inherits if isinstance(inherits, list) else []) if isinstance(i, str)
        )
    return found


def hidden_fields_of(
    principal: Principal, bundle: Mapping[str, Any]
) -> Callable[[str], frozenset[str]]:
    """Return a function giving, per entity, the field names hidden from the caller.

    A field is hidden when every permission that lets the caller read the
    entity hides it; an entity the caller may not read at all hides every
    field (:data:`EVERYTHING`). An explicit deny of ``read`` wins.
    """
    roles = _roles(bundle, list(principal.membership.roles))
    cache: dict[str, frozenset[str]] = {}

    def hidden(entity: str) -> frozenset[str]:
        if entity in cache:
            return cache[entity]
        grants: list[Mapping[str, Any]] = []
        denied = False
        for role in roles:
            permissions = role.get("permissions", [])
            for p in permissions if isinstance(permissions, list) else []:
                if not isinstance(p, Mapping) or p.get("entity") not in (entity, "*"):
                    continue
                actions = p.get("actions", [])
                if "read" not in (actions if isinstance(actions, list) else []):
                    continue
                if p.get("effect", "allow") == "deny":
                    denied = True
                else:
                    grants.append(p)
        if denied or not grants:
            result = EVERYTHING
        else:
            sets = []
            for p in grants:
                fields = p.get("fields", {})
                fields = fields if isinstance(fields, Mapping) else {}
                sets.append({name for name, how in fields.items() if how == "hidden"})
            result = frozenset(set.intersection(*sets))
        cache[entity] = result
        return result

    return hidden


def visible_changes(
    entity: str | None, changes: Any, hidden: Callable[[str], frozenset[str]]
) -> Any:
    """Return ``changes`` without the fields hidden from the caller (names included)."""
    if not isinstance(changes, dict) or not entity:
        return changes
    concealed = hidden(entity)
    if concealed is EVERYTHING:
        return {}
    return {k: v for k, v in changes.items() if k not in concealed}
