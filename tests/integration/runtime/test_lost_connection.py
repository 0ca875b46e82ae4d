"""A pooled PostgreSQL connection that dies with its server process: 503, then back at once.

The engines do not ping a connection before each checkout (decision record 0009),
so a connection whose server process ended fails its statement. That request is
answered ``503 unavailable`` with Retry-After, and SQLAlchemy invalidates the pool,
so the requests after it work on fresh connections. PostgreSQL only: an SQLite
connection is a file, there is nothing to lose.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from metacrm.runtime.platform import Platform

from ...conftest import make_settings
from .test_api_meta import Api, build_app, make_tenant, private_control_database, problem


@pytest.fixture
def api(request: pytest.FixtureRequest, tmp_path) -> Iterator[tuple[Api, Platform]]:
    with private_control_database("postgresql") as database:
        settings = make_settings("postgresql", tmp_path, request, **database)
        p = Platform(settings)
        p.init_control()
        try:
            with build_app(settings) as app:
                yield make_tenant(p, app), app.extensions["metacrm"]
        finally:
            p.close()


def _kill_pooled_connections(platform: Platform) -> int:
    """End the server processes of every connection the app's pools hold; return how many."""
    engine = platform.control_engine
    admin = sa.create_engine(engine.url, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as connection:
        killed = connection.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    admin.dispose()
    return int(killed)


def test_a_request_on_a_dead_connection_is_503_and_the_next_one_works(api) -> None:
    tenant_api, platform = api
    path = f"/t/{tenant_api.slug}/api/v1/records/customer"
    headers = {"Authorization": f"Bearer {tenant_api.token}"}
    assert tenant_api.client.get(path, headers=headers).status_code == 200
    assert _kill_pooled_connections(platform) >= 1
    lost = tenant_api.client.get(path, headers=headers)
    body = problem(lost, 503, "unavailable")
    assert "connection to the database was lost" in body["detail"]
    assert lost.headers["Retry-After"] == "1"
    again = tenant_api.client.get(path, headers=headers)
    assert again.status_code == 200, again.get_data(as_text=True)[:500]
