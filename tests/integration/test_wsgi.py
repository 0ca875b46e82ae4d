"""The WSGI entry that gunicorn loads builds a working application from the environment."""

from __future__ import annotations

import importlib
import sys


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
