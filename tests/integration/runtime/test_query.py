"""Record lists on both backends: filters, sorts, keyset pages, search, include, counts, related.

Most tests read one shared tenant per backend (``world``), loaded once with
customers, contacts, deals and interactions chosen for ties, NULLs, Chinese
text and LIKE wildcards. Tests that write get a tenant of their own.
"""

from __future__ import annotations

import copy
import datetime as dt
import decimal
import random
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from metacrm.metadata.expression import EvalContext
from metacrm.runtime import metastore, tenancy
from metacrm.runtime.model import ModelCache, TenantModel
from metacrm.runtime.platform import Platform
from metacrm.runtime.query import (
    ListRequest,
    Page,
    QueryError,
    count_records,
    list_records,
    related_records,
)
from metacrm.runtime.recordview import SYSTEM_FIELDS
from metacrm.runtime.search import (
    drop_search_index,
    ensure_search_index,
    ensure_search_indexes,
    fts_table_name,
)
from metacrm.runtime.store import TenantStore
from tests.conftest import BACKENDS, make_settings
from tests.integration.runtime.conftest import insert

SECRET = b"query-test-secret"
BASE = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)
CTX = EvalContext(now=BASE, today=BASE.date(), user_id=None, team_ids=())
D = decimal.Decimal

EXTRA_DEAL_FIELDS = [
    {
        "name": "weighted",
        "type": "formula",
        "label": {"en": "Weighted"},
        "expression": "round(amount * coalesce(probability, 0) / 100, 2)",
        "result_type": "decimal",
    },
    {
        "name": "size",
        "type": "formula",
        "label": {"en": "Size"},
        "expression": 'if(amount >= 700, "large", if(amount >= 300, "medium", "small"))',
        "result_type": "text",
    },
    {"name": "extra", "type": "json", "label": {"en": "Extra"}},
    {"name": "secret_note", "type": "encrypted_text", "label": {"en": "Secret"}},
    {"name": "partners", "type": "many_to_many", "target": "customer", "label": {"en": "Partners"}},
]
EXTRA_CUSTOMER_FIELDS = [
    {
        "name": "shout",
        "type": "formula",
        "label": {"en": "Shout"},
        "expression": "upper(name)",
        "result_type": "text",
    }
]

CUSTOMERS = {
    "shanghai": {
        "name": "上海华联贸易有限公司",
        "level": "vip",
        "city": "上海",
        "lifetime_value": D(1000),
    },
    "beijing": {"name": "北京华联商厦", "level": "gold", "city": "北京", "lifetime_value": D(500)},
    "cotton": {"name": "100% Cotton Ltd", "level": None, "lifetime_value": None},
    "snake": {"name": "snake_case Trading", "level": "normal", "lifetime_value": D(500)},
    "acme": {"name": "Acme", "level": "vip", "lifetime_value": D("20.5"), "phone": "+1 555 0100"},
    "ecole": {"name": "ÉCOLE Straße", "level": "normal", "city": "Zürich"},
    "beta": {"name": "beta", "level": "gold", "lifetime_value": D("20.5")},
    "zeta": {"name": "Zeta", "level": None, "lifetime_value": D("7.25")},
}
DEAL_NAMES = [
    "apple",
    "Banana",
    "éclair",
    "Zebra",
    "zebra",
    "上海项目",
    "北京项目",
    "_under",
    "%pct",
]


