"""Accounts on both backends: members, invitations, resets, deactivation, teams, audit."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher

from metacrm.runtime import accounts, audittrail, tenancy, tokens
from metacrm.runtime.accounts import AccountError, Actor
from metacrm.runtime.control import (
    ApiToken,
    Invitation,
    Membership,
    PasswordReset,
    Team,
    Tenant,
    User,
)
from metacrm.runtime.passwords import verify_password
from metacrm.runtime.platform import Platform
from metacrm.runtime.store import audit

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
GOOD = "violet kettle orbit 42"
ADMIN = Actor(None, "test")
HOUR = dt.timedelta(hours=1)


@pytest.fixture(autouse=True)
def cheap_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real argon2id hashes at the lowest cost, so tests stay fast."""
    monkeypatch.setattr(accounts, "hash_password", CHEAP.hash)
    monkeypatch.setattr(tenancy, "hash_password", CHEAP.hash)


def make_tenant(platform: Platform, slug: str | None = None) -> Tenant:
    slug = slug or f"t{uuid.uuid4().hex[:10]}"
    created = tenancy.create_tenant(
        platform, slug, "Test", admin_email=f"boss@{slug}.example", admin_password=GOOD
    )
    return created.tenant


@pytest.fixture
def tenant(platform: Platform) -> Tenant:
    return make_tenant(platform)


def add(platform: Platform, tenant: Tenant, **kwargs: Any) -> accounts.Added:
    with accounts.work(platform, tenant, ADMIN) as w:
        return accounts.add_member(w, **kwargs)


def control_snapshot(platform: Platform) -> dict[str, Any]:
    """Everything an account change touches in the control database."""
    with platform.session() as session:
        return {
            model.__tablename__: sorted(
                tuple(str(v) for v in row) for row in session.execute(sa.select(model.__table__))
            )
            for model in (User, Membership, Team, Invitation, PasswordReset, ApiToken)
        }


def audit_actions(platform: Platform, tenant: Tenant) -> list[str]:
    with platform.store(tenant).connect() as connection:
        return list(connection.scalars(sa.select(audit.c.action).order_by(audit.c.seq)))


def test_invited_member_accepts_once_and_the_link_is_spent(platform, tenant):
    added = add(platform, tenant, email=" Ann@Example.COM ", roles=["sales_rep"])
    assert added.invitation is not None and added.new_login
    assert added.member.user.email == "ann@example.com"
    assert added.member.user.password_hash is None
    user = accounts.accept_invitation(platform, added.invitation, GOOD, "Ann Lee")
    assert verify_password(user.password_hash, GOOD)
    assert user.display_name == "Ann Lee"
    with pytest.raises(AccountError) as err:
        accounts.accept_invitation(platform, added.invitation, "another fine passphrase")
    assert err.value.code == "invalid_link"
    with platform.session() as session:
        stored = session.scalar(sa.select(User).where(User.email == "ann@example.com"))
        assert verify_password(stored.password_hash, GOOD)
    assert audit_actions(platform, tenant)[-2:] == ["user.invited", "user.invitation_accepted"]


def test_weak_password_leaves_the_invitation_usable(platform, tenant):
    added = add(platform, tenant, email="bob@example.com", roles=["sales_rep"])
    before = control_snapshot(platform)
    for weak, phrase in [
        ("short", "at least 10"),
        ("Password123", "most common"),
        ("bob-is-the-best", "email name"),
        ("x" * 1025, "at most 1024"),
    ]:
        with pytest.raises(AccountError) as err:
            accounts.accept_invitation(platform, added.invitation, weak)
        assert err.value.code == "weak_password" and phrase in err.value.message
    assert control_snapshot(platform) == before
    accounts.accept_invitation(platform, added.invitation, GOOD)


def test_expired_tampered_and_malformed_invitation_links_are_refused(platform, tenant):
    added = add(platform, tenant, email="cat@example.com", roles=["sales_rep"])
    key, _, secret = added.invitation.partition(".")
    for link in [
        f"{key}.{secret[:-1]}x",
        f"{uuid.uuid4().hex}.{secret}",
        "",
        "no-dot",
        "../../etc/passwd",
        "a" * 5000,
        None,
        f"{key}.",
    ]:
        with pytest.raises(AccountError):
            accounts.accept_invitation(platform, link, GOOD)
    with platform.session() as session:
        session.execute(sa.update(Invitation).values(expires_at=dt.datetime.now(dt.UTC) - HOUR))
    with pytest.raises(AccountError) as err:
        accounts.accept_invitation(platform, added.invitation, GOOD)
    assert err.value.code == "invalid_link"


