"""Every kind of metadata change, applied for real on SQLite and PostgreSQL.

Each refusal is checked to leave schema, data and metadata exactly as they were.
"""

from __future__ import annotations

import copy
import decimal
from typing import Any

import pytest
import sqlalchemy as sa

from metacrm.metadata.validation import BundleInvalid
from metacrm.runtime import metastore
from metacrm.runtime.migrator import DataCheckFailed
from metacrm.runtime.store import TenantStore

from .conftest import columns, indexes, insert, rows, snapshot


def lead(bundle: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in bundle["entities"] if e["name"] == "lead")


def field(bundle: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in lead(bundle)["fields"] if f["name"] == name)


def version(store: TenantStore) -> int:
    with store.connect() as connection:
        return metastore.current(connection).version


def publish(store: TenantStore, bundle: dict[str, Any], **kwargs: Any) -> metastore.Version:
    return metastore.publish(store, bundle, expected_version=version(store), **kwargs)


def refused(
    store: TenantStore, bundle: dict[str, Any], error: type[Exception], **kwargs: Any
) -> Exception:
    """Publish expecting a refusal; assert that nothing at all changed."""
    before = snapshot(store)
    before_version = version(store)
    with pytest.raises(error) as info:
        publish(store, bundle, **kwargs)
    assert snapshot(store) == before
    assert version(store) == before_version
    return info.value


def test_new_entity_creates_typed_table_with_system_columns(blank_store, minimal_bundle):
    minimal_bundle["entities"].append(
        {
            "name": "visit",
            "label": {"en": "Visit", "zh-CN": "拜访"},
            "plural_label": {"en": "Visits"},
            "title_field": "subject",
            "fields": [
                {"name": "subject", "type": "text", "label": {"en": "Subject"}, "required": True},
                {"name": "held_on", "type": "date", "label": {"en": "Held on"}, "indexed": True},
                {"name": "cost", "type": "currency", "label": {"en": "Cost"}},
                {
                    "name": "lead",
                    "type": "lookup",
                    "target": "lead",
                    "label": {"en": "Lead"},
                    "on_delete": "cascade",
                },
                {"name": "tags", "type": "tags", "label": {"en": "Tags"}},
                {
                    "name": "about",
                    "type": "related_to",
                    "targets": ["lead"],
                    "label": {"en": "About"},
                },
                {
                    "name": "peers",
                    "type": "many_to_many",
                    "target": "lead",
                    "label": {"en": "Peers"},
                },
            ],
        }
    )
    result = publish(blank_store, minimal_bundle)
    assert [op["kind"] for op in result.operations] == ["create_entity"]
    cols = columns(blank_store, "visit")
    assert {
        "id",
        "owner_id",
        "team_id",
        "created_at",
        "created_by",
        "updated_at",
        "updated_by",
        "version",
        "deleted_at",
    } <= set(cols)
    assert cols["subject"]["nullable"] is False
    assert {"about_entity", "about_id"} <= set(cols)
    assert "peers" not in cols
    assert "visit__peers" in _tables(blank_store)
    assert "ix_visit__held_on" in indexes(blank_store, "visit")
    assert "ix_visit__lead" in indexes(blank_store, "visit")


def _tables(store: TenantStore) -> list[str]:
    with store.connect() as connection:
        return sa.inspect(connection).get_table_names(schema=store.schema)


def test_lookup_foreign_key_cascades(blank_store, minimal_bundle):
    minimal_bundle["entities"].append(
        {
            "name": "note",
            "label": {"en": "Note"},
            "plural_label": {"en": "Notes"},
            "title_field": "body",
            "fields": [
                {"name": "body", "type": "text", "label": {"en": "Body"}},
                {
                    "name": "lead",
                    "type": "lookup",
                    "target": "lead",
                    "label": {"en": "Lead"},
                    "on_delete": "cascade",
                },
            ],
        }
    )
    publish(blank_store, minimal_bundle)
    (lead_id,) = insert(blank_store, "lead", {"name": "Acme"})
    insert(blank_store, "note", {"body": "hello", "lead": lead_id})
    with blank_store.begin() as connection:
        connection.execute(sa.text("DELETE FROM " + _q(blank_store, "lead")))
    assert rows(blank_store, "note", "body") == []


def _q(store: TenantStore, table: str) -> str:
    return f'"{store.schema}"."{table}"' if store.schema else f'"{table}"'


