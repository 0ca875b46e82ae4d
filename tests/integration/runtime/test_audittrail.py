"""The hash-chained audit trail and in-app notifications, on SQLite and PostgreSQL.

Tampering is done the way an attacker with database access would: plain SQL
on ``_audit``. Each kind (changed, deleted, reordered, inserted) must be
found and located by ``seq`` and id.
"""

from __future__ import annotations

import copy
import datetime as dt
import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from metacrm.runtime import audittrail, metastore, notifications, records
from metacrm.runtime.records import Caller
from metacrm.runtime.store import (
    TenantStore,
    audit,
    audit_head,
    notification,
    notification_read,
)

ALICE = uuid.UUID("00000000-0000-7000-8000-0000000000a1")
BOB = uuid.UUID("00000000-0000-7000-8000-0000000000b2")
MESSAGE = {"en": "A login from a new address", "zh-CN": "来自新地址的登录"}


def add(store: TenantStore, count: int, **extra: Any) -> list[dict[str, Any]]:
    entries = []
    for i in range(count):
        with store.begin() as connection:
            entries.append(
                audittrail.append(
                    connection,
                    action=extra.get("action", "auth.login"),
                    actor_id=ALICE,
                    actor_name="alice@example.com",
                    ip="203.0.113.7",
                    detail={"n": i, "ratio": 0.1 * i, "big": 10**20, "float": 1e300, "ok": True},
                )
            )
    return entries


def log(store: TenantStore) -> list[dict[str, Any]]:
    with store.connect() as connection:
        return [
            dict(r) for r in connection.execute(sa.select(audit).order_by(audit.c.seq)).mappings()
        ]


def verify(store: TenantStore) -> audittrail.Report:
    with store.connect() as connection:
        return audittrail.verify(connection)


def unguard(connection: sa.Connection, store: TenantStore) -> None:
    """Remove the append-only trigger, as someone with the database's admin rights could."""
    if store.dialect == "postgresql":
        connection.exec_driver_sql(
            f'ALTER TABLE "{store.schema}"._audit DISABLE TRIGGER _audit_append_only'
        )
    else:
        connection.exec_driver_sql("DROP TRIGGER IF EXISTS _audit_no_update")
        connection.exec_driver_sql("DROP TRIGGER IF EXISTS _audit_no_delete")


def tamper(store: TenantStore, *statements: Any) -> None:
    with store.begin() as connection:
        unguard(connection, store)
        for statement in statements:
            connection.execute(statement)


def kinds(report: audittrail.Report) -> list[tuple[str, int | None]]:
    return [(p.kind, p.seq) for p in report.problems]


# -- appending and verifying -----------------------------------------------------------------


def test_untouched_log_verifies_and_chains_from_genesis(store):
    entries = add(store, 5)
    stored = log(store)
    # Tenant creation published version 1: the first entry of the chain.
    assert stored[0]["action"] == "meta.create" and stored[0]["prev_hash"] == audittrail.GENESIS
    assert [e["seq"] for e in stored] == list(range(1, 7))
    for before, after in zip(stored, stored[1:], strict=False):
        assert after["prev_hash"] == before["hash"]
    assert stored[-1]["hash"] == entries[-1]["hash"]
    # JSONB gives 1e300 back as a 301-digit integer; the hash must not care.
    assert float(stored[-1]["detail"]["float"]) == 1e300
    report = verify(store)
    assert report.ok, report.problems
    assert (report.entries, report.head_seq, report.head_hash) == (6, 6, entries[-1]["hash"])


def test_hash_covers_every_field(store):
    (entry,) = add(store, 1)
    for name, value in [
        ("actor_name", "mallory@example.com"),
        ("action", "auth.logout"),
        ("ip", "198.51.100.1"),
        ("entity", "customer"),
        ("actor_id", BOB),
        ("record_id", BOB),
        ("at", entry["at"] + dt.timedelta(microseconds=1)),
        ("detail", {"n": 0}),
        ("changes", {"name": [None, "x"]}),
    ]:
        forged = {**entry, name: value}
        assert audittrail.entry_hash(forged, entry["prev_hash"]) != entry["hash"], name
    assert audittrail.entry_hash(entry, audittrail.GENESIS) != entry["hash"]


