"""Tenant creation's fast path: a template's plan, tables and DDL made once per process.

What is cached must be exactly what the uncached path makes: the same DDL text
for any schema name, the same tables, indexes, search indexes and version row
as a plain publish of the template, and nothing shared may change between
tenants.
"""

from __future__ import annotations

import copy
import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.schema import CreateIndex, CreateTable

from metacrm.metadata.model import Bundle
from metacrm.metadata.plan import make_plan
from metacrm.metadata.tables import backend_indexes, build_tables
from metacrm.runtime import metastore, tenancy
from metacrm.runtime import store as store_module
from metacrm.runtime.control import Membership
from metacrm.runtime.migrator import PreparedPlan
from metacrm.runtime.model import compile_model
from metacrm.runtime.search import ensure_search_indexes
from metacrm.runtime.store import DDL_CACHE, PLATFORM, TenantStore, table_ddl


def _fresh_ddl(
    dialect: sa.Dialect, metadata: sa.MetaData, names: set[str], schema: str | None
) -> list[str]:
    """Compile the DDL of the named tables the plain way, for one schema."""
    statements = []
    for table in metadata.sorted_tables:
        if table.name in names:
            indexes = backend_indexes(table, dialect.name)
            for element in (CreateTable(table), *(CreateIndex(i) for i in indexes)):
                compiled = element.compile(
                    dialect=dialect,
                    schema_translate_map={None: schema},
                    render_schema_translate=True,
                )
                statements.append(str(compiled).strip())
    return statements


def _schemas(platform) -> list[str | None]:
    # "order" is a reserved word: the dialect must quote it, cached or not.
    return [None] if platform.settings.embedded else ["t_alpha", "t_beta", "order"]


def test_cached_ddl_is_exactly_a_fresh_compile_for_any_schema(platform, monkeypatch):
    prepared = tenancy._prepared("core")
    engine = platform.control_engine
    with engine.connect():
        pass  # the dialect learns the server's version and default schema
    dialect = engine.dialect
    tables = list(prepared.metadata.sorted_tables)
    # Built anew from the template, as a publish without the cache builds them.
    rebuilt = build_tables(Bundle.from_doc(tenancy.template_bundle("core")))
    names = {t.name for t in tables}
    assert names == set(rebuilt.tables)
    first = {s: table_ddl(dialect, prepared.metadata, tables, s) for s in _schemas(platform)}
    platform_first = {
        s: table_ddl(dialect, PLATFORM, PLATFORM.sorted_tables, s) for s in _schemas(platform)
    }

    def no_compiling(*args: Any) -> list[str]:
        raise AssertionError("the DDL was compiled again instead of taken from the cache")

    monkeypatch.setattr(store_module, "_compile_ddl", no_compiling)
    for schema in _schemas(platform):
        cached = table_ddl(dialect, prepared.metadata, tables, schema)
        assert cached == first[schema] == _fresh_ddl(dialect, rebuilt, names, schema)
        platform_names = set(PLATFORM.tables)
        assert (
            table_ddl(dialect, PLATFORM, PLATFORM.sorted_tables, schema)
            == platform_first[schema]
            == _fresh_ddl(dialect, PLATFORM, platform_names, schema)
        )
    if not platform.settings.embedded:
        alpha, beta, order = (first[s] for s in _schemas(platform))
        assert alpha[0].startswith("CREATE TABLE t_alpha.")
        assert beta[0].startswith("CREATE TABLE t_beta.")
        assert order[0].startswith('CREATE TABLE "order".')
        assert alpha != beta
    assert len(first[_schemas(platform)[0]]) == len(tables) + sum(
        len(backend_indexes(t, dialect.name)) for t in tables
    )


def test_metadata_without_the_mark_is_compiled_every_time(platform, monkeypatch):
    engine = platform.control_engine
    with engine.connect():
        pass
    metadata = build_tables(Bundle.from_doc(tenancy.template_bundle("core")))
    table_ddl(engine.dialect, metadata, list(metadata.sorted_tables), None)
    assert DDL_CACHE not in metadata.info
    calls = []
    original = store_module._compile_ddl
    monkeypatch.setattr(store_module, "_compile_ddl", lambda *a: calls.append(1) or original(*a))
    table_ddl(engine.dialect, metadata, list(metadata.sorted_tables), None)
    assert calls == [1]


