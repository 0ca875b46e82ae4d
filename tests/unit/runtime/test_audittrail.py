"""The audit hash: one canonical form, stable across releases and backends."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid

import pytest

from metacrm.runtime import audittrail
from metacrm.runtime.audittrail import GENESIS, AuditError, _canonical, entry_hash

ENTRY = {
    "id": uuid.UUID("01a20818-e464-72e5-be09-86ae513228f7"),
    "at": dt.datetime(2026, 11, 23, 9, 14, 3, 118220, tzinfo=dt.UTC),
    "actor_id": uuid.UUID("01a20818-e408-7cf8-b1dc-53bef5d0ff42"),
    "actor_name": "li.na@acme.example",
    "action": "record.update",
    "entity": "customer",
    "record_id": uuid.UUID("01a20818-e448-755f-9987-9967eb2938d2"),
    "changes": {"level": ["normal", "vip"], "name": ["上海", "上海华联"]},
    "detail": {"version": 3, "ratio": 0.5},
    "ip": "203.0.113.7",
}


def test_the_hash_of_a_known_entry_never_changes():
    """The canonical form, spelled out: changing it would fail every stored chain."""
    canonical = (
        '{"action":"record.update","actor_id":"01a20818-e408-7cf8-b1dc-53bef5d0ff42",'
        '"actor_name":"li.na@acme.example","at":"2026-11-23T09:14:03.118220Z",'
        '"changes":{"level":["normal","vip"],"name":["上海","上海华联"]},'
        '"detail":{"ratio":{"$n":"5E-1"},"version":{"$n":"3E+0"}},"entity":"customer",'
        '"id":"01a20818-e464-72e5-be09-86ae513228f7","ip":"203.0.113.7",'
        f'"prev_hash":"{GENESIS}","record_id":"01a20818-e448-755f-9987-9967eb2938d2"}}'
    )
    expected = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert entry_hash(ENTRY, GENESIS) == expected
    assert expected == "d2f3ac60e8e94f595b16eca236fcab5cad405aabb60f4ed2f7f6739ea15847de"


def test_an_object_cannot_pose_as_a_number():
    posing = {**ENTRY, "detail": {"version": 3, "ratio": {"$n": "5E-1"}}}
    assert entry_hash(posing, GENESIS) != entry_hash(ENTRY, GENESIS)


def test_the_hash_ignores_key_order_and_time_zone_but_not_values():
    reordered = {**ENTRY, "changes": {"name": ENTRY["changes"]["name"], "level": ["normal", "vip"]}}
    assert entry_hash(reordered, GENESIS) == entry_hash(ENTRY, GENESIS)
    shanghai = dt.timezone(dt.timedelta(hours=8))
    moved = {**ENTRY, "at": ENTRY["at"].astimezone(shanghai)}
    assert entry_hash(moved, GENESIS) == entry_hash(ENTRY, GENESIS)
    assert entry_hash({**ENTRY, "detail": {"version": 4, "ratio": 0.5}}, GENESIS) != entry_hash(
        ENTRY, GENESIS
    )
    assert entry_hash(ENTRY, "f" * 64) != entry_hash(ENTRY, GENESIS)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1e300, 10**300),  # PostgreSQL's JSONB gives 1e300 back as a 301-digit integer
        (1.0, 1),
        (-0.0, 0),
        (2.5e-7, 0.00000025),
    ],
)
def test_numbers_hash_by_value(a, b):
    assert _canonical(a) == _canonical(b)


def test_different_numbers_and_types_stay_different():
    assert _canonical(1) != _canonical(2)
    assert _canonical(0.1) != _canonical(0.2)
    assert _canonical("1") != _canonical(1)
    assert _canonical(True) != _canonical(1)
    assert _canonical(None) != _canonical(0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object(), {1, 2}, b"bytes"])
def test_values_that_are_not_json_are_refused(value):
    with pytest.raises(AuditError):
        _canonical({"x": value})


def test_actions_follow_the_grammar():
    for good in ("login", "record.update", "auth.login_failed", "a.b.c"):
        assert audittrail.ACTION.match(good)
    for bad in ("", "Login", "record.", ".x", "record..x", "a-b", "record.update\n", "记录"):
        assert not audittrail.ACTION.fullmatch(bad)


def _canonical_by_value(value):
    """The canonical form worked out a value at a time (what the list fast paths must equal)."""
    if isinstance(value, list):
        return [_canonical_by_value(v) for v in value]
    return _canonical(value)


@pytest.mark.parametrize(
    "column",
    [
        ["a", None, "c"],
        [True, False, None],
        [0, 7, 4200, -15, 10**20],
        [1, "1", None, 2.5, True],
        [["x", "y"], [], None],
        [{"a": 1}, {"$n": "1"}],
    ],
)
def test_a_column_hashes_as_its_values_one_by_one(column):
    """Grouped entries hold columns; their fast paths give the per-value canonical form."""
    assert _canonical(column) == _canonical_by_value(column)
    assert _canonical({"values": {"f": column}}) == {"values": {"f": _canonical_by_value(column)}}


@pytest.mark.parametrize(
    "value",
    [
        {"ids": ["a"], "values": {"n": [1, None, "x", True]}},
        {"nested": [[1, 2], {"k": ["v"]}]},
        {"t": (1, 2)},
        {1: "int key"},
        {"f": [0.5, 1e300]},
        {"b": [True, 1]},
    ],
)
def test_a_value_is_kept_as_its_json_text_reads_back(value):
    """``_json`` skips decoding only where decoding would give the same value."""
    import json

    stored, text = audittrail._json(value, "changes")
    assert stored == json.loads(text)
    assert type(stored) is dict


def test_grouped_changes_read_as_records_in_either_form():
    columns = audittrail.group_changes(["i1", "i2"], {"name": ["a", "b"], "city": [None, "x"]})
    assert columns == {"ids": ["i1", "i2"], "values": {"name": ["a", "b"], "city": [None, "x"]}}
    expected = {"i1": {"name": "a", "city": None}, "i2": {"name": "b", "city": "x"}}
    assert audittrail.group_members(columns) == expected
    # Entries written before decision 0015 are keyed by record id.
    assert audittrail.group_members(expected) == expected


@pytest.mark.parametrize(
    "entry",
    [
        ENTRY,
        {**ENTRY, "record_id": None, "ip": None, "actor_id": None},
        {**ENTRY, "changes": {"note": '"prev_hash":"' + GENESIS + '"'}, "detail": None},
        {**ENTRY, "actor_name": '"prev_hash":"' + GENESIS + '"'},
    ],
)
def test_an_entry_hashed_before_its_link_is_known_hashes_the_same(entry):
    """Appends hash all but ``prev_hash`` before taking the chain's lock."""
    pending = audittrail._PendingHash(entry)
    for prev_hash in (GENESIS, "f" * 64):
        assert pending.hexdigest(prev_hash) == entry_hash(entry, prev_hash)