@pytest.mark.parametrize(
    "arguments",
    [
        {"action": "Record.Update"},
        {"action": "record update"},
        {"action": "x" * 41},
        {"action": "record.update;drop"},
        {"actor_name": "a" * 255},
        {"ip": "1" * 46},
        {"detail": {"bad": float("nan")}},
        {"detail": {"bad": object()}},
        {"changes": {"name": [None, "nul\x00byte"]}},
        {"at": dt.datetime(2026, 1, 1)},
    ],
)
def test_malformed_entries_are_refused_and_store_nothing(store, arguments):
    before = log(store)
    values = {"action": "auth.login", "actor_id": ALICE, "actor_name": "alice", **arguments}
    with pytest.raises(audittrail.AuditError), store.begin() as connection:
        audittrail.append(connection, **values)
    assert log(store) == before
    assert verify(store).ok


def test_append_many_chains_in_order_and_checks_everything_first(store):
    before = log(store)
    good = {"action": "record.create", "actor_id": ALICE, "actor_name": "a", "entity": "customer"}
    with pytest.raises(audittrail.AuditError), store.begin() as connection:
        audittrail.append_many(connection, [good, good, {**good, "action": "BAD"}])
    assert log(store) == before
    with store.begin() as connection:
        assert audittrail.append_many(connection, []) == []
        made = audittrail.append_many(
            connection, [{**good, "record_id": uuid.uuid4(), "detail": {"i": i}} for i in range(5)]
        )
    assert [e["seq"] for e in made] == list(range(len(before) + 1, len(before) + 6))
    assert made[0]["prev_hash"] == before[-1]["hash"]
    assert [e["detail"]["i"] for e in log(store)[-5:]] == list(range(5))
    assert verify(store).ok


def test_the_entries_insert_is_compiled_once(store):
    """Its JSON-text parameters have a cache key, so SQLAlchemy keeps the compiled INSERT."""
    compiled: list[object] = []

    def seen(connection, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO") and "_audit (" in statement:
            compiled.append(context.compiled)

    good = {"action": "record.create", "actor_id": ALICE, "actor_name": "a", "entity": "customer"}
    sa.event.listen(store.engine, "before_cursor_execute", seen)
    try:
        for _ in range(2):
            with store.begin() as connection:
                audittrail.append_many(connection, [good, {**good, "detail": {"n": 1}}])
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", seen)
    assert len(compiled) == 2 and compiled[0] is compiled[1]
    assert verify(store).ok


def test_a_rolled_back_write_leaves_no_entry_and_the_chain_goes_on(store):
    add(store, 2)
    before = log(store)
    with pytest.raises(RuntimeError), store.begin() as connection:
        audittrail.append(connection, action="record.create", actor_id=ALICE, actor_name="a")
        raise RuntimeError("the change failed after its audit entry")
    assert log(store) == before
    (entry,) = add(store, 1)
    assert entry["seq"] == before[-1]["seq"] + 1 and entry["prev_hash"] == before[-1]["hash"]
    assert verify(store).ok


def test_concurrent_appends_never_fork_the_chain(store):
    threads, each = 6, 8
    barrier = threading.Barrier(threads)
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            barrier.wait()
            for i in range(each):
                with store.begin() as connection:
                    audittrail.append(
                        connection,
                        action="record.update",
                        actor_id=ALICE,
                        actor_name=f"writer {n}",
                        detail={"i": i},
                    )
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures, failures
    stored = log(store)
    assert [e["seq"] for e in stored] == list(range(1, threads * each + 2))
    assert len({e["prev_hash"] for e in stored}) == len(stored)  # no two share a predecessor
    assert verify(store).ok


def test_an_append_waits_for_the_open_transaction_before_it(store, backend):
    """The second writer links to the first one's entry, not to the same predecessor."""
    add(store, 1)
    started, release = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def first() -> None:
        with store.begin() as connection:
            results["first"] = audittrail.append(
                connection, action="record.create", actor_id=ALICE, actor_name="first"
            )
            started.set()
            release.wait(10)

    def second() -> None:
        started.wait(10)
        with store.begin() as connection:
            results["second"] = audittrail.append(
                connection, action="record.create", actor_id=BOB, actor_name="second"
            )

    a, b = threading.Thread(target=first), threading.Thread(target=second)
    a.start()
    b.start()
    b.join(0.5)
    assert b.is_alive(), "the second append did not wait for the first transaction"
    release.set()
    a.join()
    b.join()
    assert results["second"]["prev_hash"] == results["first"]["hash"]
    assert results["second"]["seq"] == results["first"]["seq"] + 1
    assert verify(store).ok


# -- tampering, each kind ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        audit.update().values(actor_name="someone else"),
        audit.update().where(audit.c.seq == 2).values(seq=99),
        audit.delete().where(audit.c.seq == 2),
        audit.delete(),
    ],
    ids=["update", "renumber", "delete-one", "delete-all"],
)
def test_the_database_refuses_to_change_or_delete_entries(store, statement):
    add(store, 2)
    before = log(store)
    with pytest.raises(sa.exc.DatabaseError) as info, store.begin() as connection:
        connection.execute(statement)
    assert "append-only" in str(info.value)
    assert log(store) == before


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_truncate_is_refused_on_postgresql(store):
    """SQLite has no TRUNCATE; its DELETE without WHERE is refused above."""
    add(store, 1)
    before = log(store)
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.begin() as connection:
        connection.exec_driver_sql(f'TRUNCATE "{store.schema}"._audit')
    assert log(store) == before