def test_add_relabel_and_reorder_fields(blank_store, minimal_bundle):
    insert(blank_store, "lead", {"name": "A"})
    lead(minimal_bundle)["fields"].append(
        {"name": "budget", "type": "decimal", "label": {"en": "Budget"}, "scale": 2}
    )
    field(minimal_bundle, "city")["label"] = {"en": "Town", "zh-CN": "城市"}
    fields = lead(minimal_bundle)["fields"]
    fields[1], fields[2] = fields[2], fields[1]
    result = publish(blank_store, minimal_bundle)
    kinds = [op["kind"] for op in result.operations]
    assert kinds == ["add_field", "update_field", "reorder_fields"]
    assert "budget" in columns(blank_store, "lead")
    assert rows(blank_store, "lead", "name", "budget") == [("A", None)]
    relabel = result.operations[1]
    assert relabel["description"] == "Relabel field 'lead.city' to 'Town'"


def test_adding_required_field_without_default_is_refused_on_a_filled_table(
    blank_store, minimal_bundle
):
    ids = insert(blank_store, "lead", {"name": "A"}, {"name": "B"})
    lead(minimal_bundle)["fields"].append(
        {"name": "region", "type": "text", "label": {"en": "Region"}, "required": True}
    )
    error = refused(blank_store, minimal_bundle, DataCheckFailed)
    (failure,) = error.failures
    assert failure.count == 2
    assert set(failure.sample_ids) == {str(i) for i in ids}


def test_adding_required_field_with_default_fills_existing_rows(blank_store, minimal_bundle):
    insert(blank_store, "lead", {"name": "A"})
    lead(minimal_bundle)["fields"].append(
        {
            "name": "region",
            "type": "text",
            "label": {"en": "Region"},
            "required": True,
            "default": "east",
        }
    )
    publish(blank_store, minimal_bundle)
    assert rows(blank_store, "lead", "region") == [("east",)]
    assert columns(blank_store, "lead")["region"]["nullable"] is False


def test_index_added_and_removed(blank_store, minimal_bundle):
    field(minimal_bundle, "city")["indexed"] = True
    lead(minimal_bundle)["indexes"] = [{"name": "by_city_score", "fields": ["city", "score"]}]
    publish(blank_store, minimal_bundle)
    assert {"ix_lead__city", "ix_lead__by_city_score"} <= set(indexes(blank_store, "lead"))
    field(minimal_bundle, "city")["indexed"] = False
    del lead(minimal_bundle)["indexes"]
    result = publish(blank_store, minimal_bundle)
    assert {op["kind"] for op in result.operations} == {"drop_index", "drop_field_index"}
    assert not {"ix_lead__city", "ix_lead__by_city_score"} & set(indexes(blank_store, "lead"))


def test_keyset_indexes_end_with_id_on_sqlite_only(blank_store, minimal_bundle):
    """SQLite reads ties in id order from the index; PostgreSQL sorts them (record 0020)."""
    publish(blank_store, minimal_bundle)
    tail = ["id"] if blank_store.schema is None else []
    assert indexes(blank_store, "lead")["ix_lead__created_at"]["column_names"] == [
        "created_at",
        *tail,
    ]
    # A composite index added by a later publish takes the same shape, and goes again.
    lead(minimal_bundle)["indexes"] = [{"name": "by_city_score", "fields": ["city", "score"]}]
    publish(blank_store, minimal_bundle)
    found = indexes(blank_store, "lead")
    assert found["ix_lead__by_city_score"]["column_names"] == ["city", "score", *tail]
    assert len([name for name in found if name == "ix_lead__by_city_score"]) == 1
    del lead(minimal_bundle)["indexes"]
    publish(blank_store, minimal_bundle)
    assert "ix_lead__by_city_score" not in indexes(blank_store, "lead")


def test_making_field_required_is_refused_with_count_and_sample_ids(blank_store, minimal_bundle):
    insert(blank_store, "lead", {"name": "A", "city": "Shanghai"})
    empty = insert(blank_store, "lead", {"name": "B"}, {"name": "C"})
    field(minimal_bundle, "city")["required"] = True
    error = refused(blank_store, minimal_bundle, DataCheckFailed)
    (failure,) = error.failures
    assert failure.count == 2
    assert sorted(failure.sample_ids) == sorted(str(i) for i in empty)
    assert "2 record(s) have no value in 'lead.city'" in failure.message


