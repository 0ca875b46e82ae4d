"""The record service on both backends: validation, audit and outbox, concurrency, recycle bin."""

from __future__ import annotations

import copy
import datetime as dt
import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from metacrm.metadata.expression import EvalContext
from metacrm.runtime import audittrail, metastore, records, tenancy
from metacrm.runtime.records import Caller, RecordInvalid, RecordNotFound, VersionMismatch
from metacrm.runtime.store import audit, outbox

CALLER = Caller(uuid.UUID("00000000-0000-7000-8000-000000000001"), "tester@example.com")


@pytest.fixture
def tenant(platform):
    """A core tenant with two extra fields on deal: a formula and an encrypted note."""
    created = tenancy.create_tenant(platform, f"r{uuid.uuid4().hex[:9]}", "Records")
    store = platform.store(created.tenant)
    with store.connect() as connection:
        bundle = copy.deepcopy(metastore.current(connection).bundle)
    deal = next(e for e in bundle["entities"] if e["name"] == "deal")
    deal["fields"] += [
        {
            "name": "weighted",
            "type": "formula",
            "label": {"en": "Weighted"},
            "expression": "amount * probability / 100",
            "result_type": "decimal",
        },
        {"name": "secret_note", "type": "encrypted_text", "label": {"en": "Secret"}},
        {
            "name": "partners",
            "type": "many_to_many",
            "target": "customer",
            "label": {"en": "Partners"},
        },
    ]
    deal["validation_rules"] = [
        {
            "name": "closed_needs_date",
            "expression": 'stage != "won" or closed_on is not null',
            "message": {"en": "A won deal needs a close date"},
        }
    ]
    metastore.publish(store, bundle, expected_version=1)
    return platform, store


def run(tenant, operation, *args: Any, **kwargs: Any) -> Any:
    platform, store = tenant
    with store.begin(immediate=True) as connection:
        model = platform.models.current(store, connection)
        entity = model.entity(args[0])
        return operation(connection, model, entity, *args[1:], **kwargs)


def create(tenant, entity: str, data: dict[str, Any]) -> dict[str, Any]:
    platform, _ = tenant
    return run(tenant, records.create, entity, data, CALLER, platform.cipher)


def counts(tenant) -> tuple[int, int]:
    _, store = tenant
    with store.connect() as connection:
        return (
            connection.execute(sa.select(sa.func.count()).select_from(audit)).scalar_one(),
            connection.execute(sa.select(sa.func.count()).select_from(outbox)).scalar_one(),
        )


def customer(tenant, **extra: Any) -> dict[str, Any]:
    return create(tenant, "customer", {"name": "上海华联贸易有限公司", "kind": "company", **extra})


def test_create_applies_defaults_numbers_and_system_columns(tenant):
    c = customer(tenant)
    deal = create(
        tenant, "deal", {"name": "Big", "customer": c["id"], "amount": "1200.5", "probability": 50}
    )
    assert deal["number"] == "D-00001"
    assert deal["stage"] == "lead"  # the field's default
    assert deal["amount"] == "1200.50"
    assert deal["weighted"] == "600.25" or deal["weighted"].startswith("600.25")
    assert deal["owner_id"] == str(CALLER.user_id) and deal["version"] == 1
    assert deal["created_at"].endswith("Z")
    assert create(tenant, "deal", {"name": "Next", "customer": c["id"]})["number"] == "D-00002"


def test_every_problem_of_a_payload_is_reported_and_nothing_stored(tenant):
    before = counts(tenant)
    with pytest.raises(RecordInvalid) as info:
        create(
            tenant,
            "deal",
            {
                "id": str(uuid.uuid4()),
                "owner_id": str(uuid.uuid4()),
                "number": "D-9",
                "weighted": 1,
                "bogus": 1,
                "amount": "abc",
                "stage": "nope",
                "probability": 101,
                "customer": str(uuid.uuid4()),
                "expected_close_on": "2024-13-01",
            },
        )
    pointers = {e["pointer"]: e["message"] for e in info.value.errors}
    assert set(pointers) == {
        "/id",
        "/owner_id",
        "/number",
        "/weighted",
        "/bogus",
        "/amount",
        "/stage",
        "/probability",
        "/customer",
        "/expected_close_on",
        "/name",
    }
    assert "set by the platform" in pointers["/owner_id"]
    assert "computed" in pointers["/weighted"]
    assert "no live customer" in pointers["/customer"]
    assert counts(tenant) == before