def test_a_new_invitation_replaces_the_open_one(platform, tenant):
    added = add(platform, tenant, email="dan@example.com", roles=["sales_rep"])
    with accounts.work(platform, tenant, ADMIN) as w:
        again, _ = accounts.reinvite(w, added.member.user.id, HOUR)
    with pytest.raises(AccountError):
        accounts.accept_invitation(platform, added.invitation, GOOD)
    accounts.accept_invitation(platform, again, GOOD)
    with accounts.work(platform, tenant, ADMIN) as w, pytest.raises(AccountError) as err:
        accounts.reinvite(w, added.member.user.id, HOUR)
    assert err.value.code == "already_accepted"


@pytest.mark.parametrize(
    "roles, code",
    [
        (["a,b"], "invalid_roles"),
        (["x]"], "invalid_roles"),
        (["Admin"], "invalid_roles"),
        (["admin\n"], "invalid_roles"),
        (["ghost_role"], "unknown_role"),
        ([], "invalid_roles"),
        ("admin", "invalid_roles"),
        ([1], "invalid_roles"),
        (["sales_rep"] * 21, "invalid_roles"),
    ],
)
def test_bad_roles_are_refused_and_nothing_is_stored(platform, tenant, roles, code):
    before = control_snapshot(platform)
    with pytest.raises(AccountError) as err:
        add(platform, tenant, email="eve@example.com", roles=roles)
    assert err.value.code == code
    assert control_snapshot(platform) == before


@pytest.mark.parametrize(
    "email",
    [
        "eve@example.com\r\nBcc: all@example.com",
        "<script>@example.com",
        "eve@example",
        "a" * 65 + "@example.com",
        "eve@" + "a" * 250 + ".com",
        "eve@@example.com",
        "eve example@example.com",
        'e"ve@example.com',
        "eve@exa_mple.com",
        "еve@example.com",  # Cyrillic е
        "",
        None,
    ],
)
def test_hostile_emails_are_refused(platform, tenant, email):
    before = control_snapshot(platform)
    with pytest.raises(AccountError) as err:
        add(platform, tenant, email=email, roles=["sales_rep"])
    assert err.value.code == "invalid_email"
    assert control_snapshot(platform) == before


def test_one_person_joins_two_tenants_with_one_login(platform, tenant):
    other = make_tenant(platform)
    first = add(platform, tenant, email="fay@example.com", roles=["sales_rep"], password=GOOD)
    assert first.invitation is None
    second = add(platform, other, email="fay@example.com", roles=["read_only"])
    assert second.invitation is None and not second.new_login
    with pytest.raises(AccountError) as err:
        add(platform, other, email="fay@example.com", roles=["read_only"])
    assert err.value.code == "already_member"
    third = make_tenant(platform)
    with pytest.raises(AccountError) as err:
        add(platform, third, email="fay@example.com", roles=["read_only"], password=GOOD + "x")
    assert err.value.code == "login_exists"
    with platform.session() as session:
        count = sa.select(sa.func.count()).select_from(User).where(User.email == "fay@example.com")
        assert session.scalar(count) == 1


def test_deactivation_revokes_the_members_tokens_in_that_tenant(platform, tenant):
    other = make_tenant(platform)
    added = add(platform, tenant, email="gil@example.com", roles=["sales_rep"], password=GOOD)
    add(platform, other, email="gil@example.com", roles=["sales_rep"])
    with platform.session() as session:
        user = session.get_one(User, added.member.user.id)
        here_t = session.get_one(Tenant, tenant.id)
        there_t = session.get_one(Tenant, other.id)
        _, here = tokens.create_token(session, here_t, user, "here")
        _, there = tokens.create_token(session, there_t, user, "there")
    with accounts.work(platform, tenant, ADMIN) as w:
        accounts.deactivate(w, added.member.user.id)
    with platform.session() as session:
        assert tokens.authenticate(session, here) is None
        assert tokens.authenticate(session, there) is not None
    with accounts.work(platform, tenant, ADMIN) as w:
        accounts.reactivate(w, added.member.user.id)
    with platform.session() as session:
        assert tokens.authenticate(session, here) is None  # revoked tokens stay revoked
    assert audit_actions(platform, tenant)[-2:] == ["user.deactivated", "user.reactivated"]