def test_a_changed_entry_is_named(store):
    entries = add(store, 4)
    target = entries[1]
    tamper(
        store,
        audit.update().where(audit.c.seq == target["seq"]).values(actor_name="someone else"),
    )
    report = verify(store)
    assert kinds(report) == [("changed", target["seq"])]
    assert str(target["id"]) in report.problems[0].message


def test_an_edited_link_is_named_as_such(store):
    entries = add(store, 3)
    target = entries[1]
    tamper(store, audit.update().where(audit.c.seq == target["seq"]).values(prev_hash="a" * 64))
    report = verify(store)
    assert kinds(report) == [("changed", target["seq"])]
    assert "prev_hash was edited" in report.problems[0].message


def test_a_changed_json_value_is_named(store):
    entries = add(store, 3)
    target = entries[0]
    tamper(
        store,
        audit.update()
        .where(audit.c.seq == target["seq"])
        .values(detail={**target["detail"], "n": 99}),
    )
    assert kinds(verify(store)) == [("changed", target["seq"])]


def test_a_changed_and_rehashed_entry_breaks_the_next_link(store):
    entries = add(store, 4)
    target = dict(entries[1], actor_name="someone else")
    tamper(
        store,
        audit.update()
        .where(audit.c.seq == target["seq"])
        .values(
            actor_name=target["actor_name"],
            hash=audittrail.entry_hash(target, target["prev_hash"]),
        ),
    )
    report = verify(store)
    assert kinds(report) == [("missing", target["seq"] + 1)]
    assert f"seq {target['seq']} was changed" in report.problems[0].message


def test_a_deleted_entry_is_named(store):
    entries = add(store, 5)
    gone = entries[2]["seq"]
    tamper(store, audit.delete().where(audit.c.seq == gone))
    report = verify(store)
    assert kinds(report) == [("missing", gone + 1)]
    assert f"seq {gone} to {gone} are missing" in report.problems[0].message


def test_a_deleted_entry_with_seq_closed_up_is_found(store):
    entries = add(store, 5)
    gone = entries[2]["seq"]
    tamper(
        store,
        audit.delete().where(audit.c.seq == gone),
        audit.update().where(audit.c.seq > gone).values(seq=audit.c.seq + 1000),
        audit.update().where(audit.c.seq > 1000).values(seq=audit.c.seq - 1001),
        audit_head.update().values(seq=audit_head.c.seq - 1),
    )
    report = verify(store)
    assert kinds(report) == [("missing", gone)]
    assert "deleted" in report.problems[0].message


def test_deleted_first_entries_are_found(store):
    add(store, 3)
    tamper(store, audit.delete().where(audit.c.seq <= 2))
    assert kinds(verify(store)) == [("missing", 3)]


def test_deleted_last_entries_are_found_through_the_head(store):
    entries = add(store, 4)
    tamper(store, audit.delete().where(audit.c.seq >= entries[-2]["seq"]))
    report = verify(store)
    assert kinds(report) == [("missing", entries[-1]["seq"])]
    assert f"entries after seq {entries[-3]['seq']} are missing" in report.problems[0].message


