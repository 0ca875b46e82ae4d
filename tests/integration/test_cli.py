"""The ``metacrm`` command, run in-process with Click's runner.

Settings come from ``METACRM_*`` variables, as in production: an instance
folder under ``tmp_path`` (SQLite), or the session's PostgreSQL database with a
schema prefix of the test's own, whose schemas are dropped at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher
from click.testing import CliRunner, Result

from metacrm.app import create_app
from metacrm.cli import main
from metacrm.runtime import settings as settings_module
from metacrm.runtime import tenancy
from metacrm.runtime.control import User
from metacrm.runtime.passwords import verify_password
from metacrm.runtime.platform import Platform

CORE = Path(__file__).resolve().parents[2] / "tenants" / "core"
SECRET = "cli-test-secret-0123456789"
CHEAP_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@dataclass
class Cli:
    """Run ``metacrm`` with a fixed environment and check its exit code."""

    env: dict[str, str | None]
    runner: CliRunner

    def __call__(self, *args: str, code: int = 0, catch: bool = False) -> Result:
        """Run a command; ``catch`` turns an uncaught exception into exit code 1."""
        result = self.runner.invoke(main, list(args), env=self.env, catch_exceptions=catch)
        assert result.exit_code == code, (
            f"exit {result.exit_code} != {code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
        return result

    def platform(self) -> Platform:
        """Return a platform on the same settings the command line uses."""
        environ = {k: v for k, v in self.env.items() if v is not None}
        p = Platform(settings_module.load(environ=environ))
        p.init_control()
        return p

    def create(self, slug: str, *extra: str) -> str:
        """Create a tenant and return its admin email."""
        email = f"admin@{slug}.example"
        self("tenant", "create", slug, "--name", f"{slug} Ltd", "--admin-email", email, *extra)
        return email


def clean_environment() -> dict[str, str | None]:
    """Unset every METACRM_* variable of the outer environment for the command."""
    return {key: None for key in os.environ if key.startswith("METACRM_")}


@pytest.fixture(autouse=True)
def cheap_password_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash new passwords with argon2id at its lowest cost: real hashes, made fast."""
    monkeypatch.setattr(tenancy, "hash_password", CHEAP_HASHER.hash)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    """The command line on an embedded (SQLite) instance under tmp_path."""
    env = clean_environment()
    env.update(
        METACRM_INSTANCE_DIR=str(tmp_path / "instance"),
        METACRM_SECRET_KEY=SECRET,
    )
    return Cli(env, CliRunner())


@pytest.fixture
def pg_cli(pg_url: str) -> Iterator[Cli]:
    """The command line on the session's PostgreSQL database, with a schema prefix of its own."""
    prefix = f"c{uuid.uuid4().hex[:6]}_"
    env = clean_environment()
    env.update(
        METACRM_DATABASE_URL=pg_url,
        METACRM_TENANT_SCHEMA_PREFIX=prefix,
        METACRM_SECRET_KEY=SECRET,
        METACRM_ENV="production",
    )
    yield Cli(env, CliRunner())
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as connection:
            for schema in _schemas(connection, prefix):
                connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
            connection.execute(
                sa.text("DELETE FROM tenant WHERE schema LIKE :p"), {"p": _like(prefix)}
            )
    finally:
        engine.dispose()


def _like(prefix: str) -> str:
    return prefix.replace("_", r"\_") + "%"


def _schemas(connection: sa.Connection, prefix: str) -> list[str]:
    rows = connection.execute(
        sa.text("SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE :p"),
        {"p": _like(prefix)},
    )
    return [row[0] for row in rows]


def copy_core(tmp_path: Path, name: str = "bundle") -> Path:
    folder = tmp_path / name
    shutil.copytree(CORE, folder)
    return folder


def edit(path: Path, change: Any) -> None:
    """Load a JSON document, let ``change`` modify it, and write it back."""
    doc = json.loads(path.read_text("utf-8"))
    change(doc)
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=2), "utf-8")


def add_customer_field(folder: Path, **field: Any) -> None:
    edit(folder / "entities" / "customer.json", lambda doc: doc["fields"].append(field))


def listed(cli: Cli) -> list[str]:
    return [line.split("\t")[0] for line in cli("tenant", "list").stdout.splitlines()]


# -- tenants --------------------------------------------------------------------------------