def test_update_with_optimistic_concurrency_and_audit(tenant):
    platform, _ = tenant
    c = customer(tenant, level="normal")
    record_id = uuid.UUID(c["id"])
    updated = run(
        tenant,
        records.update,
        "customer",
        record_id,
        {"level": "vip"},
        CALLER,
        platform.cipher,
        expected_version=1,
    )
    assert updated["level"] == "vip" and updated["version"] == 2
    with pytest.raises(VersionMismatch) as info:
        run(
            tenant,
            records.update,
            "customer",
            record_id,
            {"level": "gold"},
            CALLER,
            platform.cipher,
            expected_version=1,
        )
    assert info.value.current == 2
    _, store = tenant
    with store.connect() as connection:
        entry = (
            connection.execute(sa.select(audit).where(audit.c.action == "record.update"))
            .mappings()
            .one()
        )
        event = (
            connection.execute(sa.select(outbox).where(outbox.c.event == "record.update"))
            .mappings()
            .one()
        )
    assert entry["changes"] == {"level": ["normal", "vip"]}
    assert entry["actor_name"] == CALLER.name
    assert event["payload"]["changes"] == {"level": ["normal", "vip"]}


def test_no_change_makes_no_version(tenant):
    platform, _ = tenant
    c = customer(tenant, level="vip")
    same = run(
        tenant,
        records.update,
        "customer",
        uuid.UUID(c["id"]),
        {"level": "vip"},
        CALLER,
        platform.cipher,
    )
    assert same["version"] == 1


def test_audit_or_outbox_failure_stores_nothing(tenant, monkeypatch):
    before = counts(tenant)
    original = records._write_logs

    def broken(c, logs, **options):
        original(c, logs, **options)
        raise sa.exc.OperationalError("INSERT INTO _outbox", {}, Exception("disk full"))

    monkeypatch.setattr(records, "_write_logs", broken)
    with pytest.raises(sa.exc.OperationalError):
        customer(tenant)
    monkeypatch.setattr(records, "_write_logs", original)
    assert counts(tenant) == before
    _, store = tenant
    from .conftest import rows

    assert rows(store, "customer", "name") == []


def _make_customer_email_unique(tenant) -> None:
    _, store = tenant
    with store.connect() as connection:
        current = metastore.current(connection)
    bundle = copy.deepcopy(current.bundle)
    customer_doc = next(e for e in bundle["entities"] if e["name"] == "customer")
    next(f for f in customer_doc["fields"] if f["name"] == "email")["unique"] = True
    metastore.publish(store, bundle, expected_version=current.version)


def test_unique_values_get_a_clear_error(tenant):
    c = customer(tenant)
    create(tenant, "deal", {"name": "A", "customer": c["id"]})
    _make_customer_email_unique(tenant)
    customer(tenant, email="a@x.example")
    with pytest.raises(RecordInvalid) as info:
        customer(tenant, email="a@x.example")
    assert info.value.errors[0]["pointer"] == "/email"
    assert "unique" in info.value.errors[0]["message"]


def test_a_unique_clash_past_the_checks_is_refused_by_the_bulk_write(tenant, monkeypatch):
    """A race the unique check cannot see (COPY on PostgreSQL, executemany on SQLite)
    is the constraint's refusal, told as a field error, and stores nothing."""
    platform, _ = tenant
    _make_customer_email_unique(tenant)
    customer(tenant, email="raced@x.example")
    before = counts(tenant)
    monkeypatch.setattr(records, "_check_unique", lambda c, rows: [])
    items = [{"name": "a", "email": "free@x.example"}, {"name": "b", "email": "raced@x.example"}]
    with pytest.raises(RecordInvalid) as info:
        run(tenant, records.create_many, "customer", items, CALLER, platform.cipher, bulk=True)
    if tenant[1].dialect == "postgresql":  # the error names the constraint
        expected = {"pointer": "/email", "message": "must be unique; another record has this value"}
    else:  # SQLite names the columns only
        expected = {
            "pointer": "/",
            "message": "the change conflicts with other records (a constraint refused it)",
        }
    assert info.value.errors == [expected]
    assert counts(tenant) == before


def test_a_unique_clash_past_the_checks_is_refused_by_a_single_create(tenant, monkeypatch):
    """The row goes in one pipeline with its event, entry and read: a constraint's refusal
    there is the same field error, and nothing of the pipeline is kept."""
    _make_customer_email_unique(tenant)
    customer(tenant, email="raced@x.example")
    before = counts(tenant)
    monkeypatch.setattr(records, "_check_unique", lambda c, rows: [])
    with pytest.raises(RecordInvalid) as info:
        customer(tenant, email="raced@x.example")
    if tenant[1].dialect == "postgresql":
        assert info.value.errors == [
            {"pointer": "/email", "message": "must be unique; another record has this value"}
        ]
    assert counts(tenant) == before
    _, store = tenant
    from .conftest import rows

    assert rows(store, "customer", "email").count(("raced@x.example",)) == 1