def test_reordered_entries_are_named(store):
    entries = add(store, 5)
    x, y = entries[1]["seq"], entries[2]["seq"]
    tamper(
        store,
        audit.update().where(audit.c.seq == x).values(seq=-1),
        audit.update().where(audit.c.seq == y).values(seq=x),
        audit.update().where(audit.c.seq == -1).values(seq=y),
    )
    report = verify(store)
    assert {p.kind for p in report.problems} == {"reordered"}
    assert ("reordered", x) in kinds(report) and ("reordered", y) in kinds(report)
    first = next(p for p in report.problems if p.seq == x)
    assert f"follows seq {y} in the chain" in first.message


def test_an_inserted_entry_is_named(store):
    entries = add(store, 4)
    # A forger with the code: a well-formed entry that links to its predecessor,
    # slipped in between seq a and b by moving the later entries up by one.
    a = entries[1]
    forged: dict[str, Any] = {
        "id": uuid.uuid4(),
        "at": a["at"] + dt.timedelta(seconds=1),
        "actor_id": BOB,
        "actor_name": "bob@example.com",
        "action": "auth.login",
        "entity": None,
        "record_id": None,
        "changes": None,
        "detail": None,
        "ip": None,
        "prev_hash": a["hash"],
    }
    forged["hash"] = audittrail.entry_hash(forged, a["hash"])
    forged["seq"] = a["seq"] + 1
    tamper(
        store,
        audit.update().where(audit.c.seq > a["seq"]).values(seq=audit.c.seq + 1000),
        audit.update().where(audit.c.seq > 1000).values(seq=audit.c.seq - 999),
        audit.insert().values(**forged),
        audit_head.update().values(seq=audit_head.c.seq + 1),
    )
    report = verify(store)
    assert kinds(report) == [("inserted", forged["seq"])]
    assert str(forged["id"]) in report.problems[0].message


def test_an_inserted_entry_with_a_made_up_link_is_named(store):
    entries = add(store, 3)
    a = entries[0]
    forged = {
        "seq": a["seq"] + 1,
        "id": uuid.uuid4(),
        "at": a["at"],
        "actor_id": None,
        "actor_name": "x",
        "action": "auth.login",
        "entity": None,
        "record_id": None,
        "changes": None,
        "detail": None,
        "ip": None,
        "prev_hash": "f" * 64,
        "hash": "e" * 64,
    }
    tamper(
        store,
        audit.update().where(audit.c.seq > a["seq"]).values(seq=audit.c.seq + 1000),
        audit.update().where(audit.c.seq > 1000).values(seq=audit.c.seq - 999),
        audit.insert().values(**forged),
        audit_head.update().values(seq=audit_head.c.seq + 1),
    )
    report = verify(store)
    assert ("inserted", forged["seq"]) in kinds(report)
    assert ("changed", forged["seq"]) in kinds(report)
    assert all(p.kind != "missing" for p in report.problems)


def test_an_entry_appended_outside_the_trail_is_found_through_the_head(store):
    entries = add(store, 2)
    last = entries[-1]
    forged = {
        "id": uuid.uuid4(),
        "at": last["at"],
        "actor_id": None,
        "actor_name": "x",
        "action": "auth.login",
        "entity": None,
        "record_id": None,
        "changes": None,
        "detail": None,
        "ip": None,
    }
    forged_hash = audittrail.entry_hash(forged, last["hash"])
    tamper(
        store,
        audit.insert().values(
            **forged, seq=last["seq"] + 1, prev_hash=last["hash"], hash=forged_hash
        ),
    )
    assert kinds(verify(store)) == [("inserted", last["seq"])]


def test_renumbered_seq_with_intact_links_is_named(store):
    entries = add(store, 3)
    tamper(
        store,
        audit.update().where(audit.c.seq == entries[-1]["seq"]).values(seq=50),
        audit_head.update().values(seq=50),
    )
    assert kinds(verify(store)) == [("changed", 50)]


# -- what appends the entries -----------------------------------------------------------------


