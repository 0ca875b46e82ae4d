"""The user-admin API: a tenant's members and teams.

Only members whose roles hold the ``manage_users`` capability get in, with a
credential that may write (not a read-only token, and not a token limited to
some entities: user admin is not an entity). Members are addressed by their
user id, teams by their API name, and every lookup is inside the URL's
tenant: another tenant's user or team is a 404, exactly like one that does
not exist. The rules themselves live in :mod:`metacrm.runtime.accounts`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, NoReturn

from flask import Blueprint, Response, jsonify, request

from metacrm.runtime import accounts, mail
from metacrm.runtime.accounts import AccountError, Actor
from metacrm.runtime.api.context import RequestContext, access, platform, resolve
from metacrm.runtime.api.problem import abort, read_json
from metacrm.runtime.control import User

bp = Blueprint("users_api", __name__, url_prefix="/t/<tenant>/api/v1")

MAX_BODY = 64 * 1024
#: HTTP status of each refusal ``accounts`` can raise.
STATUS = {
    "not_found": 404,
    "unknown_team": 422,
    "unknown_role": 422,
    "unknown_manager": 422,
    "invalid_email": 422,
    "invalid_roles": 422,
    "invalid_value": 422,
    "invalid_manager": 422,
    "invalid_parent": 422,
    "weak_password": 422,
    "would_lock_out": 422,
    "already_member": 409,
    "login_exists": 409,
    "already_active": 409,
    "already_inactive": 409,
    "already_accepted": 409,
    "inactive_member": 409,
    "team_exists": 409,
    "team_in_use": 409,
}
MEMBER_FIELDS = {"email", "roles", "team", "manager", "display_name", "language"}
PATCH_FIELDS = {"roles", "team", "manager"}
TEAM_FIELDS = {"name", "label", "parent"}


def refuse(error: AccountError) -> NoReturn:
    """Answer an ``AccountError`` as a problem with its own stable code."""
    status = STATUS.get(error.code, 422)
    if status == 404:
        abort(404, "not_found", "Not Found", error.message)
    errors = [{"pointer": f"/{error.field}", "message": error.message}] if error.field else []
    abort(status, error.code, "The change was refused", error.message, errors=errors)


def user_admin(tenant: str) -> RequestContext:
    """Return the context of a caller allowed to manage this tenant's users, or 403.

    The capability is asked of the permission core (``authz.Access``), the one
    path every other check takes too.
    """
    context = resolve(tenant)
    principal = context.principal
    if principal.read_only:
        abort(403, "forbidden", "Forbidden", "this API token is read-only")
    if principal.token is not None and principal.token.entities is not None:
        abort(403, "forbidden", "Forbidden", "this API token is limited to some entities")
    with context.store.connect() as connection:
        model = platform().models.current(context.store, connection)
    if not access(context, model).can(accounts.MANAGE_USERS):
        abort(
            403,
            "forbidden",
            "Forbidden",
            "managing users needs a role with the manage_users capability",
        )
    return context


def _actor(context: RequestContext) -> Actor:
    user = context.principal.user
    return Actor(user.id, user.email, request.remote_addr)


def _object(allowed: set[str], required: tuple[str, ...] = ()) -> dict[str, Any]:
    body = read_json(MAX_BODY)
    if not isinstance(body, dict):
        abort(400, "bad_request", "Bad Request", "the body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        abort(
            422,
            "unknown_field",
            "Unknown field",
            f"{unknown[0]!r} is not a field here; use {', '.join(sorted(allowed))}",
            errors=[{"pointer": f"/{name}", "message": "unknown field"} for name in unknown],
        )
    for name in required:
        if name not in body:
            abort(
                422,
                "missing_field",
                "Missing field",
                f"{name!r} is required",
                errors=[{"pointer": f"/{name}", "message": "required"}],
            )
    return body


def _optional_text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        refuse(AccountError("invalid_value", f"{name} must be text or null", name))
    return value


def _user_id(value: str) -> uuid.UUID:
    """Parse a member id from the URL; anything that is not one is a member not found."""
    try:
        if len(value) <= 36:
            return uuid.UUID(value)
    except ValueError:
        pass
    abort(404, "not_found", "Not Found", "there is no such member in this tenant")


def _root() -> str:
    return request.host_url.rstrip("/")


# -- members --------------------------------------------------------------------------------


@bp.get("/users")
def list_users(tenant: str) -> Response:
    """List the tenant's members."""
    context = user_admin(tenant)
    with platform().session() as session:
        members = accounts.list_members(session, context.tenant.id)
    return jsonify({"items": [m.describe() for m in members]})


