"""Mail: its settings, the rendered messages and the links they carry."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from metacrm.runtime import mail
from metacrm.runtime import settings as settings_module
from metacrm.runtime.settings import Settings, SettingsError

SECRET = "0123456789abcdef-secret"


def load(tmp_path: Path, environ: dict[str, str] | None = None, **values: Any) -> Settings:
    values.setdefault("instance_dir", str(tmp_path / "instance"))
    values.setdefault("secret_key", SECRET)
    return settings_module.load(values, environ=environ or {})


def test_mail_is_off_by_default_and_links_use_the_request_or_dev_address(tmp_path) -> None:
    settings = load(tmp_path)
    assert not mail.enabled(settings)
    assert mail.link(settings, "/account/reset/x") == "http://127.0.0.1:5000/account/reset/x"
    assert mail.link(settings, "/p", "https://crm.local/") == "https://crm.local/p"


def test_base_url_wins_and_loses_its_trailing_slash(tmp_path) -> None:
    settings = load(tmp_path, base_url="https://crm.example.com/")
    assert settings.base_url == "https://crm.example.com"
    assert mail.link(settings, "/p", "http://evil.example") == "https://crm.example.com/p"


@pytest.mark.parametrize(
    "values, phrase",
    [
        ({"smtp_security": "ssl"}, "smtp_security"),
        ({"smtp_host": "mail", "smtp_port": 70000}, "smtp_port"),
        ({"base_url": "javascript:alert(1)"}, "base_url"),
        ({"base_url": "https://crm.example.com/a b"}, "base_url"),
        ({"invitation_hours": 0}, "invitation_hours"),
        ({"password_reset_minutes": 0}, "password_reset_minutes"),
        ({"operator_session_hours": 0}, "operator_session_hours"),
    ],
)
def test_bad_mail_settings_stop_start_up(tmp_path, values, phrase) -> None:
    with pytest.raises(SettingsError, match=phrase):
        load(tmp_path, **values)


def test_the_smtp_password_is_a_secret(tmp_path) -> None:
    path = tmp_path / "metacrm.toml"
    path.write_text('smtp_password = "hunter2hunter2"\n', "utf-8")
    with pytest.raises(SettingsError, match="secret"):
        settings_module.load(
            {"instance_dir": str(tmp_path / "i"), "secret_key": SECRET},
            environ={"METACRM_CONFIG_FILE": str(path)},
        )
    settings = settings_module.load(
        {"instance_dir": str(tmp_path / "i"), "secret_key": SECRET},
        environ={"METACRM_SMTP_PASSWORD": "hunter2hunter2"},
    )
    assert settings.smtp_password == "hunter2hunter2"


@pytest.mark.parametrize(
    "lang, words", [("en", "invited you"), ("zh-CN", "邀请您加入"), ("zh", "邀请")]
)
def test_invitations_speak_english_and_chinese(lang, words) -> None:
    subject, body = mail.render(
        "invitation", lang, tenant="Acme", inviter="Bo", link="https://x/a", expires="2026-01-01"
    )
    assert words in body and "https://x/a" in body and "Acme" in subject


def test_unknown_languages_fall_back_to_english() -> None:
    assert mail.language("fr-FR") == "en" and mail.language(None) == "en"
    subject, _ = mail.render("password_reset", "de", email="a@b.c", link="l", expires="e")
    assert subject == "Reset your metacrm password"


def test_an_unreachable_server_is_a_mail_error(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    settings = load(tmp_path, smtp_host="127.0.0.1", smtp_port=port, smtp_security="none")
    with pytest.raises(mail.MailError):
        mail.send(settings, "a@example.com", "s", "b")


def test_a_subject_with_line_breaks_stays_one_header(tmp_path) -> None:
    received: list[bytes] = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            received.append(envelope.content)
            return "250 OK"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        settings = load(tmp_path, smtp_host="127.0.0.1", smtp_port=port, smtp_security="none")
        subject, body = mail.render(
            "invitation",
            "en",
            tenant="Acme\r\nBcc: all@x.example",
            inviter="x",
            link="l",
            expires="e",
        )
        mail.send(settings, "a@example.com", subject, body)
    finally:
        controller.stop()
    (content,) = received
    headers = content.split(b"\r\n\r\n", 1)[0]
    assert b"\nBcc:" not in headers and b"Acme Bcc: all@x.example" in headers