def deal_rows(customers: list[uuid.UUID], contacts: list[uuid.UUID]) -> list[dict[str, Any]]:
    """Thirty-two deals with ties in every sort key and NULLs in the nullable ones."""
    stages = ["lead", "qualified", "proposal", "won", "lost"]
    rows = []
    for i in range(32):
        rows.append(
            {
                "name": DEAL_NAMES[i] if i < len(DEAL_NAMES) else f"Deal {i % 20:02d}",
                "customer": customers[i % len(customers)],
                "primary_contact": contacts[i % 3] if i % 3 else None,
                "stage": stages[i % len(stages)],
                "amount": None if i % 5 == 0 else D((i * 37) % 11 * 100),
                "probability": None if i % 4 == 0 else D((i * 10) % 100),
                "expected_close_on": None if i % 4 == 1 else BASE.date() + dt.timedelta(i % 7),
                # Pairs of deals share a creation time: the id has to break the tie.
                "created_at": BASE - dt.timedelta(hours=i // 2),
                "updated_at": BASE,
            }
        )
    return rows


@dataclass
class World:
    """A tenant with data, and helpers to list it."""

    store: TenantStore
    model: TenantModel
    customers: dict[str, uuid.UUID] = field(default_factory=dict)
    contacts: list[uuid.UUID] = field(default_factory=list)
    deals: list[dict[str, Any]] = field(default_factory=list)
    deleted_deal: uuid.UUID | None = None

    @property
    def dialect(self) -> str:
        return self.store.dialect

    def list(self, entity: str, **request: Any) -> Page:
        with self.store.connect() as connection:
            return list_records(
                connection,
                self.model,
                self.model.entities[entity],
                ListRequest(**request),
                CTX,
                SECRET,
            )

    def scoped(self, entity: str, scope: Any, **request: Any) -> Page:
        with self.store.connect() as connection:
            return list_records(
                connection,
                self.model,
                self.model.entities[entity],
                ListRequest(**request),
                CTX,
                SECRET,
                scope,
            )

    def everything(self, entity: str, **request: Any) -> list[dict[str, Any]]:
        page = self.list(entity, limit=500, **request)
        assert page.next_cursor is None
        return page.items

    def names(self, entity: str, **request: Any) -> list[str]:
        return [item["name"] for item in self.everything(entity, **request)]

    def count(self, entity: str, filter: str | None = None, **options: Any) -> tuple[int, bool]:
        with self.store.connect() as connection:
            return count_records(
                connection, self.model, self.model.entities[entity], filter, CTX, **options
            )

    def related(self, target: str, record_id: uuid.UUID, source: str, **options: Any) -> Page:
        via = options.pop("via", None)
        with self.store.connect() as connection:
            return related_records(
                connection,
                self.model,
                self.model.entities[target],
                record_id,
                self.model.entities[source],
                ListRequest(**options),
                CTX,
                SECRET,
                via=via,
            )


def publish_extra_fields(store: TenantStore) -> None:
    with store.connect() as connection:
        bundle = copy.deepcopy(metastore.current(connection).bundle)
    entities = {e["name"]: e for e in bundle["entities"]}
    entities["deal"]["fields"] += copy.deepcopy(EXTRA_DEAL_FIELDS)
    entities["customer"]["fields"] += copy.deepcopy(EXTRA_CUSTOMER_FIELDS)
    metastore.publish(store, bundle, expected_version=1)


def current_model(store: TenantStore) -> TenantModel:
    with store.connect() as connection:
        return ModelCache().current(store, connection)


def new_tenant(platform: Platform) -> TenantStore:
    created = tenancy.create_tenant(platform, f"q{uuid.uuid4().hex[:9]}", "Query test")
    store = platform.store(created.tenant)
    publish_extra_fields(store)
    return store


@pytest.fixture(scope="module", params=BACKENDS)
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """One loaded tenant per backend, shared by the read-only tests of this module."""
    tmp = tmp_path_factory.mktemp(f"query-{request.param}")
    platform = Platform(make_settings(request.param, tmp, request))
    platform.init_control()
    try:
        store = new_tenant(platform)
        names = list(CUSTOMERS)
        rows = [
            {**values, "created_at": BASE - dt.timedelta(days=i), "updated_at": BASE}
            for i, values in enumerate(CUSTOMERS.values())
        ]
        customers = dict(zip(names, insert(store, "customer", *rows), strict=True))
        contacts = insert(
            store,
            "contact",
            *(
                {"name": f"Contact {i}", "customer": customers["shanghai"], "created_at": BASE}
                for i in range(3)
            ),
        )
        deals = deal_rows(list(customers.values()), contacts)
        for row, deal_id in zip(deals, insert(store, "deal", *deals), strict=True):
            row["id"] = deal_id
        (deleted,) = insert(
            store,
            "deal",
            {"name": "Binned", "customer": customers["acme"], "deleted_at": BASE, "amount": D(1)},
        )
        insert(
            store,
            "interaction",
            {
                "subject": "Call 上海",
                "occurred_at": BASE,
                "customer": customers["beijing"],
                "related_to_entity": "customer",
                "related_to_id": customers["shanghai"],
            },
            {"subject": "Visit", "occurred_at": BASE, "customer": customers["shanghai"]},
        )
        model = current_model(store)
        link = model.entities["deal"].links["partners"]
        with store.begin() as connection:
            connection.execute(
                link.insert(),
                [
                    {
                        "source_id": deals[1]["id"],
                        "target_id": customers["shanghai"],
                        "created_at": BASE,
                    },
                    {
                        "source_id": deals[1]["id"],
                        "target_id": customers["acme"],
                        "created_at": BASE,
                    },
                    {
                        "source_id": deals[2]["id"],
                        "target_id": customers["acme"],
                        "created_at": BASE,
                    },
                ],
            )
            ensure_search_indexes(connection, model)
        yield World(store, model, customers, contacts, deals, deleted)
    finally:
        for item in tenancy.list_tenants(platform):
            tenancy.delete_tenant(platform, item.slug)
        platform.close()


@contextmanager
def statements(store: TenantStore) -> Iterator[list[str]]:
    """Collect the SELECT statements sent to the database inside the block."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "EXPLAIN", "WITH")):
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", record)


def refused(call: Callable[[], Any], code: str, pointer: str) -> QueryError:
    with pytest.raises(QueryError) as info:
        call()
    assert (info.value.code, info.value.pointer) == (code, pointer), info.value.message
    return info.value


# -- reference ordering --------------------------------------------------------------------


def typed(item: dict[str, Any], name: str) -> Any:
    """Read a JSON value back as the type it sorts by."""
    value = item.get(name)
    if value is None:
        return None
    if name in ("id", "owner_id", "customer", "primary_contact"):
        return uuid.UUID(value)
    if name in ("created_at", "updated_at", "deleted_at"):
        return dt.datetime.fromisoformat(value)
    if name in ("amount", "probability", "weighted", "lifetime_value"):
        return D(value)
    if name in ("expected_close_on",):
        return dt.date.fromisoformat(value)
    return value


def _null_last(value: Any) -> tuple[bool, Any]:
    return (True, 0) if value is None else (False, value)


def reference_order(items: list[dict[str, Any]], sort: str) -> list[str]:
    """Sort items in Python by the documented rules: NULLs last ascending, first descending;
    text by code point; id last, in the direction of the last key."""
    keys = [(part.lstrip("-"), part.startswith("-")) for part in sort.split(",")]
    if keys[-1][0] != "id":
        keys.append(("id", keys[-1][1]))
    ordered = list(items)
    for name, descending in reversed(keys):
        ordered.sort(key=lambda item, n=name: _null_last(typed(item, n)), reverse=descending)
    return [item["id"] for item in ordered]


# -- filters -------------------------------------------------------------------------------


def live_deals(world: World, predicate: Callable[[dict[str, Any]], bool]) -> set[str]:
    return {row["name"] for row in world.deals if predicate(row)}


@pytest.mark.parametrize(
    "expression, predicate",
    [
        ('stage = "won"', lambda r: r["stage"] == "won"),
        (
            'stage in ("won", "lost") and amount >= 500',
            lambda r: r["stage"] in ("won", "lost") and (r["amount"] or 0) >= 500,
        ),
        ("amount is null", lambda r: r["amount"] is None),
        ("not (amount > 300)", lambda r: r["amount"] is not None and not r["amount"] > 300),
        (
            "amount between 200 and 400",
            lambda r: r["amount"] is not None and 200 <= r["amount"] <= 400,
        ),
        (
            "expected_close_on >= add_days(today(), 4)",
            lambda r: (
                r["expected_close_on"] is not None
                and r["expected_close_on"] >= BASE.date() + dt.timedelta(4)
            ),
        ),
        (
            "created_at < add_days(now(), -10)",
            lambda r: r["created_at"] < BASE - dt.timedelta(days=10),
        ),
        ('name contains "项目"', lambda r: "项目" in r["name"]),
        ('name starts_with "ZEB"', lambda r: r["name"].lower().startswith("zeb")),
        ('name like "\\\\%%"', lambda r: r["name"].startswith("%")),
        ('name like "\\\\_%"', lambda r: r["name"].startswith("_")),
        ('lower(name) = "zebra"', lambda r: r["name"].lower() == "zebra"),
        ("len(name) = 4", lambda r: len(r["name"]) == 4),
        (
            'coalesce(amount, 0) = 0 or name = "apple"',
            lambda r: (r["amount"] or 0) == 0 or r["name"] == "apple",
        ),
    ],
)
def test_filter_on_own_fields(world, expression, predicate):
    assert set(world.names("deal", filter=expression)) == live_deals(world, predicate)


def test_filter_through_a_lookup(world):
    vip = {world.customers["shanghai"], world.customers["acme"]}
    found = world.names("deal", filter='customer.level = "vip"')
    assert set(found) == live_deals(world, lambda r: r["customer"] in vip)
    assert len(found) == len([r for r in world.deals if r["customer"] in vip])
    no_level = {world.customers["cotton"], world.customers["zeta"]}
    assert set(world.names("deal", filter="customer.level is null")) == live_deals(
        world, lambda r: r["customer"] in no_level
    )
    assert set(world.names("deal", filter='primary_contact.name = "Contact 1"')) == live_deals(
        world, lambda r: r["primary_contact"] == world.contacts[1]
    )


def test_filter_on_formulas(world):
    def weighted(r: dict[str, Any]) -> decimal.Decimal | None:
        if r["amount"] is None:
            return None
        return (r["amount"] * (r["probability"] or 0) / 100).quantize(D("0.01"))

    assert set(world.names("deal", filter="weighted > 200")) == live_deals(
        world, lambda r: (weighted(r) or 0) > 200
    )
    assert set(world.names("deal", filter='size = "large"')) == live_deals(
        world, lambda r: r["amount"] is not None and r["amount"] >= 700
    )
    items = world.everything("deal", filter="weighted is not null", fields=("weighted", "amount"))
    assert {item["id"]: D(item["weighted"]) for item in items} == {
        str(r["id"]): weighted(r) for r in world.deals if weighted(r) is not None
    }


def test_filter_on_chinese_text_and_customer_fields(world):
    assert world.names("customer", filter='city = "上海"') == ["上海华联贸易有限公司"]
    assert set(world.names("customer", filter='name contains "华联"')) == {
        "上海华联贸易有限公司",
        "北京华联商厦",
    }
    assert world.names("customer", filter='name contains "straße"') == ["ÉCOLE Straße"]
    assert world.names("customer", filter='shout = "ACME"') == ["Acme"]
    assert set(world.names("customer", filter="level is null")) == {"100% Cotton Ltd", "Zeta"}


def test_filter_and_scope_are_both_applied(world):
    table = world.model.entities["deal"].table
    page = world.scoped("deal", table.c.stage == "won", filter="amount is not null", limit=500)
    assert {item["name"] for item in page.items} == live_deals(
        world, lambda r: r["stage"] == "won" and r["amount"] is not None
    )


@pytest.mark.parametrize(
    "expression, fragment, line, column",
    [
        ("amout > 5", "unknown field 'amout'; did you mean 'amount'?", 1, 1),
        ("name = 5", "cannot compare text with number", 1, 6),
        ("1=1; drop table deal", "no ';'", 1, 4),
        ("amount", "must give a condition", 1, 1),
        ('stage = "won"\n  and amount > "x"', "cannot compare", 2, 14),
        ("x" * 100_000, "too long", 1, 10_001),
        ("(" * 10_000 + "true" + ")" * 10_000, "too long", 1, 10_001),
        ("(" * 100 + "true" + ")" * 100, "too many nested parentheses", 1, 65),
        ("not " * 2_000 + "true", "nested too deeply", None, None),
        ("- " * 3_000 + "amount > 0", "nested too deeply", None, None),
        ('secret_note = "x"', "cannot be used", 1, 1),
        ("extra is null", "cannot be used", 1, 1),
        ('partners contains "x"', "cannot be used", 1, 1),
        ('customer.shout = "ACME"', "unknown field", 1, 1),
        ('customer.nope = "x"', "unknown field 'nope' of customer", 1, 1),
        ('customer.level.x = "x"', "only one lookup away", 1, 15),
        ("amount > 0 and", "expected", 1, 15),
        ('name = "上海\u201d', "never closed", 1, 8),
    ],
)
def test_bad_filters_are_refused_with_a_position(world, expression, fragment, line, column):
    error = refused(lambda: world.list("deal", filter=expression), "invalid_filter", "/filter")
    assert fragment in error.message
    if line is not None:
        assert (error.line, error.column) == (line, column)
    assert error.to_dict()["pointer"] == "/filter" and "line" in error.to_dict()


def test_related_to_fields_are_not_filterable_yet(world):
    error = refused(
        lambda: world.list("interaction", filter="related_to is null"), "invalid_filter", "/filter"
    )
    assert "unknown field 'related_to'" in error.message


def test_filter_nested_beyond_sqlite_is_refused_there(world):
    expression = "lower(" * 40 + "name" + ")" * 40 + ' = "x"'
    if world.dialect == "sqlite":
        error = refused(lambda: world.list("deal", filter=expression), "invalid_filter", "/filter")
        assert "nested too deeply for the database" in error.message
        assert (error.line, error.column) == (1, 241)
        refused(lambda: world.count("deal", expression), "invalid_filter", "/filter")
    else:
        assert world.list("deal", filter=expression).items == []
    assert world.list("deal", filter='stage = "won"').items  # the connection is still usable


def test_blank_filter_means_no_filter(world):
    assert len(world.everything("deal", filter="  ")) == len(world.deals)


# -- sorting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sort",
    [
        None,
        "created_at",
        "amount",
        "-amount",
        "name",
        "-name",
        "expected_close_on,-amount",
        "-expected_close_on,amount",
        "weighted",
        "-weighted,name",
        "-size,name",
        "stage,-created_at",
        "customer,-probability",
        "owner_id",
        "-id",
        "updated_at,name",
    ],
)
def test_sort_matches_the_documented_order(world, sort):
    items = world.everything("deal", sort=sort)
    assert len(items) == len(world.deals)
    assert [item["id"] for item in items] == reference_order(items, sort or "-created_at")


def test_text_sorts_by_code_point(world):
    names = [n for n in world.names("deal", sort="name,id") if not n.startswith("Deal ")]
    assert names == sorted(names)
    assert (
        names.index("Zebra") < names.index("apple") < names.index("zebra") < names.index("éclair")
    )


def test_nulls_last_ascending_first_descending(world):
    ascending = [item["amount"] for item in world.everything("deal", sort="amount")]
    descending = [item["amount"] for item in world.everything("deal", sort="-amount")]
    nulls = ascending.count(None)
    assert nulls and ascending[-nulls:] == [None] * nulls and None not in ascending[:-nulls]
    assert descending[:nulls] == [None] * nulls and None not in descending[nulls:]


@pytest.mark.parametrize(
    "sort, fragment",
    [
        ("nope", "unknown field 'nope'"),
        ("amout", "did you mean 'amount'"),
        ("description", "long text field and cannot be sorted"),
        ("products", "tags field and cannot be sorted"),
        ("extra", "json field and cannot be sorted"),
        ("partners", "cannot be sorted"),
        ("secret_note", "cannot be sorted"),
        ("customer.level", "unknown field"),
        ("name,-name", "twice"),
        ("name,,amount", "empty field"),
        ("-", "empty field"),
        ("team_id", "unknown field"),
        ("a" * 2_000, "too long"),
        (
            ",".join(
                [
                    "name",
                    "amount",
                    "stage",
                    "created_at",
                    "updated_at",
                    "owner_id",
                    "probability",
                    "weighted",
                    "size",
                ]
            ),
            "at most 8",
        ),
    ],
)
def test_bad_sorts_are_refused(world, sort, fragment):
    error = refused(lambda: world.list("deal", sort=sort), "invalid_sort", "/sort")
    assert fragment in error.message


def test_related_to_cannot_be_sorted(world):
    refused(lambda: world.list("interaction", sort="related_to"), "invalid_sort", "/sort")


# -- keyset pages --------------------------------------------------------------------------


def pages(world: World, entity: str, sizes: Iterator[int], **request: Any) -> list[list[str]]:
    found: list[list[str]] = []
    cursor = None
    while True:
        page = world.list(entity, limit=next(sizes), cursor=cursor, **request)
        found.append([item["id"] for item in page.items])
        if page.next_cursor is None:
            return found
        assert page.items, "a page with a next cursor is never empty"
        cursor = page.next_cursor


@pytest.mark.parametrize(
    "request_",
    [
        {},
        {"sort": "amount"},
        {"sort": "-amount,name"},
        {"sort": "-expected_close_on,amount,-name"},
        {"sort": "weighted,-size"},
        {"sort": "name", "filter": "amount is not null"},
        {"sort": "customer,created_at", "filter": 'stage != "won"'},
        {"sort": "-lifetime_value", "_entity": "customer"},
    ],
)
def test_paging_with_random_sizes_gives_every_row_once_in_order(world, request_):
    request_ = dict(request_)
    entity = request_.pop("_entity", "deal")
    expected = [item["id"] for item in world.everything(entity, **request_)]
    rng = random.Random(1234)
    for _ in range(4):
        sizes = iter(lambda: rng.randint(1, 7), None)
        found = pages(world, entity, sizes, **request_)
        assert [i for page in found for i in page] == expected


def test_last_page_has_no_cursor_when_rows_fill_it_exactly(world):
    total = len(world.deals)
    assert world.list("deal", limit=total).next_cursor is None
    page = world.list("deal", limit=total - 1)
    assert page.next_cursor is not None
    assert len(world.list("deal", limit=total, cursor=page.next_cursor).items) == 1


def test_paging_is_stable_when_rows_are_inserted_meanwhile(platform):
    store = new_tenant(platform)
    (customer,) = insert(store, "customer", {"name": "C", "created_at": BASE})
    original = insert(
        store,
        "deal",
        *(
            {
                "name": f"d{i}",
                "customer": customer,
                "amount": None if i % 3 == 0 else D(i % 4),
                "created_at": BASE - dt.timedelta(minutes=i // 2),
            }
            for i in range(20)
        ),
    )
    world = World(store, current_model(store))
    for sort in ("-created_at", "amount", "-amount,name"):
        before = [item["id"] for item in world.everything("deal", sort=sort)]
        assert sorted(before) == sorted(str(i) for i in original)
        seen: list[str] = []
        cursor = None
        added_before, added_after = [], []
        while True:
            page = world.list("deal", sort=sort, limit=3, cursor=cursor)
            seen += [item["id"] for item in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
            # A row that sorts first (already passed) and one that sorts last (still ahead).
            first, last = insert(
                store,
                "deal",
                {
                    "name": "a-new",
                    "customer": customer,
                    "amount": D(-1) if sort == "amount" else None,
                    "created_at": BASE + dt.timedelta(days=1),
                },
                {
                    "name": "z-new",
                    "customer": customer,
                    "amount": None if sort == "amount" else D(-5),
                    # Each one older than the last, so each sorts after those before it.
                    "created_at": BASE - dt.timedelta(days=1, seconds=len(added_after)),
                },
            )
            added_before.append(str(first))
            added_after.append(str(last))
        assert len(seen) == len(set(seen))
        assert [i for i in seen if i in before] == before
        assert not set(seen) & set(added_before)
        assert set(added_after) <= set(seen)
        final = [item["id"] for item in world.everything("deal", sort=sort)]
        assert [i for i in final if i in set(seen)] == seen
        with store.begin() as connection:
            table = world.model.entities["deal"].table
            connection.execute(table.delete().where(table.c.name.in_(["a-new", "z-new"])))


@pytest.mark.parametrize("limit", [0, -1, 501, 10**12, True, "abc", 2.5, None])
def test_bad_limits_are_refused(world, limit):
    refused(lambda: world.list("deal", limit=limit), "invalid_limit", "/limit")


def test_tampered_or_foreign_cursors_are_refused(world):
    page = world.list("deal", sort="-amount", filter='stage != "won"', limit=3)
    token = page.next_cursor
    assert token is not None
    body, _, signature = token.partition(".")
    other = world.list("customer", limit=2).next_cursor
    bad = {
        "tampered": body[:-2] + ("AA" if body[-2:] != "AA" else "BB") + "." + signature,
        "garbage": "not-a-cursor",
        "empty": "",
        "long": "A" * 10_000,
    }
    for token_ in bad.values():
        refused(
            lambda t=token_: world.list("deal", sort="-amount", filter='stage != "won"', cursor=t),
            "invalid_cursor",
            "/cursor",
        )
    for request_ in (
        {"sort": "amount", "filter": 'stage != "won"'},
        {"sort": "-amount", "filter": 'stage = "won"'},
        {"sort": "-amount"},
        {"sort": "-amount", "filter": 'stage != "won"', "q": "apple"},
        {"sort": "-amount", "filter": 'stage != "won"', "deleted": True},
    ):
        refused(
            lambda r=request_: world.list("deal", cursor=token, **r), "invalid_cursor", "/cursor"
        )
    refused(lambda: world.list("deal", cursor=other), "invalid_cursor", "/cursor")
    with world.store.connect() as connection:
        entity = world.model.entities["deal"]
        request_ = ListRequest(sort="-amount", filter='stage != "won"', cursor=token)
        with pytest.raises(QueryError) as info:
            list_records(connection, world.model, entity, request_, CTX, b"another secret")
        assert info.value.code == "invalid_cursor"
    # Spelling the same filter differently continues the same list.
    assert world.list("deal", sort="-amount", filter="stage!='won'", cursor=token).items


# -- fields and include --------------------------------------------------------------------


def test_fields_choose_what_is_returned(world):
    items = world.everything("deal", fields=("name", "partners"), sort="-amount")
    assert set(items[0]) == {*SYSTEM_FIELDS, "name", "partners"}
    partners = {item["id"]: set(item["partners"]) for item in items if item["partners"]}
    assert partners == {
        str(world.deals[1]["id"]): {str(world.customers["shanghai"]), str(world.customers["acme"])},
        str(world.deals[2]["id"]): {str(world.customers["acme"])},
    }
    # Sorting by a field that is not returned still pages correctly.
    found = pages(world, "deal", iter(lambda: 5, None), fields=("name",), sort="-amount,size")
    assert [i for page in found for i in page] == [
        item["id"] for item in world.everything("deal", sort="-amount,size")
    ]
    masked = world.everything("deal", fields=("secret_note",), filter='name = "apple"')
    assert "secret_note" in masked[0]


@pytest.mark.parametrize("fields", [("nope",), ("name", "customer.level"), "name", (5,)])
def test_unknown_fields_are_refused(world, fields):
    refused(lambda: world.list("deal", fields=fields), "invalid_fields", "/fields")


def test_include_embeds_lookup_targets(world):
    items = world.everything("deal", include=("customer", "primary_contact"))
    names = {cid: CUSTOMERS[key]["name"] for key, cid in world.customers.items()}
    for item in items:
        embedded = item["_included"]
        assert embedded["customer"]["id"] == item["customer"]
        assert embedded["customer"]["name"] == names[uuid.UUID(item["customer"])]
        if item["primary_contact"] is None:
            assert embedded["primary_contact"] is None
        else:
            assert embedded["primary_contact"]["id"] == item["primary_contact"]
    assert "shout" in items[0]["_included"]["customer"]
    narrow = world.list("deal", fields=("name",), include=("customer",), limit=1).items[0]
    assert narrow["_included"]["customer"]["id"] == narrow["customer"]


def test_include_costs_the_same_statements_for_any_page_size(world):
    counts = []
    for limit in (3, 10, 30):
        with statements(world.store) as seen:
            page = world.list("deal", limit=limit, include=("customer", "primary_contact"))
        assert len(page.items) == limit
        counts.append(len(seen))
    # The page, each included lookup, and the many-to-many field of deal.
    assert counts == [4, 4, 4]


@pytest.mark.parametrize(
    "include, fragment",
    [
        (("nope",), "unknown field"),
        (("stage",), "not a lookup"),
        (("partners",), "not a lookup"),
        ("customer", "list"),
    ],
)
def test_bad_includes_are_refused(world, include, fragment):
    error = refused(lambda: world.list("deal", include=include), "invalid_include", "/include")
    assert fragment in error.message


# -- search --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q, expected",
    [
        ("华联", {"上海华联贸易有限公司", "北京华联商厦"}),
        ("联", {"上海华联贸易有限公司", "北京华联商厦"}),
        ("华联贸易有限", {"上海华联贸易有限公司"}),
        ("  商厦 ", {"北京华联商厦"}),
        ("100%", {"100% Cotton Ltd"}),
        ("%", {"100% Cotton Ltd"}),
        ("0%", {"100% Cotton Ltd"}),
        ("e_c", {"snake_case Trading"}),
        ("_", {"snake_case Trading"}),
        ("ACME", {"Acme"}),
        ("cme", {"Acme"}),
        ("école", {"ÉCOLE Straße"}),
        ("STRASSE", set()),
        ("straße", {"ÉCOLE Straße"}),
        ("555 01", {"Acme"}),
        ('"quoted"', set()),
        ("\\", set()),
        ("zzz", set()),
    ],
)
def test_search_finds_substrings_ignoring_case(world, q, expected):
    assert set(world.names("customer", q=q)) == expected


def test_search_combines_with_filter_sort_and_pages(world):
    found = pages(
        world, "customer", iter(lambda: 1, None), q="华联", sort="name", filter='level != "vip"'
    )
    assert len(found) == 1 and len(found[0]) == 1
    assert world.names("customer", q="a", sort="name", filter="lifetime_value > 10") == [
        "Acme",
        "beta",
        "snake_case Trading",
    ]


@pytest.mark.parametrize("q", ["x" * 201, "a\x00b", "tab\there", 5])
def test_bad_searches_are_refused(world, q):
    refused(lambda: world.list("customer", q=q), "invalid_search", "/q")


def test_search_index_is_in_place_and_used(world):
    with world.store.connect() as connection:
        if world.dialect == "sqlite":
            tables = connection.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE name LIKE '\\_fts\\_%' ESCAPE '\\'"
            ).scalars()
            assert {fts_table_name(e) for e in world.model.entities} <= set(tables)
        else:
            indexes = connection.execute(
                sa.text("SELECT indexname FROM pg_indexes WHERE schemaname = :s"),
                {"s": world.store.schema},
            ).scalars()
            assert {"trgm_customer__name", "trgm_customer__phone", "trgm_deal__number"} <= set(
                indexes
            )
    with statements(world.store) as seen:
        world.list("customer", q="华联贸")
    if world.dialect == "sqlite":
        assert "MATCH" in seen[-1]
    else:
        assert "ILIKE" in seen[-1]


def test_search_gives_the_same_answers_with_and_without_its_index(platform):
    store = new_tenant(platform)
    names = [
        "上海华联贸易有限公司",
        "北京华联商厦",
        "100% Cotton",
        "snake_case",
        "ÉCOLE Straße",
        "Acme",
    ]
    ids = insert(store, "customer", *({"name": n, "created_at": BASE} for n in names))
    world = World(store, current_model(store))
    queries = ["华联", "华联贸易", "100%", "e_c", "école", "ACME", "cme", "zzz"]
    without = {q: set(world.names("customer", q=q)) for q in queries}
    with store.begin() as connection:
        assert ensure_search_index(connection, world.model, world.model.entities["customer"])
        assert ensure_search_index(connection, world.model, world.model.entities["customer"])
    assert {q: set(world.names("customer", q=q)) for q in queries} == without
    assert without["华联贸易"] == {"上海华联贸易有限公司"}
    # Writes after the index exists keep it in step.
    table = world.model.entities["customer"].table
    with store.begin() as connection:
        connection.execute(table.update().where(table.c.id == ids[0]).values(name="广州华联"))
        connection.execute(table.delete().where(table.c.id == ids[1]))
    (new,) = insert(store, "customer", {"name": "深圳华联贸易", "created_at": BASE})
    assert set(world.names("customer", q="华联贸易")) == {"深圳华联贸易"}
    assert set(world.names("customer", q="华联")) == {"广州华联", "深圳华联贸易"}
    assert set(world.names("customer", q="上海华联")) == set()
    # Dropped for a bulk import, search still answers (by scan), and comes back complete.
    with store.begin() as connection:
        drop_search_index(connection, world.model.entities["customer"])
    assert set(world.names("customer", q="华联贸易")) == {"深圳华联贸易"}
    insert(store, "customer", {"name": "宁波华联贸易", "created_at": BASE})
    with store.begin() as connection:
        assert ensure_search_index(connection, world.model, world.model.entities["customer"])
    assert set(world.names("customer", q="华联贸易")) == {"深圳华联贸易", "宁波华联贸易"}
    if store.dialect == "sqlite":
        with store.begin() as connection:
            connection.exec_driver_sql(
                f"INSERT INTO {fts_table_name('customer')}({fts_table_name('customer')}, rank) "
                "VALUES ('integrity-check', 1)"
            )
            # A table rebuild drops the triggers: search falls back to LIKE until repaired.
            connection.exec_driver_sql(f'DROP TRIGGER "{fts_table_name("customer")}_ai"')
        insert(store, "customer", {"name": "杭州华联贸易", "created_at": BASE})
        expected = {"深圳华联贸易", "宁波华联贸易", "杭州华联贸易"}
        assert set(world.names("customer", q="华联贸易")) == expected
        with store.begin() as connection:
            ensure_search_index(connection, world.model, world.model.entities["customer"])
        with statements(store) as seen:
            assert set(world.names("customer", q="华联贸易")) == expected
        assert "MATCH" in seen[-1]
    assert new


# -- recycle bin ---------------------------------------------------------------------------


def test_deleted_records_are_listed_only_from_the_recycle_bin(world):
    assert "Binned" not in world.names("deal")
    assert world.names("deal", deleted=True) == ["Binned"]
    assert world.count("deal") == (len(world.deals), True)
    assert world.count("deal", deleted=True) == (1, True)


# -- counts --------------------------------------------------------------------------------


def test_count_is_exact_up_to_the_threshold_then_estimated(world):
    total = len(world.deals)
    assert world.count("deal") == (total, True)
    won = sum(r["stage"] == "won" for r in world.deals)
    assert world.count("deal", 'stage = "won"') == (won, True)
    assert world.count("deal", threshold=total) == (total, True)
    value, exact = world.count("deal", threshold=5)
    assert not exact and value >= 6
    assert world.count("deal", threshold=5, exact=True) == (total, True)
    assert world.count("customer", q="华联") == (2, True)
    with statements(world.store) as seen:
        world.count("deal", 'stage = "won"')
    assert len(seen) == 1 and "LIMIT 1001" in seen[0]


def test_count_estimate_explains_each_count_with_its_own_values(world):
    """The EXPLAIN behind an estimate is compiled once and bound anew on every count.

    SQLite has no estimate: past the threshold it answers threshold + 1 and
    sends no EXPLAIN at all.
    """
    sent: list[Any] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
        if statement.startswith("EXPLAIN"):
            sent.append(parameters)

    event.listen(world.store.engine, "before_cursor_execute", record)
    try:
        for stage in ("won", "lost", "won"):
            value, exact = world.count("deal", f'stage = "{stage}"', threshold=0)
            assert not exact and value >= 1
    finally:
        event.remove(world.store.engine, "before_cursor_execute", record)
    if world.store.dialect == "sqlite":
        assert sent == []
        assert world.count("deal", 'stage = "won"', threshold=0) == (1, False)
        return
    values = [sorted(str(v) for v in p.values()) for p in sent]
    assert [("won" in v, "lost" in v) for v in values] == [
        (True, False),
        (False, True),
        (True, False),
    ]


def test_a_count_past_its_cap_again_asks_for_its_estimate_in_the_same_trip(world):
    """The first count past the cap learns it; the next sends count and EXPLAIN together
    (one round trip on PostgreSQL) with the same answers; one below the cap forgets it."""
    total = len(world.deals)
    first = world.count("deal", 'stage != "lost"', threshold=1)
    with statements(world.store) as seen:
        again = world.count("deal", 'stage != "lost"', threshold=1)
    assert again == first and not again[1] and again[0] >= 2
    if world.store.dialect == "postgresql":
        assert [s.split()[0] for s in seen] == ["SELECT", "EXPLAIN"]
    else:
        assert len(seen) == 1  # SQLite has no estimate: threshold + 1
        assert again == (2, False)
    assert world.count("deal", threshold=total) == (total, True)
    value, exact = world.count("deal", 'stage != "lost"', threshold=1)
    assert not exact and value >= 2
    with statements(world.store) as seen:
        assert world.count("deal", 'stage = "won"', threshold=total) == (
            sum(r["stage"] == "won" for r in world.deals),
            True,
        )
    assert len(seen) == 1
    refused(lambda: world.count("deal", "amount >", threshold=1), "invalid_filter", "/filter")


def test_count_refuses_bad_filters(world):
    refused(lambda: world.count("deal", "amount >"), "invalid_filter", "/filter")


SLOW = (
    "(WITH RECURSIVE spin(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM spin WHERE x < 50000000) "
    "SELECT count(*) FROM spin) > 0"
)


def test_exact_count_stops_at_its_timeout(world):
    with world.store.connect() as connection:
        entity = world.model.entities["deal"]
        before = None
        if world.dialect == "postgresql":
            before = connection.exec_driver_sql("SHOW statement_timeout").scalar()
        with pytest.raises(QueryError) as info:
            count_records(
                connection,
                world.model,
                entity,
                None,
                CTX,
                exact=True,
                timeout_ms=50,
                scope=sa.text(SLOW),
            )
        assert info.value.code == "count_timeout"
        # The connection is usable and the timeout did not outlive the count.
        assert count_records(connection, world.model, entity, None, CTX) == (len(world.deals), True)
        if before is not None:
            assert connection.exec_driver_sql("SHOW statement_timeout").scalar() == before


# -- related records -----------------------------------------------------------------------


def test_related_records_follow_lookups_related_to_and_many_to_many(world):
    shanghai = world.customers["shanghai"]
    through_lookup = {str(r["id"]) for r in world.deals if r["customer"] == shanghai}
    through_partners = {str(world.deals[1]["id"])}
    items = world.related("customer", shanghai, "deal", limit=500).items
    assert {item["id"] for item in items} == through_lookup | through_partners
    only = world.related("customer", shanghai, "deal", via="customer", limit=500).items
    assert {item["id"] for item in only} == through_lookup
    interactions = world.related("customer", shanghai, "interaction").items
    assert {i["subject"] for i in interactions} == {"Visit", "Call 上海"}
    assert len(world.related("customer", shanghai, "contact").items) == 3
    contact = world.contacts[1]
    assert {i["id"] for i in world.related("contact", contact, "deal").items} == {
        str(r["id"]) for r in world.deals if r["primary_contact"] == contact
    }
    # The inverse side of deal.partners: customers a deal names as partners.
    partners = world.related("deal", world.deals[1]["id"], "customer", via="partners").items
    assert {i["name"] for i in partners} == {"上海华联贸易有限公司", "Acme"}


def test_related_records_page_filter_and_sort(world):
    shanghai = world.customers["shanghai"]
    first = world.related(
        "customer", shanghai, "deal", limit=2, sort="name", filter="amount is not null"
    )
    assert len(first.items) == 2 and first.next_cursor
    rest = world.related(
        "customer",
        shanghai,
        "deal",
        cursor=first.next_cursor,
        sort="name",
        filter="amount is not null",
        limit=500,
    )
    names = [i["name"] for i in first.items + rest.items]
    assert names == sorted(names)
    # A cursor of one record's related list does not continue another's.
    refused(
        lambda: world.related(
            "customer",
            world.customers["acme"],
            "deal",
            cursor=first.next_cursor,
            sort="name",
            filter="amount is not null",
        ),
        "invalid_cursor",
        "/cursor",
    )


def test_unrelated_entities_are_refused(world):
    refused(lambda: world.related("task", uuid.uuid4(), "customer"), "not_related", "")
    refused(
        lambda: world.related("customer", world.customers["acme"], "deal", via="stage"),
        "not_related",
        "/via",
    )


# -- the SQL itself ------------------------------------------------------------------------


def test_typical_list_is_one_plain_select(world):
    q = _qualifier(world)
    with statements(world.store) as seen:
        page = world.list("customer", filter='level = "vip"', limit=1)
        world.list("customer", filter='level = "vip"', limit=1, cursor=page.next_cursor)
    assert len(seen) == 2
    first, second = (" ".join(sql.split()) for sql in seen)
    assert first.startswith(f"SELECT {q}customer.id, ")
    assert (
        f" FROM {q}customer WHERE {q}customer.deleted_at IS NULL AND ({q}customer.level = " in first
    )
    assert first.endswith(f"ORDER BY {q}customer.created_at DESC, {q}customer.id DESC LIMIT 2")
    assert "JOIN" not in first and "OFFSET" not in first and "SELECT" not in first[6:]
    # The next page starts after the last row's key, compared as a row value.
    assert f"AND ({q}customer.created_at, {q}customer.id) < (" in second
    assert "OFFSET" not in second


def _qualifier(world: World) -> str:
    # A SQLite tenant is a file of its own: its statements name no schema.
    return f"{world.store.schema}." if world.store.schema else ""
