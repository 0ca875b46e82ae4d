"""How records become JSON on both backends: decimal formulas print alike, the fast row path
agrees with the mapping path, and formulas and filters are parsed once."""

from __future__ import annotations

import copy
import decimal
import uuid
from typing import Any

import pytest

from metacrm.metadata.validation import validate_bundle
from metacrm.runtime import metastore, model, query, records, recordview, tenancy
from metacrm.runtime.records import Caller

CALLER = Caller(uuid.UUID("00000000-0000-7000-8000-000000000001"), "tester@example.com")


def _formula(name: str, expression: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "formula",
        "label": {"en": name, "zh-CN": name},
        "expression": expression,
        "result_type": "decimal",
        **extra,
    }


ITEM = {
    "name": "item",
    "label": {"en": "Item", "zh-CN": "物品"},
    "plural_label": {"en": "Items", "zh-CN": "物品"},
    "title_field": "name",
    "fields": [
        {"name": "name", "type": "text", "label": {"en": "Name"}, "required": True},
        {
            "name": "amount",
            "type": "decimal",
            "label": {"en": "Amount"},
            "precision": 14,
            "scale": 2,
        },
        _formula("doubled", "amount * 2.5", scale=2),
        _formula("third", "amount / 3", scale=4),
        _formula("whole", "amount / 3", scale=0),
        _formula("plain", "amount * 2"),
    ],
}


@pytest.fixture
def tenant(platform):
    """A core tenant plus an entity with decimal formulas, with and without a scale."""
    created = tenancy.create_tenant(platform, f"v{uuid.uuid4().hex[:9]}", "Views")
    store = platform.store(created.tenant)
    with store.connect() as connection:
        bundle = copy.deepcopy(metastore.current(connection).bundle)
    bundle["entities"].append(copy.deepcopy(ITEM))
    metastore.publish(store, bundle, expected_version=1)
    return platform, store


def _create(tenant, data: dict[str, Any]) -> dict[str, Any]:
    platform, store = tenant
    with store.begin(immediate=True) as connection:
        m = platform.models.current(store, connection)
        return records.create(connection, m, m.entity("item"), data, CALLER, platform.cipher)


def _list(tenant, **kwargs: Any) -> list[dict[str, Any]]:
    platform, store = tenant
    with store.connect() as connection:
        m = platform.models.current(store, connection)
        ctx = records._context(connection, m, m.entity("item"), CALLER, platform.cipher)
        page = query.list_records(
            connection,
            m,
            m.entity("item"),
            query.ListRequest(**kwargs),
            ctx.eval_context(),
            b"secret",
        )
    return page.items


@pytest.mark.parametrize(
    ("amount", "doubled", "third", "whole"),
    [
        ("10.00", "25.00", "3.3333", "3"),
        ("0.01", "0.03", "0.0033", "0"),  # 0.025 rounds half away from zero
        ("-10.00", "-25.00", "-3.3333", "-3"),
        ("4.50", "11.25", "1.5000", "2"),
    ],
)
def test_decimal_formula_prints_rounded_to_its_scale_on_every_backend(
    tenant, amount, doubled, third, whole
):
    created = _create(tenant, {"name": "Formula", "amount": amount})
    assert (created["doubled"], created["third"], created["whole"]) == (doubled, third, whole)
    (listed,) = [item for item in _list(tenant) if item["id"] == created["id"]]
    assert (listed["doubled"], listed["third"], listed["whole"]) == (doubled, third, whole)


def test_decimal_formula_without_scale_is_text_of_the_exact_value(tenant):
    created = _create(tenant, {"name": "Plain", "amount": "10.25"})
    assert isinstance(created["plain"], str)
    assert decimal.Decimal(created["plain"]) == decimal.Decimal("20.50")


def test_decimal_formula_of_nothing_is_null(tenant):
    created = _create(tenant, {"name": "Empty"})
    assert created["doubled"] is None and created["plain"] is None


def test_formula_sorts_and_filters_by_value_not_text(tenant):
    for amount in ("9.00", "100.00", "20.00"):
        _create(tenant, {"name": f"S{amount}", "amount": amount})
    names = [i["name"] for i in _list(tenant, filter="doubled >= 22.5", sort="doubled")]
    assert names == ["S9.00", "S20.00", "S100.00"]


def test_fast_row_path_agrees_with_the_mapping_path(tenant):
    created = _create(tenant, {"name": "Same", "amount": "12.34"})
    platform, store = tenant
    with store.connect() as connection:
        m = platform.models.current(store, connection)
        entity = m.entity("item")
        ctx = records._context(connection, m, entity, CALLER, platform.cipher).eval_context()
        statement = recordview.sa.select(*recordview.select_columns(m, entity, ctx)).where(
            entity.table.c.id == uuid.UUID(created["id"])
        )
        result = connection.execute(statement)
        keys = list(result.keys())
        row = result.one()
    fast = recordview.rows_to_json(entity, keys, [row])[0]
    assert fast == recordview.to_json(entity, row._mapping)
    assert list(fast) == list(recordview.to_json(entity, row._mapping))


def test_formulas_are_parsed_once_per_published_version(tenant):
    platform, store = tenant
    with store.connect() as connection:
        m = platform.models.current(store, connection)
    entity = m.entity("item")
    assert set(entity.formulas) == {"doubled", "third", "whole", "plain"}
    assert entity.formulas["doubled"] is model.parsed("amount * 2.5")