@pytest.mark.parametrize("value", [0, 7, -7, 10, 4200, -15, 10**20, 2**63 - 1, -(2**63)])
def test_integer_columns_hash_as_decimal_numbers(value):
    assert audittrail._integer_text(value) == (
        format(__import__("decimal").Decimal(value).normalize(), "E") if value else "0"
    )


def test_the_text_around_the_link_is_the_canonical_form():
    """PostgreSQL hashes ``before + prev_hash + after``: the same bytes Python hashes."""
    before, after = audittrail._hashed_text(ENTRY)
    link = "ab" * 32
    expected = entry_hash(ENTRY, link)
    assert hashlib.sha256(before + link.encode() + after).hexdigest() == expected
    assert before.endswith(b'"prev_hash":"') and after.startswith(b'","record_id":')
    loose = {**ENTRY, "record_id": None}
    before, after = audittrail._hashed_text(loose)
    assert after == b'","record_id":null}'
    assert hashlib.sha256(before + link.encode() + after).hexdigest() == entry_hash(loose, link)


GROUPED_COLUMNS = [
    {"name": ['a "quoted" 名字', "b\\c", "tab\there"], "flag": [True, None, False]},
    {"employees": [0, -4200, 10**30], "name": ["x", "y", "z"]},
    {"empty": [], "nulls": [None, None, None]},
]


@pytest.mark.parametrize("columns", GROUPED_COLUMNS)
def test_a_grouped_entry_written_a_column_at_a_time_hashes_and_stores_as_the_general_path(
    columns,
):
    """The grouped entry's texts made per column (decision record 0018) are the bytes the
    general path makes: the same hash, and stored JSON that reads back as the value."""
    ids = [str(uuid.UUID(int=n)) for n in range(3)]
    changes = audittrail.group_changes(ids, columns)
    stored, canonical = audittrail._grouped_texts(changes)
    assert canonical == json.dumps(_canonical(changes), **audittrail._CANONICAL_JSON)
    assert json.loads(stored) == changes
    prepared = audittrail._prepare(
        action="record.create",
        actor_id=ENTRY["actor_id"],
        actor_name="importer",
        entity="lead",
        changes=changes,
        detail={"version": 1, "records": 3},
        at=ENTRY["at"],
    )
    assert prepared["changes_json"] == stored
    general = {**prepared, "changes_canonical": None}
    assert entry_hash(prepared, GENESIS) == entry_hash(general, GENESIS)


@pytest.mark.parametrize(
    "columns",
    [{"amount": [1.5, 2.0]}, {"mixed": [1, "one"]}, {"$n": ["x"]}, {"pair": [["a", 1]]}],
)
def test_a_grouped_entry_with_other_values_takes_the_general_path(columns):
    assert audittrail._grouped_texts(audittrail.group_changes(["a"], columns)) is None


def test_a_nul_in_a_grouped_entry_is_refused():
    changes = audittrail.group_changes(["a"], {"name": ["nul \x00 here"]})
    with pytest.raises(AuditError, match="NUL"):
        audittrail.prepare(
            [{"action": "record.create", "actor_id": None, "actor_name": "x", "changes": changes}]
        )