def test_a_rule_broken_by_a_single_update_stores_nothing(tenant):
    platform, _ = tenant
    deal = create(tenant, "deal", {"name": "A", "customer": customer(tenant)["id"]})
    before = counts(tenant)
    with pytest.raises(RecordInvalid) as info:
        run(
            tenant,
            records.update,
            "deal",
            uuid.UUID(deal["id"]),
            {"stage": "won", "amount": 10},
            CALLER,
            platform.cipher,
            expected_version=1,
        )
    assert {e["message"] for e in info.value.errors} == {"A won deal needs a close date"}
    assert counts(tenant) == before
    _, store = tenant
    with store.connect() as connection:
        model = platform.models.current(store, connection)
        ctx = EvalContext(now=dt.datetime.now(dt.UTC), today=dt.date.today())
        stored = records.get(connection, model, model.entity("deal"), uuid.UUID(deal["id"]), ctx)
    assert stored["version"] == 1 and stored["stage"] == deal["stage"]


def test_concurrent_single_writes_keep_one_chain(tenant):
    """Creates and updates from several threads: every write is logged once, the chain
    never forks, and each update of a record sees the version the last one left."""
    platform, store = tenant
    shared = customer(tenant, level="normal")
    before = counts(tenant)
    threads, each = 4, 6
    barrier = threading.Barrier(threads)
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            barrier.wait()
            for i in range(each):
                mine = customer(tenant, email=f"w{n}-{i}@x.example")
                run(
                    tenant,
                    records.update,
                    "customer",
                    uuid.UUID(mine["id"]),
                    {"level": "vip"},
                    CALLER,
                    platform.cipher,
                    expected_version=1,
                )
                # All threads update one record too: without a version each waits its turn.
                run(
                    tenant,
                    records.update,
                    "customer",
                    uuid.UUID(shared["id"]),
                    {"city": f"{n}-{i}"},
                    CALLER,
                    platform.cipher,
                )
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures, failures
    writes = threads * each * 3
    assert counts(tenant) == (before[0] + writes, before[1] + writes)
    with store.connect() as connection:
        assert audittrail.verify(connection).ok
        versions = connection.execute(
            sa.select(audit.c.detail).where(
                audit.c.record_id == uuid.UUID(shared["id"]), audit.c.action == "record.update"
            )
        ).scalars()
        assert sorted(d["version"] for d in versions) == list(range(2, threads * each + 2))


def test_a_grouped_create_writes_one_audit_entry_and_one_event(tenant):
    """Imports pass ``grouped``: the batch's records share one entry and one event."""
    platform, store = tenant
    before = counts(tenant)
    items = [
        {"name": "g1", "email": "g1@x.example"},
        {"name": "g2", "kind": "company"},
        {"name": "g3", "lifetime_value": "12.50", "tags": ["a"]},
    ]
    made = run(
        tenant,
        records.create_many,
        "customer",
        items,
        CALLER,
        platform.cipher,
        bulk=True,
        returning=False,
        grouped=True,
    )
    assert counts(tenant) == (before[0] + 1, before[1] + 1)
    with store.connect() as connection:
        entry = connection.execute(sa.select(audit).order_by(audit.c.seq.desc())).first()
        event = connection.execute(sa.select(outbox).order_by(outbox.c.id.desc())).first()
        assert audittrail.verify(connection).ok
    ids = [m["id"] for m in made]
    assert entry.action == "record.create" and entry.record_id is None
    assert entry.entity == "customer" and entry.detail == {"version": 1, "records": 3}
    assert audittrail.is_grouped(entry._mapping)
    # In columns: the ids once, each field's name once with its values in id order.
    assert entry.changes["ids"] == ids
    assert entry.changes["values"]["name"] == ["g1", "g2", "g3"]
    assert entry.changes["values"]["email"] == ["g1@x.example", None, None]
    members = audittrail.group_members(entry.changes)
    assert list(members) == ids
    # The values each record was created with, defaults included.
    assert members[ids[0]].items() >= {"name": "g1", "email": "g1@x.example"}.items()
    assert members[ids[0]]["kind"] == "company"
    assert members[ids[2]]["lifetime_value"] in ("12.50", "12.5")
    assert members[ids[2]]["tags"] == ["a"]
    assert event.event == "record.create" and event.record_id is None
    assert event.payload == {"entity": "customer", "ids": ids, "operation": "create", "version": 1}
    # One record alone keeps an entry of its own, grouped or not.
    run(
        tenant,
        records.create_many,
        "customer",
        [{"name": "g4"}],
        CALLER,
        platform.cipher,
        grouped=True,
    )
    with store.connect() as connection:
        single = connection.execute(sa.select(audit).order_by(audit.c.seq.desc())).first()
    assert single.record_id is not None and single.changes["name"] == [None, "g4"]


