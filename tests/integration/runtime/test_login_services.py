"""The sign-in services without HTTP, on SQLite and PostgreSQL: mfa, sessions, throttle."""

from __future__ import annotations

import datetime as dt
import time
import uuid

import pyotp
import pytest
import sqlalchemy as sa

from metacrm.runtime import mfa, sessions, throttle
from metacrm.runtime.control import LoginSession, RecoveryCode, User, UserMfa
from metacrm.runtime.platform import Platform

NOW = 1_800_000_000.0  # a fixed moment, so steps are predictable


def _user(platform: Platform) -> uuid.UUID:
    with platform.session() as session:
        user = User(email=f"u{uuid.uuid4().hex[:8]}@example.com", display_name="U")
        session.add(user)
        session.flush()
        return user.id


def _enrolled(platform: Platform) -> tuple[uuid.UUID, str, list[str]]:
    user_id = _user(platform)
    with platform.session() as session:
        secret = mfa.begin_enrolment(session, platform.cipher, user_id)
        code = pyotp.TOTP(secret).at(NOW)
        codes = mfa.confirm_enrolment(session, platform.cipher, user_id, code, now=NOW)
    return user_id, secret, codes


def test_secret_is_stored_encrypted_and_codes_hashed(platform: Platform) -> None:
    user_id, secret, codes = _enrolled(platform)
    with platform.session() as session:
        stored = session.get(UserMfa, user_id)
        assert stored is not None and secret not in stored.secret
        hashes = session.scalars(
            sa.select(RecoveryCode.code_hash).where(RecoveryCode.user_id == user_id)
        ).all()
    assert len(hashes) == len(codes) == mfa.RECOVERY_CODES
    assert not set(codes) & set(hashes)


def test_totp_accepts_drift_and_refuses_replay_and_older_codes(platform: Platform) -> None:
    user_id, secret, _ = _enrolled(platform)
    totp = pyotp.TOTP(secret)
    with platform.session() as session:
        # The enrolment code's step is spent.
        assert mfa.verify(session, platform.cipher, user_id, totp.at(NOW), now=NOW) is None
        later = NOW + 60
        assert mfa.verify(session, platform.cipher, user_id, totp.at(later), now=later) == "totp"
        assert mfa.verify(session, platform.cipher, user_id, totp.at(later), now=later) is None
        # One step behind "now" is drift, but that step is older than the last used one.
        assert mfa.verify(session, platform.cipher, user_id, totp.at(later - 30), now=later) is None
        # Two steps away is beyond the drift window.
        far = later + 300
        assert mfa.verify(session, platform.cipher, user_id, totp.at(far + 60), now=far) is None
        assert mfa.verify(session, platform.cipher, user_id, totp.at(far + 30), now=far) == "totp"


