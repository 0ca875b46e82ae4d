"""The "API tokens" page of the user menu: a member's own tokens in one tenant.

Issue 4 lets members create tokens in the user menu as well as through the API
and the CLI. The page is a third door onto the same service, not a second copy
of it: a request is checked by :func:`metacrm.runtime.tokens.request_problems`
and a token made and revoked by :func:`metacrm.runtime.accounts.issue_token` and
:func:`~metacrm.runtime.accounts.revoke_own_token`, exactly as the API does, so
both refuse the same input and write the same audit entries.

The page needs a signed-in session for the URL's tenant (another tenant's page
is the same 404 as a tenant that does not exist), every POST carries the form's
CSRF token, and the secret appears once, on the page that answers the creation;
the list never shows it again (only its hash is stored).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from flask import Blueprint, Response, request
from werkzeug.wrappers import Response as BaseResponse

from metacrm.runtime import accounts, metastore, tokens
from metacrm.runtime.authz import TenantPolicy
from metacrm.runtime.control import ApiToken
from metacrm.runtime.web import page, text
from metacrm.runtime.web.auth import SignedIn, platform
from metacrm.runtime.web.signin import _ready

bp = Blueprint("tokens_web", __name__, template_folder="templates")

#: A lifetime field is a plain number of days; at most 7 digits are worth parsing.
DAYS = re.compile(r"[0-9]{1,7}")
#: Longer form values are refused without being looked at (the name's limit is far lower).
MAX_FIELD = 1000


@bp.after_request
def _protect(response: Response) -> Response:
    """Never cache (a page may hold a secret) or frame the page; only this site's resources."""
    return page.protect(response, referrer="same-origin")


def _words() -> dict[str, str]:
    return text.strings(text.language())


def _message(title: str, message: str, status: int) -> Response:
    return page.render("signin/message.html", text.TEXT, status, title=title, message=message)


def _readable_entities(current: SignedIn) -> list[str]:
    """Return the entities the member's roles may read in the tenant's published model.

    A token can only narrow what its member may do, so the page offers (and
    accepts) only entities the member could read with the session itself.
    """
    assert current.tenant is not None and current.membership is not None
    with platform().store(current.tenant).connect() as connection:
        version = metastore.current(connection)
    policy = TenantPolicy(current.tenant.id, version.version, version.bundle)
    roles = policy.known_roles(current.membership.roles or ())
    names = accounts.entity_names(version.bundle)
    return sorted(name for name in names if policy.scope(roles, name, "read") is not None)


def _when(value: Any) -> str | None:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value is not None else None


def _rows(current: SignedIn) -> list[dict[str, Any]]:
    """Return the member's tokens in this tenant, newest first, as the page shows them."""
    assert current.tenant is not None
    with platform().session() as session:
        items = tokens.list_tokens(session, current.tenant.id, current.user.id)
        return [_row(token) for token in items]


def _row(token: ApiToken) -> dict[str, Any]:
    shown = tokens.describe(token)
    return {
        "id": shown["id"],
        "name": token.name,
        "read_only": token.read_only,
        "entities": token.entities,
        "created": _when(token.created_at),
        "expires": _when(token.expires_at),
        "last_used": _when(token.last_used_at),
        "revoked": _when(token.revoked_at),
        "state": shown["state"],
    }


def _page(current: SignedIn, status: int = 200, **values: Any) -> Response:
    values.setdefault("errors", [])
    values.setdefault("notice", None)
    values.setdefault("secret", None)
    values.setdefault("form", {"name": "", "read_only": False, "entities": [], "days": ""})
    return page.render(
        "signin/tokens.html",
        text.TEXT,
        status,
        login=current,
        rows=_rows(current),
        readable=_readable_entities(current),
        max_name=tokens.MAX_NAME,
        max_days=tokens.MAX_DAYS,
        **values,
    )


