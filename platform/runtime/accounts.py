"""Accounts: members of a tenant, invitations, password resets, teams.

Every change goes through one ``Work`` unit: a control-database session and a
transaction on the tenant's store, so the change and its audit entry commit
together (the audit entry is written last, then the control change commits,
then the tenant's; a failure anywhere before the end undoes both). Callers
(the CLI, the user-admin API, the account pages) only translate input and
errors; the rules live here, once.

Single-use links (invitations and password resets) read ``<row id>.<secret>``;
only the secret's SHA-256 is stored, and a link is spent in the same
transaction that sets the password, so a replayed link finds it used.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from metacrm.metadata.identifiers import identifier_problem
from metacrm.runtime import audittrail, metastore, sessions
from metacrm.runtime.authz import capabilities
from metacrm.runtime.control import (
    Invitation,
    Membership,
    PasswordReset,
    Team,
    Tenant,
    User,
    utcnow,
)
from metacrm.runtime.passwords import hash_password, password_problem
from metacrm.runtime.platform import Platform
from metacrm.runtime.tokens import create_token, find_token, revoke_token, revoke_user_tokens

MAX_EMAIL = 254
MAX_DISPLAY_NAME = 200
MAX_LABEL = 200
MAX_TEAM_NAME = 63
MAX_ROLES = 20
#: Characters an address may hold: no spaces, controls, quotes, brackets or separators, so
#: an address can never smuggle a header, a second recipient or markup into a mail or a page.
_EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)+",
    re.ASCII,
)
#: The capability that lets a member manage the tenant's users and teams.
MANAGE_USERS = "manage_users"
#: Open password-reset links one login may have at a time; more requests are ignored.
MAX_OPEN_RESETS = 3


class AccountError(ValueError):
    """A change was refused; ``code`` is stable (API problem code), ``field`` the input at fault."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass(frozen=True)
class Actor:
    """Who makes a change, as the audit trail records it."""

    user_id: uuid.UUID | None
    name: str
    ip: str | None = None


CLI_ACTOR = Actor(None, "cli")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# -- input checks ---------------------------------------------------------------------------


def normalise_email(email: Any, field: str = "email") -> str:
    """Return the email address in its stored form (trimmed, lower case), or AccountError."""
    if not isinstance(email, str):
        raise AccountError("invalid_email", "the email address must be text", field)
    value = email.strip().lower()
    if len(value) > MAX_EMAIL:
        raise AccountError(
            "invalid_email", f"the email address is longer than {MAX_EMAIL} characters", field
        )
    if not _EMAIL.fullmatch(value):
        raise AccountError("invalid_email", f"{email[:80]!r} is not an email address", field)
    return value


def _text(value: Any, field: str, limit: int, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value.strip()) <= limit:
        raise AccountError("invalid_value", f"{what} must be 1 to {limit} characters long", field)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise AccountError("invalid_value", f"{what} cannot contain control characters", field)
    return value.strip()


def role_names(bundle: Mapping[str, Any]) -> set[str]:
    """Return the API names of the roles a published bundle defines."""
    listed = bundle.get("roles", [])
    return {r["name"] for r in listed if isinstance(r, Mapping) and isinstance(r.get("name"), str)}


def check_roles(bundle: Mapping[str, Any], roles: Any) -> list[str]:
    """Return the roles as stored, or AccountError naming the first bad one.

    Names must follow the identifier grammar (a comma or bracket in a role name
    would corrupt Casbin's policy lines) and exist in the tenant's published
    metadata, so nobody is given a role that grants nothing by accident.
    """
    if not isinstance(roles, list | tuple) or not roles:
        raise AccountError("invalid_roles", "give at least one role", "roles")
    if len(roles) > MAX_ROLES:
        raise AccountError("invalid_roles", f"give at most {MAX_ROLES} roles", "roles")
    known = role_names(bundle)
    result: list[str] = []
    for role in roles:
        if not isinstance(role, str) or identifier_problem(role):
            shown = role[:80] if isinstance(role, str) else role
            raise AccountError(
                "invalid_roles",
                f"{shown!r} is not a role name (lower-case letters, digits and underscores, "
                "starting with a letter)",
                "roles",
            )
        if role not in known:
            raise AccountError(
                "unknown_role",
                f"there is no role {role!r} in this tenant; roles: {', '.join(sorted(known))}",
                "roles",
            )
        if role not in result:
            result.append(role)
    return result