def _deals(customer_id: str, count: int) -> list[dict[str, Any]]:
    return [
        {
            "name": f"d{i}",
            "customer": customer_id,
            "amount": f"{i}.50",
            "probability": i % 101,
            "expected_close_on": "2026-03-04",
            "secret_note": f"secret {i}",
            "stage": "lead",
        }
        for i in range(count)
    ]


def test_a_grouped_create_of_many_records_writes_an_entry_per_500_in_columns(tenant):
    """An import batch of 1,200 deals: entries of 500, 500 and 200 records, each in columns."""
    platform, store = tenant
    c = customer(tenant)
    partner = customer(tenant, name="Partner")
    items = _deals(c["id"], 1200)
    items[5]["partners"] = [partner["id"]]
    before = counts(tenant)
    made = run(
        tenant,
        records.create_many,
        "deal",
        items,
        CALLER,
        platform.cipher,
        bulk=True,
        returning=False,
        grouped=True,
    )
    assert counts(tenant) == (before[0] + 3, before[1] + 3)
    ids = [m["id"] for m in made]
    assert ids == sorted(ids) and len(set(ids)) == 1200  # counted up from one UUIDv7
    with store.connect() as connection:
        entries = connection.execute(sa.select(audit).order_by(audit.c.seq.desc()).limit(3)).all()[
            ::-1
        ]
        events = connection.execute(sa.select(outbox).order_by(outbox.c.id.desc()).limit(3)).all()
        assert audittrail.verify(connection).ok
        model = platform.models.current(store, connection)
        fifth = records.get(connection, model, model.entity("deal"), uuid.UUID(ids[5]), _ctx())
    assert [e.detail["records"] for e in entries] == [500, 500, 200]
    assert [e.changes["ids"] for e in entries] == [ids[:500], ids[500:1000], ids[1000:]]
    assert sorted(len(e.payload["ids"]) for e in events) == [200, 500, 500]
    values = entries[0].changes["values"]
    assert values["secret_note"][:2] == [records.MASK, records.MASK]  # never the plaintext
    assert values["amount"][:2] in (["0.50", "1.50"], ["0.5", "1.5"])
    assert values["expected_close_on"][0] == "2026-03-04"
    assert values["number"][:2] == ["D-00001", "D-00002"]
    assert values["partners"][5] == [partner["id"]] and values["partners"][4] is None
    assert fifth["name"] == "d5" and fifth["number"] == "D-00006"
    with store.connect() as connection:
        note = records.decrypt_field(
            connection, model.entity("deal"), uuid.UUID(ids[7]), "secret_note", platform.cipher
        )
    assert note == "secret 7"


def test_a_refused_grouped_create_stores_nothing_and_the_transaction_goes_on(tenant):
    """A rule checked after the rows went in: no row, entry or event of the batch is left."""
    platform, store = tenant
    c = customer(tenant)
    items = _deals(c["id"], 700)
    items[650]["stage"] = "won"  # a won deal needs a close date (the entity's rule)
    before = counts(tenant)
    with store.begin() as connection:
        model = platform.models.current(store, connection)
        deal = model.entity("deal")
        with pytest.raises(RecordInvalid) as info:
            records.create_many(
                connection,
                model,
                deal,
                items,
                CALLER,
                platform.cipher,
                bulk=True,
                returning=False,
                grouped=True,
            )
        assert info.value.errors == [
            {"pointer": "/650", "message": "A won deal needs a close date"}
        ]
        stored = connection.execute(sa.select(sa.func.count()).select_from(deal.table))
        assert stored.scalar_one() == 0
        made = records.create_many(
            connection,
            model,
            deal,
            items[:2],
            CALLER,
            platform.cipher,
            bulk=True,
            returning=False,
            grouped=True,
        )
    assert len(made) == 2
    assert counts(tenant) == (before[0] + 1, before[1] + 1)


