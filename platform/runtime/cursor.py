"""Opaque, signed keyset cursors for record lists.

A cursor names a position in one list: the sort key values of the last row a
page showed, with what makes the list that list (entity, sort, a digest of the
filter and search). It is JSON, base64url-encoded and signed with
HMAC-SHA256, so a client can hand it back but cannot forge or edit one. The
format carries its own version number and nothing of the tenant: a cursor only
positions a query, which applies every filter and permission itself.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import hashlib
import hmac
import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FORMAT = 1
#: Longer tokens are refused before any decoding work.
MAX_TOKEN_LENGTH = 8192
_KEY_CONTEXT = b"metacrm.cursor.v1"
_SIGNATURE_BYTES = 32
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class CursorError(ValueError):
    """A cursor that is malformed, tampered with, or signed with another secret."""


@dataclass(frozen=True)
class Position:
    """What a cursor says: the list it belongs to and the last sort key values shown."""

    entity: str
    sort: str
    digest: str
    values: tuple[Any, ...]


def digest(*parts: object) -> str:
    """Return a short, stable hash of the parts that define a list (filter, search …)."""
    text = json.dumps([p if p is None or isinstance(p, bool | int) else str(p) for p in parts])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def encode(position: Position, secret: bytes) -> str:
    """Return the signed token for a position."""
    payload = {
        "v": FORMAT,
        "e": position.entity,
        "s": position.sort,
        "h": position.digest,
        "k": [_encode_value(v) for v in position.values],
    }
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    raw = data.encode()
    return f"{_b64(raw)}.{_b64(_sign(raw, secret))}"


def decode(token: str, secret: bytes) -> Position:
    """Verify a token and return its position; CursorError when it is not one of ours."""
    if not isinstance(token, str) or not token:
        raise CursorError("the cursor is empty")
    if len(token) > MAX_TOKEN_LENGTH:
        raise CursorError("the cursor is too long")
    body, dot, signature = token.partition(".")
    if not dot or not _BASE64URL.fullmatch(body) or not _BASE64URL.fullmatch(signature):
        raise CursorError("the cursor is malformed")
    raw = _unb64(body)
    if not hmac.compare_digest(_unb64(signature), _sign(raw, secret)):
        raise CursorError("the cursor's signature does not match")
    try:
        payload = json.loads(raw)
    except ValueError:
        raise CursorError("the cursor is malformed") from None
    if not isinstance(payload, dict) or payload.get("v") != FORMAT:
        raise CursorError("the cursor comes from another version of metacrm")
    entity, sort, hashed, values = (payload.get(k) for k in ("e", "s", "h", "k"))
    if not (
        isinstance(entity, str)
        and isinstance(sort, str)
        and isinstance(hashed, str)
        and isinstance(values, list)
    ):
        raise CursorError("the cursor is malformed")
    return Position(entity, sort, hashed, tuple(_decode_value(v) for v in values))


def _key(secret: bytes) -> bytes:
    if not secret:
        raise ValueError("a cursor secret is required")
    # A key of its own, so a signature made for cursors is never valid elsewhere.
    return hmac.new(secret, _KEY_CONTEXT, hashlib.sha256).digest()


def _sign(raw: bytes, secret: bytes) -> bytes:
    return hmac.new(_key(secret), raw, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise CursorError("the cursor is malformed") from None


# -- sort key values: JSON scalars as they are, other types tagged ------------------------


def _encode_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("a cursor cannot hold a non-finite number")
        return value
    if isinstance(value, decimal.Decimal):
        return ["n", str(value)]
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("a cursor cannot hold a naive datetime")
        return ["t", value.astimezone(dt.UTC).isoformat()]
    if isinstance(value, dt.date):
        return ["d", value.isoformat()]
    if isinstance(value, uuid.UUID):
        return ["u", value.hex]
    raise TypeError(f"a cursor cannot hold {type(value).__name__}")


def _decode_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str | float):
        return value
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], str)):
        raise CursorError("the cursor is malformed")
    tag, text = value
    try:
        if tag == "n":
            number = decimal.Decimal(text)
            if number.is_finite():
                return number
        elif tag == "t":
            moment = dt.datetime.fromisoformat(text)
            if moment.tzinfo is not None:
                return moment.astimezone(dt.UTC)
        elif tag == "d":
            return dt.date.fromisoformat(text)
        elif tag == "u":
            return uuid.UUID(hex=text)
    except (ValueError, decimal.InvalidOperation):
        pass
    raise CursorError("the cursor is malformed")


def same_shape(values: Sequence[Any], kinds: Sequence[type]) -> bool:
    """Tell whether each value is None or an instance of the type expected at its place."""
    if len(values) != len(kinds):
        return False
    for value, kind in zip(values, kinds, strict=True):
        if value is None:
            continue
        if kind is int and isinstance(value, bool):
            return False
        if kind is dt.date and isinstance(value, dt.datetime):
            return False
        if not isinstance(value, kind):
            return False
    return True