def check_team_name(name: Any) -> str:
    """Return a team's API name, or AccountError (the identifier grammar)."""
    if not isinstance(name, str) or len(name) > MAX_TEAM_NAME or identifier_problem(name):
        shown = name[:80] if isinstance(name, str) else name
        raise AccountError(
            "invalid_value",
            f"{shown!r} is not a team name (lower-case letters, digits and underscores, "
            "starting with a letter, at most 63)",
            "name",
        )
    return name


# -- the unit of work -----------------------------------------------------------------------


@dataclass
class Work:
    """One change in a tenant: the control session, the tenant connection and the actor."""

    session: Session
    connection: Connection
    tenant: Tenant
    actor: Actor
    _bundle: dict[str, Any] | None = None

    @property
    def bundle(self) -> dict[str, Any]:
        """The tenant's published metadata (read once per unit)."""
        if self._bundle is None:
            self._bundle = metastore.current(self.connection).bundle
        return self._bundle

    def audit(
        self,
        action: str,
        user_id: uuid.UUID | None = None,
        detail: Mapping[str, Any] | None = None,
        changes: Mapping[str, Any] | None = None,
    ) -> None:
        """Append an audit entry about an account change, in this unit's transaction."""
        self.session.flush()
        audittrail.append(
            self.connection,
            action=action,
            actor_id=self.actor.user_id,
            actor_name=self.actor.name[:254],
            record_id=user_id,
            detail=detail,
            changes=changes,
            ip=self.actor.ip,
        )


@contextmanager
def work(platform: Platform, tenant: Tenant, actor: Actor) -> Iterator[Work]:
    """Yield a unit of work; both transactions commit when the block succeeds."""
    store = platform.store(tenant)
    with store.begin() as connection, platform.session() as session:
        yield Work(session, connection, session.get_one(Tenant, tenant.id), actor)


# -- members --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """A member as the admin API and the CLI show it."""

    user: User
    membership: Membership
    team: Team | None
    manager: User | None

    def describe(self) -> dict[str, Any]:
        """Return the member as JSON (no password hash, no secrets)."""
        return {
            "id": self.user.id.hex,
            "email": self.user.email,
            "display_name": self.user.display_name,
            "roles": list(self.membership.roles),
            "team": self.team.name if self.team else None,
            "manager": self.manager.email if self.manager else None,
            "active": bool(self.membership.is_active and self.user.is_active),
            "pending_invitation": self.user.password_hash is None,
            "joined_at": self.membership.created_at.isoformat(),
        }


def list_members(session: Session, tenant_id: uuid.UUID) -> list[Member]:
    """Return a tenant's members (active and not), by email."""
    manager = sa.orm.aliased(User)
    rows = session.execute(
        sa.select(User, Membership, Team, manager)
        .join(Membership, Membership.user_id == User.id)
        .outerjoin(Team, Team.id == Membership.team_id)
        .outerjoin(manager, manager.id == Membership.manager_id)
        .where(Membership.tenant_id == tenant_id)
        .order_by(User.email)
    )
    return [Member(*row) for row in rows]


def get_member(session: Session, tenant_id: uuid.UUID, user_id: uuid.UUID) -> Member | None:
    """Return one member of a tenant, or None (also for another tenant's user)."""
    for member in _members_where(session, tenant_id, User.id == user_id):
        return member
    return None


def member_by_email(session: Session, tenant_id: uuid.UUID, email: str) -> Member | None:
    """Return the member with this email in a tenant, or None."""
    for member in _members_where(session, tenant_id, User.email == email.strip().lower()):
        return member
    return None


def _members_where(session: Session, tenant_id: uuid.UUID, clause: Any) -> list[Member]:
    manager = sa.orm.aliased(User)
    rows = session.execute(
        sa.select(User, Membership, Team, manager)
        .join(Membership, Membership.user_id == User.id)
        .outerjoin(Team, Team.id == Membership.team_id)
        .outerjoin(manager, manager.id == Membership.manager_id)
        .where(Membership.tenant_id == tenant_id, clause)
    )
    return [Member(*row) for row in rows]


