"""API bearer tokens: random secrets shown once, stored as SHA-256 hashes.

A token reads ``mcrm_<token id>_<secret>``; the id finds the row without a
scan, and the secret is compared by hash in constant time. A slow hash adds
nothing here: the secret has 256 bits of entropy, unlike a password.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from metacrm.metadata.identifiers import identifier_problem
from metacrm.runtime.changes import CACHE_NEUTRAL
from metacrm.runtime.control import ApiToken, Membership, Tenant, User, utcnow
from metacrm.runtime.database import for_reads
from metacrm.runtime.principal import Principal

PREFIX = "mcrm_"
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
MAX_NAME = 100
MAX_ENTITIES = 100
MAX_DAYS = 3650
#: Tokens whose principal a process keeps (``TokenCache``).
TOKEN_CACHE_SIZE = 10_000


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenError(ValueError):
    """A token request was refused; ``field`` names the input at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def scope_problems(
    name: str,
    entities: Sequence[str] | None,
    expires_days: int | None,
    known_entities: Iterable[str] | None = None,
) -> list[TokenError]:
    """Return every reason a token's name, entity list or lifetime is refused."""
    problems = []
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= MAX_NAME:
        problems.append(TokenError(f"the name must be 1 to {MAX_NAME} characters long", "name"))
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problems.append(TokenError("the name cannot contain control characters", "name"))
    if entities is not None:
        known = None if known_entities is None else set(known_entities)
        if len(entities) > MAX_ENTITIES:
            problems.append(TokenError(f"list at most {MAX_ENTITIES} entities", "entities"))
        for entity in entities:
            if not isinstance(entity, str) or identifier_problem(entity):
                problems.append(TokenError(f"{entity!r} is not an entity API name", "entities"))
            elif known is not None and entity not in known:
                problems.append(TokenError(f"there is no entity {entity!r}", "entities"))
    if expires_days is not None and not 1 <= expires_days <= MAX_DAYS:
        problems.append(TokenError(f"the lifetime must be 1 to {MAX_DAYS} days", "expires_days"))
    return problems


def request_problems(
    name: str,
    entities: Sequence[str] | None,
    expires_days: int | None,
    known_entities: Iterable[str] | None,
    caller: ApiToken | None = None,
) -> tuple[list[TokenError], dt.datetime | None]:
    """Check a token request from the API or the tokens page; return its problems and expiry.

    ``caller`` is the token the request came with, if any: a token never mints a
    broader one (more entities, or a later expiry). One function for both doors,
    so the page cannot accept what the API refuses.
    """
    problems = scope_problems(name, entities, expires_days, known_entities)
    days_ok = expires_days is not None and 1 <= expires_days <= MAX_DAYS
    expires = utcnow() + dt.timedelta(days=expires_days) if days_ok and expires_days else None
    if caller is not None:
        if caller.entities is not None and (
            entities is None or not set(entities) <= set(caller.entities)
        ):
            problems.append(
                TokenError("a token limited to some entities creates only such tokens", "entities")
            )
        if caller.expires_at is not None and (expires is None or expires > caller.expires_at):
            problems.append(
                TokenError("a token cannot create one that outlives it", "expires_days")
            )
    return problems, expires


def create_token(
    session: Session,
    tenant: Tenant,
    user: User,
    name: str,
    read_only: bool = False,
    expires_at: dt.datetime | None = None,
    entities: Sequence[str] | None = None,
) -> tuple[ApiToken, str]:
    """Store a new token for a member and return it with its plain text (shown once).

    ``entities`` limits the token to those entities (None: every entity the
    user's roles allow); the permission layer reads it from ``principal.token``.
    """
    secret = secrets.token_urlsafe(32)
    token = ApiToken(
        id=uuid.uuid4(),
        tenant_id=tenant.id,
        user_id=user.id,
        name=name.strip(),
        secret_hash=_digest(secret),
        read_only=read_only,
        entities=None if entities is None else sorted(set(entities)),
        expires_at=expires_at,
    )
    session.add(token)
    session.flush()
    return token, f"{PREFIX}{token.id.hex}_{secret}"


def list_tokens(
    session: Session, tenant_id: uuid.UUID, user_id: uuid.UUID | None = None
) -> list[ApiToken]:
    """Return a tenant's tokens (one user's when ``user_id`` is given), newest first."""
    query = sa.select(ApiToken).where(ApiToken.tenant_id == tenant_id)
    if user_id is not None:
        query = query.where(ApiToken.user_id == user_id)
    return list(session.scalars(query.order_by(ApiToken.created_at.desc(), ApiToken.id)))