def test_a_record_is_found_in_grouped_entries_of_either_form(tenant):
    """about_record reads the columns and the entries written before them (keyed by id)."""
    platform, store = tenant
    made = run(
        tenant,
        records.create_many,
        "customer",
        [{"name": "k1"}, {"name": "k2"}],
        CALLER,
        platform.cipher,
        bulk=True,
        returning=False,
        grouped=True,
    )
    old_id = str(uuid.uuid4())
    with store.begin() as connection:
        audittrail.append(
            connection,
            action="record.create",
            actor_id=CALLER.user_id,
            actor_name=CALLER.name,
            entity="customer",
            changes={old_id: {"name": "old"}},
            detail={"version": 1, "records": 1},
        )
    with store.connect() as connection:
        for wanted, expected in ((made[1]["id"], "k2"), (old_id, "old")):
            found = connection.execute(
                sa.select(audit).where(audittrail.about_record(uuid.UUID(wanted)))
            ).all()
            assert len(found) == 1
            assert audittrail.group_members(found[0].changes)[wanted]["name"] == expected
        missing = connection.execute(
            sa.select(audit).where(audittrail.about_record(uuid.uuid4()))
        ).all()
        assert missing == []


def test_bulk_unique_checks_name_taken_and_repeated_values_per_row(tenant):
    platform, _ = tenant
    _make_customer_email_unique(tenant)
    taken = customer(tenant, email="taken@x.example")
    before = counts(tenant)
    items = [{"name": f"c{i}", "email": f"free{i}@x.example"} for i in range(600)]
    items[3]["email"] = "taken@x.example"
    items[550]["email"] = items[10]["email"]  # a repeat in another chunk of 500
    with pytest.raises(RecordInvalid) as info:
        run(tenant, records.create_many, "customer", items, CALLER, platform.cipher, bulk=True)
    assert info.value.errors == [
        {"pointer": "/550/email", "message": "repeats the value of /10/email"},
        {"pointer": "/3/email", "message": f"must be unique; record {taken['id']} already has it"},
    ]
    assert counts(tenant) == before
    # A record keeping its own value is not a clash with itself.
    updated = run(
        tenant,
        records.update,
        "customer",
        uuid.UUID(taken["id"]),
        {"email": "taken@x.example", "city": "Hangzhou"},
        CALLER,
        platform.cipher,
    )
    assert updated["city"] == "Hangzhou"


def test_lookup_to_a_deleted_record_is_refused(tenant):
    platform, _ = tenant
    c = customer(tenant)
    run(tenant, records.delete_many, "customer", [(uuid.UUID(c["id"]), None)], CALLER)
    with pytest.raises(RecordInvalid, match="no live customer"):
        create(tenant, "deal", {"name": "A", "customer": c["id"]})


def test_recycle_bin_restore_and_purge(tenant):
    platform, _ = tenant
    c = customer(tenant)
    record_id = uuid.UUID(c["id"])
    with pytest.raises(RecordNotFound):
        run(tenant, records.purge, "customer", record_id, CALLER)  # not in the bin yet
    run(tenant, records.delete_many, "customer", [(record_id, 1)], CALLER)
    ctx = _ctx()
    with pytest.raises(RecordNotFound):
        run(tenant, records.get, "customer", record_id, ctx)
    assert run(tenant, records.get, "customer", record_id, ctx, deleted=True)["deleted_at"]
    restored = run(tenant, records.restore, "customer", record_id, CALLER)
    assert restored["deleted_at"] is None and restored["version"] == 3
    run(tenant, records.delete_many, "customer", [(record_id, None)], CALLER)
    run(tenant, records.purge, "customer", record_id, CALLER)
    with pytest.raises(RecordNotFound):
        run(tenant, records.get, "customer", record_id, ctx, deleted=True)


def _ctx():
    import datetime as dt

    from metacrm.metadata.expression import EvalContext

    now = dt.datetime.now(dt.UTC)
    return EvalContext(now=now, today=now.date(), user_id=CALLER.user_id, team_ids=())


def test_purge_refused_while_a_restricting_lookup_points_at_it(tenant):
    c = customer(tenant)
    create(tenant, "deal", {"name": "A", "customer": c["id"]})  # deal.customer restricts
    run(tenant, records.delete_many, "customer", [(uuid.UUID(c["id"]), None)], CALLER)
    with pytest.raises(RecordInvalid, match="restricts deletion"):
        run(tenant, records.purge, "customer", uuid.UUID(c["id"]), CALLER)


def test_validation_rule_and_stage_requirements(tenant):
    c = customer(tenant)
    with pytest.raises(RecordInvalid) as info:
        create(tenant, "deal", {"name": "A", "customer": c["id"], "stage": "won", "amount": 10})
    assert {e["message"] for e in info.value.errors} == {"A won deal needs a close date"}
    with pytest.raises(RecordInvalid) as info:
        create(tenant, "deal", {"name": "A", "customer": c["id"], "stage": "lost"})
    assert info.value.errors[0]["pointer"] == "/lost_reason"
    deal = create(
        tenant,
        "deal",
        {"name": "A", "customer": c["id"], "stage": "won", "amount": 10, "closed_on": "2024-05-01"},
    )
    assert deal["stage"] == "won"