def _catalog(store: TenantStore) -> dict[str, Any]:
    """Describe a namespace's objects with its own name taken out, so two can be compared."""
    with store.connect() as connection:
        if store.schema is None:
            rows = connection.exec_driver_sql(
                "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
            ).all()
            objects = [tuple(r) for r in rows]
        else:
            params = {"s": store.schema}
            columns = connection.execute(
                sa.text(
                    "SELECT table_name, column_name, ordinal_position, data_type, "
                    "character_maximum_length, numeric_precision, numeric_scale, is_nullable, "
                    "replace(column_default, :s, 'S') FROM information_schema.columns "
                    "WHERE table_schema = :s ORDER BY table_name, ordinal_position"
                ),
                params,
            ).all()
            indexes = connection.execute(
                sa.text(
                    "SELECT indexname, replace(indexdef, :s, 'S') FROM pg_indexes "
                    "WHERE schemaname = :s ORDER BY indexname"
                ),
                params,
            ).all()
            constraints = connection.execute(
                sa.text(
                    "SELECT c.conname, replace(pg_get_constraintdef(c.oid), :s, 'S') "
                    "FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
                    "WHERE n.nspname = :s ORDER BY c.conname"
                ),
                params,
            ).all()
            objects = [tuple(r) for r in (*columns, *indexes, *constraints)]
        version = metastore.current(connection)
    return {
        "objects": objects,
        "version": (version.version, version.bundle, version.operations, version.action),
    }


def _uncached_namespace(platform, slug: str) -> TenantStore:
    """Make a namespace the plain way: the template through make_plan and build_tables."""
    url, schema = tenancy._placement(platform, slug)
    store = TenantStore(slug, platform.engines.get(url), schema)
    metastore.publish(
        store,
        tenancy.template_bundle("core"),
        expected_version=0,
        action="create",
        comment="created from template core",
        prepare=tenancy._namespace_maker(platform, store),
    )
    return store


