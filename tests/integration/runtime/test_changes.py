"""Change watches and the caches that rely on them (decision record 0010).

A token's principal and a tenant's published version are kept in memory and
served without a statement while the database's change mark holds. These tests
check both halves of that promise on both backends: the cache really answers
(no statement is sent), and every way the facts can change (this process,
another process, a lost listening connection) makes the next request read again.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import event

from metacrm.runtime import authz, changes, metastore, tokens
from metacrm.runtime.changes import CONTROL, Watches, meta_topic
from metacrm.runtime.control import ApiToken, Membership, Tenant
from metacrm.runtime.platform import Platform

from .test_api_meta import Api, build_app, make_tenant, problem, text_field, with_field

WAIT_SECONDS = 10.0
POSTGRESQL_ONLY = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition`` holds (a notification crosses a thread), or fail."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {WAIT_SECONDS} s for {what}")
        time.sleep(0.01)


def listening_mark(platform: Platform) -> Hashable:
    """The control mark once the watch can give one (PostgreSQL starts a listener first)."""
    wait_for(lambda: platform.control_mark() is not None, "the change listener")
    mark = platform.control_mark()
    assert mark is not None
    return mark


@contextmanager
def statements(engine: sa.Engine) -> Iterator[list[str]]:
    """Collect the SQL statements an engine sends while the block runs."""
    sent: list[str] = []

    def note(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", note)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", note)


def libpq(engine: sa.Engine) -> str:
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def outside_write(platform: Platform, sql: str, topic: str, *values: object) -> None:
    """Write as another process does: its own connection, its own announcement.

    On PostgreSQL the statement and the ``pg_notify`` another metacrm process's
    write hook sends go through a plain driver connection, so only the
    notification (not this process's own hook) can tell the watch.
    """
    engine = platform.control_engine
    if engine.dialect.name == "postgresql":
        with psycopg.connect(libpq(engine)) as connection:
            connection.execute(sql.replace("?", "%s"), values)
            connection.execute("SELECT pg_notify(%s, %s)", (changes.CHANNEL, topic))
    else:
        connection = sqlite3.connect(engine.url.database)
        try:
            with connection:
                connection.execute(sql, values)
        finally:
            connection.close()


@pytest.fixture
def api(platform: Platform) -> Iterator[Api]:
    with build_app(platform.settings) as app:
        yield make_tenant(platform, app)


def app_platform(api: Api) -> Platform:
    return api.client.application.extensions["metacrm"]


def warm(api: Api) -> None:
    """Make the requests that fill the caches.

    The first use of a token records it (a control-database commit), which on
    SQLite changes the file's data_version; the second request reads again.
    """
    for _ in range(2):
        assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200


def records_url(api: Api) -> str:
    return f"/t/{api.slug}/api/v1/records/customer"


def bearer(api: Api) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.token}"}


# -- the watches ----------------------------------------------------------------------------


def test_a_mark_holds_until_a_write_of_this_process_commits(platform: Platform, api: Api) -> None:
    before = listening_mark(platform)
    assert platform.control_mark() == before
    with platform.session() as session:
        session.execute(sa.update(Tenant).values(name="Renamed here"))
    assert platform.control_mark() != before


def test_a_write_written_as_text_changes_the_mark(platform: Platform, api: Api) -> None:
    before = listening_mark(platform)
    with platform.control_engine.begin() as connection:
        connection.execute(sa.text("UPDATE tenant SET name = :name"), {"name": "As text"})
    assert platform.control_mark() != before


def test_a_rolled_back_write_leaves_the_mark_alone(platform: Platform, api: Api) -> None:
    before = listening_mark(platform)
    with platform.control_engine.connect() as connection:
        connection.execute(sa.update(Membership).values(is_active=True))
        connection.rollback()
    assert platform.control_mark() == before


def test_another_process_write_changes_the_mark(platform: Platform, api: Api) -> None:
    before = listening_mark(platform)
    outside_write(platform, "UPDATE tenant SET name = ?", CONTROL, "Renamed elsewhere")
    wait_for(lambda: platform.control_mark() != before, "the other process's change")


@POSTGRESQL_ONLY  # SQLite's data_version counts every commit; nothing is announced there
def test_a_cache_neutral_write_keeps_the_mark(platform: Platform, api: Api) -> None:
    before = listening_mark(platform)
    with platform.control_engine.begin() as connection:
        connection.execution_options(**{changes.CACHE_NEUTRAL: True}).execute(
            sa.update(ApiToken).values(last_used_at=dt.datetime.now(dt.UTC))
        )
    assert platform.control_mark() == before


def test_a_tenant_publish_changes_only_its_own_meta_mark(platform: Platform, api: Api) -> None:
    other = make_tenant(platform, api.client.application)
    store, other_store = platform.store(api.tenant), platform.store(other.tenant)
    watches = platform.changes

    def mark_of(s) -> Hashable | None:  # noqa: ANN001
        return watches.mark(s.engine, meta_topic(s.schema))

    wait_for(lambda: mark_of(store) is not None, "the change listener")
    mine, theirs = mark_of(store), mark_of(other_store)
    with store.connect() as connection:
        bundle = metastore.current(connection).bundle
    metastore.publish(
        store, with_field(bundle, "customer", text_field("nickname")), expected_version=1
    )
    assert mark_of(store) != mine
    assert mark_of(other_store) == theirs


def test_no_mark_for_an_in_memory_database() -> None:
    engine = sa.create_engine("sqlite://")
    assert Watches().mark(engine, CONTROL) is None


def test_a_closed_watch_gives_no_mark(platform: Platform) -> None:
    watches = Watches()
    wait_for(lambda: watches.mark(platform.control_engine, CONTROL) is not None, "a listener")
    watches.close()
    assert watches.mark(platform.control_engine, CONTROL) is None


@POSTGRESQL_ONLY  # SQLite has no listening connection to lose
def test_a_lost_listening_connection_voids_every_earlier_mark(platform: Platform, api: Api) -> None:
    engine = platform.control_engine
    before = listening_mark(platform)
    with psycopg.connect(libpq(engine), autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query = %s",
            (f"LISTEN {changes.CHANNEL}",),
        ).fetchone()
    assert ended is not None and ended[0] >= 1
    # While it reconnects there is no mark; once back, the old marks match nothing.
    wait_for(lambda: platform.control_mark() not in (None, before), "a new listening epoch")


# -- the token cache --------------------------------------------------------------------------


def test_a_known_token_is_answered_without_a_control_statement(api: Api) -> None:
    p = app_platform(api)
    listening_mark(p)
    warm(api)
    with statements(p.control_engine) as sent:
        assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200
    assert not [s for s in sent if "api_token" in s], sent


def test_a_cached_token_on_another_tenants_path_is_still_not_found(api: Api) -> None:
    other = make_tenant(api.platform, api.client.application)
    listening_mark(app_platform(api))
    warm(api)  # the token is now served from the cache
    for _ in range(2):
        problem(
            api.client.get(f"/t/{other.slug}/api/v1/records/customer", headers=bearer(api)),
            404,
            "not_found",
        )
    assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200


def test_without_a_mark_every_request_reads_the_token(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No mark (listener down, probe failed behind PgBouncer): nothing is served from memory."""
    p = app_platform(api)
    monkeypatch.setattr(p, "control_mark", lambda: None)
    warm(api)
    for _ in range(2):
        with statements(p.control_engine) as sent:
            assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200
        assert [s for s in sent if "api_token" in s], sent


def test_a_token_revoked_through_the_api_is_refused_at_once(api: Api) -> None:
    p = app_platform(api)
    listening_mark(p)
    assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200
    token_id = api.token.split("_")[1]
    answer = api.client.delete(f"/t/{api.slug}/api/v1/tokens/{token_id}", headers=bearer(api))
    assert answer.status_code in (200, 204), answer.get_data(as_text=True)
    problem(api.client.get(records_url(api), headers=bearer(api)), 401, "unauthorized")


def test_a_token_revoked_by_another_process_is_refused(api: Api) -> None:
    p = app_platform(api)
    listening_mark(p)
    assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(sep=" ")
    outside_write(p, "UPDATE api_token SET revoked_at = ?", CONTROL, now)
    wait_for(
        lambda: api.client.get(records_url(api), headers=bearer(api)).status_code == 401,
        "the revocation to be seen",
    )


def test_a_member_deactivated_by_another_process_is_refused(api: Api) -> None:
    p = app_platform(api)
    listening_mark(p)
    assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200
    outside_write(p, "UPDATE membership SET is_active = ?", CONTROL, False)
    wait_for(
        lambda: api.client.get(records_url(api), headers=bearer(api)).status_code == 401,
        "the deactivation to be seen",
    )


def test_a_cached_token_still_expires(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    p = app_platform(api)
    listening_mark(p)
    with p.session() as session:
        token, secret = tokens.create_token(
            session,
            api.tenant,
            api.admin,
            "short",
            expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
        )
    headers = {"Authorization": f"Bearer {secret}"}
    assert api.client.get(records_url(api), headers=headers).status_code == 200
    assert api.client.get(records_url(api), headers=headers).status_code == 200
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    monkeypatch.setattr(tokens, "utcnow", lambda: later)
    problem(api.client.get(records_url(api), headers=headers), 401, "unauthorized")


def test_a_wrong_secret_is_refused_and_leaves_the_cached_token_working(api: Api) -> None:
    p = app_platform(api)
    listening_mark(p)
    warm(api)
    forged = api.token[:-4] + ("AAAA" if not api.token.endswith("AAAA") else "BBBB")
    problem(
        api.client.get(records_url(api), headers={"Authorization": f"Bearer {forged}"}),
        401,
        "unauthorized",
    )
    with statements(p.control_engine) as sent:
        assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200
    assert not [s for s in sent if "api_token" in s], sent


def test_a_cached_token_keeps_its_principal_and_its_access(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = app_platform(api)
    listening_mark(p)
    warm(api)
    built: list[object] = []
    original = authz.for_principal

    def counted(*args: object, **kwargs: object) -> authz.Access:
        built.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(authz, "for_principal", counted)
    first = p.tokens.authenticate(p.control_engine, p.control_mark, api.token)
    second = p.tokens.authenticate(p.control_engine, p.control_mark, api.token)
    assert first is not None and second is not None and first[0] is second[0]
    for _ in range(3):
        assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200
    assert built == []  # warm() built it; the same principal keeps it
    # A new published version builds it again, once.
    store = p.store(api.tenant)
    with store.connect() as connection:
        bundle = metastore.current(connection).bundle
    metastore.publish(
        store, with_field(bundle, "customer", text_field("nickname")), expected_version=1
    )
    for _ in range(2):
        assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200
    assert len(built) == 1


# -- the published version ----------------------------------------------------------------------


def test_a_known_version_is_answered_without_a_statement(api: Api) -> None:
    p = app_platform(api)
    store = p.store(api.tenant)
    wait_for(lambda: p.changes.mark(store.engine, meta_topic(store.schema)) is not None, "mark")
    assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200
    with statements(store.engine) as sent:
        assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200
    assert not [s for s in sent if "_meta_version" in s], sent


def test_a_publish_by_another_platform_is_seen_by_the_next_request(
    platform: Platform, api: Api
) -> None:
    p = app_platform(api)
    assert p is not platform
    assert api.client.get(records_url(api), headers=bearer(api)).status_code == 200
    store = platform.store(api.tenant)
    with store.connect() as connection:
        bundle = metastore.current(connection).bundle
    metastore.publish(
        store, with_field(bundle, "customer", text_field("nickname")), expected_version=1
    )
    created = api.client.post(
        records_url(api), headers=bearer(api), json={"name": "Ada", "nickname": "Countess"}
    )
    assert created.status_code == 201, created.get_data(as_text=True)
    assert created.get_json()["nickname"] == "Countess"
