"""The password policy and the bundled list of common passwords."""

from __future__ import annotations

import pytest

from metacrm.runtime.passwords import (
    MAX_LENGTH,
    common_passwords,
    generate_password,
    hash_password,
    password_problem,
    verify_password,
)


def test_the_bundled_list_is_real_and_lower_case() -> None:
    listed = common_passwords()
    assert len(listed) > 19000
    assert {"password", "123456", "qwerty", "iloveyou", "password123"} <= listed
    assert all(p == p.lower() and p.strip() == p and p for p in listed)
    assert not any(p.startswith("#") for p in listed)


@pytest.mark.parametrize(
    "password, email, phrase",
    [
        ("short", None, "at least 10 characters long (it has 5)"),
        ("", None, "at least 10"),
        ("x" * (MAX_LENGTH + 1), None, "at most 1024"),
        ("password123", None, "most common passwords"),
        ("PassWord123", None, "most common passwords"),
        ("1234567890", None, "most common passwords"),
        ("qwertyuiop", None, "most common passwords"),
        ("annabel-is-great", "annabel@example.com", "email name ('annabel')"),
        ("I am ANNABEL, hi", "Annabel@Example.com", "email name"),
    ],
)
def test_weak_passwords_are_refused_with_the_reason(password, email, phrase) -> None:
    problem = password_problem(password, email)
    assert problem is not None and phrase in problem


@pytest.mark.parametrize(
    "password, email",
    [
        ("violet kettle orbit 42", None),
        ("violet kettle orbit 42", "ann@example.com"),
        (
            "al-pine meadow stroll",
            "al@example.com",
        ),  # a two-letter email name is too common to refuse
        ("x" * MAX_LENGTH, None),
        ("密码很长而且不常见的一句话", None),
    ],
)
def test_good_passwords_pass(password, email) -> None:
    assert password_problem(password, email) is None


def test_generated_passwords_pass_the_policy_and_hashes_verify() -> None:
    password = generate_password()
    assert password_problem(password) is None
    stored = hash_password(password)
    assert stored.startswith("$argon2id$")
    assert verify_password(stored, password)
    assert not verify_password(stored, password + "x")
    assert not verify_password(None, password)
    assert not verify_password("not a hash", password)