def _require_member(w: Work, user_id: uuid.UUID) -> Member:
    member = get_member(w.session, w.tenant.id, user_id)
    if member is None:
        raise AccountError("not_found", "there is no such member in this tenant")
    return member


def _team(w: Work, name: str | None, field: str = "team") -> Team | None:
    if name is None:
        return None
    if not isinstance(name, str) or identifier_problem(name):
        raise AccountError("unknown_team", "there is no such team", field)
    team = w.session.scalar(sa.select(Team).where(Team.tenant_id == w.tenant.id, Team.name == name))
    if team is None:
        raise AccountError("unknown_team", f"there is no team {name!r} in this tenant", field)
    return team


@dataclass(frozen=True)
class Added:
    """A new member, and the invitation link secret when they must choose a password."""

    member: Member
    invitation: str | None
    invitation_expires: dt.datetime | None
    new_login: bool


def add_member(
    w: Work,
    *,
    email: Any,
    roles: Any,
    team: str | None = None,
    manager_email: str | None = None,
    password: str | None = None,
    display_name: str | None = None,
    invitation_lifetime: dt.timedelta = dt.timedelta(hours=72),
) -> Added:
    """Make a person a member of the tenant; invite them when they have no password yet.

    A person who already has a login (from another tenant) keeps it: giving a
    password for them is refused, since it would change their password elsewhere.
    """
    address = normalise_email(email)
    chosen = check_roles(w.bundle, roles)
    the_team = _team(w, team)
    name = (
        _text(display_name, "display_name", MAX_DISPLAY_NAME, "the display name")
        if (display_name is not None)
        else address.partition("@")[0][:MAX_DISPLAY_NAME]
    )
    if password is not None:
        problem = password_problem(password, address)
        if problem:
            raise AccountError("weak_password", f"the password {problem}", "password")
    user = w.session.scalar(sa.select(User).where(User.email == address))
    new_login = user is None
    if user is not None:
        exists = w.session.scalar(
            sa.select(Membership).where(
                Membership.tenant_id == w.tenant.id, Membership.user_id == user.id
            )
        )
        if exists is not None:
            raise AccountError("already_member", f"{address} is already a member", "email")
        if password is not None and user.password_hash is not None:
            raise AccountError(
                "login_exists",
                f"{address} already has a login; leave the password out to add them "
                "with the password they have",
                "password",
            )
    else:
        user = User(email=address, display_name=name, password_hash=None)
        w.session.add(user)
        w.session.flush()
    if password is not None:
        user.password_hash = hash_password(password)
    manager = _manager(w, user.id, manager_email) if manager_email else None
    membership = Membership(
        tenant_id=w.tenant.id,
        user_id=user.id,
        roles=chosen,
        team_id=the_team.id if the_team else None,
        manager_id=manager.id if manager else None,
    )
    w.session.add(membership)
    w.session.flush()
    secret, expires = None, None
    if user.password_hash is None:
        secret, expires = _invite(w, user, invitation_lifetime)
    w.audit(
        "user.invited" if secret else "user.added",
        user.id,
        detail={"email": address, "roles": chosen, "team": team, "new_login": new_login},
    )
    return Added(Member(user, membership, the_team, manager), secret, expires, new_login)


def _invite(w: Work, user: User, lifetime: dt.timedelta) -> tuple[str, dt.datetime]:
    """Create an invitation (dropping the user's earlier open ones in this tenant)."""
    w.session.execute(
        sa.delete(Invitation).where(
            Invitation.tenant_id == w.tenant.id,
            Invitation.user_id == user.id,
            Invitation.accepted_at.is_(None),
        )
    )
    secret = secrets.token_urlsafe(32)
    expires = utcnow() + lifetime
    invitation = Invitation(
        tenant_id=w.tenant.id,
        user_id=user.id,
        secret_hash=_digest(secret),
        created_by=w.actor.user_id,
        expires_at=expires,
    )
    w.session.add(invitation)
    w.session.flush()
    return f"{invitation.id.hex}.{secret}", expires