def test_record_writes_and_metadata_changes_are_audited(platform, store):
    caller = Caller(ALICE, "alice@example.com")
    with store.begin() as connection:
        model = platform.models.current(store, connection)
        customer = model.entity("customer")
        created = records.create(
            connection, model, customer, {"name": "Acme"}, caller, platform.cipher
        )
        record_id = uuid.UUID(created["id"])
        records.update(
            connection, model, customer, record_id, {"name": "Acme Ltd"}, caller, platform.cipher
        )
        records.delete_many(connection, model, customer, [(record_id, None)], caller)
        records.restore(connection, model, customer, record_id, caller)
        records.delete_many(connection, model, customer, [(record_id, None)], caller)
        records.purge(connection, model, customer, record_id, caller)
    with store.connect() as connection:
        bundle = copy.deepcopy(metastore.current(connection).bundle)
    entity = next(e for e in bundle["entities"] if e["name"] == "customer")
    entity["fields"].append({"name": "nickname", "type": "text", "label": {"en": "Nickname"}})
    metastore.publish(store, bundle, expected_version=1, comment="add one")
    metastore.rollback(store, 1, expected_version=2, comment="undo", confirm_destructive=True)
    stored = log(store)
    actions = [e["action"] for e in stored]
    assert actions == [
        "meta.create",
        "record.create",
        "record.update",
        "record.delete",
        "record.restore",
        "record.delete",
        "record.purge",
        "meta.publish",
        "meta.rollback",
    ]
    update = stored[2]
    assert update["changes"]["name"] == ["Acme", "Acme Ltd"]
    assert update["record_id"] == record_id and update["entity"] == "customer"
    assert update["actor_id"] == ALICE and update["detail"] == {"version": 2}
    publish, rollback = stored[-2], stored[-1]
    assert publish["detail"]["version"] == 2 and publish["detail"]["comment"] == "add one"
    assert rollback["detail"] == {
        "version": 3,
        "previous_version": 2,
        "comment": "undo",
        "operations": rollback["detail"]["operations"],
        "to_version": 1,
    }
    assert verify(store).ok


def test_a_bulk_write_takes_the_audit_lock_after_its_row_locks(platform, store):
    """A single write holding a row of a bulk write, then appending, must not deadlock."""
    caller = Caller(ALICE, "alice@example.com")
    with store.begin() as connection:
        model = platform.models.current(store, connection)
        customer = model.entity("customer")
        ids = [
            uuid.UUID(
                records.create(
                    connection, model, customer, {"name": f"C{i}"}, caller, platform.cipher
                )["id"]
            )
            for i in range(2)
        ]
    holding, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def single() -> None:
        try:
            with store.begin() as connection:
                connection.execute(
                    customer.table.update().where(customer.table.c.id == ids[1]).values(city="X")
                )
                holding.set()
                release.wait(10)
                audittrail.append(connection, action="record.update", actor_id=BOB, actor_name="b")
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    def bulk() -> None:
        try:
            holding.wait(10)
            with store.begin(immediate=True) as connection:
                records.update_many(
                    connection,
                    model,
                    customer,
                    [(ids[0], {"city": "A"}, None), (ids[1], {"city": "B"}, None)],
                    caller,
                    platform.cipher,
                    bulk=True,
                )
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=single), threading.Thread(target=bulk)]
    for t in threads:
        t.start()
    threads[1].join(0.5)  # the bulk write is now waiting for the second row
    release.set()
    for t in threads:
        t.join()
    assert not failures, failures
    assert [e["action"] for e in log(store)[-3:]] == ["record.update"] * 3
    assert verify(store).ok


def test_a_refused_publish_appends_nothing(store):
    before = log(store)
    with pytest.raises(metastore.VersionConflict):
        metastore.publish(store, {"format": 1}, expected_version=7)
    assert log(store) == before


def test_upgrading_the_namespace_keeps_the_chain_and_the_guard(store):
    add(store, 2)
    before = log(store)
    store.upgrade_platform_tables()
    store.upgrade_platform_tables()
    assert log(store) == before
    (entry,) = add(store, 1)
    assert entry["prev_hash"] == before[-1]["hash"]
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.begin() as connection:
        connection.execute(audit.delete())
    assert verify(store).ok


def test_a_namespace_without_a_head_starts_it_from_the_log(store):
    add(store, 2)
    tamper(store, audit_head.delete())
    (entry,) = add(store, 1)
    assert entry["seq"] == 4
    assert verify(store).ok


# -- notifications ----------------------------------------------------------------------------