def test_tenant_create_prints_generated_password_once(cli):
    result = cli(
        "tenant", "create", "acme", "--name", "Acme 有限公司", "--admin-email", "Boss@Acme.Example"
    )
    out = result.stdout
    assert "Created tenant 'acme' (Acme 有限公司) from template 'core'." in out
    assert "Admin: boss@acme.example" in out
    (password,) = re.findall(r"^Password \(shown once\): (\S+)$", out, re.MULTILINE)
    assert len(password) >= 10
    assert out.count(password) == 1
    p = cli.platform()
    try:
        with p.session() as session:
            user = session.scalar(sa.select(User).where(User.email == "boss@acme.example"))
            assert user is not None
            assert user.password_hash != password
            assert verify_password(user.password_hash, password)
    finally:
        p.close()
    assert listed(cli) == ["acme"]


def test_tenant_create_with_chosen_password_prints_no_password(cli):
    result = cli(
        "tenant",
        "create",
        "acme",
        "--name",
        "Acme",
        "--admin-email",
        "boss@acme.example",
        "--admin-password",
        "correct horse battery",
    )
    assert "Password" not in result.output
    assert "correct horse battery" not in result.output


def test_tenant_create_with_sample_data_loads_records(cli):
    result = cli(
        "tenant",
        "create",
        "demo",
        "--name",
        "Demo",
        "--admin-email",
        "a@demo.example",
        "--sample-data",
    )
    (count,) = re.findall(r"Loaded (\d+) sample records\.", result.stdout)
    assert int(count) > 0


def test_duplicate_tenant_slug_is_refused(cli):
    cli.create("acme")
    result = cli(
        "tenant", "create", "acme", "--name", "Other", "--admin-email", "x@other.example", code=1
    )
    assert "already exists" in result.stderr
    assert "acme" in result.stderr
    assert listed(cli) == ["acme"]


@pytest.mark.parametrize(
    "slug",
    ["Acme", "1acme", "ac-me", "ac me", "select", "lеad", "x" * 41, "acme\n", "a;drop table t"],
)
def test_bad_tenant_slug_is_refused_and_nothing_is_left(cli, tmp_path, slug):
    result = cli(
        "tenant", "create", slug, "--name", "Bad", "--admin-email", "a@bad.example", code=1
    )
    assert "tenant slug" in result.stderr
    assert "Traceback" not in result.output
    assert listed(cli) == []
    tenants_dir = tmp_path / "instance" / "tenants"
    assert not tenants_dir.exists() or list(tenants_dir.iterdir()) == []


@pytest.mark.parametrize("option, value", [("--admin-email", "not-an-email"), ("--name", " ")])
def test_bad_tenant_details_are_refused(cli, option, value):
    args = {"--name": "Acme", "--admin-email": "a@acme.example", option: value}
    result = cli("tenant", "create", "acme", *[x for kv in args.items() for x in kv], code=1)
    assert result.stderr.startswith("Error: ")
    assert listed(cli) == []


def test_short_admin_password_is_refused(cli):
    result = cli(
        "tenant",
        "create",
        "acme",
        "--name",
        "Acme",
        "--admin-email",
        "a@acme.example",
        "--admin-password",
        "short",
        code=1,
    )
    assert "password" in result.stderr
    assert listed(cli) == []


def test_unknown_template_is_refused(cli):
    result = cli(
        "tenant",
        "create",
        "acme",
        "--name",
        "Acme",
        "--admin-email",
        "a@acme.example",
        "--template",
        "nope",
        code=1,
    )
    assert "template" in result.stderr
    assert listed(cli) == []


def test_tenant_list_shows_every_tenant_oldest_first(cli):
    assert cli("tenant", "list").stdout == ""
    cli.create("first")
    cli.create("second")
    lines = cli("tenant", "list").stdout.splitlines()
    assert [line.split("\t")[:4] for line in lines] == [
        ["first", "first Ltd", "core", "sqlite file"],
        ["second", "second Ltd", "core", "sqlite file"],
    ]


def test_tenant_delete_needs_confirm(cli, tmp_path):
    cli.create("acme")
    (database,) = (tmp_path / "instance" / "tenants").glob("acme-*.db")
    result = cli("tenant", "delete", "acme", code=1)
    assert "--confirm" in result.stderr
    assert listed(cli) == ["acme"]
    assert database.exists()
    result = cli("tenant", "delete", "acme", "--confirm")
    assert "Deleted tenant 'acme'." in result.stdout
    assert listed(cli) == []
    assert not database.exists()


def test_deleting_unknown_tenant_fails(cli):
    result = cli("tenant", "delete", "ghost", "--confirm", code=1)
    assert "there is no tenant 'ghost'" in result.stderr


# -- tokens ---------------------------------------------------------------------------------


