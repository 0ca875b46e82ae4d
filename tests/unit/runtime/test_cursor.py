"""Signed keyset cursors: round trips, and every kind of forgery refused."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import uuid

import pytest

from metacrm.runtime import cursor
from metacrm.runtime.cursor import CursorError, Position

SECRET = b"unit-test-secret"
VALUES = (
    None,
    True,
    42,
    -(2**63),
    "上海华联贸易有限公司",
    "",
    1.5,
    decimal.Decimal("1234.50"),
    dt.datetime(2024, 5, 1, 10, 30, 0, 123456, tzinfo=dt.UTC),
    dt.date(2024, 2, 29),
    uuid.UUID("0190a5c4-1234-7abc-8def-0123456789ab"),
)


def position(*values: object) -> Position:
    return Position("deal", "-amount,name,id", cursor.digest('stage = "won"', None, False), values)


def test_every_sort_key_type_round_trips():
    token = cursor.encode(position(*VALUES), SECRET)
    decoded = cursor.decode(token, SECRET)
    assert decoded == position(*VALUES)
    assert [type(v) for v in decoded.values] == [type(v) for v in VALUES]


def test_datetimes_come_back_in_utc():
    moment = dt.datetime(2024, 5, 1, 18, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    (back,) = cursor.decode(cursor.encode(position(moment), SECRET), SECRET).values
    assert back == moment and back.utcoffset() == dt.timedelta(0)


def test_token_is_url_safe_and_opaque():
    token = cursor.encode(position("a b/c+d?", decimal.Decimal("1")), SECRET)
    assert all(c.isalnum() or c in "-_." for c in token)
    assert "=" not in token


def _parts(token: str) -> tuple[str, str]:
    body, _, signature = token.partition(".")
    return body, signature


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _payload(token: str) -> dict:
    body, _ = _parts(token)
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))


def test_edited_payload_is_refused():
    token = cursor.encode(position(100), SECRET)
    payload = _payload(token)
    payload["k"] = [1_000_000]
    forged = _b64(json.dumps(payload, separators=(",", ":")).encode()) + "." + _parts(token)[1]
    with pytest.raises(CursorError, match="signature"):
        cursor.decode(forged, SECRET)


def test_edited_signature_is_refused():
    body, signature = _parts(cursor.encode(position(100), SECRET))
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    with pytest.raises(CursorError):
        cursor.decode(f"{body}.{flipped}", SECRET)


def test_cursor_signed_with_another_secret_is_refused():
    token = cursor.encode(position(1), b"another tenant's secret")
    with pytest.raises(CursorError, match="signature"):
        cursor.decode(token, SECRET)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "abc.",
        ".abc",
        "a.b.c",
        "!!!.???",
        "eyJ2IjoxfQ",
        "x" * (cursor.MAX_TOKEN_LENGTH + 1),
        "a" * 5 + "." + "b" * 43,
        "é.é",
        "\x00.\x00",
    ],
)
def test_garbage_is_refused(token):
    with pytest.raises(CursorError):
        cursor.decode(token, SECRET)


def test_non_text_token_is_refused():
    with pytest.raises(CursorError):
        cursor.decode(None, SECRET)  # type: ignore[arg-type]


def _signed(raw: bytes) -> str:
    """A token whose signature is valid for its content, as only the server can make."""
    return f"{_b64(raw)}.{_b64(cursor._sign(raw, SECRET))}"


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"v":2,"e":"deal","s":"id","h":"x","k":[]}',
        b'{"v":1,"e":"deal","s":"id","h":"x"}',
        b'{"v":1,"e":5,"s":"id","h":"x","k":[]}',
        b'{"v":1,"e":"deal","s":"id","h":"x","k":[["n","NaN"]]}',
        b'{"v":1,"e":"deal","s":"id","h":"x","k":[["t","2024-05-01T10:00:00"]]}',
        b'{"v":1,"e":"deal","s":"id","h":"x","k":[["d","2024-02-30"]]}',
        b'{"v":1,"e":"deal","s":"id","h":"x","k":[["u","not-a-uuid"]]}',
        b'{"v":1,"e":"deal","s":"id","h":"x","k":[["?","x"]]}',
        b'{"v":1,"e":"deal","s":"id","h":"x","k":[{"a":1}]}',
    ],
)
def test_signed_but_malformed_content_is_refused(raw):
    with pytest.raises(CursorError):
        cursor.decode(_signed(raw), SECRET)


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), dt.datetime(2024, 5, 1), object(), b"bytes"],
)
def test_values_a_cursor_cannot_hold_are_refused_when_encoding(value):
    with pytest.raises((TypeError, ValueError)):
        cursor.encode(position(value), SECRET)


def test_an_empty_secret_is_a_programming_error():
    with pytest.raises(ValueError):
        cursor.encode(position(1), b"")


def test_digest_tells_lists_apart():
    base = cursor.digest('stage = "won"', "华联", False, None)
    assert base == cursor.digest('stage = "won"', "华联", False, None)
    assert (
        len(
            {
                base,
                cursor.digest('stage = "won"', "华联", True, None),
                cursor.digest('stage = "won"', None, False, None),
                cursor.digest(None, "华联", False, None),
                cursor.digest('stage = "won"', "华联", False, "related:customer:1"),
            }
        )
        == 5
    )


def test_same_shape_checks_types_per_place():
    kinds = [str, int, decimal.Decimal, dt.date, dt.datetime, uuid.UUID, bool]
    good = ["a", 1, decimal.Decimal(1), dt.date.today(), dt.datetime.now(dt.UTC), uuid.uuid4()]
    assert cursor.same_shape([*good, True], kinds)
    assert cursor.same_shape([None] * 7, kinds)
    assert not cursor.same_shape(good, kinds)  # one value short
    assert not cursor.same_shape([1, *good[1:], True], kinds)
    assert not cursor.same_shape(["a", True, *good[2:], True], kinds)  # a bool is not an int
    assert not cursor.same_shape(
        ["a", 1, decimal.Decimal(1), dt.datetime.now(dt.UTC), *good[4:], True], kinds
    )
