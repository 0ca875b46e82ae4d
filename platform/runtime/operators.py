"""Platform operators: who runs the installation, kept apart from tenant members.

An operator is an ``Operator`` row, never a ``User``: no membership can point
at it, so operator credentials give no path to any tenant's records. Console
logins are server-side sessions (only a hash of the cookie's secret is
stored), ended by logging out or when they expire.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import uuid

import sqlalchemy as sa
from sqlalchemy.orm import Session

from metacrm.runtime.accounts import AccountError, normalise_email
from metacrm.runtime.control import Operator, OperatorSession, utcnow
from metacrm.runtime.passwords import (
    generate_password,
    hash_password,
    password_problem,
    verify_password,
)
from metacrm.runtime.platform import Platform

#: Verified when the email is unknown, so both answers take as long (no enumeration by timing).
_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_operator(
    platform: Platform, email: str, password: str | None = None
) -> tuple[Operator, str | None]:
    """Create an operator; return it with the generated password when none was given."""
    address = normalise_email(email)
    generated = None
    if password is None:
        password = generated = generate_password()
    else:
        problem = password_problem(password, address)
        if problem:
            raise AccountError("weak_password", f"the password {problem}", "password")
    with platform.session() as session:
        if session.scalar(sa.select(Operator.id).where(Operator.email == address)):
            raise AccountError("operator_exists", f"there is an operator {address} already")
        operator = Operator(email=address, password_hash=hash_password(password))
        session.add(operator)
    return operator, generated


def authenticate(session: Session, email: str, password: str) -> Operator | None:
    """Return the active operator these credentials name, or None (same cost either way)."""
    try:
        address = normalise_email(email)
    except AccountError:
        address = None
    operator = (
        session.scalar(sa.select(Operator).where(Operator.email == address)) if address else None
    )
    if operator is None or not operator.is_active:
        verify_password(_DUMMY_HASH, password)
        return None
    return operator if verify_password(operator.password_hash, password) else None


def start_session(session: Session, operator: Operator, lifetime: dt.timedelta) -> str:
    """Open a console session and return the cookie value (shown to the browser only)."""
    secret = secrets.token_urlsafe(32)
    row = OperatorSession(
        operator_id=operator.id, secret_hash=_digest(secret), expires_at=utcnow() + lifetime
    )
    session.add(row)
    session.flush()
    return f"{row.id.hex}.{secret}"


def _find(session: Session, cookie: str | None) -> OperatorSession | None:
    if not cookie or len(cookie) > 120:
        return None
    key, _, secret = cookie.partition(".")
    try:
        row = session.get(OperatorSession, uuid.UUID(hex=key))
    except ValueError:
        return None
    if row is None or not hmac.compare_digest(row.secret_hash, _digest(secret)):
        return None
    if row.revoked_at is not None or row.expires_at <= utcnow():
        return None
    return row


def session_operator(session: Session, cookie: str | None) -> Operator | None:
    """Return the operator a console cookie stands for while its session is live."""
    row = _find(session, cookie)
    if row is None:
        return None
    operator = session.get(Operator, row.operator_id)
    return operator if operator is not None and operator.is_active else None


def end_session(session: Session, cookie: str | None) -> None:
    """End the console session a cookie names (logging out)."""
    row = _find(session, cookie)
    if row is not None:
        row.revoked_at = utcnow()