@bp.post("/users")
def add_user(tenant: str) -> tuple[Response, int]:
    """Add a member: invite them by mail (or return the link when mail is off)."""
    context = user_admin(tenant)
    body = _object(MEMBER_FIELDS, ("email", "roles"))
    settings = platform().settings
    language = mail.language(_optional_text(body, "language"))
    try:
        with accounts.work(platform(), context.tenant, _actor(context)) as w:
            added = accounts.add_member(
                w,
                email=body["email"],
                roles=body["roles"],
                team=_optional_text(body, "team"),
                manager_email=_optional_text(body, "manager"),
                display_name=_optional_text(body, "display_name"),
                invitation_lifetime=dt.timedelta(hours=settings.invitation_hours),
            )
    except AccountError as error:
        refuse(error)
    result = added.member.describe()
    if added.invitation is not None:
        result["invitation"] = _deliver_invitation(
            context, added.member.user.email, added.invitation, added.invitation_expires, language
        )
    return jsonify(result), 201


def _deliver_invitation(
    context: RequestContext,
    email: str,
    secret: str,
    expires: dt.datetime | None,
    language: str,
) -> dict[str, Any]:
    """Mail the invitation; when mail is off (or fails) hand the link to the admin instead."""
    settings = platform().settings
    url = mail.link(settings, mail.invitation_path(secret), _root())
    outcome: dict[str, Any] = {"expires_at": expires.isoformat() if expires else None}
    if mail.enabled(settings):
        subject, text = mail.render(
            "invitation",
            language,
            tenant=context.tenant.name,
            inviter=context.principal.user.display_name or context.principal.user.email,
            link=url,
            expires=f"{expires:%Y-%m-%d %H:%M}" if expires else "",
        )
        try:
            mail.send(settings, email, subject, text)
            outcome["sent"] = True
            return outcome
        except mail.MailError as exc:
            outcome["mail_error"] = str(exc)
    outcome["sent"] = False
    outcome["url"] = url
    return outcome


@bp.get("/users/<user_id>")
def get_user(tenant: str, user_id: str) -> Response:
    """Show one member."""
    context = user_admin(tenant)
    with platform().session() as session:
        member = accounts.get_member(session, context.tenant.id, _user_id(user_id))
    if member is None:
        abort(404, "not_found", "Not Found", "there is no such member in this tenant")
    return jsonify(member.describe())


@bp.patch("/users/<user_id>")
def change_user(tenant: str, user_id: str) -> Response:
    """Change a member's roles, team or manager (any of them, in one transaction)."""
    context = user_admin(tenant)
    key = _user_id(user_id)
    body = _object(PATCH_FIELDS)
    try:
        with accounts.work(platform(), context.tenant, _actor(context)) as w:
            member = accounts.get_member(w.session, w.tenant.id, key)
            if member is None:
                raise AccountError("not_found", "there is no such member in this tenant")
            if "roles" in body:
                member = accounts.set_roles(w, key, body["roles"])
            if "team" in body:
                member = accounts.set_team(w, key, _optional_text(body, "team"))
            if "manager" in body:
                member = accounts.set_manager(w, key, _optional_text(body, "manager"))
            result = accounts.get_member(w.session, w.tenant.id, key)
            assert result is not None
            described = result.describe()
    except AccountError as error:
        refuse(error)
    return jsonify(described)