def test_notify_and_read_per_member(store):
    with store.begin() as connection:
        (to_alice,) = notifications.notify(
            connection, [ALICE, ALICE], kind="auth.new_ip", message=MESSAGE, link="/t/x/audit"
        )
        to_admins = notifications.notify_admins(connection, kind="export.mass", message=MESSAGE)
    with store.connect() as connection:
        alice = notifications.inbox(connection, ALICE, {"manage_users"})
        bob = notifications.inbox(connection, BOB, set())
        bob_admin = notifications.inbox(connection, BOB, {"manage_users", "view_audit"})
    assert [n.id for n in alice] == [to_admins, to_alice]
    assert bob == []
    assert [n.id for n in bob_admin] == [to_admins]
    assert alice[1].message == MESSAGE and alice[1].link == "/t/x/audit"
    with store.begin() as connection:
        assert notifications.mark_read(connection, BOB, {"manage_users"}, [to_alice]) == 0
        assert notifications.mark_read(connection, BOB, {"manage_users"}, [to_admins]) == 1
        assert notifications.mark_read(connection, BOB, {"manage_users"}, [to_admins]) == 0
    with store.connect() as connection:
        # Bob reading the admins' alert does not read it for Alice.
        assert notifications.unread_count(connection, ALICE, {"manage_users"}) == 2
        assert notifications.unread_count(connection, BOB, {"manage_users"}) == 0
        unread = notifications.inbox(connection, ALICE, {"manage_users"}, unread_only=True)
        assert len(unread) == 2
        page = notifications.inbox(connection, ALICE, {"manage_users"}, limit=1)
        rest = notifications.inbox(connection, ALICE, {"manage_users"}, before=page[0].id)
        assert [n.id for n in page + rest] == [to_admins, to_alice]
        assert notifications.addressed_to(connection, to_alice, ALICE, set())
        assert not notifications.addressed_to(connection, to_alice, BOB, {"manage_users"})
    with store.begin() as connection:
        assert notifications.mark_read(connection, ALICE, {"manage_users"}) == 2
    with store.connect() as connection:
        assert notifications.unread_count(connection, ALICE, {"manage_users"}) == 0


@pytest.mark.parametrize(
    "arguments",
    [
        {"kind": "Bad Kind"},
        {"kind": "k" * 64},
        {"message": {"en": "only English"}},
        {"message": {"en": "x", "zh-CN": "y", "fr": "z"}},
        {"message": {"en": "", "zh-CN": "空"}},
        {"message": {"en": "x" * 2001, "zh-CN": "y"}},
        {"message": {"en": "nul\x00", "zh-CN": "y"}},
        {"message": "text"},
        {"link": "https://evil.example/phish"},
        {"link": "//evil.example"},
        {"link": "/\\evil.example"},
        {"link": "/ok\r\nSet-Cookie: x"},
    ],
)
def test_malformed_notifications_are_refused(store, arguments):
    values = {"kind": "auth.new_ip", "message": MESSAGE, "link": None, **arguments}
    for send in (
        lambda c: notifications.notify(c, [ALICE], **values),
        lambda c: notifications.notify_admins(c, **values),
    ):
        with pytest.raises(notifications.NotificationError), store.begin() as connection:
            send(connection)
    with store.connect() as connection:
        assert (
            connection.execute(sa.select(sa.func.count()).select_from(notification)).scalar() == 0
        )
        assert (
            connection.execute(sa.select(sa.func.count()).select_from(notification_read)).scalar()
            == 0
        )


def test_audience_is_exactly_one_of_user_or_capability(store):
    with pytest.raises(sa.exc.IntegrityError), store.begin() as connection:
        connection.execute(
            notification.insert().values(
                id=uuid.uuid4(),
                created_at=dt.datetime.now(dt.UTC),
                user_id=ALICE,
                capability="manage_users",
                kind="x",
                message=MESSAGE,
            )
        )


def test_entry_values_are_compressed_with_lz4_where_postgresql_has_it(store):
    """An import's entries hold ~100 kB of JSON each; lz4 takes a fraction of pglz's time."""
    if store.dialect != "postgresql":
        assert store.schema is None  # SQLite keeps JSON as text, uncompressed
        return
    with store.connect() as connection:
        has_lz4 = connection.exec_driver_sql(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
        ).scalar_one()
        method = connection.exec_driver_sql(
            "SELECT attcompression FROM pg_attribute "
            f"WHERE attrelid = '\"{store.schema}\"._audit'::regclass AND attname = 'changes'"
        ).scalar_one()
    assert method == ("l" if has_lz4 else "")
