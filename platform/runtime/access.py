"""Tenant-wide capabilities granted by roles (``manage_metadata``, ``export`` …).

Per-entity permissions and their SQL enforcement arrive with the identity and
access work; this module answers the coarse question the metadata API needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def capabilities(bundle: Mapping[str, Any], role_names: Iterable[str]) -> set[str]:
    """Return the capabilities of the given roles, inherited roles included."""
    roles = {r["name"]: r for r in bundle.get("roles", [])}
    granted: set[str] = set()
    pending = list(role_names)
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or name not in roles:
            continue
        seen.add(name)
        granted.update(roles[name].get("capabilities", []))
        pending.extend(roles[name].get("inherits", []))
    return granted