def test_making_field_required_with_default_fills_the_gaps(blank_store, minimal_bundle):
    insert(blank_store, "lead", {"name": "A", "city": "Shanghai"}, {"name": "B"})
    field(minimal_bundle, "city").update(required=True, default="Beijing")
    publish(blank_store, minimal_bundle)
    assert sorted(rows(blank_store, "lead", "city")) == [("Beijing",), ("Shanghai",)]
    assert columns(blank_store, "lead")["city"]["nullable"] is False
    # and back to optional
    field(minimal_bundle, "city")["required"] = False
    publish(blank_store, minimal_bundle)
    assert columns(blank_store, "lead")["city"]["nullable"] is True


def test_type_change_is_refused_with_the_rows_that_do_not_convert(blank_store, minimal_bundle):
    insert(blank_store, "lead", {"name": "A", "score": "12"})
    bad = insert(blank_store, "lead", {"name": "B", "score": "twelve"})
    field(minimal_bundle, "score").pop("max_length")
    field(minimal_bundle, "score")["type"] = "integer"
    error = refused(blank_store, minimal_bundle, DataCheckFailed)
    (failure,) = error.failures
    assert failure.count == 1
    assert failure.sample_ids == [str(bad[0])]
    assert "not a valid integer" in failure.message


def test_type_change_converts_the_data(blank_store, minimal_bundle):
    insert(
        blank_store,
        "lead",
        {"name": "A", "score": " 12 "},
        {"name": "B", "score": "-3"},
        {"name": "C"},
    )
    field(minimal_bundle, "score").pop("max_length")
    field(minimal_bundle, "score")["type"] = "integer"
    field(minimal_bundle, "score")["indexed"] = True
    publish(blank_store, minimal_bundle)
    assert sorted(rows(blank_store, "lead", "name", "score")) == [("A", 12), ("B", -3), ("C", None)]
    assert "ix_lead__score" in indexes(blank_store, "lead")
    field(minimal_bundle, "score")["type"] = "decimal"
    publish(blank_store, minimal_bundle)
    assert sorted(rows(blank_store, "lead", "name", "score"))[0] == ("A", decimal.Decimal("12"))


def test_shortening_a_text_is_checked_against_lengths(blank_store, minimal_bundle):
    insert(blank_store, "lead", {"name": "A", "city": "Ulaanbaatar"})
    field(minimal_bundle, "city")["max_length"] = 5
    refused(blank_store, minimal_bundle, DataCheckFailed)
    field(minimal_bundle, "city")["max_length"] = 20
    publish(blank_store, minimal_bundle)
    assert rows(blank_store, "lead", "city") == [("Ulaanbaatar",)]


def test_impossible_type_change_is_refused_before_touching_data(blank_store, minimal_bundle):
    field(minimal_bundle, "city")["type"] = "boolean"
    del field(minimal_bundle, "city")["label"]
    field(minimal_bundle, "city")["label"] = {"en": "City"}
    insert(blank_store, "lead", {"name": "A", "city": "x"})
    refused(blank_store, minimal_bundle, DataCheckFailed)
    field(minimal_bundle, "city")["type"] = "json"
    error = refused(blank_store, minimal_bundle, BundleInvalid)
    assert "cannot change from text to json" in error.problems[0].message


def test_removed_field_is_archived_with_its_data_then_restored(blank_store, minimal_bundle):
    insert(blank_store, "lead", {"name": "A", "city": "Hangzhou"})
    original = copy.deepcopy(minimal_bundle)
    lead(minimal_bundle)["fields"] = [
        f for f in lead(minimal_bundle)["fields"] if f["name"] != "city"
    ]
    result = publish(blank_store, minimal_bundle)
    assert [op["kind"] for op in result.operations] == ["archive_field"]
    with blank_store.connect() as connection:
        stored = metastore.current(connection).bundle
    assert field(stored, "city")["archived"] is True
    assert rows(blank_store, "lead", "city") == [("Hangzhou",)]
    result = publish(blank_store, original)
    assert [op["kind"] for op in result.operations] == ["restore_field"]
    with blank_store.connect() as connection:
        assert "archived" not in field(metastore.current(connection).bundle, "city")


def test_purge_needs_confirmation_then_drops_the_column(blank_store, minimal_bundle):
    insert(blank_store, "lead", {"name": "A", "city": "Hangzhou"})
    lead(minimal_bundle)["fields"] = [
        f for f in lead(minimal_bundle)["fields"] if f["name"] != "city"
    ]
    publish(blank_store, minimal_bundle)
    error = refused(
        blank_store, minimal_bundle, metastore.ConfirmationRequired, purge=["lead.city"]
    )
    assert [op.kind for op in error.plan.operations] == ["purge_field"]
    publish(blank_store, minimal_bundle, purge=["lead.city"], confirm_destructive=True)
    assert "city" not in columns(blank_store, "lead")
    assert rows(blank_store, "lead", "name") == [("A",)]