def reinvite(w: Work, user_id: uuid.UUID, lifetime: dt.timedelta) -> tuple[str, dt.datetime]:
    """Issue a fresh invitation link to a member who has not chosen a password yet."""
    member = _require_member(w, user_id)
    if member.user.password_hash is not None:
        raise AccountError("already_accepted", "this member has a password already")
    if not member.membership.is_active:
        raise AccountError("inactive_member", "reactivate the member before inviting them")
    result = _invite(w, member.user, lifetime)
    w.audit("user.invited", member.user.id, detail={"email": member.user.email, "again": True})
    return result


def _parse_link(link: Any) -> tuple[uuid.UUID, str] | None:
    if not isinstance(link, str) or len(link) > 120:
        return None
    key, _, secret = link.partition(".")
    try:
        return uuid.UUID(hex=key), secret
    except ValueError:
        return None


@dataclass(frozen=True)
class PendingInvitation:
    """A usable invitation: whom it is for and to which tenant."""

    invitation: Invitation
    user: User
    tenant: Tenant


def open_invitation(session: Session, link: Any) -> PendingInvitation | None:
    """Return the invitation a link stands for while it is usable, else None."""
    parsed = _parse_link(link)
    if parsed is None:
        return None
    invitation = session.get(Invitation, parsed[0])
    if invitation is None or not hmac.compare_digest(invitation.secret_hash, _digest(parsed[1])):
        return None
    if invitation.accepted_at is not None or invitation.expires_at <= utcnow():
        return None
    user = session.get(User, invitation.user_id)
    tenant = session.get(Tenant, invitation.tenant_id)
    membership = session.scalar(
        sa.select(Membership).where(
            Membership.tenant_id == invitation.tenant_id, Membership.user_id == invitation.user_id
        )
    )
    if user is None or tenant is None or membership is None:
        return None
    if not user.is_active or not membership.is_active:
        return None
    return PendingInvitation(invitation, user, tenant)


def accept_invitation(
    platform: Platform, link: Any, password: str, display_name: str | None = None
) -> User:
    """Spend an invitation: set the member's password; AccountError when refused.

    The row is claimed with a conditional UPDATE, so two requests with the same
    link cannot both succeed.
    """
    with platform.session() as session:
        pending = open_invitation(session, link)
        if pending is None:
            raise AccountError(
                "invalid_link", "this invitation link is unknown, used or expired", "link"
            )
        tenant = pending.tenant
        user_id = pending.user.id
    with work(platform, tenant, Actor(user_id, "")) as w:
        pending = open_invitation(w.session, link)
        if pending is None:
            raise AccountError(
                "invalid_link", "this invitation link is unknown, used or expired", "link"
            )
        user = pending.user
        w.actor = Actor(user.id, user.email)
        problem = password_problem(password, user.email)
        if problem:
            raise AccountError("weak_password", f"the password {problem}", "password")
        name = (
            _text(display_name, "display_name", MAX_DISPLAY_NAME, "the display name")
            if display_name
            else user.display_name
        )
        claimed = w.session.execute(
            sa.update(Invitation)
            .where(Invitation.id == pending.invitation.id, Invitation.accepted_at.is_(None))
            .values(accepted_at=utcnow()),
            execution_options={"synchronize_session": False},
        ).rowcount
        if claimed != 1:
            raise AccountError(
                "invalid_link", "this invitation link is unknown, used or expired", "link"
            )
        # A login from another tenant accepted meanwhile keeps the password it has.
        if user.password_hash is None:
            user.password_hash = hash_password(password)
        user.display_name = name
        w.audit("user.invitation_accepted", user.id, detail={"email": user.email})
        return user