def test_the_last_user_manager_cannot_be_deactivated_or_demoted(platform, tenant):
    with platform.session() as session:
        boss = session.scalar(sa.select(User).where(User.email == f"boss@{tenant.slug}.example"))
    before = control_snapshot(platform)
    with accounts.work(platform, tenant, ADMIN) as w, pytest.raises(AccountError) as err:
        accounts.deactivate(w, boss.id)
    assert err.value.code == "would_lock_out"
    with accounts.work(platform, tenant, ADMIN) as w, pytest.raises(AccountError) as err:
        accounts.set_roles(w, boss.id, ["sales_rep"])
    assert err.value.code == "would_lock_out"
    assert control_snapshot(platform) == before
    add(platform, tenant, email="hal@example.com", roles=["admin"], password=GOOD)
    with accounts.work(platform, tenant, ADMIN) as w:
        accounts.set_roles(w, boss.id, ["sales_manager"])
    assert audit_actions(platform, tenant)[-1] == "user.roles_changed"


def test_teams_nest_and_refuse_loops_and_deletion_in_use(platform, tenant):
    with accounts.work(platform, tenant, ADMIN) as w:
        accounts.create_team(w, "sales", "Sales 销售")
        accounts.create_team(w, "north", "North", parent="sales")
        accounts.create_team(w, "north_city", "North city", parent="north")
    before = control_snapshot(platform)
    for name, label, parent, code in [
        ("sales", "Again", None, "team_exists"),
        ("Bad Name", "x", None, "invalid_value"),
        ("a,b", "x", None, "invalid_value"),
        ("ok", "", None, "invalid_value"),
        ("ok", "x" * 201, None, "invalid_value"),
        ("ok", "bad\x00label", None, "invalid_value"),
        ("ok", "x", "ghost", "unknown_team"),
    ]:
        with accounts.work(platform, tenant, ADMIN) as w, pytest.raises(AccountError) as err:
            accounts.create_team(w, name, label, parent)
        assert err.value.code == code, name
    with accounts.work(platform, tenant, ADMIN) as w, pytest.raises(AccountError) as err:
        accounts.update_team(w, "sales", parent="north_city", move=True)
    assert err.value.code == "invalid_parent"
    with accounts.work(platform, tenant, ADMIN) as w, pytest.raises(AccountError) as err:
        accounts.delete_team(w, "north")
    assert err.value.code == "team_in_use"
    assert control_snapshot(platform) == before
    added = add(platform, tenant, email="ivy@example.com", roles=["sales_rep"], team="north_city")
    with accounts.work(platform, tenant, ADMIN) as w:
        accounts.update_team(w, "north_city", label="City", parent="sales", move=True)
    with accounts.work(platform, tenant, ADMIN) as w, pytest.raises(AccountError) as err:
        accounts.delete_team(w, "north_city")
    assert err.value.code == "team_in_use"
    with accounts.work(platform, tenant, ADMIN) as w:
        accounts.set_team(w, added.member.user.id, None)
        accounts.delete_team(w, "north_city")
    with platform.session() as session:
        teams = {t["name"]: t for t in accounts.list_teams(session, tenant.id)}
    assert set(teams) == {"sales", "north"} and teams["north"]["parent"] == "sales"
    assert audit_actions(platform, tenant)[-1] == "team.deleted"


def test_managers_cannot_form_a_loop(platform, tenant):
    a = add(platform, tenant, email="amy@example.com", roles=["sales_rep"], password=GOOD)
    add(
        platform,
        tenant,
        email="ben@example.com",
        roles=["sales_rep"],
        manager_email="amy@example.com",
    )
    with platform.session() as session:
        ben = accounts.member_by_email(session, tenant.id, "ben@example.com")
    assert ben.manager.email == "amy@example.com"
    for manager, code in [
        ("ben@example.com", "invalid_manager"),
        ("amy@example.com", "invalid_manager"),
        ("zed@example.com", "unknown_manager"),
    ]:
        with accounts.work(platform, tenant, ADMIN) as w, pytest.raises(AccountError) as err:
            accounts.set_manager(w, a.member.user.id, manager)
        assert err.value.code == code


