"""Failed sign-in throttling per account and per IP address, with temporary lockout.

Counts live in the control database, so every web process enforces the same
limits. A locked account or address is answered exactly like a wrong
password (same message, and the caller still spends one password hash), so
an attacker learns neither which emails exist nor that a lockout started.
A lockout ends by itself after ``lockout``; a successful sign-in clears the
account's count but not the address's (one good password must not reset a
spray of guesses from the same place).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from metacrm.runtime.control import LoginThrottle, utcnow
from metacrm.runtime.settings import Settings

ACCOUNT = "account"
IP = "ip"


@dataclass(frozen=True)
class Policy:
    """How many failures lock what, and for how long."""

    max_failures: int
    ip_max_failures: int
    lockout: dt.timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        """Build the policy from the platform settings."""
        return cls(
            settings.login_max_failures,
            settings.login_ip_max_failures,
            dt.timedelta(minutes=settings.login_lockout_minutes),
        )


def _key(kind: str, value: str) -> tuple[str, str]:
    return kind, value.strip().lower()[:254]


def locked(session: Session, email: str, ip: str | None, now: dt.datetime | None = None) -> bool:
    """Tell whether sign-in is locked for this account or this address right now."""
    now = now or utcnow()
    keys = [_key(ACCOUNT, email)] + ([_key(IP, ip)] if ip else [])
    rows = session.scalars(
        sa.select(LoginThrottle).where(
            sa.or_(*(sa.and_(LoginThrottle.kind == k, LoginThrottle.key == v) for k, v in keys))
        )
    )
    return any(r.locked_until is not None and r.locked_until > now for r in rows)


def _row(session: Session, kind: str, key: str) -> LoginThrottle:
    query = (
        sa.select(LoginThrottle)
        .where(LoginThrottle.kind == kind, LoginThrottle.key == key)
        .with_for_update()
    )
    row = session.scalar(query)
    if row is not None:
        return row
    try:
        with session.begin_nested():
            row = LoginThrottle(kind=kind, key=key, failures=0, first_failure_at=utcnow())
            session.add(row)
        return row
    except IntegrityError:  # another process counted the first failure at the same moment
        found = session.scalar(query)
        assert found is not None
        return found


def record_failure(
    session: Session,
    email: str,
    ip: str | None,
    policy: Policy,
    now: dt.datetime | None = None,
) -> bool:
    """Count one failed sign-in; return True when it locked the account just now."""
    now = now or utcnow()
    account_locked_now = False
    targets = [(ACCOUNT, email, policy.max_failures)]
    if ip:
        targets.append((IP, ip, policy.ip_max_failures))
    for kind, value, limit in targets:
        row = _row(session, *_key(kind, value))
        if now - row.first_failure_at > policy.lockout or (
            row.locked_until is not None and row.locked_until <= now
        ):
            # The window passed, or a lockout ended: count afresh.
            row.failures = 0
            row.first_failure_at = now
            row.locked_until = None
        row.failures += 1
        if row.failures >= limit and row.locked_until is None:
            row.locked_until = now + policy.lockout
            account_locked_now = account_locked_now or kind == ACCOUNT
    session.flush()
    return account_locked_now


def clear_account(session: Session, email: str) -> None:
    """Forget an account's failures after a successful sign-in."""
    kind, key = _key(ACCOUNT, email)
    session.execute(
        sa.delete(LoginThrottle).where(LoginThrottle.kind == kind, LoginThrottle.key == key)
    )