def _signed_in(tenant: str) -> SignedIn | BaseResponse:
    """Return the ready session for this tenant, or the answer to send instead.

    POSTs are also checked here against the form's CSRF token, so the page
    refuses a forged form even where no app-wide CSRF protection is installed.
    """
    current = _ready(tenant)
    if not isinstance(current, SignedIn):
        return current
    if request.method == "POST" and not page.form_ok():
        words = _words()
        return _message(words["form_expired_title"], words["form_expired"], 400)
    return current


@bp.get("/t/<tenant>/account/tokens")
def tokens_page(tenant: str) -> BaseResponse:
    """List the member's tokens in this tenant and offer the form that creates one."""
    current = _signed_in(tenant)
    if not isinstance(current, SignedIn):
        return current
    return _page(current)


def _problems(
    name: str,
    entities: Sequence[str] | None,
    days_text: str,
    readable: Sequence[str],
) -> tuple[list[str], Any, int | None]:
    """Return the visitor-language messages for a creation form, its expiry and lifetime."""
    words = _words()
    messages: list[str] = []
    days: int | None = None
    if days_text and DAYS.fullmatch(days_text):
        days = int(days_text)
    elif days_text:
        days = -1  # not a whole number of days: refused below like an out-of-range one
    problems, expires = tokens.request_problems(name, entities, days, readable)
    fields = {problem.field for problem in problems}
    if "name" in fields:
        messages.append(words["token_bad_name"].format(max=tokens.MAX_NAME))
    if "entities" in fields:
        unknown = [e for e in entities or () if e not in readable]
        if unknown:
            messages += [words["token_bad_entity"].format(entity=e[:100]) for e in unknown[:5]]
        else:
            messages.append(words["token_bad_entities"].format(max=tokens.MAX_ENTITIES))
    if "expires_days" in fields:
        messages.append(words["token_bad_days"].format(max=tokens.MAX_DAYS))
    return messages, expires, days


@bp.post("/t/<tenant>/account/tokens")
def create(tenant: str) -> BaseResponse:
    """Create a token from the form; the answer shows its secret this once."""
    current = _signed_in(tenant)
    if not isinstance(current, SignedIn):
        return current
    assert current.tenant is not None
    raw_name = request.form.get("name", "")
    name = raw_name if len(raw_name) <= MAX_FIELD else ""
    read_only = request.form.get("read_only") is not None
    chosen = [e[:MAX_FIELD] for e in request.form.getlist("entities")]
    days_text = request.form.get("expires_days", "").strip()[:MAX_FIELD]
    readable = _readable_entities(current)
    errors, expires, _ = _problems(name, chosen or None, days_text, readable)
    if errors:
        form = {
            "name": name[: tokens.MAX_NAME],
            "read_only": read_only,
            "entities": [e for e in chosen if e in readable],
            "days": days_text[:10],
        }
        return _page(current, 422, errors=[_words()["token_not_created"], *errors], form=form)
    actor = accounts.Actor(current.user.id, current.user.email, request.remote_addr)
    with accounts.work(platform(), current.tenant, actor) as w:
        token, secret = accounts.issue_token(
            w, current.user.id, name, read_only, expires, chosen or None
        )
        created = token.name
    notice = _words()["token_created"].format(name=created)
    return _page(current, 201, notice=notice, secret=secret)


@bp.post("/t/<tenant>/account/tokens/<token_id>/revoke")
def revoke(tenant: str, token_id: str) -> BaseResponse:
    """Revoke one of the member's own tokens in this tenant; any other id is a 404."""
    current = _signed_in(tenant)
    if not isinstance(current, SignedIn):
        return current
    assert current.tenant is not None
    actor = accounts.Actor(current.user.id, current.user.email, request.remote_addr)
    with accounts.work(platform(), current.tenant, actor) as w:
        token = accounts.revoke_own_token(w, current.user.id, token_id[:64])
        name = None if token is None else token.name
    words = _words()
    if name is None:
        return _message(words["not_found_title"], words["not_your_token"], 404)
    return _page(current, notice=words["token_revoked"].format(name=name))
