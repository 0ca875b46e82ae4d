"""Tenant-wide capabilities granted by roles (``manage_metadata``, ``export`` …).

Per-entity permissions and their SQL enforcement arrive with the identity and
access work; this module answers the coarse question the metadata API needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def capabilities(bundle: Mapping[str, Any], role_names: Iterable[str]) -> set[str]:
    """Return the capabilities of the given roles, inherited roles included."""
    listed = bundle.get("roles", []) if isinstance(bundle, Mapping) else []
    roles = {
        r["name"]: r
        for r in (listed if isinstance(listed, list) else [])
        if isinstance(r, Mapping) and isinstance(r.get("name"), str)
    }
    granted: set[str] = set()
    pending = list(role_names)
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or name not in roles:
            continue
        seen.add(name)
        for key, target in (("capabilities", granted), ("inherits", None)):
            values = roles[name].get(key, [])
            strings = [v for v in values if isinstance(v, str)] if isinstance(values, list) else []
            if target is not None:
                target.update(strings)
            else:
                pending.extend(strings)
    return granted
