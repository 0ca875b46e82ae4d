"""What the caller of an audit or notification request may see.

Two questions: which tenant-wide capabilities the caller holds, and which
fields of an entity field-level security hides from them. Both are answered by
the permission core (:mod:`metacrm.runtime.authz`) under the tenant's published
metadata, so audit views follow exactly the rules the record API follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from metacrm.runtime import authz
from metacrm.runtime.api.context import RequestContext, platform
from metacrm.runtime.model import TenantModel

#: Every field of the entity: the caller may not read the entity at all.
EVERYTHING = frozenset({"*"})


@dataclass(frozen=True)
class Viewer:
    """The caller's access at the tenant's current metadata version."""

    access: authz.Access
    model: TenantModel

    def can(self, capability: str) -> bool:
        """Tell whether the caller, with this credential, holds a capability."""
        return self.access.can(capability)

    @property
    def audience(self) -> frozenset[str]:
        """The capabilities whose notifications the caller receives.

        The member's roles decide, not the credential: a read-only token still
        shows its owner the alerts addressed to admins.
        """
        return self.access.policy.capabilities(self.access.roles)

    def hidden(self, entity: str) -> frozenset[str]:
        """Return the fields of ``entity`` hidden from the caller (:data:`EVERYTHING`
        when the caller may not read the entity at all)."""
        if not self.access.allows(entity, "read"):
            return EVERYTHING
        return self.access.hidden_fields(entity, self.model)


def viewer_of(context: RequestContext) -> Viewer:
    """Return the viewer of a request, from its principal and the published metadata."""
    p = platform()
    with context.store.connect() as connection:
        model = p.models.current(context.store, connection)
    return Viewer(authz.for_principal(context.principal, model, p.control_engine), model)


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
