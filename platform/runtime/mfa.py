"""TOTP second factor (RFC 6238, pyotp) with single-use recovery codes.

The shared secret is encrypted with the platform key before it is stored, and
recovery codes are stored as SHA-256 hashes (they are random, 50 bits each, so
a fast hash is enough) and shown once. A code is accepted for the current
30-second step and one step either side (clock drift), and only for a step
later than the last one accepted: a code that was used once, or an older one,
is refused, so an observed code cannot be replayed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import time
import uuid

import pyotp
import segno
import sqlalchemy as sa
from sqlalchemy.orm import Session

from metacrm.runtime import audittrail
from metacrm.runtime.control import Membership, RecoveryCode, Tenant, User, UserMfa, utcnow
from metacrm.runtime.crypto import FieldCipher
from metacrm.runtime.platform import Platform
from metacrm.runtime.sessions import revoke_all

ISSUER = "metacrm"
STEP_SECONDS = 30
#: Steps either side of now that are still accepted (phone clocks drift).
DRIFT_STEPS = 1
RECOVERY_CODES = 10
_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: read off paper


class MfaError(ValueError):
    """An MFA change was refused; ``code`` is stable, the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _normalise(code: object) -> str:
    if not isinstance(code, str) or len(code) > 40:
        return ""
    return "".join(code.split()).lower()


def enabled(session: Session, user_id: uuid.UUID) -> bool:
    """Tell whether the user has a confirmed second factor."""
    row = session.get(UserMfa, user_id)
    return row is not None and row.confirmed_at is not None


def begin_enrolment(session: Session, cipher: FieldCipher, user_id: uuid.UUID) -> str:
    """Create (or replace) an unconfirmed secret for the user and return it.

    Refused when MFA is on already: turning it off first needs a code, so a
    stolen session cannot silently move the second factor to another phone.
    """
    row = session.get(UserMfa, user_id)
    if row is not None and row.confirmed_at is not None:
        raise MfaError("mfa_enabled", "two-step sign-in is on already; turn it off first")
    secret = pyotp.random_base32()
    if row is None:
        session.add(UserMfa(user_id=user_id, secret=cipher.encrypt(secret)))
    else:
        row.secret = cipher.encrypt(secret)
        row.last_step = None
    session.flush()
    return secret


def pending_secret(session: Session, cipher: FieldCipher, user_id: uuid.UUID) -> str | None:
    """Return the secret of an enrolment waiting for its first code, or None."""
    row = session.get(UserMfa, user_id)
    if row is None or row.confirmed_at is not None:
        return None
    return cipher.decrypt(row.secret)


def provisioning_uri(secret: str, email: str, issuer: str = ISSUER) -> str:
    """Return the otpauth:// URI an authenticator app reads from the QR code."""
    return pyotp.TOTP(secret).provisioning_uri(name=email, issuer_name=issuer)


def qr_svg(uri: str) -> str:
    """Return the QR code of ``uri`` as an inline SVG element (no external image)."""
    return segno.make(uri, error="m").svg_inline(scale=5, border=2, dark="#111", light="#fff")


