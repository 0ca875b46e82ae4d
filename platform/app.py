"""The application factory: settings, then extensions, then blueprints, then the CLI."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from metacrm.runtime import ratelimit
from metacrm.runtime import settings as settings_module
from metacrm.runtime.api import audit as audit_api
from metacrm.runtime.api import export as export_api
from metacrm.runtime.api import imports as imports_api
from metacrm.runtime.api import meta, openapi, problem, service
from metacrm.runtime.api import notifications as notifications_api
from metacrm.runtime.api import records as records_api
from metacrm.runtime.api import security as security_api
from metacrm.runtime.api import tokens as tokens_api
from metacrm.runtime.api import users as users_api
from metacrm.runtime.platform import Platform
from metacrm.runtime.web import account as account_web
from metacrm.runtime.web import auth as web_auth
from metacrm.runtime.web import operator as operator_web
from metacrm.runtime.web import signin as signin_web
from metacrm.runtime.web import tokens as tokens_web


class Application(Flask):
    """Flask, asking once per function (not once per request) whether it is ``async def``.

    Flask's ``ensure_sync`` runs ``inspect.iscoroutinefunction`` on every
    before/after hook and on the view, six times for an API read: about 1 % of a
    worker's time under load. The answer for a function never changes, so it is
    kept per function (Flask documents this method as the one to override).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._runnable: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        found = self._runnable.get(func)
        if found is None:
            found = self._runnable[func] = super().ensure_sync(func)
        return found


def create_app(overrides: Mapping[str, Any] | None = None) -> Flask:
    """Create a metacrm application; ``overrides`` win over every other settings source."""
    settings = settings_module.load(overrides)

    app = Application(__name__, instance_path=str(settings.instance_dir))
    app.request_class = imports_api.Request  # record imports have a body limit of their own
    app.config.update(
        SECRET_KEY=settings.secret_key,
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        METACRM_SETTINGS=settings,
    )
    app.json.ensure_ascii = False  # Chinese labels stay readable in responses

    _configure_logging(settings.log_level)
    platform = Platform(settings)
    platform.init_control()
    app.extensions["metacrm"] = platform

    problem.init_app(app)
    ratelimit.init_app(app)  # first: a flood is refused before any other work
    if settings.trusted_proxies:
        # Behind N proxies the client's address is the Nth from the right of
        # X-Forwarded-For; throttling, the IP allowlist and the audit trail need it
        # (outside the limiter's middleware, which counts by that address).
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore[method-assign]
    web_auth.init_app(app)
    app.register_blueprint(service.bp)
    app.register_blueprint(meta.bp)
    app.register_blueprint(records_api.bp)
    app.register_blueprint(export_api.bp)
    app.register_blueprint(imports_api.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(users_api.bp)
    app.register_blueprint(tokens_api.bp)
    app.register_blueprint(account_web.bp)
    app.register_blueprint(operator_web.bp)
    audit_api.init_app(app)
    app.register_blueprint(notifications_api.bp)
    app.register_blueprint(security_api.bp)
    app.register_blueprint(signin_web.bp)
    app.register_blueprint(tokens_web.bp)
    return app


def _configure_logging(level: str) -> None:
    """Send metacrm's log records to stderr at the configured level (once per process)."""
    logger = logging.getLogger("metacrm")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