def request_password_reset(
    platform: Platform, email: Any, lifetime: dt.timedelta
) -> tuple[User, str, dt.datetime] | None:
    """Return a reset link for an active login, or None (unknown, inactive, too many open).

    The caller answers the same way in every case, so nobody learns which
    addresses have a login.
    """
    try:
        address = normalise_email(email)
    except AccountError:
        return None
    with platform.session() as session:
        user = session.scalar(sa.select(User).where(User.email == address))
        if user is None or not user.is_active:
            return None
        now = utcnow()
        open_count = session.scalar(
            sa.select(sa.func.count())
            .select_from(PasswordReset)
            .where(
                PasswordReset.user_id == user.id,
                PasswordReset.used_at.is_(None),
                PasswordReset.expires_at > now,
            )
        )
        if open_count >= MAX_OPEN_RESETS:
            return None
        secret = secrets.token_urlsafe(32)
        reset = PasswordReset(
            user_id=user.id, secret_hash=_digest(secret), expires_at=now + lifetime
        )
        session.add(reset)
        session.flush()
        return user, f"{reset.id.hex}.{secret}", reset.expires_at


def open_reset(session: Session, link: Any) -> tuple[PasswordReset, User] | None:
    """Return the reset a link stands for while it is usable, else None."""
    parsed = _parse_link(link)
    if parsed is None:
        return None
    reset = session.get(PasswordReset, parsed[0])
    if reset is None or not hmac.compare_digest(reset.secret_hash, _digest(parsed[1])):
        return None
    if reset.used_at is not None or reset.expires_at <= utcnow():
        return None
    user = session.get(User, reset.user_id)
    if user is None or not user.is_active:
        return None
    return reset, user


def complete_password_reset(platform: Platform, link: Any, password: str) -> User:
    """Spend a reset link: set the new password, end the user's other links and login sessions."""
    with platform.session() as session:
        found = open_reset(session, link)
        if found is None:
            raise AccountError(
                "invalid_link", "this reset link is unknown, used or expired", "link"
            )
        reset, user = found
        problem = password_problem(password, user.email)
        if problem:
            raise AccountError("weak_password", f"the password {problem}", "password")
        now = utcnow()
        claimed = session.execute(
            sa.update(PasswordReset)
            .where(PasswordReset.user_id == user.id, PasswordReset.used_at.is_(None))
            .values(used_at=now),
            execution_options={"synchronize_session": False},
        ).rowcount
        if claimed < 1:
            raise AccountError(
                "invalid_link", "this reset link is unknown, used or expired", "link"
            )
        user.password_hash = hash_password(password)
        # A cookie taken before the reset must not outlive it.
        sessions.revoke_all(session, user.id)
        return user


def deactivate(w: Work, user_id: uuid.UUID) -> Member:
    """Deactivate a member: their tokens here and their login sessions end at once."""
    member = _require_member(w, user_id)
    if not member.membership.is_active:
        raise AccountError("already_inactive", "this member is deactivated already")
    _keep_a_user_manager(w, member, roles=[])
    member.membership.is_active = False
    revoked = revoke_user_tokens(w.session, member.user.id, w.tenant.id)
    # Sessions are per login, not per tenant: the person signs in again everywhere.
    ended = sessions.revoke_all(w.session, member.user.id)
    w.audit(
        "user.deactivated",
        member.user.id,
        detail={"email": member.user.email, "tokens_revoked": revoked, "sessions_ended": ended},
    )
    return member


def reactivate(w: Work, user_id: uuid.UUID) -> Member:
    """Let a deactivated member in again (their revoked tokens stay revoked)."""
    member = _require_member(w, user_id)
    if member.membership.is_active:
        raise AccountError("already_active", "this member is active already")
    check_roles(w.bundle, list(member.membership.roles))
    member.membership.is_active = True
    w.audit("user.reactivated", member.user.id, detail={"email": member.user.email})
    return member


def _keep_a_user_manager(w: Work, member: Member, roles: Sequence[str]) -> None:
    """Refuse a change that would leave the tenant without an active user manager."""
    if MANAGE_USERS not in capabilities(w.bundle, member.membership.roles):
        return
    if not member.membership.is_active or MANAGE_USERS in capabilities(w.bundle, roles):
        return
    others = w.session.scalars(
        sa.select(Membership)
        .join(User, User.id == Membership.user_id)
        .where(
            Membership.tenant_id == w.tenant.id,
            Membership.is_active.is_(True),
            User.is_active.is_(True),
            Membership.user_id != member.user.id,
        )
    )
    if not any(MANAGE_USERS in capabilities(w.bundle, m.roles) for m in others):
        raise AccountError(
            "would_lock_out",
            f"{member.user.email} is the last active member who can manage users; "
            "give another member that right first",
            "roles",
        )


