"""Server-side login sessions: revocable, rotated at every privilege change, timed out.

Flask's signed cookie carries only a random session id; the control database
keeps the SHA-256 of that id with the user, the tenant they chose, the second
factor's state, the address and the browser. Because the row is the
authority, a cookie captured before a logout, a password or MFA change or a
deactivation no longer opens anything afterwards (Flask's default cookie
session cannot do that: it is valid until it expires).

The tenant's ``security`` settings (idle and absolute timeouts, MFA
requirements, IP allowlist) are read from its published metadata, with the
platform's settings as defaults.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from metacrm.runtime.control import LoginSession, Tenant, utcnow
from metacrm.runtime.platform import Platform

#: last_seen_at is written at most this often, so browsing is not a write per request.
TOUCH_RESOLUTION = dt.timedelta(minutes=1)
MAX_USER_AGENT = 300
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def digest(secret: str) -> str:
    """Return the stored form of a session id."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Security:
    """A tenant's sign-in rules, with the platform defaults filled in."""

    mfa_required: bool
    mfa_required_roles: frozenset[str]
    idle: dt.timedelta
    absolute: dt.timedelta
    ip_allowlist: tuple[Network, ...]

    def requires_mfa(self, roles: Iterable[str]) -> bool:
        """Tell whether a member with these roles must use a second factor here."""
        return self.mfa_required or bool(self.mfa_required_roles.intersection(roles))

    def allows(self, ip: str | None) -> bool:
        """Tell whether a request from ``ip`` may use this tenant (no allowlist: any)."""
        if not self.ip_allowlist:
            return True
        if not ip:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.ip_allowlist)


#: Seconds a tenant's sign-in rules are reused before its settings are read again.
#: Reading them costs a query per request, and rules change rarely: a published
#: change applies in every process within this time.
SECURITY_TTL = 30.0
_security_cache: weakref.WeakKeyDictionary[Platform, dict[uuid.UUID, tuple[float, Security]]] = (
    weakref.WeakKeyDictionary()
)
_security_lock = threading.Lock()


def default_security(platform: Platform) -> Security:
    """Return the platform-wide defaults (before a tenant is chosen)."""
    s = platform.settings
    return Security(
        False,
        frozenset(),
        dt.timedelta(minutes=s.session_idle_minutes),
        dt.timedelta(minutes=s.session_absolute_minutes),
        (),
    )


def tenant_security(platform: Platform, tenant: Tenant, *, fresh: bool = False) -> Security:
    """Return a tenant's sign-in rules, read again when older than SECURITY_TTL or ``fresh``."""
    now = time.monotonic()
    with _security_lock:
        rules = _security_cache.get(platform)
        known = rules.get(tenant.id) if rules is not None else None
    if known is not None and not fresh and now - known[0] < SECURITY_TTL:
        return known[1]
    security = _read_security(platform, tenant)
    with _security_lock:
        _security_cache.setdefault(platform, {})[tenant.id] = (now, security)
    return security


def forget_security() -> None:
    """Drop every remembered tenant rule (tests that publish new rules call this)."""
    with _security_lock:
        _security_cache.clear()


def _read_security(platform: Platform, tenant: Tenant) -> Security:
    store = platform.store(tenant)
    with store.connect() as connection:
        model = platform.models.current(store, connection)
    doc = model.settings.get("security") or {}
    base = default_security(platform)
    idle = doc.get("session_idle_minutes")
    absolute = doc.get("session_absolute_minutes")
    return Security(
        bool(doc.get("mfa_required", False)),
        frozenset(doc.get("mfa_required_roles", ())),
        dt.timedelta(minutes=idle) if idle else base.idle,
        dt.timedelta(minutes=absolute) if absolute else base.absolute,
        # The metadata validator checked every entry; strict=False only forgives host bits.
        tuple(ipaddress.ip_network(c, strict=False) for c in doc.get("ip_allowlist", ())),
    )


def start(
    session: Session,
    user_id: uuid.UUID,
    *,
    ip: str | None,
    user_agent: str | None,
    mfa_passed: bool,
    tenant_id: uuid.UUID | None = None,
) -> tuple[LoginSession, str]:
    """Open a new login session; return the row and the id for the cookie (shown once)."""
    secret = secrets.token_urlsafe(32)
    now = utcnow()
    row = LoginSession(
        secret_hash=digest(secret),
        user_id=user_id,
        tenant_id=tenant_id,
        created_at=now,
        last_seen_at=now,
        ip=(ip or "")[:45] or None,
        user_agent=(user_agent or "")[:MAX_USER_AGENT] or None,
        mfa_passed=mfa_passed,
    )
    session.add(row)
    session.flush()
    return row, secret


def find(session: Session, secret: object) -> LoginSession | None:
    """Return the open (not revoked) session a cookie names, or None."""
    if not isinstance(secret, str) or not 20 <= len(secret) <= 100:
        return None
    return session.scalar(
        sa.select(LoginSession).where(
            LoginSession.secret_hash == digest(secret), LoginSession.revoked_at.is_(None)
        )
    )


def expired(row: LoginSession, security: Security, now: dt.datetime | None = None) -> bool:
    """Tell whether a session has passed its idle or absolute lifetime."""
    now = now or utcnow()
    return now - row.last_seen_at > security.idle or now - row.created_at > security.absolute


def touch(session: Session, row: LoginSession, now: dt.datetime | None = None) -> None:
    """Record activity on a session (at most once per TOUCH_RESOLUTION)."""
    now = now or utcnow()
    if now - row.last_seen_at >= TOUCH_RESOLUTION:
        session.execute(
            sa.update(LoginSession).where(LoginSession.id == row.id).values(last_seen_at=now)
        )
        row.last_seen_at = now


def rotate(session: Session, row: LoginSession, **changes: object) -> tuple[LoginSession, str]:
    """Replace a session by a new id carrying the same state plus ``changes``.

    Called at every privilege change (second factor passed, tenant chosen), so
    an id planted or seen before the change (session fixation) is worth nothing.
    The absolute lifetime still counts from the first sign-in.
    """
    revoke(session, row)
    values = {
        "ip": row.ip,
        "user_agent": row.user_agent,
        "mfa_passed": row.mfa_passed,
        "tenant_id": row.tenant_id,
    }
    values.update(changes)
    new, secret = start(session, row.user_id, **values)  # type: ignore[arg-type]
    new.created_at = row.created_at
    session.flush()
    return new, secret


def revoke(session: Session, row: LoginSession) -> None:
    """End one session now."""
    session.execute(
        sa.update(LoginSession)
        .where(LoginSession.id == row.id, LoginSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    row.revoked_at = row.revoked_at or utcnow()


def revoke_all(session: Session, user_id: uuid.UUID, *, keep: uuid.UUID | None = None) -> int:
    """End every open session of a user (except ``keep``); return how many ended.

    Deactivation, a password change and an MFA change call this, so every
    browser that was signed in as the person must sign in again.
    """
    clause = sa.and_(LoginSession.user_id == user_id, LoginSession.revoked_at.is_(None))
    if keep is not None:
        clause = sa.and_(clause, LoginSession.id != keep)
    result = session.execute(sa.update(LoginSession).where(clause).values(revoked_at=utcnow()))
    return result.rowcount or 0
