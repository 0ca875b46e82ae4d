"""Pure sign-in rules: the two languages' words, the IP allowlist, the new settings."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import string

import pytest

from metacrm.metadata.validation import validate_bundle
from metacrm.runtime import settings as settings_module
from metacrm.runtime.sessions import Security
from metacrm.runtime.web import text

from ..metadata.bundles import bundle as make_bundle
from ..metadata.bundles import entity


def _placeholders(value: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(value) if name}


def test_both_languages_have_every_string_with_the_same_placeholders() -> None:
    english, chinese = text.TEXT["en"], text.TEXT["zh-CN"]
    assert set(english) == set(chinese)
    for key in english:
        assert _placeholders(english[key]) == _placeholders(chinese[key]), key
        assert chinese[key].strip(), key


def test_templates_use_only_known_strings() -> None:
    from importlib import resources

    folder = resources.files("metacrm.runtime.web") / "templates" / "signin"
    used: set[str] = set()
    for page in folder.iterdir():
        used |= set(re.findall(r"\bt\.([a-z_]+)", page.read_text("utf-8")))
    assert used and used <= set(text.TEXT["en"])


def _security(*networks: str) -> Security:
    return Security(
        False,
        frozenset(),
        dt.timedelta(minutes=30),
        dt.timedelta(hours=12),
        tuple(ipaddress.ip_network(n, strict=False) for n in networks),
    )


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("203.0.113.9", True),
        ("203.0.114.9", False),
        ("::ffff:203.0.113.9", True),
        ("2001:db8::1", True),
        ("2001:db9::1", False),
        (None, False),
        ("", False),
        ("not an address", False),
        ("203.0.113.9\x00", False),
    ],
)
def test_allowlist_matches_networks(ip: str | None, allowed: bool) -> None:
    assert _security("203.0.113.0/24", "2001:db8::/32").allows(ip) is allowed


def test_empty_allowlist_allows_everyone() -> None:
    assert _security().allows(None) and _security().allows("198.51.100.1")


def test_mfa_requirement_by_tenant_or_role() -> None:
    base = _security()
    assert not base.requires_mfa(["sales_rep"])
    by_role = Security(True, frozenset(), base.idle, base.absolute, ())
    assert by_role.requires_mfa([])
    roles = Security(False, frozenset({"admin"}), base.idle, base.absolute, ())
    assert roles.requires_mfa(["sales_rep", "admin"]) and not roles.requires_mfa(["sales_rep"])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("login_rate_limit", "lots"),
        ("login_rate_limit", "0 per minute"),
        ("api_rate_limit", "10 per fortnight"),
        ("api_rate_limit", "10 per minute; "),
        ("session_idle_minutes", 0),
        ("login_max_failures", 0),
        ("login_lockout_minutes", "-1"),
    ],
)
def test_bad_login_settings_stop_start_up(key: str, value: object) -> None:
    with pytest.raises(settings_module.SettingsError) as refused:
        settings_module.load({"secret_key": "x" * 20, key: value}, environ={})
    assert key in str(refused.value)


def test_good_rates_are_accepted() -> None:
    loaded = settings_module.load(
        {"secret_key": "x" * 20, "api_rate_limit": "100/second;5000 per hour"}, environ={}
    )
    assert loaded.api_rate_limit == "100/second;5000 per hour"


@pytest.mark.parametrize(
    ("security", "pointer"),
    [
        ({"ip_allowlist": ["10.0.0.0/33"]}, "/settings/security/ip_allowlist/0"),
        ({"ip_allowlist": ["10.0.0.0/8", "1.2.3"]}, "/settings/security/ip_allowlist/1"),
        ({"ip_allowlist": ["nonsense"]}, "/settings/security/ip_allowlist/0"),
        ({"mfa_required_roles": ["no_such_role"]}, "/settings/security/mfa_required_roles/0"),
        ({"mfa_required_roles": ["Bad,Role"]}, "/settings/security/mfa_required_roles/0"),
        (
            {"session_idle_minutes": 600, "session_absolute_minutes": 60},
            "/settings/security/session_idle_minutes",
        ),
        ({"session_idle_minutes": 1}, "/settings/security/session_idle_minutes"),
        ({"mfa_required": "yes"}, "/settings/security/mfa_required"),
        ({"unknown": True}, "/settings/security"),
    ],
)
def test_bad_security_settings_are_refused_with_a_pointer(
    security: dict[str, object], pointer: str
) -> None:
    bundle = make_bundle(entity("thing"))
    bundle["settings"] = {"security": security}
    problems = validate_bundle(bundle)
    assert any(p.pointer.startswith(pointer) for p in problems), [p.pointer for p in problems]


def test_good_security_settings_pass() -> None:
    bundle = make_bundle(entity("thing"))
    bundle["settings"] = {
        "security": {
            "mfa_required": True,
            "mfa_required_roles": [],
            "session_idle_minutes": 15,
            "session_absolute_minutes": 60,
            "ip_allowlist": ["203.0.113.0/24", "203.0.113.7", "2001:db8::/32"],
        }
    }
    assert validate_bundle(bundle) == []