def set_roles(w: Work, user_id: uuid.UUID, roles: Any) -> Member:
    """Replace a member's roles (each must exist in the published metadata)."""
    member = _require_member(w, user_id)
    chosen = check_roles(w.bundle, roles)
    _keep_a_user_manager(w, member, chosen)
    before = list(member.membership.roles)
    if before != chosen:
        member.membership.roles = chosen
        w.audit(
            "user.roles_changed",
            member.user.id,
            detail={"email": member.user.email},
            changes={"roles": [before, chosen]},
        )
    return member


def set_team(w: Work, user_id: uuid.UUID, team: str | None) -> Member:
    """Move a member to a team (None: no team)."""
    member = _require_member(w, user_id)
    the_team = _team(w, team)
    before = member.team.name if member.team else None
    if before != team:
        member.membership.team_id = the_team.id if the_team else None
        w.audit(
            "user.team_changed",
            member.user.id,
            detail={"email": member.user.email},
            changes={"team": [before, team]},
        )
    return Member(member.user, member.membership, the_team, member.manager)


def _manager(w: Work, user_id: uuid.UUID, manager_email: Any) -> User:
    address = normalise_email(manager_email, "manager")
    manager = member_by_email(w.session, w.tenant.id, address)
    if manager is None or not manager.membership.is_active:
        raise AccountError(
            "unknown_manager", f"{address} is not an active member of this tenant", "manager"
        )
    if manager.user.id == user_id:
        raise AccountError("invalid_manager", "a member cannot report to themselves", "manager")
    # Walk up from the new manager: meeting the member again would close a loop.
    chain = dict(
        w.session.execute(
            sa.select(Membership.user_id, Membership.manager_id).where(
                Membership.tenant_id == w.tenant.id
            )
        ).all()
    )
    current: uuid.UUID | None = manager.user.id
    seen: set[uuid.UUID] = set()
    while current is not None and current not in seen:
        if current == user_id:
            raise AccountError(
                "invalid_manager", f"{address} already reports to this member", "manager"
            )
        seen.add(current)
        current = chain.get(current)
    return manager.user


def set_manager(w: Work, user_id: uuid.UUID, manager_email: str | None) -> Member:
    """Set whom a member reports to (None: nobody); reporting loops are refused."""
    member = _require_member(w, user_id)
    manager = _manager(w, user_id, manager_email) if manager_email is not None else None
    before = member.manager.email if member.manager else None
    after = manager.email if manager else None
    if before != after:
        member.membership.manager_id = manager.id if manager else None
        w.audit(
            "user.manager_changed",
            member.user.id,
            detail={"email": member.user.email},
            changes={"manager": [before, after]},
        )
    return Member(member.user, member.membership, member.team, manager)


# -- teams ----------------------------------------------------------------------------------


def list_teams(session: Session, tenant_id: uuid.UUID) -> list[dict[str, Any]]:
    """Return a tenant's teams with their parent's name and member count, by name."""
    teams = list(session.scalars(sa.select(Team).where(Team.tenant_id == tenant_id)))
    names = {t.id: t.name for t in teams}
    counts = dict(
        session.execute(
            sa.select(Membership.team_id, sa.func.count())
            .where(Membership.tenant_id == tenant_id, Membership.team_id.is_not(None))
            .group_by(Membership.team_id)
        ).all()
    )
    return [
        {
            "id": t.id.hex,
            "name": t.name,
            "label": t.label,
            "parent": names.get(t.parent_id) if t.parent_id else None,
            "members": counts.get(t.id, 0),
        }
        for t in sorted(teams, key=lambda t: t.name)
    ]


def create_team(w: Work, name: Any, label: Any, parent: str | None = None) -> Team:
    """Create a team, optionally nested under another of the same tenant."""
    team_name = check_team_name(name)
    team_label = _text(label, "label", MAX_LABEL, "the label")
    parent_team = _team(w, parent, "parent")
    if w.session.scalar(
        sa.select(Team.id).where(Team.tenant_id == w.tenant.id, Team.name == team_name)
    ):
        raise AccountError("team_exists", f"there is a team {team_name!r} already", "name")
    team = Team(
        tenant_id=w.tenant.id,
        name=team_name,
        label=team_label,
        parent_id=parent_team.id if parent_team else None,
    )
    w.session.add(team)
    w.session.flush()
    w.audit("team.created", None, detail={"team": team_name, "label": team_label, "parent": parent})
    return team