def test_parse_cache_keeps_short_texts_only():
    assert model.parsed("amount > 1") is model.parsed("amount > 1")
    long_text = "name = '" + "x" * model.PARSE_CACHE_TEXT + "'"
    assert len(long_text) > model.PARSE_CACHE_TEXT
    assert model.parsed(long_text) is not model.parsed(long_text)


def test_json_values_keep_their_meaning():
    import datetime as dt

    moment = dt.datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    assert recordview.json_value(moment) == "2026-01-01T19:04:05.006000Z"
    assert recordview.json_value(decimal.Decimal("1E-8")) == "0.00000001"
    assert recordview.json_value(dt.date(2026, 2, 3)) == "2026-02-03"
    assert recordview.json_value(True) is True
    assert recordview.json_value([uuid.UUID(int=1)]) == ["00000000-0000-0000-0000-000000000001"]


def test_scale_on_a_formula_that_is_not_decimal_is_refused():
    doc = copy.deepcopy(tenancy.template_bundle("core"))
    deal = next(e for e in doc["entities"] if e["name"] == "deal")
    deal["fields"].append({**_formula("odd", "len(name)", scale=2), "result_type": "integer"})
    errors = validate_bundle(doc)
    assert any(e.pointer.endswith("/scale") for e in errors), errors


def test_precision_on_a_formula_is_refused():
    doc = copy.deepcopy(tenancy.template_bundle("core"))
    deal = next(e for e in doc["entities"] if e["name"] == "deal")
    deal["fields"].append(_formula("odd", "amount * 2", precision=10))
    assert validate_bundle(doc)


def _bulk(tenant, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    platform, store = tenant
    with store.begin(immediate=True) as connection:
        m = platform.models.current(store, connection)
        return records.create_many(
            connection, m, m.entity("item"), items, CALLER, platform.cipher, bulk=True
        )


def _counts(tenant) -> tuple[int, int, int]:
    import sqlalchemy as sa

    from metacrm.runtime.store import audit, outbox

    platform, store = tenant
    with store.connect() as connection:
        m = platform.models.current(store, connection)
        return tuple(
            connection.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
            for t in (m.entity("item").table, audit, outbox)
        )


def test_bulk_create_returns_records_in_order_with_one_audit_entry_and_event_each(tenant):
    before = _counts(tenant)
    items = [{"name": f"B{k}", "amount": f"{k}.50"} for k in range(7)] + [{"name": "no amount"}]
    created = _bulk(tenant, items)
    assert [r["name"] for r in created] == [i["name"] for i in items]
    assert [r["doubled"] for r in created[:2]] == ["1.25", "3.75"]
    assert created[-1]["amount"] is None and created[-1]["version"] == 1
    assert _counts(tenant) == tuple(n + 8 for n in before)


def test_bulk_create_whose_audit_fails_stores_nothing(tenant, monkeypatch):
    import sqlalchemy as sa

    from metacrm.runtime import audittrail

    before = _counts(tenant)

    def broken(connection, prepared):
        raise sa.exc.OperationalError("INSERT INTO _audit", {}, Exception("disk full"))

    # The writer of every append of several entries (append_many goes through it too).
    monkeypatch.setattr(audittrail, "append_prepared", broken)
    with pytest.raises(sa.exc.OperationalError):
        _bulk(tenant, [{"name": "X1"}, {"name": "X2"}])
    assert _counts(tenant) == before


def test_bulk_create_with_one_bad_item_stores_nothing(tenant):
    before = _counts(tenant)
    with pytest.raises(records.RecordInvalid) as info:
        _bulk(tenant, [{"name": "ok"}, {"name": "bad", "amount": "abc"}, {"amount": "1"}])
    pointers = {e["pointer"] for e in info.value.errors}
    assert pointers == {"/1/amount", "/2/name"}
    assert _counts(tenant) == before


def test_row_plans_stay_bounded_however_many_column_sets_are_asked(tenant):
    platform, store = tenant
    with store.connect() as connection:
        m = platform.models.current(store, connection)
    entity = m.entity("item")
    names = ["id", "version", "name", "amount", "doubled", "third", "whole", "plain"]
    for n in range(recordview.MAX_VIEW_PLANS * 2):
        keys = [names[k] for k in range(len(names)) if n >> k & 1] or ["id"]
        row = [None] * len(keys)
        (record,) = recordview.rows_to_json(entity, keys, [row])
        assert set(record) == set(keys)
    assert len(recordview._VIEW_PLANS[entity.entity]) <= recordview.MAX_VIEW_PLANS


@pytest.mark.parametrize(
    ("value", "scale", "shown"),
    [
        (0.1 * 3, None, "0.3"),  # SQLite's binary noise is not shown
        (25.0, None, "25.0"),
        (0.1 * 3, 2, "0.30"),
        (2.5, 0, "3"),
        (-2.5, 0, "-3"),
        (decimal.Decimal("25.000"), 2, "25.00"),
        (7, 2, "7.00"),
        (None, 2, None),
        (float("nan"), 2, None),
        (float("inf"), None, None),
    ],
)
def test_decimal_formula_values_are_shown_exactly_and_rounded(value, scale, shown):
    assert recordview._decimal_formula(scale)(value) == shown
