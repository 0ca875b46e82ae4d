"""Small bundles for the metadata unit tests."""

from __future__ import annotations

import copy
from typing import Any


def entity(name: str, *fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Return an entity document with a required text title field ``name``."""
    return {
        "name": name,
        "label": {"en": name.title(), "zh-CN": name},
        "plural_label": {"en": name.title() + "s"},
        "title_field": "name",
        "fields": [
            {"name": "name", "type": "text", "label": {"en": "Name"}, "required": True},
            *fields,
        ],
        **extra,
    }


def text(name: str, **extra: Any) -> dict[str, Any]:
    """Return a text field document."""
    return {"name": name, "type": "text", "label": {"en": name.title()}, **extra}


def bundle(*entities: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Return a bundle document."""
    return {"format": 1, "entities": [copy.deepcopy(e) for e in entities], **extra}