def test_encrypted_field_is_stored_as_ciphertext_and_masked(tenant):
    platform, store = tenant
    c = customer(tenant)
    deal = create(tenant, "deal", {"name": "A", "customer": c["id"], "secret_note": "密码 1234"})
    assert deal["secret_note"] == "********"
    with store.connect() as connection:
        model = platform.models.current(store, connection)
        stored = connection.execute(
            sa.select(model.entity("deal").table.c.secret_note)
        ).scalar_one()
        assert "1234" not in stored
        assert (
            records.decrypt_field(
                connection,
                model.entity("deal"),
                uuid.UUID(deal["id"]),
                "secret_note",
                platform.cipher,
            )
            == "密码 1234"
        )
        changes = connection.execute(
            sa.select(audit.c.changes).where(audit.c.entity == "deal")
        ).scalar_one()
    assert changes["secret_note"] == [None, "********"]


def test_relations_and_related_to(tenant):
    a, b = customer(tenant), customer(tenant, name="王芳", kind="person")
    deal = create(
        tenant, "deal", {"name": "A", "customer": a["id"], "partners": [a["id"], b["id"]]}
    )
    assert deal["partners"] == [a["id"], b["id"]]
    task = create(
        tenant, "task", {"subject": "Call", "related_to": {"entity": "deal", "id": deal["id"]}}
    )
    assert task["related_to"] == {"entity": "deal", "id": deal["id"]}
    with pytest.raises(RecordInvalid, match="entity must be one of"):
        create(tenant, "task", {"subject": "x", "related_to": {"entity": "task", "id": a["id"]}})


def test_bulk_create_is_all_or_nothing_with_row_pointers(tenant):
    platform, store = tenant
    items = [{"name": "A", "kind": "company"}, {"kind": "company"}, {"name": "C", "level": "x"}]
    with pytest.raises(RecordInvalid) as info:
        run(tenant, records.create_many, "customer", items, CALLER, platform.cipher, bulk=True)
    assert {e["pointer"] for e in info.value.errors} == {"/1/name", "/2/level"}
    from .conftest import rows

    assert rows(store, "customer", "name") == []


def test_caught_refusal_inside_a_transaction_leaves_nothing(tenant):
    """The stage rule fails after the row was written; the write undoes itself."""
    platform, store = tenant
    c = customer(tenant)
    deal = create(tenant, "deal", {"name": "A", "customer": c["id"]})
    before = counts(tenant)
    with store.begin(immediate=True) as connection:
        model = platform.models.current(store, connection)
        with pytest.raises(RecordInvalid, match="lost_reason"):
            records.update(
                connection,
                model,
                model.entity("deal"),
                uuid.UUID(deal["id"]),
                {"stage": "lost"},
                CALLER,
                platform.cipher,
            )
    again = run(tenant, records.get, "deal", uuid.UUID(deal["id"]), _ctx())
    assert (again["stage"], again["version"]) == ("lead", 1)
    assert counts(tenant) == before


