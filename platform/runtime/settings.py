"""Settings: one load order, validated at start-up.

Code defaults (``config/defaults.toml``) → the TOML file named by
``METACRM_CONFIG_FILE`` → ``METACRM_*`` environment variables → overrides
passed to the factory. A bad value stops start-up with a message that names
the setting and where the value came from. Secrets come only from the
environment.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ENV_PREFIX = "METACRM_"
SECRET_KEYS = frozenset({"secret_key", "smtp_password"})
SUPPORTED_DRIVERS = ("postgresql", "postgresql+psycopg", "sqlite", "sqlite+pysqlite")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SMTP_SECURITY = ("starttls", "tls", "none")
#: A rate in the ``limits`` library's notation: "N per unit" or "N/unit", several joined by ";".
RATE_LIMIT = (
    r"[1-9][0-9]{0,8} ?(per|/) ?(second|minute|hour|day)s?"
    r"( ?; ?[1-9][0-9]{0,8} ?(per|/) ?(second|minute|hour|day)s?)*"
)


class SettingsError(ValueError):
    """A setting has a value metacrm cannot start with."""


@dataclass(frozen=True)
class Settings:
    """Every setting metacrm reads, with its validated value."""

    env: str = "development"
    instance_dir: Path = Path("instance")
    database_url: str = ""
    tenant_database_url: str = ""
    tenant_schema_prefix: str = "t_"
    redis_url: str = ""
    secret_key: str = ""
    max_request_bytes: int = 5 * 1024 * 1024
    max_import_bytes: int = 50 * 1024 * 1024
    ddl_lock_timeout_ms: int = 50
    pool_size: int = 5
    host: str = "127.0.0.1"
    port: int = 5000
    log_level: str = "INFO"
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_security: str = "starttls"
    smtp_user: str = ""
    smtp_password: str = ""
    mail_from: str = ""
    base_url: str = ""
    invitation_hours: int = 72
    password_reset_minutes: int = 60
    operator_session_hours: int = 8
    session_idle_minutes: int = 30
    session_absolute_minutes: int = 720
    login_max_failures: int = 5
    login_ip_max_failures: int = 50
    login_lockout_minutes: int = 15
    login_rate_limit: str = "30 per minute"
    api_rate_limit: str = "1200 per minute"
    mass_export_rows: int = 1000
    trusted_proxies: int = 0

    @property
    def embedded(self) -> bool:
        """Tell whether the control database is the embedded SQLite default."""
        return self.database_url.startswith("sqlite")

    @property
    def tenants_dir(self) -> Path:
        return self.instance_dir / "tenants"


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _convert(name: str, raw: Any, source: str) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind == "int":
            if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
                return raw
            if isinstance(raw, str) and re.fullmatch(r"[0-9]{1,12}", raw.strip(), re.ASCII):
                return int(raw.strip())
            raise ValueError
        if kind == "Path":
            return Path(str(raw))
        if not isinstance(raw, str):
            raise ValueError
        return raw
    except (TypeError, ValueError):
        expected = "a non-negative whole number" if kind == "int" else "a string"
        raise SettingsError(f"setting {name} from {source}: {raw!r} is not {expected}") from None


def load(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings from every source in order and validate them."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def merge(data: Mapping[str, Any], source: str, allow_secrets: bool) -> None:
        for key, raw in data.items():
            if key not in _FIELDS:
                raise SettingsError(f"unknown setting {key!r} in {source}")
            if key in SECRET_KEYS and not allow_secrets:
                raise SettingsError(
                    f"setting {key} is a secret: give it in the environment "
                    f"as {ENV_PREFIX}{key.upper()}, not in {source}"
                )
            values[key] = _convert(key, raw, source)
            sources[key] = source

    defaults = resources.files("metacrm.defaults") / "defaults.toml"
    merge(tomllib.loads(defaults.read_text("utf-8")), "config/defaults.toml", False)
    config_file = environ.get(f"{ENV_PREFIX}CONFIG_FILE")
    if config_file:
        try:
            data = tomllib.loads(Path(config_file).read_text("utf-8"))
        except OSError as exc:
            raise SettingsError(
                f"{ENV_PREFIX}CONFIG_FILE: cannot read {config_file}: {exc.strerror}"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(
                f"{ENV_PREFIX}CONFIG_FILE: {config_file} is not TOML: {exc}"
            ) from None
        merge(data, config_file, False)
    from_env = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX) and key != f"{ENV_PREFIX}CONFIG_FILE"
    }
    merge(from_env, "the environment", True)
    merge(dict(overrides or {}), "the application factory", True)
    return _finish(values, sources)


def _finish(values: dict[str, Any], sources: dict[str, str]) -> Settings:
    settings = Settings(**values)
    if settings.env not in ("development", "production"):
        raise SettingsError(
            f"setting env from {sources.get('env')}: {settings.env!r} must be "
            "'development' or 'production'"
        )
    instance = settings.instance_dir.expanduser().resolve()
    changes: dict[str, Any] = {"instance_dir": instance}
    database_url = settings.database_url or f"sqlite:///{instance / 'control.db'}"
    changes["database_url"] = database_url
    for key in ("database_url", "tenant_database_url"):
        url = changes.get(key, getattr(settings, key))
        if not url:
            continue
        try:
            parsed = sa.make_url(url)
            backend = parsed.get_backend_name()
            _ = parsed.port
        except (sa.exc.ArgumentError, ValueError):
            raise SettingsError(
                f"setting {key} from {sources.get(key)}: not a database URL"
            ) from None
        if parsed.drivername not in SUPPORTED_DRIVERS:
            raise SettingsError(
                f"setting {key} from {sources.get(key)}: the driver {parsed.drivername!r} is "
                f"not supported; use {' or '.join(SUPPORTED_DRIVERS)}"
            )
        if backend not in ("postgresql", "sqlite"):
            raise SettingsError(
                f"setting {key} from {sources.get(key)}: {backend!r} is not "
                "supported; use postgresql:// or sqlite:///"
            )
    prefix = settings.tenant_schema_prefix
    if prefix.startswith("pg_") or not re.fullmatch(r"[a-z][a-z0-9_]{0,9}", prefix, re.ASCII):
        raise SettingsError(
            "setting tenant_schema_prefix: use 1-10 lower-case letters, digits "
            "and underscores, starting with a letter (not pg_, which PostgreSQL reserves)"
        )
    if settings.log_level.upper() not in LOG_LEVELS:
        raise SettingsError(
            f"setting log_level from {sources.get('log_level')}: "
            f"{settings.log_level!r} is not one of {', '.join(LOG_LEVELS)}"
        )
    changes["log_level"] = settings.log_level.upper()
    if not 1 <= settings.port <= 65535:
        raise SettingsError(f"setting port: {settings.port} is not a TCP port")
    if settings.smtp_security not in SMTP_SECURITY:
        raise SettingsError(
            f"setting smtp_security from {sources.get('smtp_security')}: "
            f"{settings.smtp_security!r} is not one of {', '.join(SMTP_SECURITY)}"
        )
    if settings.smtp_host and not 1 <= settings.smtp_port <= 65535:
        raise SettingsError(f"setting smtp_port: {settings.smtp_port} is not a TCP port")
    if settings.base_url and not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", settings.base_url):
        raise SettingsError(
            f"setting base_url from {sources.get('base_url')}: {settings.base_url!r} is not "
            "an http(s) URL such as https://crm.example.com"
        )
    changes["base_url"] = settings.base_url.rstrip("/")
    for key in ("invitation_hours", "password_reset_minutes", "operator_session_hours"):
        if getattr(settings, key) < 1:
            raise SettingsError(f"setting {key}: must be at least 1")
    for key in (
        "session_idle_minutes",
        "session_absolute_minutes",
        "login_max_failures",
        "login_ip_max_failures",
        "login_lockout_minutes",
    ):
        if getattr(settings, key) < 1:
            raise SettingsError(f"setting {key}: must be at least 1")
    for key in ("login_rate_limit", "api_rate_limit"):
        if not re.fullmatch(RATE_LIMIT, getattr(settings, key)):
            raise SettingsError(
                f"setting {key} from {sources.get(key)}: {getattr(settings, key)!r} is not a "
                "rate such as '30 per minute' or '10/second'"
            )
    if not 0 <= settings.trusted_proxies <= 5:
        raise SettingsError(
            f"setting trusted_proxies: {settings.trusted_proxies} must be 0 (clients connect "
            "directly) to 5 (proxies in front of metacrm that set X-Forwarded-For)"
        )
    if settings.mass_export_rows < 0:
        raise SettingsError("setting mass_export_rows: must be 0 or more")
    for key in ("max_request_bytes", "max_import_bytes"):
        if getattr(settings, key) < 1024:
            raise SettingsError(f"setting {key}: must be at least 1024")
    if not settings.secret_key:
        if settings.env == "production":
            raise SettingsError(
                f"setting secret_key: production needs {ENV_PREFIX}SECRET_KEY "
                "in the environment (a long random string)"
            )
        changes["secret_key"] = _development_secret(instance)
    elif len(settings.secret_key) < 16:
        raise SettingsError("setting secret_key: use at least 16 characters")
    return dataclasses.replace(settings, **changes)


def _development_secret(instance: Path) -> str:
    """Return a per-instance random secret, kept in the instance folder (development only)."""
    path = instance / "dev_secret_key"
    try:
        return path.read_text("utf-8").strip()
    except FileNotFoundError:
        instance.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(48)
        path.write_text(value, "utf-8")
        path.chmod(0o600)
        return value
