"""Tell whether building something read the request's evaluation context.

A list's filter, sort and select list become SQLAlchemy constructs that can be
reused by every later request, unless ``now()``, ``today()``, ``me()`` or
``my_team()`` (directly or through a formula) put the request's values into
them. Rather than keep a list of those functions next to the compilers, the
builder runs with a watched copy of the context: if it never read a value, what
it built holds none, and may be cached.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from metacrm.metadata.expression import EvalContext

_T = TypeVar("_T")
_VALUES = frozenset(f.name for f in dataclasses.fields(EvalContext))


class _Watched(EvalContext):
    """An EvalContext that notes any read of its values."""

    def __getattribute__(self, name: str) -> Any:
        if name in _VALUES:
            object.__setattr__(self, "_read", True)
        return super().__getattribute__(name)


def build_watched(build: Callable[[EvalContext], _T], ctx: EvalContext) -> tuple[_T, bool]:
    """Return ``build(ctx)`` and whether it did without the context's values.

    When the second item is True, the result is the same for every request and
    may be cached; otherwise it must be built per request.
    """
    # Copied without counting as a read: builders nest (a list's shape holds its sort keys).
    # Any other context is read as usual (one may set its values on first use).
    value_of = object.__getattribute__ if isinstance(ctx, _Watched) else getattr
    watched = _Watched(**{name: value_of(ctx, name) for name in _VALUES})
    object.__setattr__(watched, "_read", False)  # __post_init__ checked the values
    found = build(watched)
    read = object.__getattribute__(watched, "_read")
    if read and isinstance(ctx, _Watched):
        object.__setattr__(ctx, "_read", True)  # what the inner build read, the outer did
    return found, not read


_MISSING = object()


class ContextFreeCache:
    """What was built without the evaluation context, per owner (held weakly) and key.

    The owner is the published version's object the result was built from (an
    ``EntityModel``), so a new version starts empty and the old entries go with
    the old model. Each owner keeps at most ``limit`` entries; beyond that its
    entries are dropped and built again, so odd requests cannot grow memory.
    Errors raised by the builder are not cached.
    """

    def __init__(self, limit: int = 256) -> None:
        self._found: weakref.WeakKeyDictionary[Any, dict[Hashable, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._limit = limit

    def get(
        self, owner: Any, key: Hashable, build: Callable[[EvalContext], _T], ctx: EvalContext
    ) -> _T:
        """Return the cached result for (owner, key), or build it with ``ctx``."""
        return self.lookup(owner, key, build, ctx)[0]

    def lookup(
        self, owner: Any, key: Hashable, build: Callable[[EvalContext], _T], ctx: EvalContext
    ) -> tuple[_T, bool]:
        """Return ``get``'s result and whether it is shared by every request (context-free).

        A shared result is the same object until the owner's version goes, so
        what is derived from it (its SQL compiled once, see ``direct``) may be
        cached beside it.
        """
        with self._lock:
            found = self._found.get(owner, {}).get(key, _MISSING)
        if found is not _MISSING:
            return found, True
        value, free = build_watched(build, ctx)
        if free:
            with self._lock:
                entries = self._found.setdefault(owner, {})
                if len(entries) >= self._limit:
                    entries.clear()
                entries[key] = value
        return value, free