def test_purging_a_live_field_is_refused(blank_store, minimal_bundle):
    error = refused(
        blank_store, minimal_bundle, BundleInvalid, purge=["lead.city"], confirm_destructive=True
    )
    assert "must be archived before it is purged" in error.problems[0].message


def test_unique_is_refused_on_duplicates(blank_store, minimal_bundle):
    dupes = insert(blank_store, "lead", {"name": "A", "city": "X"}, {"name": "B", "city": "X"})
    insert(blank_store, "lead", {"name": "C", "city": "Y"})
    field(minimal_bundle, "city")["unique"] = True
    error = refused(blank_store, minimal_bundle, DataCheckFailed)
    assert error.failures[0].count == 1
    assert sorted(error.failures[0].sample_ids) == sorted(str(i) for i in dupes)


def test_new_lookup_on_existing_table(blank_store, minimal_bundle):
    (a,) = insert(blank_store, "lead", {"name": "A"})
    lead(minimal_bundle)["fields"].append(
        {"name": "referred_by", "type": "lookup", "target": "lead", "label": {"en": "Referred by"}}
    )
    publish(blank_store, minimal_bundle)
    insert(blank_store, "lead", {"name": "B", "referred_by": a})
    with pytest.raises(sa.exc.IntegrityError), blank_store.begin() as connection:
        connection.execute(
            sa.text(
                f"INSERT INTO {_q(blank_store, 'lead')} (id, name, referred_by, created_at, "
                "updated_at) VALUES (:i, 'C', :r, :t, :t)"
            ),
            {"i": _uuid(blank_store), "r": _uuid(blank_store), "t": "2024-01-01 00:00:00"},
        )


def _uuid(store: TenantStore) -> Any:
    import uuid

    value = uuid.uuid4()
    return value.hex if store.schema is None else value


def test_stale_expected_version_conflicts_and_changes_nothing(blank_store, minimal_bundle):
    field(minimal_bundle, "city")["indexed"] = True
    before = snapshot(blank_store)
    current = version(blank_store)
    with pytest.raises(metastore.VersionConflict) as info:
        metastore.publish(blank_store, minimal_bundle, expected_version=current - 1)
    assert info.value.current == current
    assert snapshot(blank_store) == before


def test_history_diff_and_rollback(blank_store, minimal_bundle):
    start = version(blank_store)
    insert(blank_store, "lead", {"name": "A"})
    lead(minimal_bundle)["fields"].append(
        {"name": "phone", "type": "phone", "label": {"en": "Phone"}}
    )
    publish(blank_store, minimal_bundle, comment="add phone")
    with blank_store.connect() as connection:
        history = metastore.history(connection)
        assert [v.version for v in history][:2] == [start + 1, start]
        assert history[0].comment == "add phone"
        plan = metastore.diff(connection, start, start + 1)
        assert [op.kind for op in plan.operations] == ["add_field"]
    result = metastore.rollback(blank_store, start, expected_version=start + 1)
    assert result.action == "rollback"
    assert [op["kind"] for op in result.operations] == ["archive_field"]
    assert "phone" in columns(blank_store, "lead")  # archived, data kept
    with blank_store.connect() as connection:
        assert field(metastore.current(connection).bundle, "phone")["archived"] is True


def test_failure_inside_ddl_rolls_everything_back(blank_store, minimal_bundle, monkeypatch):
    from metacrm.runtime import migrator

    lead(minimal_bundle)["fields"].append(
        {"name": "phone", "type": "phone", "label": {"en": "Phone"}}
    )
    field(minimal_bundle, "city")["indexed"] = True
    original = migrator._Applier.do_add_field_index

    def explode(self, op):
        original(self, op)
        raise RuntimeError("disk full")

    monkeypatch.setattr(migrator._Applier, "do_add_field_index", explode)
    refused(blank_store, minimal_bundle, RuntimeError)


def test_core_template_tables(store):
    cols = columns(store, "deal")
    assert cols["amount"]["type"].__class__.__name__ in ("NUMERIC", "FLOAT", "REAL")
    assert cols["customer"]["nullable"] is False
    assert "uq_deal__number" in indexes(store, "deal")
    with store.connect() as connection:
        fks = sa.inspect(connection).get_foreign_keys("contact", schema=store.schema)
    assert any(fk["referred_table"] == "customer" for fk in fks)