def _match_step(secret: str, code: str, now: float, after: int | None) -> int | None:
    if len(code) != 6 or not code.isascii() or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret)
    current = int(now // STEP_SECONDS)
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        expected = totp.generate_otp(step)
        if hmac.compare_digest(expected, code) and (after is None or step > after):
            return step
    return None


def confirm_enrolment(
    session: Session,
    cipher: FieldCipher,
    user_id: uuid.UUID,
    code: object,
    now: float | None = None,
) -> list[str]:
    """Turn MFA on when ``code`` matches the pending secret; return new recovery codes."""
    row = session.get(UserMfa, user_id)
    if row is None or row.confirmed_at is not None:
        raise MfaError("no_enrolment", "start the set-up again")
    step = _match_step(cipher.decrypt(row.secret), _normalise(code), now or time.time(), None)
    if step is None:
        raise MfaError("bad_code", "the code does not match; check the phone's clock")
    row.confirmed_at = utcnow()
    row.last_step = step
    return new_recovery_codes(session, user_id)


def new_recovery_codes(session: Session, user_id: uuid.UUID) -> list[str]:
    """Replace the user's recovery codes with fresh ones and return them (shown once)."""
    session.execute(sa.delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
    codes = [
        "-".join("".join(secrets.choice(_ALPHABET) for _ in range(5)) for _ in range(2))
        for _ in range(RECOVERY_CODES)
    ]
    session.add_all(RecoveryCode(user_id=user_id, code_hash=_hash(c)) for c in codes)
    session.flush()
    return codes


def recovery_codes_left(session: Session, user_id: uuid.UUID) -> int:
    """Return how many unused recovery codes the user has."""
    return (
        session.scalar(
            sa.select(sa.func.count())
            .select_from(RecoveryCode)
            .where(RecoveryCode.user_id == user_id, RecoveryCode.used_at.is_(None))
        )
        or 0
    )


def verify(
    session: Session,
    cipher: FieldCipher,
    user_id: uuid.UUID,
    code: object,
    now: float | None = None,
) -> str | None:
    """Check a TOTP or recovery code; return "totp" or "recovery" when accepted, else None.

    The accepted step (or recovery code) is consumed with a conditional
    UPDATE, so two requests racing with the same code cannot both pass.
    """
    row = session.get(UserMfa, user_id)
    if row is None or row.confirmed_at is None:
        return None
    text = _normalise(code)
    step = _match_step(cipher.decrypt(row.secret), text, now or time.time(), row.last_step)
    if step is not None:
        last = UserMfa.last_step
        taken = session.execute(
            sa.update(UserMfa)
            .where(UserMfa.user_id == user_id, sa.or_(last.is_(None), last < step))
            .values(last_step=step)
        )
        if taken.rowcount == 1:
            session.refresh(row)
            return "totp"
        return None
    if len(text) == 11 and text[5] == "-":
        used = session.execute(
            sa.update(RecoveryCode)
            .where(
                RecoveryCode.user_id == user_id,
                RecoveryCode.code_hash == _hash(text),
                RecoveryCode.used_at.is_(None),
            )
            .values(used_at=utcnow())
        )
        if used.rowcount == 1:
            return "recovery"
    return None


def disable(session: Session, user_id: uuid.UUID) -> bool:
    """Remove the user's second factor and recovery codes; tell whether one was on."""
    row = session.get(UserMfa, user_id)
    was_on = row is not None and row.confirmed_at is not None
    session.execute(sa.delete(RecoveryCode).where(RecoveryCode.user_id == user_id))
    if row is not None:
        session.delete(row)  # through the session, so its identity map forgets the row too
    session.flush()
    return was_on


def current_code(secret: str, at: dt.datetime | None = None) -> str:
    """Return the code an authenticator shows at ``at`` (tests and the browser test use it)."""
    moment = (at or utcnow()).timestamp()
    return pyotp.TOTP(secret).generate_otp(int(moment // STEP_SECONDS))


def operator_reset(platform: Platform, email: str) -> tuple[list[str], int]:
    """Remove a login's second factor for an operator; return its tenants and sessions ended.

    For the person whose login is in several tenants, whom no single tenant's
    admin may reset (``shared_identity``). Every tenant the login belongs to
    gets an ``mfa_reset`` entry naming the operator's command as the actor.
    """
    normal = email.strip().lower() if isinstance(email, str) else ""
    with platform.session() as session:
        user = session.scalar(sa.select(User).where(User.email == normal))
        if user is None:
            raise MfaError("not_found", f"there is no login {email!r}")
        if not enabled(session, user.id):
            raise MfaError("mfa_not_enabled", f"{user.email} has no second factor")
        tenants = session.scalars(
            sa.select(Tenant)
            .join(Membership, Membership.tenant_id == Tenant.id)
            .where(Membership.user_id == user.id)
            .order_by(Tenant.slug)
        ).all()
        disable(session, user.id)
        ended = revoke_all(session, user.id)
        user_id, user_email = user.id, user.email
    for tenant in tenants:
        with platform.store(tenant).begin() as connection:
            audittrail.append(
                connection,
                action="auth.mfa_reset",
                actor_id=None,
                actor_name="operator (metacrm user reset-mfa)",
                detail={"user_id": str(user_id), "email": user_email, "sessions_ended": ended},
            )
    return [t.slug for t in tenants], ended