def find_token(
    session: Session, tenant_id: uuid.UUID, token_id: str, user_id: uuid.UUID | None = None
) -> ApiToken | None:
    """Return a token of this tenant (and user) by its id in hex or UUID form, or None."""
    try:
        key = uuid.UUID(token_id) if len(token_id) <= 36 else None
    except ValueError:
        return None
    token = session.get(ApiToken, key) if key is not None else None
    if token is None or token.tenant_id != tenant_id:
        return None
    if user_id is not None and token.user_id != user_id:
        return None
    return token


def revoke_token(token: ApiToken) -> bool:
    """Revoke a token now; return False when it was revoked already."""
    if token.revoked_at is not None:
        return False
    token.revoked_at = utcnow()
    return True


def revoke_user_tokens(
    session: Session, user_id: uuid.UUID, tenant_id: uuid.UUID | None = None
) -> int:
    """Revoke every live token of a user (in one tenant, or everywhere); return how many."""
    query = (
        sa.update(ApiToken)
        .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    if tenant_id is not None:
        query = query.where(ApiToken.tenant_id == tenant_id)
    return session.execute(query, execution_options={"synchronize_session": False}).rowcount


def describe(token: ApiToken) -> dict[str, Any]:
    """Return what may be shown about a token: everything but its secret."""
    now = utcnow()
    if token.revoked_at is not None:
        state = "revoked"
    elif token.expires_at is not None and token.expires_at <= now:
        state = "expired"
    else:
        state = "active"
    return {
        "id": token.id.hex,
        "name": token.name,
        "read_only": token.read_only,
        "entities": token.entities,
        "created_at": token.created_at.isoformat(),
        "expires_at": token.expires_at and token.expires_at.isoformat(),
        "last_used_at": token.last_used_at and token.last_used_at.isoformat(),
        "revoked_at": token.revoked_at and token.revoked_at.isoformat(),
        "state": state,
    }


def authenticate(session: Session, presented: str) -> Principal | None:
    """Return the principal a bearer token stands for (in the token's own tenant), or None.

    The objects are detached copies; changes the session holds are flushed first,
    so a token revoked in it is refused.
    """
    session.flush()
    found = authenticate_with_tenant(session.connection(), presented)
    return found[0] if found is not None else None


_MODELS = (ApiToken, User, Membership, Tenant)
_TABLES = tuple(model.__table__ for model in _MODELS)
#: The token, its user, the membership and the tenant in one statement, built once.
_AUTHENTICATION = (
    sa.select(*(c.label(f"{t.name}__{c.name}") for t in _TABLES for c in t.c))
    .select_from(ApiToken.__table__)
    .join(User.__table__, User.__table__.c.id == ApiToken.__table__.c.user_id)
    .join(
        Membership.__table__,
        sa.and_(
            Membership.__table__.c.user_id == User.__table__.c.id,
            Membership.__table__.c.tenant_id == ApiToken.__table__.c.tenant_id,
        ),
    )
    .join(Tenant.__table__, Tenant.__table__.c.id == ApiToken.__table__.c.tenant_id)
    .where(ApiToken.__table__.c.id == sa.bindparam("token_id"))
)


def _parse(presented: str) -> tuple[uuid.UUID, str] | None:
    """Split ``mcrm_<id>_<secret>`` into the token's id and its secret; None if malformed."""
    if not isinstance(presented, str) or not presented.startswith(PREFIX) or len(presented) > 200:
        return None
    token_id, _, secret = presented[len(PREFIX) :].partition("_")
    try:
        return uuid.UUID(hex=token_id), secret
    except ValueError:
        return None


_Found = tuple[ApiToken, User, Membership, Tenant]


def _load(connection: sa.Connection, key: uuid.UUID) -> _Found | None:
    """Read a token, its user, the membership and the tenant in one statement."""
    row = connection.execute(_AUTHENTICATION, {"token_id": key}).mappings().first()
    if row is None:
        return None
    token, user, membership, tenant = (
        model(**{c.name: row[f"{t.name}__{c.name}"] for c in t.c})
        for model, t in zip(_MODELS, _TABLES, strict=True)
    )
    return token, user, membership, tenant  # type: ignore[return-value]


def _accept(found: _Found | None, secret: str) -> tuple[Principal, Tenant] | None:
    """Check the secret and that token, login and membership are live now."""
    if found is None:
        return None
    token, user, membership, tenant = found
    if not _presented_now(token, secret) or token.revoked_at is not None:
        return None
    if not user.is_active or not membership.is_active:
        return None
    return Principal(user, membership, token=token), tenant


def _presented_now(token: ApiToken, secret: str) -> bool:
    """Tell whether ``secret`` is the token's and the token has not expired yet.

    What must be checked on every use, cached or not; the rest of ``_accept``
    holds as long as the rows it read do.
    """
    if not hmac.compare_digest(token.secret_hash, _digest(secret)):
        return False
    return token.expires_at is None or token.expires_at > utcnow()


def authenticate_with_tenant(
    connection: sa.Connection, presented: str
) -> tuple[Principal, Tenant] | None:
    """Return the principal a bearer token stands for and the token's tenant, or None.

    One statement reads the token, its user, the membership and the tenant, and
    the rows become detached model objects without an ORM session: this runs on
    every API request, where a round trip or a session costs as much as the
    request's own SQL.
    """
    parsed = _parse(presented)
    if parsed is None:
        return None
    key, secret = parsed
    return _accept(_load(connection, key), secret)


class TokenCache:
    """What recently presented tokens stand for, kept while the control database is unchanged.

    An entry holds the rows ``_load`` read and the change mark taken before
    reading them (``metacrm.runtime.changes``); it serves only while the mark
    taken now is the same, so a revoked token, a deactivated login or a changed
    membership is read again. The secret, the expiry and the live flags are
    checked on every use, cached or not. Unknown tokens are never cached.
    """

    def __init__(self, size: int = TOKEN_CACHE_SIZE) -> None:
        self._entries: OrderedDict[uuid.UUID, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size

    def authenticate(
        self, engine: sa.Engine, mark: Callable[[], Hashable | None], presented: str
    ) -> tuple[Principal, Tenant] | None:
        """Like ``authenticate_with_tenant``, without a statement when the cache may answer."""
        parsed = _parse(presented)
        if parsed is None:
            return None
        key, secret = parsed
        now_mark = mark()
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and now_mark is not None and entry.mark == now_mark:
            return entry.accept(secret)
        with engine.connect() as connection:
            found = _load(for_reads(connection), key)
        accepted = _accept(found, secret)
        with self._lock:
            if accepted is None or found is None or now_mark is None:
                # A failed attempt must not evict live entries, nor leave a stale one.
                self._entries.pop(key, None)
            else:
                self._entries[key] = _Entry(now_mark, accepted)
                self._entries.move_to_end(key)
                while len(self._entries) > self._size:
                    self._entries.popitem(last=False)
        return accepted


class _Entry:
    """What a token's rows, read under ``mark``, were accepted as.

    While the mark holds, the revocation and the live flags of the token, its
    login and its membership are what was read, so a later use only checks the
    secret and the expiry, and gets the same ``Principal`` back: the objects
    the request path keys its own caches on (``api.context.access``).
    """

    __slots__ = ("accepted", "mark")

    def __init__(self, mark: Hashable, accepted: tuple[Principal, Tenant]) -> None:
        self.mark = mark
        self.accepted = accepted

    def accept(self, secret: str) -> tuple[Principal, Tenant] | None:
        token = self.accepted[0].token
        assert token is not None, "a token's principal names its token"
        return self.accepted if _presented_now(token, secret) else None


def record_use(engine: sa.Engine, token: ApiToken) -> None:
    """Note when a token was last used, at most once a minute, never failing the request.

    Authentication itself only reads, so concurrent requests on the embedded SQLite
    database never contend for its write lock; this write starts with the UPDATE
    (taking the lock at once) and is skipped when another request just did it.
    """
    now = utcnow()
    if token.last_used_at is not None and now - token.last_used_at < LAST_USED_RESOLUTION:
        return
    try:
        # Marked cache-neutral: a token's last use is nothing a cache holds.
        with engine.begin() as connection:
            connection.execution_options(**{CACHE_NEUTRAL: True}).execute(
                sa.update(ApiToken)
                .where(ApiToken.id == token.id)
                .where(
                    sa.or_(
                        ApiToken.last_used_at.is_(None),
                        ApiToken.last_used_at < now - LAST_USED_RESOLUTION,
                    )
                )
                .values(last_used_at=now)
            )
    except sa.exc.OperationalError:
        return  # a busy database; the next request records it
    token.last_used_at = now
