"""The WSGI entry that gunicorn loads builds a working application from the environment."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_wsgi_app_serves_health_from_environment_settings(tmp_path, monkeypatch):
    for name in [n for n in list(__import__("os").environ) if n.startswith("METACRM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("METACRM_INSTANCE_DIR", str(tmp_path / "instance"))
    monkeypatch.setenv("METACRM_SECRET_KEY", "a-secret-key-for-wsgi-tests")
    monkeypatch.delitem(sys.modules, "metacrm.wsgi", raising=False)
    wsgi = importlib.import_module("metacrm.wsgi")
    try:
        response = wsgi.app.test_client().get("/healthz")
        assert response.status_code == 200
        assert response.get_json() == {"status": "ok"}
        assert (tmp_path / "instance" / "control.db").exists()
    finally:
        wsgi.app.extensions["metacrm"].close()
        sys.modules.pop("metacrm.wsgi", None)


def _client_address(tmp_path, trusted_proxies: int, forwarded: str) -> str:
    from flask import request

    from metacrm.app import create_app

    app = create_app(
        {
            "instance_dir": str(tmp_path / f"instance{trusted_proxies}"),
            "secret_key": "a-secret-key-for-wsgi-tests",
            "trusted_proxies": trusted_proxies,
        }
    )
    app.add_url_rule("/_address", "address", lambda: request.remote_addr or "")
    try:
        response = app.test_client().get(
            "/_address",
            headers={"X-Forwarded-For": forwarded},
            environ_base={"REMOTE_ADDR": "10.0.0.9"},
        )
        return response.get_data(as_text=True)
    finally:
        app.extensions["metacrm"].close()


def test_client_address_comes_from_the_trusted_proxy_only(tmp_path):
    # One proxy: the address it appended (the right-most) is the client's; what the
    # client wrote before it (a forged 1.2.3.4) is ignored.
    assert _client_address(tmp_path, 1, "1.2.3.4, 203.0.113.7") == "203.0.113.7"
    # No proxy configured: X-Forwarded-For is the client's own claim and is ignored.
    assert _client_address(tmp_path, 0, "203.0.113.7") == "10.0.0.9"


def test_the_application_checks_each_function_for_async_once(tmp_path, monkeypatch):
    """Hooks and views run as they are; ``iscoroutinefunction`` is asked once per function."""
    import inspect

    import flask.app

    from metacrm.app import create_app

    app = create_app(
        {"instance_dir": str(tmp_path / "instance"), "secret_key": "a-secret-key-for-wsgi-tests"}
    )
    asked: list[object] = []
    real = inspect.iscoroutinefunction

    def counting(func: object) -> bool:
        asked.append(func)
        return real(func)

    monkeypatch.setattr(flask.app, "iscoroutinefunction", counting)
    try:
        client = app.test_client()
        assert client.get("/healthz").status_code == 200
        first = len(asked)  # the before/after hooks and the view
        answers = [client.get("/healthz") for _ in range(4)]
        assert [a.status_code for a in answers] == [200] * 4
        assert first >= 3 and len(asked) == first

        async def coroutine_view() -> str:
            return "not run: Flask's async extra is not installed"

        with pytest.raises(RuntimeError, match="async"):  # Flask's own answer, unchanged
            app.ensure_sync(coroutine_view)
    finally:
        app.extensions["metacrm"].close()