def test_on_delete_change_is_enforced(blank_store, minimal_bundle):
    minimal_bundle["entities"].append(
        {
            "name": "note",
            "label": {"en": "Note"},
            "plural_label": {"en": "Notes"},
            "title_field": "body",
            "fields": [
                {"name": "body", "type": "text", "label": {"en": "Body"}},
                {
                    "name": "lead",
                    "type": "lookup",
                    "target": "lead",
                    "label": {"en": "Lead"},
                    "on_delete": "restrict",
                },
            ],
        }
    )
    publish(blank_store, minimal_bundle)
    (lead_id,) = insert(blank_store, "lead", {"name": "Acme"})
    insert(blank_store, "note", {"body": "hello", "lead": lead_id})
    with pytest.raises(sa.exc.IntegrityError), blank_store.begin() as connection:
        connection.execute(sa.text("DELETE FROM " + _q(blank_store, "lead")))
    minimal_bundle["entities"][1]["fields"][1]["on_delete"] = "set_null"
    result = publish(blank_store, minimal_bundle)
    assert [op["kind"] for op in result.operations] == ["change_on_delete"]
    with blank_store.begin() as connection:
        connection.execute(sa.text("DELETE FROM " + _q(blank_store, "lead")))
    assert rows(blank_store, "note", "body", "lead") == [("hello", None)]


def test_many_to_many_added_to_existing_entity(blank_store, minimal_bundle):
    a, b = insert(blank_store, "lead", {"name": "A"}, {"name": "B"})
    lead(minimal_bundle)["fields"].append(
        {"name": "partners", "type": "many_to_many", "target": "lead", "label": {"en": "Partners"}}
    )
    result = publish(blank_store, minimal_bundle)
    assert [op["kind"] for op in result.operations] == ["add_relation"]
    with blank_store.begin() as connection:
        connection.execute(
            sa.text(
                f"INSERT INTO {_q(blank_store, 'lead__partners')} (source_id, target_id, "
                "created_at) VALUES (:a, :b, :t)"
            ),
            {"a": _key(blank_store, a), "b": _key(blank_store, b), "t": "2024-01-01 00:00:00"},
        )
        count = connection.execute(
            sa.text(f"SELECT count(*) FROM {_q(blank_store, 'lead__partners')}")
        ).scalar_one()
    assert count == 1


def _key(store: TenantStore, value: Any) -> Any:
    return value.hex if store.schema is None else value


def test_archived_entity_keeps_its_table_restores_and_purges(blank_store, minimal_bundle):
    minimal_bundle["entities"].append(
        {
            "name": "memo",
            "label": {"en": "Memo"},
            "plural_label": {"en": "Memos"},
            "title_field": "title",
            "fields": [{"name": "title", "type": "text", "label": {"en": "Title"}}],
        }
    )
    publish(blank_store, minimal_bundle)
    insert(blank_store, "memo", {"title": "keep me"})
    with_memo = copy.deepcopy(minimal_bundle)
    minimal_bundle["entities"].pop()
    assert [op["kind"] for op in publish(blank_store, minimal_bundle).operations] == [
        "archive_entity"
    ]
    assert rows(blank_store, "memo", "title") == [("keep me",)]
    assert [op["kind"] for op in publish(blank_store, with_memo).operations] == ["restore_entity"]
    publish(blank_store, minimal_bundle)
    refused(blank_store, minimal_bundle, metastore.ConfirmationRequired, purge=["memo"])
    publish(blank_store, minimal_bundle, purge=["memo"], confirm_destructive=True)
    assert "memo" not in _tables(blank_store)


def test_unique_composite_index_refused_on_duplicates(blank_store, minimal_bundle):
    insert(blank_store, "lead", {"name": "A", "city": "X"}, {"name": "A", "city": "X"})
    lead(minimal_bundle)["indexes"] = [
        {"name": "name_city", "fields": ["name", "city"], "unique": True}
    ]
    error = refused(blank_store, minimal_bundle, DataCheckFailed)
    assert error.failures[0].count == 1
    assert len(error.failures[0].sample_ids) == 2


def test_publishing_the_same_bundle_changes_nothing(blank_store, minimal_bundle):
    before = version(blank_store)
    result = publish(blank_store, minimal_bundle)
    assert result.version == before
    assert version(blank_store) == before