def update_team(
    w: Work, name: str, *, label: Any = None, parent: str | None = None, move: bool = False
) -> Team:
    """Rename a team's label and/or move it under another parent (``move``); no loops."""
    team = _team(w, name, "name")
    assert team is not None
    changes: dict[str, list[Any]] = {}
    if label is not None:
        new_label = _text(label, "label", MAX_LABEL, "the label")
        if new_label != team.label:
            changes["label"] = [team.label, new_label]
            team.label = new_label
    if move:
        parent_team = _team(w, parent, "parent")
        if parent_team is not None:
            walk: uuid.UUID | None = parent_team.id
            parents = dict(
                w.session.execute(
                    sa.select(Team.id, Team.parent_id).where(Team.tenant_id == w.tenant.id)
                ).all()
            )
            seen: set[uuid.UUID] = set()
            while walk is not None and walk not in seen:
                if walk == team.id:
                    raise AccountError(
                        "invalid_parent",
                        f"{parent!r} is {name!r} itself or one of its sub-teams",
                        "parent",
                    )
                seen.add(walk)
                walk = parents.get(walk)
        new_parent = parent_team.id if parent_team else None
        if new_parent != team.parent_id:
            old = w.session.get(Team, team.parent_id) if team.parent_id else None
            changes["parent"] = [old.name if old else None, parent]
            team.parent_id = new_parent
    if changes:
        w.audit("team.changed", None, detail={"team": team.name}, changes=changes)
    return team


def delete_team(w: Work, name: str) -> None:
    """Delete an empty team (no members, no sub-teams), so no record loses its team silently."""
    team = _team(w, name, "name")
    assert team is not None
    if w.session.scalar(sa.select(Team.id).where(Team.parent_id == team.id).limit(1)):
        raise AccountError("team_in_use", f"team {name!r} has sub-teams; move them first")
    if w.session.scalar(sa.select(Membership.id).where(Membership.team_id == team.id).limit(1)):
        raise AccountError("team_in_use", f"team {name!r} has members; move them first")
    w.session.delete(team)
    w.audit("team.deleted", None, detail={"team": name})


def audit_token(w: Work, action: str, token: Any, user: User) -> None:
    """Record a token event (created or revoked) in the tenant's audit trail."""
    w.audit(
        action,
        user.id,
        detail={
            "token_id": token.id.hex,
            "name": token.name,
            "email": user.email,
            "read_only": token.read_only,
            "entities": token.entities,
        },
    )


def issue_token(
    w: Work,
    user_id: uuid.UUID,
    name: str,
    read_only: bool,
    expires_at: dt.datetime | None,
    entities: Sequence[str] | None,
) -> tuple[Any, str]:
    """Create a member's token and audit ``token.created``; return it and its secret.

    The API and the tokens page both call this after ``tokens.request_problems``
    found nothing wrong, so a token is made and recorded the same way by either.
    """
    user = w.session.get_one(User, user_id)
    token, secret = create_token(w.session, w.tenant, user, name, read_only, expires_at, entities)
    audit_token(w, "token.created", token, user)
    return token, secret


def revoke_own_token(w: Work, user_id: uuid.UUID, token_id: str) -> Any | None:
    """Revoke one of a member's tokens in this tenant (audited once); None when not theirs."""
    token = find_token(w.session, w.tenant.id, token_id, user_id)
    if token is not None and revoke_token(token):
        audit_token(w, "token.revoked", token, w.session.get_one(User, token.user_id))
    return token


def entity_names(bundle: Mapping[str, Any]) -> Iterable[str]:
    """Return the API names of the entities in a published bundle."""
    return [
        e["name"]
        for e in bundle.get("entities", [])
        if isinstance(e, Mapping) and isinstance(e.get("name"), str)
    ]