@bp.post("/users/<user_id>/deactivate")
def deactivate_user(tenant: str, user_id: str) -> Response:
    """Deactivate a member: their tokens and login sessions end at once."""
    return _state_change(tenant, user_id, accounts.deactivate)


@bp.post("/users/<user_id>/reactivate")
def reactivate_user(tenant: str, user_id: str) -> Response:
    """Let a deactivated member in again."""
    return _state_change(tenant, user_id, accounts.reactivate)


def _state_change(tenant: str, user_id: str, change: Any) -> Response:
    context = user_admin(tenant)
    key = _user_id(user_id)
    try:
        with accounts.work(platform(), context.tenant, _actor(context)) as w:
            change(w, key)
            member = accounts.get_member(w.session, w.tenant.id, key)
            assert member is not None
            described = member.describe()
    except AccountError as error:
        refuse(error)
    return jsonify(described)


@bp.post("/users/<user_id>/invitation")
def reinvite_user(tenant: str, user_id: str) -> tuple[Response, int]:
    """Send a fresh invitation to a member who has not chosen a password yet."""
    context = user_admin(tenant)
    key = _user_id(user_id)
    language = mail.language(request.args.get("language"))
    hours = platform().settings.invitation_hours
    try:
        with accounts.work(platform(), context.tenant, _actor(context)) as w:
            secret, expires = accounts.reinvite(w, key, dt.timedelta(hours=hours))
            email = w.session.get_one(User, key).email
    except AccountError as error:
        refuse(error)
    return jsonify(_deliver_invitation(context, email, secret, expires, language)), 201


# -- teams ----------------------------------------------------------------------------------


@bp.get("/teams")
def list_teams(tenant: str) -> Response:
    """List the tenant's teams with their parents and member counts."""
    context = user_admin(tenant)
    with platform().session() as session:
        return jsonify({"items": accounts.list_teams(session, context.tenant.id)})


def _team_json(context: RequestContext, name: str) -> dict[str, Any]:
    with platform().session() as session:
        for team in accounts.list_teams(session, context.tenant.id):
            if team["name"] == name:
                return team
    abort(404, "not_found", "Not Found", "there is no such team in this tenant")


@bp.post("/teams")
def create_team(tenant: str) -> tuple[Response, int]:
    """Create a team, optionally under a parent team."""
    context = user_admin(tenant)
    body = _object(TEAM_FIELDS, ("name", "label"))
    try:
        with accounts.work(platform(), context.tenant, _actor(context)) as w:
            team = accounts.create_team(
                w, body["name"], body["label"], _optional_text(body, "parent")
            )
            name = team.name
    except AccountError as error:
        refuse(error)
    return jsonify(_team_json(context, name)), 201


def _known_team(context: RequestContext, name: str) -> None:
    """Answer 404 for a team name that is not one of this tenant's teams."""
    _team_json(context, name)


@bp.patch("/teams/<name>")
def change_team(tenant: str, name: str) -> Response:
    """Rename a team's label and/or move it under another parent (null: top level)."""
    context = user_admin(tenant)
    _known_team(context, name)
    body = _object({"label", "parent"})
    try:
        with accounts.work(platform(), context.tenant, _actor(context)) as w:
            accounts.update_team(
                w,
                name,
                label=body.get("label"),
                parent=_optional_text(body, "parent"),
                move="parent" in body,
            )
    except AccountError as error:
        refuse(error)
    return jsonify(_team_json(context, name))


@bp.delete("/teams/<name>")
def delete_team(tenant: str, name: str) -> Response:
    """Delete a team with no members and no sub-teams."""
    context = user_admin(tenant)
    _known_team(context, name)
    try:
        with accounts.work(platform(), context.tenant, _actor(context)) as w:
            accounts.delete_team(w, name)
    except AccountError as error:
        refuse(error)
    return Response(status=204)