def test_auto_numbers_are_unique_under_concurrent_creates(tenant):
    platform, _ = tenant
    c = customer(tenant)
    numbers: list[str] = []
    failures: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                numbers.append(create(tenant, "deal", {"name": "x", "customer": c["id"]})["number"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert sorted(numbers) == [f"D-{n:05d}" for n in range(1, 21)]


# -- bulk creates read a field at a time ------------------------------------------------------

BATCHES = {
    "every row alike": [
        {"name": f"n{i}", "kind": "person", "lifetime_value": "12.50", "city": "杭州"}
        for i in range(4)
    ],
    "gaps and defaults": [
        {"name": "a", "tags": ["x", "y"], "lifetime_value": 7},
        {"name": "b", "level": "vip", "next_follow_up_on": "2026-02-03"},
        {"name": "c", "email": "c@x.example", "last_contacted_at": "2026-01-02T03:04:05+08:00"},
    ],
    "a row with nothing but its name": [{"name": "a"}, {"name": "b", "kind": "person"}],
}

#: Batches the column reading leaves to the payload-by-payload reading (all but the
#: first have a problem it words).
LEFT_TO_EACH = {
    "a null": [{"name": "a"}, {"name": "b", "city": None}],
    "an unknown option": [{"name": "a", "kind": "robot"}, {"name": "b"}],
    "a long text": [{"name": "a" * 201}, {"name": "b"}],
    "a required field left out": [{"name": "a"}, {"city": "x"}],
    "an empty required field": [{"name": ""}, {"name": "b"}],
    "an unknown field": [{"name": "a", "nmae": "x"}, {"name": "b"}],
    "a system field": [{"name": "a", "owner_id": str(uuid.uuid4())}, {"name": "b"}],
    "a negative amount": [{"name": "a", "lifetime_value": "-1"}, {"name": "b"}],
    "not an object": [{"name": "a"}, ["name", "b"]],
}


def _both_ways(tenant, items):
    platform, store = tenant
    with store.begin() as connection:
        model = platform.models.current(store, connection)
        c = records._context(connection, model, model.entity("customer"), CALLER, platform.cipher)
        batch = records._validate_batch(c, items)
        one_by_one = [
            records._validate(c, data, creating=True, pointer=f"/{i}")
            for i, data in enumerate(items)
        ]
    return batch, one_by_one


@pytest.mark.parametrize("case", sorted(BATCHES))
def test_a_batch_read_by_columns_equals_reading_each_payload(tenant, case):
    batch, one_by_one = _both_ways(tenant, BATCHES[case])
    assert batch is not None
    assert all(not errors for _, errors in one_by_one)
    # The same values, keys in the same order (the audit trail keeps that order).
    assert [list(v.items()) for v in batch] == [list(v.items()) for v, _ in one_by_one]


@pytest.mark.parametrize("case", sorted(LEFT_TO_EACH))
def test_a_batch_with_any_problem_is_left_to_the_payload_by_payload_reading(tenant, case):
    batch, one_by_one = _both_ways(tenant, LEFT_TO_EACH[case])
    assert batch is None
    assert any(errors for _, errors in one_by_one) == (case != "a null")


def _import(tenant, text: str, batch: int) -> tuple[int, int]:
    import io

    from metacrm.runtime import importer

    platform, store = tenant
    with store.begin() as connection:
        model = platform.models.current(store, connection)
        entity = model.entity("customer")
        _, rows = importer.csv_rows(entity, io.StringIO(text, newline=""))
        return importer.import_rows(
            connection, model, entity, rows, CALLER, platform.cipher, batch=batch
        )


def test_an_import_reading_ahead_lists_problems_in_file_order_and_stores_nothing(tenant):
    """Each batch's next one is read while the server stores it; errors keep the file's order."""
    from metacrm.runtime import importer

    lines = ["name,email"] + [f"c{i},c{i}@x.example" for i in range(10)]
    lines[4] = "c3,not-an-email"
    lines[9] = "c8,c8@x.example,extra"
    lines[10] = ",c9@x.example"
    before = counts(tenant)
    with pytest.raises(importer.ImportRefused) as info:
        _import(tenant, "\n".join(lines) + "\n", batch=3)
    assert [e["row"] for e in info.value.errors] == [5, 10, 11]
    assert info.value.rows_read == 10 and info.value.complete
    assert counts(tenant) == before
    read, created = _import(tenant, "\n".join(["name"] + [f"ok{i}" for i in range(7)]), batch=3)
    assert (read, created) == (7, 7)
    assert counts(tenant) == (before[0] + 3, before[1] + 3)  # entries of 3, 3 and 1 records


def test_an_import_batch_whose_audit_fails_stores_nothing(tenant, monkeypatch):
    """The grouped column path writes its entries through the same writer; a failure there
    takes the batch's rows and event with it."""
    platform, store = tenant
    before = counts(tenant)

    def broken(connection, prepared):
        raise sa.exc.OperationalError("INSERT INTO _audit", {}, Exception("disk full"))

    monkeypatch.setattr(audittrail, "append_prepared", broken)
    with pytest.raises(sa.exc.OperationalError):
        run(
            tenant,
            records.create_many,
            "customer",
            [{"name": f"f{i}"} for i in range(600)],
            CALLER,
            platform.cipher,
            bulk=True,
            returning=False,
            grouped=True,
        )
    monkeypatch.undo()
    assert counts(tenant) == before
    with store.connect() as connection:
        model = platform.models.current(store, connection)
        table = model.entity("customer").table
        stored = connection.execute(
            sa.select(sa.func.count()).select_from(table).where(table.c.name.like("f%"))
        ).scalar_one()
    assert stored == 0


# -- imports: batches read ahead of their write (decision record 0018) ---------------------------


def _import_rows(tenant, entity: str, rows, batch: int) -> tuple[int, int]:
    from metacrm.runtime import importer

    platform, store = tenant
    with store.begin() as connection:
        model = platform.models.current(store, connection)
        return importer.import_rows(
            connection, model, model.entity(entity), rows, CALLER, platform.cipher, batch=batch
        )


def _deal_rows(customer_id: str, count: int):
    from metacrm.runtime.importer import Row

    return [Row(i + 2, payload) for i, payload in enumerate(_deals(customer_id, count))]


def test_a_batch_read_ahead_is_created_as_its_payloads_would_be(tenant):
    platform, store = tenant
    c = customer(tenant)
    items = _deals(c["id"], 30)
    with store.begin() as connection:
        model = platform.models.current(store, connection)
        deal = model.entity("deal")
        ahead = records.read_ahead(connection, model, deal, items, CALLER, platform.cipher)
        made = records.create_many(
            connection, model, deal, ahead, CALLER, platform.cipher, bulk=True, grouped=True
        )
        with pytest.raises(TypeError):
            records.create_many(connection, model, deal, ahead, CALLER, platform.cipher)
    assert [(m["name"], m["amount"], m["stage"]) for m in made] == [
        (f"d{i}", f"{i}.50", "lead") for i in range(30)
    ]
    # The caller's id as owner, creator and updater of every row (binary COPY sends it once).
    assert {(m["owner_id"], m["created_by"], m["updated_by"]) for m in made} == {
        (str(CALLER.user_id),) * 3
    }
    assert len({m["id"] for m in made}) == 30


def test_a_batch_read_ahead_with_bad_payloads_is_refused_in_its_turn_with_worded_errors(tenant):
    platform, store = tenant
    c = customer(tenant)
    items = _deals(c["id"], 5)
    items[3]["probability"] = "most"
    before = counts(tenant)
    with store.begin() as connection:
        model = platform.models.current(store, connection)
        deal = model.entity("deal")
        ahead = records.read_ahead(connection, model, deal, items, CALLER, platform.cipher)
        assert ahead.columns is None  # the per-row path reads it in its turn
        with pytest.raises(RecordInvalid) as info:
            records.create_many(
                connection, model, deal, ahead, CALLER, platform.cipher, bulk=True, grouped=True
            )
    assert [e["pointer"] for e in info.value.errors] == ["/3/probability"]
    assert counts(tenant) == before


def test_an_import_refused_after_batches_were_stored_leaves_nothing(tenant):
    """Batches of 100: batch 2 refused by a check, batch 4 by a rule run in SQL after its
    COPY; every batch is still checked, and no row, entry or event is left."""
    from metacrm.runtime import importer

    platform, store = tenant
    c = customer(tenant)
    rows = _deal_rows(c["id"], 450)
    rows[150].payload["probability"] = "most"
    rows[320].payload["stage"] = "won"  # a won deal needs a close date
    before = counts(tenant)
    with pytest.raises(importer.ImportRefused) as info:
        _import_rows(tenant, "deal", rows, 100)
    assert [(e["pointer"], e["row"]) for e in info.value.errors] == [
        ("/rows/152/probability", 152),
        ("/rows/322", 322),
    ]
    assert info.value.rows_read == 450 and info.value.complete
    assert counts(tenant) == before
    with store.connect() as connection:
        model = platform.models.current(store, connection)
        stored = connection.execute(
            sa.select(sa.func.count()).select_from(model.entity("deal").table)
        )
        assert stored.scalar_one() == 0


def test_an_import_whose_file_fails_during_a_copy_leaves_nothing_and_the_transaction_goes_on(
    tenant,
):
    """The next batch is read while a COPY is open: a read that fails ends the COPY, the
    import's savepoint is rolled back, and the caller's transaction is usable."""
    from metacrm.runtime import importer

    platform, store = tenant
    c = customer(tenant)
    rows = _deal_rows(c["id"], 250)

    def broken():
        yield from rows
        raise OSError("the upload was cut off")

    before = counts(tenant)
    with store.begin() as connection:
        model = platform.models.current(store, connection)
        deal = model.entity("deal")
        with pytest.raises(OSError, match="cut off"):
            importer.import_rows(
                connection, model, deal, broken(), CALLER, platform.cipher, batch=100
            )
        stored = connection.execute(sa.select(sa.func.count()).select_from(deal.table))
        assert stored.scalar_one() == 0
        read, created = importer.import_rows(
            connection, model, deal, rows[:120], CALLER, platform.cipher, batch=100
        )
    assert (read, created) == (120, 120)
    assert counts(tenant) == (before[0] + 2, before[1] + 2)
    with store.connect() as connection:
        assert audittrail.verify(connection).ok
