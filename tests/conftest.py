"""Fixtures shared by every tier: backends, a platform, tenants.

Database tests run on SQLite and on a real PostgreSQL (``TEST_PG_URL``,
default: the local server's ``test`` database). The session creates a private
PostgreSQL database for itself and drops it at the end, so runs never see each
other's schemas.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from metacrm.runtime import settings as settings_module
from metacrm.runtime import tenancy
from metacrm.runtime.platform import Platform

PG_ADMIN_URL = os.environ.get("TEST_PG_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """Create a private PostgreSQL database for this test session."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"metacrm_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def make_settings(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, **overrides: object
) -> settings_module.Settings:
    """Return settings for a platform on one backend, with its files under tmp_path."""
    values: dict[str, object] = {
        "instance_dir": str(tmp_path / "instance"),
        "secret_key": "test-secret-key-0123456789",
        # Every test client comes from 127.0.0.1; a module's many API calls must not
        # meet the production rate limit (tests/integration/web/ tests the limits).
        "api_rate_limit": "1000000 per minute",
        "login_rate_limit": "1000000 per minute",
    }
    if backend == "postgresql":
        values["database_url"] = request.getfixturevalue("pg_url")
        values["tenant_schema_prefix"] = f"t{uuid.uuid4().hex[:6]}_"
    values.update(overrides)
    return settings_module.load(values, environ={})


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Run the test once per database backend."""
    return request.param


@pytest.fixture
def platform(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Platform]:
    """A platform with an empty control database on the test's backend."""
    p = Platform(make_settings(backend, tmp_path, request))
    p.init_control()
    yield p
    for item in tenancy.list_tenants(p):
        tenancy.delete_tenant(p, item.slug)
    p.close()
