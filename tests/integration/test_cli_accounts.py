"""``metacrm user``, ``team``, ``token`` and ``operator``: on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher
from click.testing import CliRunner

from metacrm.runtime import accounts, operators, tenancy, tokens
from metacrm.runtime.control import Membership, Operator, User
from metacrm.runtime.passwords import verify_password
from tests.integration.test_cli import SECRET, Cli, clean_environment, pg_cli  # noqa: F401

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
GOOD = "violet kettle orbit 42"


@pytest.fixture(autouse=True)
def cheap_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts, "hash_password", CHEAP.hash)
    monkeypatch.setattr(tenancy, "hash_password", CHEAP.hash)
    monkeypatch.setattr(operators, "hash_password", CHEAP.hash)


@pytest.fixture(params=["sqlite", "postgresql"])
def cli(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cli]:
    """The command line on an instance of its own, on each backend."""
    env = clean_environment()
    env.update(METACRM_INSTANCE_DIR=str(tmp_path / "instance"), METACRM_SECRET_KEY=SECRET)
    if request.param == "postgresql":
        # The session's PostgreSQL database with a schema prefix of the test's own.
        pg_cli = request.getfixturevalue("pg_cli")
        env.update(pg_cli.env)
    yield Cli(env, CliRunner())


@pytest.fixture
def slug(cli: Cli) -> str:
    name = f"a{re.sub('[^a-z0-9]', '', str(id(cli)))[-8:]}"
    cli("tenant", "create", name, "--name", "Acme", "--admin-email", f"boss@{name}.example")
    return name


def test_user_add_prints_an_invitation_that_sets_a_password(cli, slug):
    out = cli(
        "user", "add", "--tenant", slug, "--email", f"Ann@{slug}.example", "--role", "sales_rep"
    ).stdout
    assert f"Added ann@{slug}.example" in out
    link = re.search(r"/account/invitation/(\S+)", out).group(1)
    assert out.count("http://127.0.0.1:5000/account/invitation/") == 1
    platform = cli.platform()
    try:
        accounts.accept_invitation(platform, link, GOOD)
        with pytest.raises(accounts.AccountError):
            accounts.accept_invitation(platform, link, GOOD)
    finally:
        platform.close()
    listed = cli("user", "list", "--tenant", slug).stdout
    assert f"ann@{slug}.example\tsales_rep\t-\t-\tactive\n" in listed


def test_user_add_with_a_password_and_team(cli, slug):
    cli("team", "add", "--tenant", slug, "sales", "--label", "Sales 销售")
    cli("team", "add", "--tenant", slug, "north", "--label", "North", "--parent", "sales")
    out = cli(
        "user",
        "add",
        "--tenant",
        slug,
        "--email",
        f"bo@{slug}.example",
        "--role",
        "sales_manager",
        "--role",
        "sales_rep",
        "--team",
        "north",
        "--manager",
        f"boss@{slug}.example",
        "--password",
        GOOD,
    ).stdout
    assert "Invitation" not in out and GOOD not in out
    assert "north\tNorth\tsales\t1" in cli("team", "list", "--tenant", slug).stdout
    platform = cli.platform()
    try:
        with platform.session() as session:
            user = session.scalar(sa.select(User).where(User.email == f"bo@{slug}.example"))
            assert verify_password(user.password_hash, GOOD)
            roles = session.scalar(sa.select(Membership.roles).where(Membership.user_id == user.id))
            assert roles == ["sales_manager", "sales_rep"]
    finally:
        platform.close()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--email", "x@example.com", "--role", "a,b"], "is not a role name"),
        (["--email", "x@example.com", "--role", "x]"], "is not a role name"),
        (["--email", "x@example.com", "--role", "emperor"], "there is no role 'emperor'"),
        (["--email", "x@example.com\nBcc: y@example.com", "--role", "admin"], "not an email"),
        (["--email", "x@example.com", "--role", "admin", "--team", "ghost"], "no team 'ghost'"),
        (["--email", "x@example.com", "--role", "admin", "--password", "password123"], "common"),
        (
            ["--email", "xavier@example.com", "--role", "admin", "--password", "xavier-rocks-hard"],
            "must not contain your email name",
        ),
        (["--email", "x@example.com", "--role", "admin", "--manager", "who@x.example"], "not an"),
    ],
)
def test_user_add_refusals_change_nothing(cli, slug, args, message):
    before = cli("user", "list", "--tenant", slug).stdout
    result = cli("user", "add", "--tenant", slug, *args, code=1)
    assert message in result.stderr and "nothing was changed" in result.stderr
    assert "Traceback" not in result.output
    assert cli("user", "list", "--tenant", slug).stdout == before


def test_deactivate_revokes_tokens_and_reactivate_keeps_them_revoked(cli, slug):
    cli(
        "user",
        "add",
        "--tenant",
        slug,
        "--email",
        f"cy@{slug}.example",
        "--role",
        "sales_rep",
        "--password",
        GOOD,
    )
    secret = cli("token", "create", "--tenant", slug, "--user", f"cy@{slug}.example", "--name", "t")
    secret = secret.stdout.strip()
    assert (
        "revoked"
        in cli("user", "deactivate", "--tenant", slug, "--email", f"cy@{slug}.example").stdout
    )
    platform = cli.platform()
    try:
        with platform.session() as session:
            assert tokens.authenticate(session, secret) is None
    finally:
        platform.close()
    assert "deactivated" in cli("user", "list", "--tenant", slug).stdout
    again = cli("user", "deactivate", "--tenant", slug, "--email", f"cy@{slug}.example", code=1)
    assert "deactivated already" in again.stderr
    refused = cli(
        "token", "create", "--tenant", slug, "--user", f"cy@{slug}.example", "--name", "t", code=1
    )
    assert "is deactivated" in refused.stderr
    cli("user", "reactivate", "--tenant", slug, "--email", f"cy@{slug}.example")
    assert (
        "revoked" in cli("token", "list", "--tenant", slug, "--user", f"cy@{slug}.example").stdout
    )
    last = cli("user", "deactivate", "--tenant", slug, "--email", f"boss@{slug}.example", code=1)
    assert "last active member who can manage users" in last.stderr
    ghost = cli("user", "deactivate", "--tenant", slug, "--email", "no@example.com", code=1)
    assert "is not a member" in ghost.stderr


def test_token_scopes_list_and_revoke(cli, slug):
    email = f"boss@{slug}.example"
    secret = cli(
        "token",
        "create",
        "--tenant",
        slug,
        "--user",
        email,
        "--name",
        "sync",
        "--read-only",
        "--entity",
        "customer",
        "--entity",
        "deal",
        "--expires-days",
        "30",
    ).stdout.strip()
    token_id = secret.split("_")[1]
    listed = cli("token", "list", "--tenant", slug).stdout
    assert token_id in listed and "read-only on customer,deal" in listed and "active" in listed
    assert secret.split("_", 2)[2] not in listed
    platform = cli.platform()
    try:
        with platform.session() as session:
            principal = tokens.authenticate(session, secret)
            assert principal.token.entities == ["customer", "deal"] and principal.read_only
    finally:
        platform.close()
    assert "Revoked token" in cli("token", "revoke", "--tenant", slug, token_id).stdout
    assert "revoked" in cli("token", "list", "--tenant", slug).stdout
    assert "revoked already" in cli("token", "revoke", "--tenant", slug, token_id, code=1).stderr
    assert "no token" in cli("token", "revoke", "--tenant", slug, "zz", code=1).stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--entity", "ghost"], "--entity: there is no entity 'ghost'"),
        (["--entity", "Bad,Name"], "--entity:"),
        (["--expires-days", "0"], "--expires-days:"),
        (["--expires-days", "100000"], "--expires-days:"),
    ],
)
def test_token_create_refusals(cli, slug, args, message):
    result = cli(
        "token",
        "create",
        "--tenant",
        slug,
        "--user",
        f"boss@{slug}.example",
        "--name",
        "x",
        *args,
        code=1,
    )
    assert message in result.stderr
    assert cli("token", "list", "--tenant", slug).stdout == ""


def test_token_revoke_cannot_reach_another_tenants_token(cli, slug):
    cli("tenant", "create", "other", "--name", "Other", "--admin-email", "boss@other.example")
    secret = cli(
        "token", "create", "--tenant", "other", "--user", "boss@other.example", "--name", "x"
    ).stdout.strip()
    result = cli("token", "revoke", "--tenant", slug, secret.split("_")[1], code=1)
    assert "no token" in result.stderr
    assert "active" in cli("token", "list", "--tenant", "other").stdout


def test_team_add_refusals(cli, slug):
    cli("team", "add", "--tenant", slug, "sales", "--label", "Sales")
    for args, message in [
        (["sales", "--label", "again"], "already"),
        (["Bad-Name", "--label", "x"], "is not a team name"),
        (["north", "--label", "x", "--parent", "ghost"], "no team 'ghost'"),
        (["north", "--label", "x" * 201], "1 to 200"),
    ]:
        result = cli("team", "add", "--tenant", slug, *args, code=1)
        assert message in result.stderr
    assert cli("team", "list", "--tenant", slug).stdout.count("\n") == 1


def test_operator_create_is_not_a_tenant_member(cli, slug):
    out = cli("operator", "create", "--email", "Ops@Example.com").stdout
    password = re.search(r"Password \(shown once\): (\S+)", out).group(1)
    again = cli("operator", "create", "--email", "ops@example.com", code=1)
    assert "there is an operator ops@example.com already" in again.stderr
    weak = cli("operator", "create", "--email", "o2@example.com", "--password", "short", code=1)
    assert "at least 10" in weak.stderr
    platform = cli.platform()
    try:
        with platform.session() as session:
            operator = session.scalar(
                sa.select(Operator).where(Operator.email == "ops@example.com")
            )
            assert operators.authenticate(session, "ops@example.com", password) == operator
            assert session.scalar(sa.select(User).where(User.email == "ops@example.com")) is None
    finally:
        platform.close()
