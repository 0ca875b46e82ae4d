"""Outgoing mail: invitations and password resets, in English or Simplified Chinese.

Mail goes through the SMTP server the settings name (``smtp_*``); with no
``smtp_host`` nothing is sent and the caller shows the link itself (the CLI
prints it, the admin API returns it). Messages are plain text: a link in a
plain-text mail cannot hide behind different visible text.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formataddr, make_msgid

from metacrm.runtime.settings import Settings

log = logging.getLogger(__name__)

LANGUAGES = ("en", "zh-CN")
TIMEOUT_SECONDS = 15

_MESSAGES: dict[str, dict[str, tuple[str, str]]] = {
    "invitation": {
        "en": (
            "You are invited to {tenant} on metacrm",
            "Hello,\n\n{inviter} invited you to {tenant} on metacrm.\n\n"
            "Open this link to choose your password and sign in:\n\n{link}\n\n"
            "The link works once and expires at {expires} (UTC).\n"
            "If you did not expect this invitation, ignore this mail.\n",
        ),
        "zh-CN": (
            "您受邀加入 metacrm 上的 {tenant}",
            "您好：\n\n{inviter} 邀请您加入 metacrm 上的 {tenant}。\n\n"
            "请打开以下链接设置密码并登录：\n\n{link}\n\n"
            "该链接只能使用一次，将于 {expires}（UTC）失效。\n"
            "如果您并未期待此邀请，请忽略本邮件。\n",
        ),
    },
    "password_reset": {
        "en": (
            "Reset your metacrm password",
            "Hello,\n\nSomeone (hopefully you) asked to reset the password of {email} "
            "on metacrm.\n\nOpen this link to choose a new password:\n\n{link}\n\n"
            "The link works once and expires at {expires} (UTC).\n"
            "If you did not ask for this, ignore this mail: your password stays as it is.\n",
        ),
        "zh-CN": (
            "重置您的 metacrm 密码",
            "您好：\n\n有人（希望是您本人）申请重置 metacrm 账号 {email} 的密码。\n\n"
            "请打开以下链接设置新密码：\n\n{link}\n\n"
            "该链接只能使用一次，将于 {expires}（UTC）失效。\n"
            "如果这不是您本人的操作，请忽略本邮件，您的密码不会改变。\n",
        ),
    },
}


class MailError(RuntimeError):
    """The SMTP server could not be reached or refused the message."""


def language(requested: str | None) -> str:
    """Return a supported language for ``requested`` (an Accept-Language-like tag)."""
    if requested and requested.lower().startswith("zh"):
        return "zh-CN"
    return "en"


def render(kind: str, lang: str, **values: str) -> tuple[str, str]:
    """Return the subject and body of a message kind in a language."""
    subject, body = _MESSAGES[kind][language(lang)]
    return subject.format(**values), body.format(**values)


def enabled(settings: Settings) -> bool:
    """Tell whether mail is configured (an ``smtp_host`` is set)."""
    return bool(settings.smtp_host)


def send(settings: Settings, to: str, subject: str, body: str) -> None:
    """Send one plain-text mail through the configured SMTP server; MailError on failure."""
    message = EmailMessage()
    sender = settings.mail_from or f"metacrm@{settings.smtp_host}"
    message["From"] = formataddr(("metacrm", sender))
    message["To"] = to
    # A header must stay one line: a tenant name with a line break must not end it early.
    message["Subject"] = " ".join(subject.split())
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    message.set_content(body, charset="utf-8")
    try:
        if settings.smtp_security == "tls":
            client: smtplib.SMTP = smtplib.SMTP_SSL(
                settings.smtp_host,
                settings.smtp_port,
                timeout=TIMEOUT_SECONDS,
                context=ssl.create_default_context(),
            )
        else:
            client = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=TIMEOUT_SECONDS)
        with client:
            if settings.smtp_security == "starttls":
                client.starttls(context=ssl.create_default_context())
            if settings.smtp_user:
                client.login(settings.smtp_user, settings.smtp_password)
            client.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        log.warning("mail to %s not sent: %s", to, exc)
        raise MailError(f"the mail server refused or could not be reached ({exc})") from None


def link(settings: Settings, path: str, request_root: str | None = None) -> str:
    """Return the absolute URL of ``path`` for a mail or the CLI.

    ``base_url`` wins; otherwise the address of the request that sent the mail,
    or the development server's address for the CLI.
    """
    root = settings.base_url or (request_root or "").rstrip("/")
    if not root:
        root = f"http://{settings.host}:{settings.port}"
    return f"{root}{path}"


def invitation_path(link_secret: str) -> str:
    """Return the path of the page that accepts an invitation."""
    return f"/account/invitation/{link_secret}"


def reset_path(link_secret: str) -> str:
    """Return the path of the page that completes a password reset."""
    return f"/account/reset/{link_secret}"
