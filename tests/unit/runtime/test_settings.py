"""Settings: one load order, validated at start-up, with messages that name the setting.

Every test passes ``environ`` explicitly and points ``instance_dir`` into
``tmp_path``, so nothing here reads the real environment or writes outside the
test's own folder.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from metacrm.runtime import settings as settings_module
from metacrm.runtime.settings import Settings, SettingsError

SECRET = "0123456789abcdef-secret"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in tmp_path, so a relative default instance folder never lands in the repository."""
    monkeypatch.chdir(tmp_path)


def load(
    tmp_path: Path, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Load settings with the instance folder in tmp_path unless a source names another."""
    values: dict[str, Any] = {}
    environ = dict(environ or {})
    if "METACRM_INSTANCE_DIR" not in environ and "METACRM_CONFIG_FILE" not in environ:
        values["instance_dir"] = str(tmp_path / "instance")
    values.update(overrides or {})
    return settings_module.load(values, environ=environ)


def config_file(tmp_path: Path, text: str, name: str = "metacrm.toml") -> dict[str, str]:
    """Write a TOML config file and return the environment that names it."""
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return {"METACRM_CONFIG_FILE": str(path)}


def refused(tmp_path: Path, *names: str, **kwargs: Any) -> str:
    """Load expecting SettingsError; assert its message names every given word."""
    with pytest.raises(SettingsError) as info:
        load(tmp_path, **kwargs)
    message = str(info.value)
    for name in names:
        assert name in message, message
    return message


# -- defaults -------------------------------------------------------------------------------


def test_defaults_match_config_defaults_toml(tmp_path):
    s = load(tmp_path)
    assert s.env == "development"
    assert s.tenant_database_url == ""
    assert s.tenant_schema_prefix == "t_"
    assert s.redis_url == ""
    assert s.max_request_bytes == 5 * 1024 * 1024
    assert s.ddl_lock_timeout_ms == 50
    assert s.pool_size == 5
    assert s.host == "127.0.0.1"
    assert s.port == 5000
    assert s.log_level == "INFO"


def test_default_database_is_sqlite_control_db_in_instance_dir(tmp_path):
    s = load(tmp_path)
    instance = (tmp_path / "instance").resolve()
    assert s.instance_dir == instance
    assert s.database_url == f"sqlite:///{instance / 'control.db'}"
    assert s.embedded is True
    assert s.tenants_dir == instance / "tenants"


def test_postgresql_database_url_is_not_embedded(tmp_path):
    s = load(tmp_path, {"database_url": "postgresql+psycopg://u@db.example/crm"})
    assert s.database_url == "postgresql+psycopg://u@db.example/crm"
    assert s.embedded is False


def test_settings_are_frozen(tmp_path):
    s = load(tmp_path)
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


# -- precedence -----------------------------------------------------------------------------


def test_config_file_overrides_defaults(tmp_path):
    environ = config_file(
        tmp_path, f'instance_dir = "{tmp_path / "from_file"}"\nport = 6000\nhost = "0.0.0.0"\n'
    )
    s = load(tmp_path, environ=environ)
    assert s.port == 6000
    assert s.host == "0.0.0.0"
    assert s.instance_dir == (tmp_path / "from_file").resolve()
    assert s.pool_size == 5  # untouched keys keep their default


def test_environment_overrides_config_file(tmp_path):
    environ = config_file(tmp_path, "port = 6000\npool_size = 7\n")
    environ["METACRM_PORT"] = "7000"
    s = load(tmp_path, environ=environ)
    assert s.port == 7000
    assert s.pool_size == 7


def test_overrides_win_over_environment_and_file(tmp_path):
    environ = config_file(tmp_path, "port = 6000\n")
    environ["METACRM_PORT"] = "7000"
    s = load(tmp_path, {"port": 8000}, environ=environ)
    assert s.port == 8000


def test_environment_names_are_case_insensitive_after_the_prefix(tmp_path):
    s = load(tmp_path, environ={"METACRM_LOG_LEVEL": "DEBUG", "METACRM_pool_size": "9"})
    assert s.log_level == "DEBUG"
    assert s.pool_size == 9


def test_environment_without_prefix_is_ignored(tmp_path):
    s = load(tmp_path, environ={"PORT": "1234", "DATABASE_URL": "mysql://x/y"})
    assert s.port == 5000


def test_environment_instance_dir_is_used(tmp_path):
    s = settings_module.load(environ={"METACRM_INSTANCE_DIR": str(tmp_path / "env_instance")})
    assert s.instance_dir == (tmp_path / "env_instance").resolve()
    assert (tmp_path / "env_instance" / "dev_secret_key").exists()


def test_load_reads_nothing_from_the_process_environment_when_environ_is_given(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("METACRM_PORT", "1234")
    monkeypatch.setenv("METACRM_NOT_A_SETTING", "x")
    assert load(tmp_path).port == 5000


# -- unknown keys and secrets -----------------------------------------------------------------


def test_unknown_key_in_config_file_is_refused(tmp_path):
    environ = config_file(tmp_path, "prot = 6000\n")
    message = refused(tmp_path, "prot", environ=environ)
    assert "metacrm.toml" in message


def test_unknown_environment_variable_is_refused(tmp_path):
    refused(tmp_path, "databse_url", "environment", environ={"METACRM_DATABSE_URL": "x"})


def test_unknown_override_is_refused(tmp_path):
    refused(tmp_path, "colour", overrides={"colour": "blue"})


def test_table_in_config_file_is_refused(tmp_path):
    environ = config_file(tmp_path, "[database]\nurl = 'sqlite://'\n")
    refused(tmp_path, "database", environ=environ)


def test_secret_key_in_config_file_is_refused(tmp_path):
    environ = config_file(tmp_path, f'secret_key = "{SECRET}"\n')
    message = refused(tmp_path, "secret_key", "METACRM_SECRET_KEY", environ=environ)
    assert SECRET not in message  # the secret itself is not echoed back


def test_secret_key_from_environment_is_accepted(tmp_path):
    s = load(tmp_path, environ={"METACRM_SECRET_KEY": SECRET})
    assert s.secret_key == SECRET


def test_short_secret_key_is_refused(tmp_path):
    refused(tmp_path, "secret_key", "16", environ={"METACRM_SECRET_KEY": "short"})


def test_missing_config_file_is_refused(tmp_path):
    missing = tmp_path / "nope.toml"
    refused(
        tmp_path, "METACRM_CONFIG_FILE", str(missing), environ={"METACRM_CONFIG_FILE": str(missing)}
    )


def test_config_file_that_is_not_toml_is_refused(tmp_path):
    environ = config_file(tmp_path, "port = = 5\n")
    refused(tmp_path, "METACRM_CONFIG_FILE", "not TOML", environ=environ)


# -- bad values -----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["abc", "", "-1", "5000.5", "1e3", "0x10"])
def test_non_integer_port_from_environment_is_refused(tmp_path, raw):
    message = refused(tmp_path, "port", "environment", environ={"METACRM_PORT": raw})
    assert repr(raw) in message


@pytest.mark.parametrize("port", [0, 65536, 100000])
def test_port_outside_tcp_range_is_refused(tmp_path, port):
    refused(tmp_path, "port", overrides={"port": port})


def test_boolean_for_integer_setting_is_refused(tmp_path):
    environ = config_file(tmp_path, "pool_size = true\n")
    refused(tmp_path, "pool_size", environ=environ)


def test_float_for_integer_setting_in_config_file_is_refused(tmp_path):
    # int(8080.5) is 8080: a fractional value must be refused, not silently truncated.
    environ = config_file(tmp_path, "port = 8080.5\n")
    refused(tmp_path, "port", environ=environ)


def test_non_ascii_digits_for_integer_setting_are_refused(tmp_path):
    # int() accepts Arabic-Indic digits; a setting should be plain ASCII digits.
    refused(tmp_path, "pool_size", environ={"METACRM_POOL_SIZE": "٥"})


def test_number_for_string_setting_is_refused(tmp_path):
    environ = config_file(tmp_path, "host = 127\n")
    refused(tmp_path, "host", environ=environ)


def test_too_small_max_request_bytes_is_refused(tmp_path):
    refused(tmp_path, "max_request_bytes", overrides={"max_request_bytes": 100})


def test_max_import_bytes_defaults_to_50_mib_and_refuses_tiny_values(tmp_path):
    assert load(tmp_path).max_import_bytes == 50 * 1024 * 1024
    environ = {"METACRM_MAX_IMPORT_BYTES": "1048576"}
    assert load(tmp_path, environ=environ).max_import_bytes == 1048576
    refused(tmp_path, "max_import_bytes", environ={"METACRM_MAX_IMPORT_BYTES": "1000"})


def test_mass_export_rows_defaults_to_1000_and_refuses_negatives(tmp_path):
    assert load(tmp_path).mass_export_rows == 1000
    assert load(tmp_path, environ={"METACRM_MASS_EXPORT_ROWS": "0"}).mass_export_rows == 0
    refused(tmp_path, "mass_export_rows", environ={"METACRM_MASS_EXPORT_ROWS": "-1"})


@pytest.mark.parametrize("env", ["staging", "Production", "dev", ""])
def test_unknown_env_name_is_refused(tmp_path, env):
    refused(tmp_path, "env", "development", "production", environ={"METACRM_ENV": env})


@pytest.mark.parametrize("key", ["database_url", "tenant_database_url"])
@pytest.mark.parametrize(
    "url",
    ["not a url", "mysql://u@h/db", "mongodb://h/db", "oracle://h/db"],
)
def test_bad_or_unsupported_database_url_is_refused(tmp_path, key, url):
    refused(tmp_path, key, environ={f"METACRM_{key.upper()}": url})


def test_database_url_with_bad_port_is_refused_as_a_setting_error(tmp_path):
    # sa.make_url raises ValueError (not ArgumentError) for a non-numeric port.
    refused(
        tmp_path,
        "database_url",
        environ={"METACRM_DATABASE_URL": "postgresql://u@host:abc/db"},
    )


def test_tenant_database_url_is_accepted_for_postgresql(tmp_path):
    s = load(tmp_path, {"tenant_database_url": "postgresql+psycopg://u@h/tenants"})
    assert s.tenant_database_url == "postgresql+psycopg://u@h/tenants"


@pytest.mark.parametrize("prefix", ["", "1t_", "T_", "t-", "t;drop_", "abcdefghijk", "_t"])
def test_bad_tenant_schema_prefix_is_refused(tmp_path, prefix):
    refused(tmp_path, "tenant_schema_prefix", overrides={"tenant_schema_prefix": prefix})


def test_non_ascii_tenant_schema_prefix_is_refused(tmp_path):
    # A Cyrillic 'а' looks like 'a' and passes str.isalpha()/islower().
    refused(tmp_path, "tenant_schema_prefix", overrides={"tenant_schema_prefix": "tа_"})


@pytest.mark.parametrize("prefix", ["t_", "tenant_", "t1", "abcdefghij"])
def test_good_tenant_schema_prefix_is_accepted(tmp_path, prefix):
    assert load(tmp_path, {"tenant_schema_prefix": prefix}).tenant_schema_prefix == prefix


# -- secrets by environment -------------------------------------------------------------------


def test_production_without_secret_key_is_refused(tmp_path):
    refused(tmp_path, "secret_key", "METACRM_SECRET_KEY", environ={"METACRM_ENV": "production"})
    assert not (tmp_path / "instance" / "dev_secret_key").exists()


def test_production_with_secret_key_from_environment_starts(tmp_path):
    s = load(tmp_path, environ={"METACRM_ENV": "production", "METACRM_SECRET_KEY": SECRET})
    assert s.env == "production"
    assert s.secret_key == SECRET
    assert not (tmp_path / "instance" / "dev_secret_key").exists()


def test_development_secret_is_generated_once_and_reused(tmp_path):
    first = load(tmp_path)
    path = tmp_path / "instance" / "dev_secret_key"
    assert path.read_text("utf-8") == first.secret_key
    assert len(first.secret_key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = load(tmp_path)
    assert second.secret_key == first.secret_key


def test_development_secret_differs_between_instances(tmp_path):
    a = load(tmp_path, {"instance_dir": str(tmp_path / "a")})
    b = load(tmp_path, {"instance_dir": str(tmp_path / "b")})
    assert a.secret_key != b.secret_key


def test_explicit_secret_key_does_not_write_a_development_secret(tmp_path):
    s = load(tmp_path, environ={"METACRM_SECRET_KEY": SECRET})
    assert s.secret_key == SECRET
    assert not (tmp_path / "instance" / "dev_secret_key").exists()


# -- paths ----------------------------------------------------------------------------------


def test_relative_instance_dir_is_resolved_against_current_directory(tmp_path):
    s = settings_module.load({"instance_dir": "relative/inst"}, environ={})
    assert s.instance_dir.is_absolute()
    assert s.instance_dir == (tmp_path / "relative" / "inst").resolve()
    assert s.database_url == f"sqlite:///{s.instance_dir / 'control.db'}"


def test_default_instance_dir_is_instance_in_current_directory(tmp_path):
    s = settings_module.load(environ={})
    assert s.instance_dir == (tmp_path / "instance").resolve()


def test_home_in_instance_dir_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    s = settings_module.load({"instance_dir": "~/crm"}, environ={})
    assert s.instance_dir == (tmp_path / "crm").resolve()


@pytest.mark.parametrize("value", [-1, 6])
def test_trusted_proxies_outside_zero_to_five_is_refused(tmp_path, value):
    with pytest.raises(SettingsError, match="trusted_proxies"):
        settings_module.load({"instance_dir": str(tmp_path), "trusted_proxies": value}, environ={})