@pytest.mark.parametrize(
    "code", [None, 123456, "", " ", "12 34 5", "abcdef", "１２３４５６", "0" * 41, "\x00" * 6]
)
def test_malformed_codes_are_refused(platform: Platform, code: object) -> None:
    user_id, _, _ = _enrolled(platform)
    with platform.session() as session:
        assert mfa.verify(session, platform.cipher, user_id, code, now=NOW + 60) is None
        assert session.get(UserMfa, user_id).last_step == int(NOW // 30)


def test_recovery_codes_work_once_in_any_case_and_spacing(platform: Platform) -> None:
    user_id, _, codes = _enrolled(platform)
    with platform.session() as session:
        spaced = " " + codes[0].upper() + " "
        assert mfa.verify(session, platform.cipher, user_id, spaced) == "recovery"
        assert mfa.verify(session, platform.cipher, user_id, codes[0]) is None
        assert mfa.recovery_codes_left(session, user_id) == mfa.RECOVERY_CODES - 1
        fresh = mfa.new_recovery_codes(session, user_id)
        assert mfa.verify(session, platform.cipher, user_id, codes[1]) is None
        assert mfa.verify(session, platform.cipher, user_id, fresh[0]) == "recovery"


def test_enrolment_rules(platform: Platform) -> None:
    user_id, _, _ = _enrolled(platform)
    with platform.session() as session, pytest.raises(mfa.MfaError) as again:
        mfa.begin_enrolment(session, platform.cipher, user_id)
    assert again.value.code == "mfa_enabled"
    other = _user(platform)
    with platform.session() as session:
        with pytest.raises(mfa.MfaError):
            mfa.confirm_enrolment(session, platform.cipher, other, "123456")
        secret = mfa.begin_enrolment(session, platform.cipher, other)
        with pytest.raises(mfa.MfaError) as wrong:
            mfa.confirm_enrolment(session, platform.cipher, other, "000000", now=NOW)
        assert wrong.value.code == "bad_code" or pyotp.TOTP(secret).at(NOW) == "000000"
        assert not mfa.enabled(session, other)
        assert mfa.pending_secret(session, platform.cipher, other) == secret
    with platform.session() as session:
        assert mfa.disable(session, user_id) is True
        assert not mfa.enabled(session, user_id)
        assert mfa.recovery_codes_left(session, user_id) == 0


def test_qr_code_is_inline_svg_of_the_otpauth_uri() -> None:
    secret = pyotp.random_base32()
    uri = mfa.provisioning_uri(secret, "pat@example.com")
    assert uri.startswith(f"otpauth://totp/metacrm:pat%40example.com?secret={secret}")
    svg = mfa.qr_svg(uri)
    assert svg.startswith("<svg") and "<script" not in svg and "http" not in svg.split(">")[0][5:]


def test_sessions_store_only_a_hash_and_revoke(platform: Platform) -> None:
    user_id = _user(platform)
    with platform.session() as session:
        row, secret = sessions.start(
            session, user_id, ip="10.0.0.1", user_agent="x" * 1000, mfa_passed=True
        )
        assert row.secret_hash != secret and secret not in row.secret_hash
        assert len(row.user_agent or "") == sessions.MAX_USER_AGENT
        assert sessions.find(session, secret) is not None
        for bad in (None, 42, "", "short", secret + "x", "x" * 5000):
            assert sessions.find(session, bad) is None
        new, new_secret = sessions.rotate(session, row, tenant_id=None)
        assert sessions.find(session, secret) is None
        assert sessions.find(session, new_secret) is not None
        assert new.created_at == row.created_at
        other, other_secret = sessions.start(
            session, user_id, ip=None, user_agent=None, mfa_passed=False
        )
        assert sessions.revoke_all(session, user_id, keep=other.id) == 1
        assert sessions.find(session, other_secret) is not None
        assert sessions.revoke_all(session, user_id) == 1
        assert (
            session.scalar(
                sa.select(sa.func.count())
                .select_from(LoginSession)
                .where(LoginSession.user_id == user_id, LoginSession.revoked_at.is_(None))
            )
            == 0
        )


def test_expiry_uses_idle_and_absolute_limits(platform: Platform) -> None:
    security = sessions.default_security(platform)
    now = dt.datetime.now(dt.UTC)
    row = LoginSession(created_at=now, last_seen_at=now)
    assert not sessions.expired(row, security, now)
    assert sessions.expired(row, security, now + security.idle + dt.timedelta(seconds=1))
    row.last_seen_at = now + security.absolute
    assert sessions.expired(row, security, now + security.absolute + dt.timedelta(seconds=1))


def test_throttle_locks_then_forgets(platform: Platform) -> None:
    policy = throttle.Policy(3, 5, dt.timedelta(minutes=10))
    email = f"t{uuid.uuid4().hex[:8]}@example.com"
    start = dt.datetime.now(dt.UTC)
    with platform.session() as session:
        results = [
            throttle.record_failure(session, email, "10.9.9.9", policy, start) for _ in range(3)
        ]
        assert results == [False, False, True]
        assert throttle.locked(session, email.upper(), None, start)
        # The lockout ends by itself and counting starts afresh.
        after = start + dt.timedelta(minutes=11)
        assert not throttle.locked(session, email, None, after)
        assert throttle.record_failure(session, email, None, policy, after) is False
        throttle.clear_account(session, email)
        assert not throttle.locked(session, email, None, after)
        # The address counted every failure from it and was not cleared: 3, then 2 more.
        other = f"o{uuid.uuid4().hex[:8]}@example.com"
        throttle.record_failure(session, other, "10.9.9.9", policy, start)
        assert not throttle.locked(session, f"z{uuid.uuid4().hex[:8]}@x.com", "10.9.9.9", start)
        throttle.record_failure(session, other, "10.9.9.9", policy, start)
        assert throttle.locked(session, f"z{uuid.uuid4().hex[:8]}@x.com", "10.9.9.9", start)


def test_old_failures_fall_out_of_the_window(platform: Platform) -> None:
    policy = throttle.Policy(2, 50, dt.timedelta(minutes=10))
    email = f"w{uuid.uuid4().hex[:8]}@example.com"
    start = dt.datetime.now(dt.UTC)
    with platform.session() as session:
        assert throttle.record_failure(session, email, None, policy, start) is False
        later = start + dt.timedelta(minutes=11)
        assert throttle.record_failure(session, email, None, policy, later) is False
        assert not throttle.locked(session, email, None, later)


def test_totp_matches_the_clock(platform: Platform) -> None:
    user_id = _user(platform)
    with platform.session() as session:
        secret = mfa.begin_enrolment(session, platform.cipher, user_id)
        mfa.confirm_enrolment(session, platform.cipher, user_id, mfa.current_code(secret))
    assert pyotp.TOTP(secret).now() in {
        mfa.current_code(secret),
        mfa.current_code(secret, dt.datetime.fromtimestamp(time.time() - 1, dt.UTC)),
    }