def test_a_member_of_another_tenant_is_not_found(platform, tenant):
    other = make_tenant(platform)
    stranger = add(platform, other, email="jo@example.com", roles=["sales_rep"], password=GOOD)
    before = control_snapshot(platform)
    for change in (
        lambda w: accounts.deactivate(w, stranger.member.user.id),
        lambda w: accounts.set_roles(w, stranger.member.user.id, ["admin"]),
        lambda w: accounts.set_team(w, stranger.member.user.id, None),
    ):
        with accounts.work(platform, tenant, ADMIN) as w, pytest.raises(AccountError) as err:
            change(w)
        assert err.value.code == "not_found"
    assert control_snapshot(platform) == before


def test_password_reset_works_once_and_ends_other_links(platform, tenant):
    add(platform, tenant, email="kim@example.com", roles=["sales_rep"], password=GOOD)
    assert accounts.request_password_reset(platform, "nobody@example.com", HOUR) is None
    assert accounts.request_password_reset(platform, "not an email", HOUR) is None
    _, first, _ = accounts.request_password_reset(platform, "KIM@example.com", HOUR)
    _, second, _ = accounts.request_password_reset(platform, "kim@example.com", HOUR)
    with pytest.raises(AccountError) as err:
        accounts.complete_password_reset(platform, first, "password1234")
    assert err.value.code == "weak_password"
    user = accounts.complete_password_reset(platform, first, "fresh morning tide 7")
    assert verify_password(user.password_hash, "fresh morning tide 7")
    for link in (first, second):
        with pytest.raises(AccountError) as err:
            accounts.complete_password_reset(platform, link, "another fresh phrase")
        assert err.value.code == "invalid_link"


def test_open_reset_links_are_capped(platform, tenant):
    add(platform, tenant, email="lou@example.com", roles=["sales_rep"], password=GOOD)
    for _ in range(accounts.MAX_OPEN_RESETS):
        assert accounts.request_password_reset(platform, "lou@example.com", HOUR) is not None
    assert accounts.request_password_reset(platform, "lou@example.com", HOUR) is None


def test_expired_reset_link_is_refused(platform, tenant):
    add(platform, tenant, email="max@example.com", roles=["sales_rep"], password=GOOD)
    _, link, _ = accounts.request_password_reset(platform, "max@example.com", HOUR)
    with platform.session() as session:
        session.execute(sa.update(PasswordReset).values(expires_at=dt.datetime.now(dt.UTC) - HOUR))
    with pytest.raises(AccountError):
        accounts.complete_password_reset(platform, link, "fresh morning tide 7")


def test_account_events_keep_the_audit_chain_valid(platform, tenant):
    added = add(platform, tenant, email="ned@example.com", roles=["sales_rep"])
    with accounts.work(platform, tenant, ADMIN) as w:
        accounts.create_team(w, "east", "East")
        accounts.set_team(w, added.member.user.id, "east")
        accounts.set_roles(w, added.member.user.id, ["sales_manager"])
    with platform.store(tenant).connect() as connection:
        assert audittrail.verify(connection).ok
    assert audit_actions(platform, tenant)[-4:] == [
        "user.invited",
        "team.created",
        "user.team_changed",
        "user.roles_changed",
    ]


def test_an_older_control_database_gets_the_new_nullable_columns(platform, tenant):
    from metacrm.runtime import control

    with platform.control_engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE api_token DROP COLUMN entities")
    control.create_schema(platform.control_engine)
    control.create_schema(platform.control_engine)  # a second start adds nothing
    columns = {c["name"] for c in sa.inspect(platform.control_engine).get_columns("api_token")}
    assert "entities" in columns
    with platform.session() as session:
        boss = session.scalar(sa.select(User).where(User.email == f"boss@{tenant.slug}.example"))
        _, secret = tokens.create_token(
            session, session.get_one(Tenant, tenant.id), boss, "x", entities=["customer"]
        )
    with platform.session() as session:
        assert tokens.authenticate(session, secret).token.entities == ["customer"]
