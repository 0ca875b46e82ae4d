"""Sign-in security of a tenant's members, for admins: see and reset a member's MFA.

A reset is for the member who lost their phone and their recovery codes: it
removes the second factor and the recovery codes, ends every login session of
the member, and is written to the tenant's audit trail (``mfa_reset``). It
needs the ``manage_users`` capability and a credential that may write.

A login identity can belong to several tenants, and its second factor guards
all of them; an admin of one tenant therefore cannot reset the factor of a
person who is also an active member elsewhere (``shared_identity``), since
that would weaken another tenant's protection from outside it.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from flask import Blueprint, Response, jsonify, request

from metacrm.runtime import audittrail, mfa, sessions
from metacrm.runtime.api.context import RequestContext, platform
from metacrm.runtime.api.problem import abort
from metacrm.runtime.api.users import user_admin
from metacrm.runtime.control import Membership, User

bp = Blueprint("security_api", __name__, url_prefix="/t/<tenant>/api/v1")


def _member(context: RequestContext, user_id: str) -> User:
    """Return a member of the URL's tenant; anything else is 404, like a member that is not."""
    try:
        wanted = uuid.UUID(user_id) if len(user_id) <= 36 else None
    except ValueError:
        wanted = None
    user = None
    if wanted is not None:
        with platform().session() as session:
            user = session.scalar(
                sa.select(User)
                .join(Membership, Membership.user_id == User.id)
                .where(User.id == wanted, Membership.tenant_id == context.tenant.id)
            )
    if user is None:
        abort(404, "not_found", "Not Found", "there is no such member in this tenant")
    return user


@bp.get("/users/<user_id>/mfa")
def get_mfa(tenant: str, user_id: str) -> Response:
    """Tell whether a member uses two-step sign-in and how many recovery codes remain."""
    context = user_admin(tenant)
    user = _member(context, user_id)
    with platform().session() as session:
        on = mfa.enabled(session, user.id)
        left = mfa.recovery_codes_left(session, user.id) if on else 0
    return jsonify({"user_id": str(user.id), "enabled": on, "recovery_codes_left": left})


@bp.delete("/users/<user_id>/mfa")
def reset_mfa(tenant: str, user_id: str) -> tuple[str, int]:
    """Remove a member's second factor and end their sessions (audited)."""
    context = user_admin(tenant)
    user = _member(context, user_id)
    p = platform()
    actor = context.principal.user
    # The audit entry and the reset commit together or not at all: the control
    # change commits first, inside the tenant transaction that holds the entry.
    with context.store.begin() as connection, p.session() as session:
        elsewhere = session.scalar(
            sa.select(sa.func.count())
            .select_from(Membership)
            .where(
                Membership.user_id == user.id,
                Membership.tenant_id != context.tenant.id,
                Membership.is_active.is_(True),
            )
        )
        if elsewhere:
            abort(
                409,
                "shared_identity",
                "The member's login is shared with other tenants",
                "this login is also an active member of another tenant, whose sign-in its "
                "second factor protects too; a platform operator resets it with "
                "'metacrm user reset-mfa' (the member can still sign in with a recovery code)",
            )
        if not mfa.enabled(session, user.id):
            abort(409, "mfa_not_enabled", "Nothing to reset", "this member has no second factor")
        mfa.disable(session, user.id)
        ended = sessions.revoke_all(session, user.id)
        audittrail.append(
            connection,
            action="auth.mfa_reset",
            actor_id=actor.id,
            actor_name=actor.email,
            detail={"user_id": str(user.id), "email": user.email, "sessions_ended": ended},
            ip=request.remote_addr,
        )
    return "", 204