def _app_for(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Build the web application from the same environment the command line uses."""
    for key, value in cli.env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    return create_app()


def test_token_create_prints_a_token_that_works_on_the_api(cli, monkeypatch):
    email = cli.create("acme")
    token = cli("token", "create", "--tenant", "acme", "--user", email, "--name", "ci").stdout
    token = token.strip()
    assert re.fullmatch(r"mcrm_[0-9a-f]{32}_[A-Za-z0-9_-]{40,}", token)
    read_only = cli(
        "token",
        "create",
        "--tenant",
        "acme",
        "--user",
        email.upper(),
        "--name",
        "ro",
        "--read-only",
    ).stdout.strip()
    app = _app_for(cli, monkeypatch)
    try:
        client = app.test_client()
        response = client.get("/t/acme/api/v1/meta/", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200
        assert response.get_json()["version"] == 1
        response = client.post(
            "/t/acme/api/v1/meta/publish",
            json={"bundle": response.get_json()["bundle"], "expected_version": 1},
            headers={"Authorization": f"Bearer {read_only}"},
        )
        assert response.status_code == 403
    finally:
        app.extensions["metacrm"].close()


def test_token_create_for_unknown_tenant_or_non_member_fails(cli):
    email = cli.create("acme")
    cli.create("other")
    result = cli("token", "create", "--tenant", "ghost", "--user", email, "--name", "x", code=1)
    assert "there is no tenant 'ghost'" in result.stderr
    result = cli("token", "create", "--tenant", "other", "--user", email, "--name", "x", code=1)
    assert "is not a member of 'other'" in result.stderr
    result = cli(
        "token", "create", "--tenant", "acme", "--user", "nobody@x.example", "--name", "x", code=1
    )
    assert "is not a member" in result.stderr
    result = cli("token", "create", "--tenant", "acme", "--user", email, "--name", "", code=1)
    assert "--name" in result.stderr


# -- meta validate --------------------------------------------------------------------------


def test_meta_validate_accepts_the_core_bundle(cli):
    result = cli("meta", "validate", str(CORE))
    assert result.stdout.strip() == f"{CORE}: valid"


def test_meta_validate_lists_problems_by_file_and_pointer(cli, tmp_path):
    folder = copy_core(tmp_path)

    def breakage(doc: dict[str, Any]) -> None:
        doc["fields"][1]["type"] = "no_such_type"
        del doc["fields"][2]["label"]
        doc["title_field"] = "nmae"

    edit(folder / "entities" / "customer.json", breakage)
    result = cli("meta", "validate", str(folder), code=1)
    out = result.stdout
    assert re.search(r"^\S+: \d+ problem\(s\)$", out, re.MULTILINE)
    assert "entities/customer.json#/fields/1/type" in out
    assert "entities/customer.json#/fields/2" in out
    assert "entities/customer.json#/title_field" in out
    assert "hint: " in out  # "did you mean 'name'?"


def test_meta_validate_reports_malformed_json_files(cli, tmp_path):
    folder = copy_core(tmp_path)
    (folder / "entities" / "task.json").write_text('{"kind": "entity", "name": ', "utf-8")
    (folder / "roles" / "admin.json").write_text('{"kind": "role", "kind": "role"}', "utf-8")
    out = cli("meta", "validate", str(folder), code=1).stdout
    assert "entities/task.json" in out
    assert "roles/admin.json" in out
    assert "duplicate key" in out


def test_meta_validate_of_missing_folder_fails(cli, tmp_path):
    result = cli("meta", "validate", str(tmp_path / "nope"), code=2)
    assert "does not exist" in result.output


# -- meta plan, publish, history, diff, rollback, export ------------------------------------


def test_meta_publish_history_diff_rollback_and_export(cli, tmp_path):
    cli.create("acme")
    folder = copy_core(tmp_path)
    add_customer_field(folder, name="nickname", type="text", label={"en": "Nickname"})

    planned = cli("meta", "plan", "--tenant", "acme", str(folder)).stdout
    assert planned.startswith("Against version 1:")
    assert "  1. Add text field 'Nickname' (customer.nickname)" in planned

    published = cli(
        "meta",
        "publish",
        "--tenant",
        "acme",
        "--expected-version",
        "1",
        "--comment",
        "add nickname",
        str(folder),
    ).stdout
    assert "Published version 2 (1 operations)." in published

    stale = cli(
        "meta", "publish", "--tenant", "acme", "--expected-version", "1", str(folder), code=1
    )
    assert "published version is 2" in stale.stderr
    assert "nothing was changed" in stale.stderr

    history = cli("meta", "history", "--tenant", "acme").stdout.splitlines()
    assert [line.split()[0] for line in history] == ["2", "1"]
    assert "publish" in history[0] and "cli" in history[0] and "add nickname" in history[0]
    assert "create" in history[1]

    diff = cli("meta", "diff", "--tenant", "acme", "1", "2").stdout
    assert "Add text field 'Nickname' (customer.nickname)" in diff
    assert cli("meta", "diff", "--tenant", "acme", "2", "2").stdout.strip() == "No changes."
    unknown = cli("meta", "diff", "--tenant", "acme", "1", "9", code=1)
    assert "never published" in unknown.stderr

    rolled = cli("meta", "rollback", "--tenant", "acme", "--to", "1", "--expected-version", "2")
    assert "Published version 3" in rolled.stdout
    history = cli("meta", "history", "--tenant", "acme").stdout.splitlines()
    assert history[0].split()[:1] == ["3"] and "rollback" in history[0]

    latest = tmp_path / "latest.json"
    assert (
        f"Wrote version 3 to {latest}."
        in cli("meta", "export", "--tenant", "acme", str(latest)).stdout
    )
    bundle = json.loads(latest.read_text("utf-8"))
    customer = next(e for e in bundle["entities"] if e["name"] == "customer")
    nickname = next(f for f in customer["fields"] if f["name"] == "nickname")
    assert nickname["archived"] is True

    second = tmp_path / "v2.json"
    cli("meta", "export", "--tenant", "acme", "--version", "2", str(second))
    customer = next(
        e for e in json.loads(second.read_text("utf-8"))["entities"] if e["name"] == "customer"
    )
    assert "archived" not in next(f for f in customer["fields"] if f["name"] == "nickname")
    missing = cli(
        "meta", "export", "--tenant", "acme", "--version", "9", str(tmp_path / "x.json"), code=1
    )
    assert "never published" in missing.stderr
    assert not (tmp_path / "x.json").exists()


def test_meta_plan_and_publish_refuse_what_the_data_does_not_allow(cli, tmp_path):
    cli.create("acme", "--sample-data")
    folder = copy_core(tmp_path)
    add_customer_field(folder, name="region", type="text", label={"en": "Region"}, required=True)
    planned = cli("meta", "plan", "--tenant", "acme", str(folder), code=1).stdout
    assert "refused:" in planned
    assert re.search(r"e\.g\. records [0-9a-f-]{36}", planned)
    result = cli(
        "meta", "publish", "--tenant", "acme", "--expected-version", "1", str(folder), code=1
    )
    assert "the data does not allow this change; nothing was changed" in result.stderr
    assert len(cli("meta", "history", "--tenant", "acme").stdout.splitlines()) == 1


def test_meta_publish_purge_needs_confirm_destructive(cli, tmp_path):
    cli.create("acme")
    with_field = copy_core(tmp_path, "with_field")
    add_customer_field(with_field, name="nickname", type="text", label={"en": "Nickname"})
    publish = ("meta", "publish", "--tenant", "acme")
    cli(*publish, "--expected-version", "1", str(with_field))
    cli(*publish, "--expected-version", "2", str(CORE))  # archives the field
    refused = cli(
        *publish, "--expected-version", "3", "--purge", "customer.nickname", str(CORE), code=1
    )
    assert "--confirm-destructive" in refused.stderr
    assert "[destructive]" in refused.stdout
    assert len(cli("meta", "history", "--tenant", "acme").stdout.splitlines()) == 3
    done = cli(
        *publish,
        "--expected-version",
        "3",
        "--purge",
        "customer.nickname",
        "--confirm-destructive",
        str(CORE),
    )
    assert "Published version 4" in done.stdout


def test_meta_publish_of_invalid_folder_changes_nothing(cli, tmp_path):
    cli.create("acme")
    folder = copy_core(tmp_path)
    add_customer_field(folder, name="x; drop table t", type="text", label={"en": "X"})
    result = cli(
        "meta", "publish", "--tenant", "acme", "--expected-version", "1", str(folder), code=1
    )
    assert "entities/customer.json#/fields/" in result.stdout
    assert len(cli("meta", "history", "--tenant", "acme").stdout.splitlines()) == 1


def test_meta_commands_on_unknown_tenant_fail(cli, tmp_path):
    for args in (
        ("meta", "plan", "--tenant", "ghost", str(CORE)),
        ("meta", "publish", "--tenant", "ghost", "--expected-version", "1", str(CORE)),
        ("meta", "history", "--tenant", "ghost"),
        ("meta", "diff", "--tenant", "ghost", "1", "2"),
        ("meta", "rollback", "--tenant", "ghost", "--to", "1", "--expected-version", "1"),
        ("meta", "export", "--tenant", "ghost", str(tmp_path / "out.json")),
    ):
        assert "there is no tenant 'ghost'" in cli(*args, code=1).stderr


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, value, word",
    [
        ("METACRM_PORT", "abc", "port"),
        ("METACRM_ENV", "staging", "env"),
        ("METACRM_DATABASE_URL", "mysql://u@h/db", "database_url"),
        ("METACRM_POOL_SIZE", "-3", "pool_size"),
        ("METACRM_COLOUR", "blue", "colour"),
        ("METACRM_DATABASE_URL", "postgresql://u@host:abc/db", "database_url"),
        ("METACRM_TENANT_SCHEMA_PREFIX", "T-", "tenant_schema_prefix"),
    ],
)
def test_bad_setting_exits_2_naming_it(cli, name, value, word):
    cli.env[name] = value
    for args in (("tenant", "list"), ("serve",)):
        result = cli(*args, code=2)
        assert word in result.stderr
        assert "Traceback" not in result.output


def test_production_without_secret_key_exits_2(cli):
    cli.env["METACRM_ENV"] = "production"
    cli.env["METACRM_SECRET_KEY"] = None
    assert "METACRM_SECRET_KEY" in cli("tenant", "list", code=2).stderr


def test_config_file_named_by_environment_is_used(cli, tmp_path):
    config = tmp_path / "metacrm.toml"
    config.write_text(f'instance_dir = "{tmp_path / "from_file"}"\n', "utf-8")
    cli.env["METACRM_INSTANCE_DIR"] = None
    cli.env["METACRM_CONFIG_FILE"] = str(config)
    cli.create("acme")
    assert list((tmp_path / "from_file" / "tenants").glob("acme-*.db"))


def test_unreachable_database_fails_with_a_message_not_a_traceback(cli):
    cli.env["METACRM_DATABASE_URL"] = "postgresql+psycopg://nobody@127.0.0.1:1/none"
    result = cli("tenant", "list", code=1, catch=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.stderr.startswith("Error: ")
    assert "database" in result.stderr


def test_export_to_a_missing_folder_fails_with_a_message_not_a_traceback(cli, tmp_path):
    cli.create("acme")
    target = tmp_path / "no" / "such" / "folder" / "out.json"
    result = cli("meta", "export", "--tenant", "acme", str(target), code=1, catch=True)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.stderr.startswith("Error: ")


def test_serve_refuses_a_port_outside_the_tcp_range(cli):
    assert "--port" in cli("serve", "--port", "0", code=2).stderr


def test_version_option(cli):
    assert "0.1.0" in cli("--version").stdout


# -- PostgreSQL -----------------------------------------------------------------------------


def test_cli_on_postgresql_creates_publishes_and_deletes_schema(pg_cli, pg_url, tmp_path):
    prefix = pg_cli.env["METACRM_TENANT_SCHEMA_PREFIX"]
    slug = f"pg{uuid.uuid4().hex[:8]}"
    email = pg_cli.create(slug)
    (line,) = [x for x in pg_cli("tenant", "list").stdout.splitlines() if x.startswith(slug)]
    assert line.split("\t")[3] == f"{prefix}{slug}"
    token = pg_cli("token", "create", "--tenant", slug, "--user", email, "--name", "ci").stdout
    assert token.startswith("mcrm_")

    folder = copy_core(tmp_path)
    add_customer_field(folder, name="nickname", type="text", label={"en": "Nickname"}, indexed=True)
    published = pg_cli(
        "meta", "publish", "--tenant", slug, "--expected-version", "1", str(folder)
    ).stdout
    assert "Published version 2" in published

    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as connection:
            assert _schemas(connection, prefix) == [f"{prefix}{slug}"]
            columns = sa.inspect(connection).get_columns("customer", schema=f"{prefix}{slug}")
            assert "nickname" in {c["name"] for c in columns}
        pg_cli("tenant", "delete", slug, "--confirm")
        with engine.connect() as connection:
            assert _schemas(connection, prefix) == []
    finally:
        engine.dispose()
    assert slug not in pg_cli("tenant", "list").stdout


def test_duplicate_tenant_on_postgresql_keeps_the_existing_schema(pg_cli, pg_url):
    prefix = pg_cli.env["METACRM_TENANT_SCHEMA_PREFIX"]
    slug = f"pg{uuid.uuid4().hex[:8]}"
    pg_cli.create(slug)
    pg_cli("tenant", "create", slug, "--name", "Again", "--admin-email", "b@again.example", code=1)
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as connection:
            assert _schemas(connection, prefix) == [f"{prefix}{slug}"]
    finally:
        engine.dispose()
    assert len(pg_cli("meta", "history", "--tenant", slug).stdout.splitlines()) == 1
