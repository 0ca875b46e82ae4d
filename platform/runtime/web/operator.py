"""The operator console: platform operators sign in, see and create tenants.

Operators are not tenant members (see :mod:`metacrm.runtime.operators`): the
console lists the tenant registry and creates tenants, and nothing here reads
a tenant's records. Its login is a server-side session in a cookie of its own
(``metacrm_operator``, HttpOnly, SameSite=Strict, Secure in production, path
``/operator``), so it never mixes with a tenant member's login session.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Blueprint, Response, current_app, redirect, request

from metacrm.metadata.validation import BundleInvalid
from metacrm.runtime import accounts, mail, operators, tenancy
from metacrm.runtime.accounts import AccountError
from metacrm.runtime.control import Operator
from metacrm.runtime.platform import Platform
from metacrm.runtime.web import page, text

bp = Blueprint("operator", __name__, url_prefix="/operator", template_folder="templates")

COOKIE = "metacrm_operator"

TEXT: dict[str, dict[str, str]] = {
    "en": {
        "console": "Operator console",
        "sign_in": "Sign in",
        "sign_out": "Sign out",
        "email": "Email",
        "password": "Password",
        "bad_login": "Wrong email or password.",
        "form_expired": "The form expired; please try again.",
        "tenants": "Tenants",
        "slug": "Slug",
        "name": "Name",
        "template": "Template",
        "created": "Created",
        "new_tenant": "Create a tenant",
        "admin_email": "First admin's email",
        "create": "Create",
        "created_tenant": "Created tenant {slug}.",
        "invite_link": "Invitation link for {email} (single use, until {expires} UTC):",
        "invite_mailed": "An invitation was mailed to {email}.",
        "no_tenants": "No tenants yet.",
    },
    "zh-CN": {
        "console": "运维控制台",
        "sign_in": "登录",
        "sign_out": "退出",
        "email": "邮箱",
        "password": "密码",
        "bad_login": "邮箱或密码错误。",
        "form_expired": "表单已过期，请重试。",
        "tenants": "租户",
        "slug": "标识",
        "name": "名称",
        "template": "模板",
        "created": "创建时间",
        "new_tenant": "创建租户",
        "admin_email": "首位管理员邮箱",
        "create": "创建",
        "created_tenant": "已创建租户 {slug}。",
        "invite_link": "{email} 的邀请链接（仅可使用一次，{expires} UTC 前有效）：",
        "invite_mailed": "邀请邮件已发送至 {email}。",
        "no_tenants": "还没有租户。",
    },
}


def _platform() -> Platform:
    return current_app.extensions["metacrm"]


def _lang() -> str:
    return text.language()


def _page(template: str, status: int = 200, **values: Any) -> Response:
    return page.render(template, TEXT, status, **values)


@bp.after_request
def _protect(response: Response) -> Response:
    return page.protect(response, referrer="no-referrer")


def _current() -> Operator | None:
    with _platform().session() as session:
        return operators.session_operator(session, request.cookies.get(COOKIE))


def _to_login() -> Response:
    return redirect("/operator/login", 303)  # type: ignore[return-value]


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response:
    """Show and handle the operator sign-in form."""
    if request.method == "GET":
        return _page("operator/login.html", error=None)
    text = TEXT[_lang()]
    if not page.form_ok():
        return _page("operator/login.html", 400, error=text["form_expired"])
    p = _platform()
    lifetime = dt.timedelta(hours=p.settings.operator_session_hours)
    with p.session() as session:
        found = operators.authenticate(
            session, request.form.get("email", "")[:254], request.form.get("password", "")[:1024]
        )
        cookie = operators.start_session(session, found, lifetime) if found else None
    if cookie is None:
        return _page("operator/login.html", 401, error=text["bad_login"])
    response = redirect("/operator/", 303)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(lifetime.total_seconds()),
        path="/operator",
        secure=p.settings.env == "production",
        httponly=True,
        samesite="Strict",
    )
    return response  # type: ignore[return-value]


@bp.post("/logout")
def logout() -> Response:
    """End the operator's console session."""
    if page.form_ok():
        with _platform().session() as session:
            operators.end_session(session, request.cookies.get(COOKIE))
    response = _to_login()
    response.delete_cookie(COOKIE, path="/operator")
    return response


@bp.get("/")
def home() -> Response:
    """List the tenants (the registry only: no tenant's records)."""
    operator = _current()
    if operator is None:
        return _to_login()
    return _home(operator)


def _home(operator: Operator, status: int = 200, **values: Any) -> Response:
    tenants = tenancy.list_tenants(_platform())
    return _page("operator/home.html", status, operator=operator, tenants=tenants, **values)


@bp.post("/tenants")
def create_tenant() -> Response:
    """Create a tenant from a template and invite its first admin."""
    operator = _current()
    if operator is None:
        return _to_login()
    text = TEXT[_lang()]
    if not page.form_ok():
        return _home(operator, 400, error=text["form_expired"])
    p = _platform()
    slug = request.form.get("slug", "").strip()[:100]
    name = request.form.get("name", "")[:300]
    template = request.form.get("template", "core").strip()[:100] or "core"
    email = request.form.get("admin_email", "")[:300]
    try:
        address = accounts.normalise_email(email)
        created = tenancy.create_tenant(p, slug, name, template)
    except AccountError as exc:
        return _home(operator, 422, error=exc.message, form=request.form)
    except tenancy.TenantError as exc:
        return _home(operator, 422, error=str(exc), form=request.form)
    except BundleInvalid:
        return _home(operator, 422, error=f"template {template!r} is not valid", form=request.form)
    actor = accounts.Actor(None, f"operator:{operator.email}"[:254], request.remote_addr)
    lifetime = dt.timedelta(hours=p.settings.invitation_hours)
    with accounts.work(p, created.tenant, actor) as w:
        added = accounts.add_member(w, email=address, roles=["admin"], invitation_lifetime=lifetime)
    notice = text["created_tenant"].format(slug=slug)
    link = None
    if added.invitation is not None and added.invitation_expires is not None:
        url = mail.link(p.settings, mail.invitation_path(added.invitation), request.host_url)
        expires = f"{added.invitation_expires:%Y-%m-%d %H:%M}"
        sent = False
        if mail.enabled(p.settings):
            subject, body = mail.render(
                "invitation",
                _lang(),
                tenant=created.tenant.name,
                inviter="metacrm",
                link=url,
                expires=expires,
            )
            try:
                mail.send(p.settings, address, subject, body)
                sent = True
            except mail.MailError:
                sent = False
        if sent:
            notice += " " + text["invite_mailed"].format(email=address)
        else:
            link = {"label": text["invite_link"].format(email=address, expires=expires), "url": url}
    return _home(operator, 201, notice=notice, link=link)
