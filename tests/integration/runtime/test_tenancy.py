"""Tenants: creation from a template, isolation of namespaces, deletion, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from metacrm.runtime import metastore, tenancy
from metacrm.runtime.control import Membership, Tenant, User
from metacrm.runtime.passwords import verify_password


def _namespaces(platform) -> set[str]:
    if platform.settings.embedded:
        # Files are named <slug>-<unique suffix>.db, never reused.
        return {p.stem.rsplit("-", 1)[0] for p in platform.settings.tenants_dir.glob("*.db")}
    with platform.control_engine.connect() as connection:
        prefix = platform.settings.tenant_schema_prefix
        return {
            name[len(prefix) :]
            for (name,) in connection.execute(
                sa.text("SELECT nspname FROM pg_namespace WHERE nspname LIKE :p"),
                {"p": prefix.replace("_", "\\_") + "%"},
            )
        }


def test_create_tenant_from_core_with_admin(platform):
    created = tenancy.create_tenant(platform, "acme", "Acme 贸易", admin_email="Boss@Acme.example")
    assert created.generated_password
    with platform.session() as session:
        user = session.scalar(sa.select(User).where(User.email == "boss@acme.example"))
        assert verify_password(user.password_hash, created.generated_password)
        membership = session.scalar(sa.select(Membership).where(Membership.user_id == user.id))
        assert membership.roles == ["admin"]
    with platform.store(created.tenant).connect() as connection:
        version = metastore.current(connection)
    assert version.version == 1 and version.action == "create"
    assert {e["name"] for e in version.bundle["entities"]} == {
        "customer",
        "contact",
        "interaction",
        "task",
        "deal",
    }
    assert _namespaces(platform) == {"acme"}


def test_tenants_do_not_share_tables(platform):
    a = tenancy.create_tenant(platform, "alpha", "A").tenant
    b = tenancy.create_tenant(platform, "beta", "B").tenant
    store_a, store_b = platform.store(a), platform.store(b)
    assert (store_a.schema, store_a.engine.url) != (store_b.schema, store_b.engine.url)
    from .conftest import insert, rows

    insert(store_a, "customer", {"name": "only in alpha", "kind": "company"})
    assert rows(store_b, "customer", "name") == []
    assert rows(store_a, "customer", "name") == [("only in alpha",)]


@pytest.mark.parametrize(
    ("slug", "says"),
    [
        ("Acme", "lower case"),
        ("a-b", "may contain only"),
        ("select", "reserved"),
        ("x" * 41, "limit is 40"),
        ("acme\n", "may contain only"),
    ],
)
def test_bad_slugs_are_refused_and_nothing_is_made(platform, slug, says):
    with pytest.raises(tenancy.TenantError, match=says):
        tenancy.create_tenant(platform, slug, "x")
    assert tenancy.list_tenants(platform) == []
    assert _namespaces(platform) == set()


def test_duplicate_slug_and_unknown_template_are_refused(platform):
    tenancy.create_tenant(platform, "acme", "Acme")
    with pytest.raises(tenancy.TenantError, match="already exists"):
        tenancy.create_tenant(platform, "acme", "Acme again")
    with pytest.raises(tenancy.TenantError, match="no template"):
        tenancy.create_tenant(platform, "other", "Other", template="../core")
    assert [t.slug for t in tenancy.list_tenants(platform)] == ["acme"]
    assert _namespaces(platform) == {"acme"}


def test_existing_login_with_a_new_password_is_refused_before_anything_is_made(platform):
    tenancy.create_tenant(
        platform, "acme", "Acme", admin_email="a@x.example", admin_password="correct horse battery"
    )
    with pytest.raises(tenancy.TenantError, match="already has a login"):
        tenancy.create_tenant(
            platform,
            "beta",
            "Beta",
            admin_email="a@x.example",
            admin_password="another long password",
        )
    assert _namespaces(platform) == {"acme"}
    created = tenancy.create_tenant(platform, "gamma", "Gamma", admin_email="a@x.example")
    assert created.generated_password is None  # the person keeps their password


def test_failure_during_creation_leaves_nothing(platform, monkeypatch):
    def broken_register(*args, **kwargs):
        raise RuntimeError("control database went away")

    monkeypatch.setattr(tenancy, "Tenant", broken_register)
    with pytest.raises(RuntimeError):
        tenancy.create_tenant(platform, "acme", "Acme")
    assert _namespaces(platform) == set()
    with platform.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Tenant)) == 0


def test_delete_removes_data_and_registration(platform):
    created = tenancy.create_tenant(platform, "acme", "Acme", admin_email="a@x.example")
    tenancy.delete_tenant(platform, "acme")
    assert tenancy.list_tenants(platform) == []
    assert _namespaces(platform) == set()
    if platform.settings.embedded:
        assert not Path(created.tenant.database_url.removeprefix("sqlite:///")).exists()
    with pytest.raises(tenancy.TenantError, match="no tenant"):
        tenancy.delete_tenant(platform, "acme")
