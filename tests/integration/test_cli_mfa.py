"""`metacrm user reset-mfa`: an operator removes a login's second factor, audited everywhere."""

from __future__ import annotations

import sqlalchemy as sa

from metacrm.runtime import mfa, sessions
from metacrm.runtime.control import Membership, User
from metacrm.runtime.store import audit
from tests.integration.test_cli import (
    Cli,
    pg_cli,  # noqa: F401
)
from tests.integration.test_cli_accounts import cheap_hashes, cli  # noqa: F401


def _two_tenants(cli: Cli) -> tuple[str, str]:  # noqa: F811
    names = []
    for n in ("one", "two"):
        name = f"m{n}{id(cli) % 100000}"
        cli("tenant", "create", name, "--name", n, "--admin-email", f"boss@{name}.example")
        names.append(name)
    return names[0], names[1]


def test_reset_mfa_removes_the_factor_ends_sessions_and_audits_each_tenant(cli: Cli) -> None:  # noqa: F811
    first, second = _two_tenants(cli)
    email = f"shared@{first}.example"
    platform = cli.platform()
    try:
        with platform.session() as session:
            user = User(email=email, display_name="Shared")
            session.add(user)
            session.flush()
            for slug in (first, second):
                tenant = platform.tenant(session, slug)
                session.add(Membership(tenant_id=tenant.id, user_id=user.id, roles=["sales_rep"]))
            secret = mfa.begin_enrolment(session, platform.cipher, user.id)
            mfa.confirm_enrolment(session, platform.cipher, user.id, mfa.current_code(secret))
            sessions.start(session, user.id, ip=None, user_agent=None, mfa_passed=True)
        out = cli("user", "reset-mfa", "--email", email.upper()).stdout
        assert "1 session(s) ended" in out and first in out and second in out
        with platform.session() as session:
            assert not mfa.enabled(session, user.id)
            tenants = [platform.tenant(session, s) for s in (first, second)]
        for tenant in tenants:
            with platform.store(tenant).connect() as connection:
                last = connection.execute(
                    sa.select(audit.c.action, audit.c.detail).order_by(audit.c.seq.desc())
                ).first()
            assert last.action == "auth.mfa_reset" and last.detail["email"] == email
        again = cli("user", "reset-mfa", "--email", email, code=1)
        assert "has no second factor; nothing was changed" in again.stderr
        missing = cli("user", "reset-mfa", "--email", "nobody@example.com", code=1)
        assert "there is no login" in missing.stderr and "Traceback" not in missing.stderr
    finally:
        platform.close()