def _ddl_statements(store: TenantStore, run) -> list[str]:
    seen: list[str] = []

    def watch(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith(("CREATE", "DROP", "ALTER", "INSERT")):
            seen.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", watch)
    try:
        run()
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", watch)
    return seen


def test_a_created_tenant_is_what_a_plain_publish_of_its_template_makes(platform):
    created = tenancy.create_tenant(platform, "cached", "Cached")
    cached = platform.store(created.tenant)
    plain = _uncached_namespace(platform, "plain")
    try:
        one, other = _catalog(cached), _catalog(plain)
        assert one["objects"] == other["objects"]
        assert one["version"] == other["version"]
        assert one["version"][1] == tenancy.template_bundle("core")
        names = {o[1] for o in one["objects"]} | {o[0] for o in one["objects"]}
        assert {"_meta_version", "customer", "deal"} <= names
        assert ("_fts_customer" if cached.schema is None else "trgm_customer__name") in names
        # The search indexes made with the tables are the ones a publish wants: ensuring
        # them again finds nothing to do.
        for store in (cached, plain):
            with store.begin() as connection:
                version = metastore.current(connection)
                model = compile_model(version.version, version.bundle)
                seen = _ddl_statements(
                    store, lambda c=connection, m=model: ensure_search_indexes(c, m)
                )
            assert seen == []
    finally:
        tenancy._drop_namespace(platform, plain)


def test_tenants_share_nothing_that_changes(platform, minimal_bundle):
    template = tenancy.template_bundle("core")
    prepared = tenancy._prepared("core")
    before = copy.deepcopy(prepared.plan.result)
    first = platform.store(tenancy.create_tenant(platform, "first", "First").tenant)
    bundle = tenancy.template_bundle("core")
    customer = next(e for e in bundle["entities"] if e["name"] == "customer")
    customer["fields"].append({"name": "vip_note", "type": "text", "label": {"en": "VIP"}})
    customer["label"]["en"] = "Client"
    metastore.publish(first, bundle, expected_version=1)
    second = platform.store(tenancy.create_tenant(platform, "second", "Second").tenant)
    with second.connect() as connection:
        assert metastore.current(connection).bundle == template
    assert prepared.plan.result == before == template
    assert "vip_note" not in prepared.metadata.tables["customer"].c
    with first.connect() as connection:
        assert metastore.current(connection).version == 2


def test_only_a_plan_that_creates_can_be_prepared(platform):
    core = Bundle.from_doc(tenancy.template_bundle("core"))
    changed = tenancy.template_bundle("core")
    deal = next(e for e in changed["entities"] if e["name"] == "deal")
    deal.setdefault("indexes", []).append({"name": "by_name", "fields": ["name"]})
    with pytest.raises(ValueError, match="only plans that create entities"):
        PreparedPlan(make_plan(core, changed))


def test_a_prepared_plan_publishes_only_itself_as_version_one(platform):
    created = tenancy.create_tenant(platform, "acme", "Acme")
    store = platform.store(created.tenant)
    prepared = tenancy._prepared("core")
    before = _catalog(store)
    with pytest.raises(ValueError, match="version 1"):
        metastore.publish(store, prepared.plan.result, expected_version=1, prepared=prepared)
    with pytest.raises(ValueError, match="version 1"):
        metastore.publish(
            store, tenancy.template_bundle("core"), expected_version=0, prepared=prepared
        )
    assert _catalog(store) == before


@pytest.mark.parametrize("backend", ["postgresql"])
def test_an_existing_schema_is_refused_and_left_alone(platform):
    schema = f"{platform.settings.tenant_schema_prefix}acme"
    with platform.control_engine.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        connection.exec_driver_sql(f'CREATE TABLE "{schema}".keep (v text)')
        connection.exec_driver_sql(f"INSERT INTO \"{schema}\".keep VALUES ('mine')")
    try:
        with pytest.raises(tenancy.TenantError, match="already exists"):
            tenancy.create_tenant(platform, "acme", "Acme")
        assert tenancy.list_tenants(platform) == []
        with platform.control_engine.connect() as connection:
            tables = connection.execute(
                sa.text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"),
                {"s": schema},
            ).scalars()
            assert list(tables) == ["keep"]
            assert connection.exec_driver_sql(f'SELECT v FROM "{schema}".keep').all() == [("mine",)]
    finally:
        with platform.control_engine.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.mark.parametrize("backend", ["postgresql"])
def test_publish_holds_the_lock_and_a_local_timeout(platform, minimal_bundle):
    store = platform.store(tenancy.create_tenant(platform, "acme", "Acme").tenant)
    seen: dict[str, Any] = {}

    def look(connection) -> None:
        seen["timeout"] = connection.exec_driver_sql("SHOW lock_timeout").scalar()
        seen["locks"] = connection.execute(
            sa.text(
                "SELECT count(*) FROM pg_locks "
                "WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted"
            )
        ).scalar()

    bundle = tenancy.template_bundle("core")
    bundle["entities"][0]["fields"].append({"name": "extra", "type": "text", "label": {"en": "X"}})
    metastore.publish(store, bundle, expected_version=1, lock_timeout_ms=75, prepare=look)
    assert seen == {"timeout": "75ms", "locks": 1}
    # SET LOCAL: the pooled connection does not keep the short timeout.
    with store.connect() as connection:
        assert connection.exec_driver_sql("SHOW lock_timeout").scalar() != "75ms"
        assert (
            connection.execute(
                sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
            ).scalar()
            == 0
        )


def test_concurrent_creation_of_one_slug_makes_one_tenant(platform, monkeypatch):
    both_checked = threading.Barrier(2)
    original = tenancy._namespace_maker

    def maker(p, store):
        # Both pass the control database's "slug taken?" check before either publishes.
        made = original(p, store)
        both_checked.wait(timeout=10)
        return made

    monkeypatch.setattr(tenancy, "_namespace_maker", maker)
    outcomes: list[str] = []

    def create() -> None:
        try:
            tenancy.create_tenant(platform, "race", "Race")
            outcomes.append("created")
        except tenancy.TenantError as exc:
            outcomes.append(f"refused: {exc}")

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o.split(":")[0] for o in outcomes) == ["created", "refused"], outcomes
    assert "already exists" in next(o for o in outcomes if o != "created")
    (registered,) = tenancy.list_tenants(platform)
    with platform.store(registered).connect() as connection:
        assert metastore.current(connection).version == 1


def test_a_failure_while_adding_the_admin_leaves_nothing(platform, monkeypatch):
    def interrupted(*args: Any) -> Any:
        raise KeyboardInterrupt  # the process stops between the tables and the login

    # A fresh address: on PostgreSQL the control database is shared by the session's
    # tests, and a login another test left behind would get no generated password.
    email = f"boss-{uuid.uuid4().hex[:8]}@acme.example"
    monkeypatch.setattr(tenancy, "_ensure_user", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tenancy.create_tenant(platform, "acme", "Acme", admin_email=email)
    assert tenancy.list_tenants(platform) == []
    with platform.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Membership)) == 0
    if platform.settings.embedded:
        assert list(platform.settings.tenants_dir.glob("acme-*")) == []
    else:
        with platform.control_engine.connect() as connection:
            assert (
                connection.execute(
                    sa.text("SELECT count(*) FROM pg_namespace WHERE nspname = :s"),
                    {"s": f"{platform.settings.tenant_schema_prefix}acme"},
                ).scalar()
                == 0
            )
    monkeypatch.undo()
    created = tenancy.create_tenant(platform, "acme", "Acme", admin_email=email)
    assert created.admin is not None and created.generated_password
    with platform.session() as session:
        membership = session.scalar(sa.select(Membership))
        assert (membership.tenant_id, membership.user_id) == (created.tenant.id, created.admin.id)