def test_purge_works_with_the_archived_field_still_in_the_bundle(blank_store, minimal_bundle):
    insert(blank_store, "lead", {"name": "A", "city": "Hangzhou"})
    field(minimal_bundle, "city")["archived"] = True
    result = publish(blank_store, minimal_bundle)
    assert [op["kind"] for op in result.operations] == ["archive_field"]
    with blank_store.connect() as connection:
        fetched = metastore.current(connection).bundle  # as a client would fetch and resend
    result = publish(blank_store, fetched, purge=["lead.city"], confirm_destructive=True)
    assert [op["kind"] for op in result.operations] == ["purge_field"]
    assert "city" not in columns(blank_store, "lead")


def test_diff_lists_archive_steps_without_spurious_reorders(blank_store, minimal_bundle):
    start = version(blank_store)
    lead(minimal_bundle)["fields"] = [
        f for f in lead(minimal_bundle)["fields"] if f["name"] != "score"
    ]
    publish(blank_store, minimal_bundle)
    with blank_store.connect() as connection:
        plan = metastore.diff(connection, start, start + 1)
    assert [op.kind for op in plan.operations] == ["archive_field"]


def _index_predicates(store: TenantStore, table: str) -> dict[str, str | None]:
    """Return each index of a table with the WHERE of its definition (None: whole table)."""
    with store.connect() as connection:
        if store.schema:
            found = connection.execute(
                sa.text(
                    "SELECT indexname, indexdef FROM pg_indexes "
                    "WHERE schemaname = :schema AND tablename = :table"
                ),
                {"schema": store.schema, "table": table},
            )
        else:
            found = connection.execute(
                sa.text(
                    "SELECT name, sql FROM sqlite_master "
                    "WHERE type = 'index' AND tbl_name = :table AND sql IS NOT NULL"
                ),
                {"table": table},
            )
        result = {}
        for name, definition in found:
            _, where, predicate = definition.partition(" WHERE ")
            result[name] = predicate.strip("() ").lower() if where else None
        return result


def test_list_indexes_hold_live_rows_and_unique_and_lookup_ones_every_row(
    blank_store, minimal_bundle
):
    field(minimal_bundle, "city")["indexed"] = True
    field(minimal_bundle, "score")["unique"] = True
    lead(minimal_bundle)["fields"].append(
        {"name": "referrer", "type": "lookup", "target": "lead", "label": {"en": "Referrer"}}
    )
    lead(minimal_bundle)["indexes"] = [{"name": "by_city_name", "fields": ["city", "name"]}]
    publish(blank_store, minimal_bundle)
    live, binned = "deleted_at is null", "deleted_at is not null"
    expected = {
        "ix_lead__owner_id": live,
        "ix_lead__created_at": live,
        "ix_lead__city": live,
        "ix_lead__by_city_name": live,
        "ix_lead__deleted_at": binned,
        "uq_lead__score": None,
        "ix_lead__referrer": None,
    }
    predicates = _index_predicates(blank_store, "lead")
    assert {name: predicates.get(name) for name in expected} == expected
    # SQLite rebuilds the table for a type change; its indexes come back the same.
    field(minimal_bundle, "score").pop("max_length")
    field(minimal_bundle, "score")["type"] = "integer"
    publish(blank_store, minimal_bundle)
    predicates = _index_predicates(blank_store, "lead")
    assert {name: predicates.get(name) for name in expected} == expected


def test_new_tables_lay_columns_out_fixed_widths_first(blank_store, minimal_bundle):
    def f(name: str, kind: str) -> dict[str, Any]:
        return {"name": name, "type": kind, "label": {"en": name}}

    minimal_bundle["entities"].append(
        {
            "name": "visit",
            "label": {"en": "Visit"},
            "plural_label": {"en": "Visits"},
            "title_field": "subject",
            "fields": [
                f("subject", "text"),
                f("seats", "integer"),
                f("note", "text"),
                f("due", "date"),
                f("vip", "boolean"),
                f("met_at", "datetime"),
            ],
        }
    )
    publish(blank_store, minimal_bundle)
    order = list(columns(blank_store, "visit"))
    assert order.index("updated_by") < order.index("created_at")  # UUIDs, then 8 bytes
    assert order.index("seats") < order.index("met_at") < order.index("version")  # 8, then 4
    assert order.index("version") < order.index("due") < order.index("vip")  # 4, then 1
    assert order.index("vip") < order.index("subject") < order.index("note")  # then the rest
    # A field added later goes to the end of the existing table.
    minimal_bundle["entities"][-1]["fields"].append(f("seen", "integer"))
    publish(blank_store, minimal_bundle)
    assert list(columns(blank_store, "visit"))[-1] == "seen"
