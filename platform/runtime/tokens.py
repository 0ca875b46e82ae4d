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
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import Session

from metacrm.runtime.control import ApiToken, Membership, Tenant, User, utcnow
from metacrm.runtime.principal import Principal

PREFIX = "mcrm_"
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(
    session: Session,
    tenant: Tenant,
    user: User,
    name: str,
    read_only: bool = False,
    expires_at: dt.datetime | None = None,
) -> tuple[ApiToken, str]:
    """Store a new token for a member and return it with its plain text (shown once)."""
    secret = secrets.token_urlsafe(32)
    token = ApiToken(
        id=uuid.uuid4(),
        tenant_id=tenant.id,
        user_id=user.id,
        name=name,
        secret_hash=_digest(secret),
        read_only=read_only,
        expires_at=expires_at,
    )
    session.add(token)
    session.flush()
    return token, f"{PREFIX}{token.id.hex}_{secret}"


def authenticate(session: Session, presented: str) -> Principal | None:
    """Return the principal a bearer token stands for (in the token's own tenant), or None."""
    if not presented.startswith(PREFIX) or len(presented) > 200:
        return None
    token_id, _, secret = presented[len(PREFIX) :].partition("_")
    try:
        key = uuid.UUID(hex=token_id)
    except ValueError:
        return None
    token = session.get(ApiToken, key)
    if token is None or not hmac.compare_digest(token.secret_hash, _digest(secret)):
        return None
    now = utcnow()
    if token.revoked_at is not None:
        return None
    if token.expires_at is not None and token.expires_at <= now:
        return None
    row = session.execute(
        sa.select(User, Membership)
        .join(Membership, Membership.user_id == User.id)
        .where(User.id == token.user_id, Membership.tenant_id == token.tenant_id)
    ).first()
    if row is None or not row.User.is_active or not row.Membership.is_active:
        return None
    return Principal(row.User, row.Membership, token=token)


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
        with engine.begin() as connection:
            connection.execute(
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
        pass  # a busy database; the next request records it
