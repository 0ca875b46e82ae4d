"""Account pages reached from a mailed link: accept an invitation, reset a password.

The link's secret is in the URL path, so these pages send no Referer, are
never cached and cannot be framed. A form is refused without its CSRF token.
Asking for a reset answers the same way whether or not the address has a
login, and the mail is sent off the request thread, so neither the page nor
its timing tells an outsider which addresses exist.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any

from flask import Blueprint, Response, current_app, request

from metacrm.runtime import accounts, mail
from metacrm.runtime.accounts import AccountError
from metacrm.runtime.passwords import password_problem
from metacrm.runtime.platform import Platform
from metacrm.runtime.settings import Settings
from metacrm.runtime.web import page, text

bp = Blueprint("account", __name__, url_prefix="/account", template_folder="templates")
log = logging.getLogger(__name__)

MAX_FIELD = 1024

TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title_invitation": "Join {tenant}",
        "title_reset": "Choose a new password",
        "title_forgot": "Forgot your password?",
        "title_done": "Your password is set",
        "title_sent": "Check your mail",
        "title_bad_link": "This link cannot be used",
        "email": "Email",
        "display_name": "Your name",
        "password": "Password",
        "confirm": "Password again",
        "policy": "At least 10 characters; not a common password; not your email name.",
        "save": "Set password",
        "send": "Send me a link",
        "mismatch": "The two passwords differ.",
        "done": "You can now sign in with your email address and the new password.",
        "sign_in": "Sign in",
        "sent": "If {email} has a login, a link to choose a new password is on its way. "
        "It works once and expires in {minutes} minutes.",
        "bad_link": "The link is unknown, was used already or has expired. "
        "Ask your administrator for a new invitation, or request a new reset link.",
        "forgot": "Enter your email address; we will send you a link to choose a new password.",
        "form_expired": "The form expired; please try again.",
        "invitation_for": "You were invited as {email}.",
    },
    "zh-CN": {
        "title_invitation": "加入 {tenant}",
        "title_reset": "设置新密码",
        "title_forgot": "忘记密码？",
        "title_done": "密码已设置",
        "title_sent": "请查收邮件",
        "title_bad_link": "此链接无法使用",
        "email": "邮箱",
        "display_name": "您的姓名",
        "password": "密码",
        "confirm": "再次输入密码",
        "policy": "至少 10 个字符；不能是常见密码；不能包含邮箱用户名。",
        "save": "设置密码",
        "send": "发送链接",
        "mismatch": "两次输入的密码不一致。",
        "done": "现在可以使用邮箱地址和新密码登录。",
        "sign_in": "登录",
        "sent": "如果 {email} 已注册，设置新密码的链接已发出。该链接只能使用一次，"
        "将在 {minutes} 分钟后失效。",
        "bad_link": "该链接无效、已被使用或已过期。请联系管理员重新邀请，或重新申请重置链接。",
        "forgot": "请输入您的邮箱地址，我们将发送设置新密码的链接。",
        "form_expired": "表单已过期，请重试。",
        "invitation_for": "您以 {email} 的身份受邀。",
    },
}


def language() -> str:
    """Return the page language (the same choice as every other page's)."""
    return text.language()


def _platform() -> Platform:
    return current_app.extensions["metacrm"]


def _page(template: str, status: int = 200, **values: Any) -> Response:
    return page.render(template, TEXT, status, **values)


@bp.after_request
def _protect(response: Response) -> Response:
    """Keep the secret in the URL out of Referer headers, caches and frames."""
    return page.protect(response, referrer="no-referrer")


def _field(name: str) -> str:
    return request.form.get(name, "")[: MAX_FIELD + 1]


def _reason(error: AccountError, password: str, email: str) -> str:
    """Return a refusal in the page's language (the policy's reasons exist in both)."""
    if error.code == "weak_password" and language() == "zh-CN":
        return "密码" + (password_problem(password, email, "zh-CN") or "不符合要求")
    return error.message


def _bad_link() -> Response:
    return _page(
        "account/message.html", 404, title="title_bad_link", message=TEXT[language()]["bad_link"]
    )


@bp.route("/invitation/<link>", methods=["GET", "POST"])
def invitation(link: str) -> Response:
    """Show and handle the form that accepts an invitation."""
    p = _platform()
    with p.session() as session:
        pending = accounts.open_invitation(session, link)
        if pending is None:
            return _bad_link()
        email, tenant_name = pending.user.email, pending.tenant.name
        name = pending.user.display_name
    values = {"email": email, "tenant": tenant_name, "display_name": name, "error": None}
    if request.method == "GET":
        return _page("account/invitation.html", **values)
    text = TEXT[language()]
    if not page.form_ok():
        return _page("account/invitation.html", 400, **{**values, "error": text["form_expired"]})
    password = _field("password")
    values["display_name"] = _field("display_name")[:200]
    if password != _field("confirm"):
        return _page("account/invitation.html", 422, **{**values, "error": text["mismatch"]})
    try:
        accounts.accept_invitation(p, link, password, values["display_name"].strip() or None)
    except AccountError as exc:
        if exc.code == "invalid_link":
            return _bad_link()
        return _page(
            "account/invitation.html", 422, **{**values, "error": _reason(exc, password, email)}
        )
    return _page("account/message.html", title="title_done", message=text["done"], sign_in=True)


@bp.route("/reset", methods=["GET", "POST"])
def forgot() -> Response:
    """Ask for a password-reset link by email (same answer for every address)."""
    if request.method == "GET":
        return _page("account/forgot.html", error=None)
    text = TEXT[language()]
    if not page.form_ok():
        return _page("account/forgot.html", 400, error=text["form_expired"])
    p = _platform()
    email = _field("email")[:254]
    minutes = p.settings.password_reset_minutes
    issued = accounts.request_password_reset(p, email, dt.timedelta(minutes=minutes))
    if issued is not None:
        user, secret, expires = issued
        url = mail.link(p.settings, mail.reset_path(secret), request.host_url)
        subject, body = mail.render(
            "password_reset",
            language(),
            email=user.email,
            link=url,
            expires=f"{expires:%Y-%m-%d %H:%M}",
        )
        _send_later(p.settings, user.email, subject, body)
    shown = email.strip() or "-"
    return _page(
        "account/message.html",
        title="title_sent",
        message=text["sent"].format(email=shown, minutes=minutes),
    )


def _send_later(settings: Settings, to: str, subject: str, body: str) -> None:
    """Send a mail off the request thread, so the answer's timing reveals nothing."""
    if not mail.enabled(settings):
        log.warning("password reset for %s not mailed: no smtp_host is configured", to)
        return

    def run() -> None:
        try:
            mail.send(settings, to, subject, body)
        except mail.MailError:
            pass  # logged by mail.send; the person can ask again

    threading.Thread(target=run, name="metacrm-mail", daemon=True).start()


@bp.route("/reset/<link>", methods=["GET", "POST"])
def reset(link: str) -> Response:
    """Show and handle the form that sets a new password from a reset link."""
    p = _platform()
    with p.session() as session:
        found = accounts.open_reset(session, link)
        if found is None:
            return _bad_link()
        email = found[1].email
    if request.method == "GET":
        return _page("account/reset.html", email=email, error=None)
    text = TEXT[language()]
    if not page.form_ok():
        return _page("account/reset.html", 400, email=email, error=text["form_expired"])
    password = _field("password")
    if password != _field("confirm"):
        return _page("account/reset.html", 422, email=email, error=text["mismatch"])
    try:
        accounts.complete_password_reset(p, link, password)
    except AccountError as exc:
        if exc.code == "invalid_link":
            return _bad_link()
        return _page("account/reset.html", 422, email=email, error=_reason(exc, password, email))
    return _page("account/message.html", title="title_done", message=text["done"], sign_in=True)
