"""``Idempotency-Key`` on POST: a retried request replays its first answer.

The key is claimed inside the write's own transaction: the first request
inserts a row for (principal, key) before it changes anything and fills in its
answer before it commits, so the answer is stored if and only if the change
is. A concurrent retry waits on that row (PostgreSQL's unique index, SQLite's
write lock) and then replays the answer instead of writing again. A refused
request stores nothing, so retrying it runs it again.

The key is bound to a hash of the method, path, query and body: the same key
with a different request is refused (``idempotency_key_reused``), never
replayed as if it were the same. Keys expire after ``TTL``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from flask import Response, json, request
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from metacrm.runtime.api.problem import abort
from metacrm.runtime.store import idempotency

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 200
#: How long a key is remembered; a key older than this starts afresh.
TTL = dt.timedelta(hours=24)
#: Response headers that are part of the stored answer.
KEPT_HEADERS = ("Location", "ETag")
#: 1-200 printable ASCII characters; HTTP strips spaces at the ends of a header value.
KEY_PATTERN = r"[\x21-\x7e](?:[\x20-\x7e]{0,198}[\x21-\x7e])?"
_KEY = re.compile(KEY_PATTERN, re.ASCII)
#: A claimed row whose answer is not written yet (never visible after a commit).
_PENDING = 0


@dataclass(frozen=True)
class Claim:
    """A key reserved by the current transaction for its request."""

    principal_id: uuid.UUID
    key: str
    request_hash: str


def requested_key() -> str | None:
    """Return the request's Idempotency-Key, None without one; 400 when malformed."""
    if HEADER not in request.headers:
        return None
    key = request.headers[HEADER]
    if not _KEY.fullmatch(key):
        abort(
            400,
            "invalid_idempotency_key",
            "Invalid Idempotency-Key",
            f"the {HEADER} header must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
        )
    return key


def request_hash() -> str:
    """Return a hash of what makes two requests the same: method, path, query and body."""
    digest = hashlib.sha256()
    for part in (
        request.method.encode(),
        request.path.encode(),
        request.query_string,
        request.get_data(cache=True),
    ):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _insert(dialect: str) -> Any:
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(idempotency)


def claim(
    connection: Connection, principal_id: uuid.UUID, key: str, now: dt.datetime
) -> Claim | Response:
    """Reserve the key for this request, or return the stored answer to replay.

    Answers 422 ``idempotency_key_reused`` when the key was used for another request.
    """
    the_claim = Claim(principal_id, key, request_hash())
    pending = {
        "principal_id": principal_id,
        "key": key,
        "request_hash": the_claim.request_hash,
        "status": _PENDING,
        "body": "",
        "headers": {},
        "created_at": now,
    }
    statement = (
        _insert(connection.dialect.name)
        .values(pending)
        .on_conflict_do_nothing(index_elements=["principal_id", "key"])
        .returning(idempotency.c.key)
    )
    if connection.execute(statement).first() is not None:
        return the_claim
    where = sa.and_(idempotency.c.principal_id == principal_id, idempotency.c.key == key)
    row = connection.execute(sa.select(idempotency).where(where)).mappings().one()
    if row["created_at"] <= now - TTL:
        connection.execute(idempotency.update().where(where).values(pending))
        return the_claim
    if row["request_hash"] != the_claim.request_hash:
        abort(
            422,
            "idempotency_key_reused",
            "Idempotency-Key already used",
            f"this {HEADER} was used for a different request (method, path or body); "
            "use a new key for a new request",
        )
    return replay(row["status"], row["body"], row["headers"])


def remember(
    connection: Connection, the_claim: Claim, status: int, body: Any, headers: Mapping[str, str]
) -> None:
    """Store the answer of a claimed request, in the same transaction as its change."""
    kept = {name: headers[name] for name in KEPT_HEADERS if name in headers}
    connection.execute(
        idempotency.update()
        .where(
            idempotency.c.principal_id == the_claim.principal_id,
            idempotency.c.key == the_claim.key,
        )
        .values(status=status, body="" if body is None else body, headers=kept)
    )


def replay(status: int, body: Any, headers: Mapping[str, str]) -> Response:
    """Return a stored answer, marked as replayed."""
    text = "" if status == 204 else json.dumps(body, ensure_ascii=False)
    response = Response(text, status, mimetype=None if status == 204 else "application/json")
    for name, value in headers.items():
        response.headers[name] = value
    response.headers[REPLAYED_HEADER] = "true"
    return response
