"""Passwords: argon2id hashing and the policy a new password must meet.

The policy follows NIST SP 800-63B rather than composition rules: a length
range (10 to 1024 characters), no password from the bundled list of the most
common ones (compared without letter case, so ``Password123`` is as weak as
``password123``), and nothing built on the person's own email name. The
message names the rule that failed, so a person can pick a better one at once.
"""

from __future__ import annotations

import functools
import secrets
from importlib import resources

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_HASHER = PasswordHasher()
MIN_LENGTH = 10
MAX_LENGTH = 1024
#: Email names shorter than this are too common as fragments to refuse (``al`` in ``alpine``).
MIN_EMAIL_NAME = 3
COMMON_LIST = "common-passwords.txt"


def hash_password(password: str) -> str:
    """Return the argon2id hash of a password."""
    return _HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Tell whether ``password`` matches the stored hash."""
    if not password_hash:
        return False
    try:
        return _HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def generate_password() -> str:
    """Return a random password that is easy to copy (about 96 bits)."""
    return secrets.token_urlsafe(12)


@functools.cache
def common_passwords() -> frozenset[str]:
    """Return the bundled list of common passwords, lower-cased (read once per process)."""
    text = (resources.files("metacrm.defaults") / COMMON_LIST).read_text("utf-8")
    return frozenset(
        line.strip().lower() for line in text.splitlines() if line.strip() and line[0] != "#"
    )


_REASONS = {
    "en": {
        "short": "must be at least {min} characters long (it has {n})",
        "long": "must be at most {max} characters long",
        "common": "is one of the most common passwords, which attackers try first; choose another",
        "email": "must not contain your email name ({name!r})",
    },
    "zh-CN": {
        "short": "至少需要 {min} 个字符（当前 {n} 个）",
        "long": "最多 {max} 个字符",
        "common": "是最常见的密码之一，攻击者会最先尝试；请换一个",
        "email": "不能包含邮箱用户名（{name}）",
    },
}


def password_problem(password: str, email: str | None = None, lang: str = "en") -> str | None:
    """Return why a chosen password is refused (a phrase after "the password"), or None.

    ``lang`` is ``en`` or ``zh-CN``; the Chinese phrase follows "密码".
    """
    reasons = _REASONS.get(lang, _REASONS["en"])
    if len(password) < MIN_LENGTH:
        return reasons["short"].format(min=MIN_LENGTH, n=len(password))
    if len(password) > MAX_LENGTH:
        return reasons["long"].format(max=MAX_LENGTH)
    lowered = password.lower()
    if lowered in common_passwords():
        return reasons["common"]
    if email:
        name = email.strip().lower().partition("@")[0]
        if len(name) >= MIN_EMAIL_NAME and name in lowered:
            return reasons["email"].format(name=name)
    return None
