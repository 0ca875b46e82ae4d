"""HTTP side of the record benchmarks: metacrm and the B1 floor under one WSGI server.

BENCHMARKS.md asks that the hand-written Flask view (B1) run "with the same JSON
serializer and the same server settings" as metacrm. Both apps are therefore
served by the same gunicorn command line (``SERVER_ARGS``: 2 worker processes,
gthread, 4 threads each, keep-alive), and both answer through Flask's JSON
provider with ``ensure_ascii`` off, as metacrm's factory sets it.

B1 (``floor_app``) runs the B0 SQL text on a raw driver connection per thread
(psycopg 3 in autocommit, or sqlite3 with metacrm's pragmas) and turns rows into
the same JSON metacrm answers (ids as UUID strings, datetimes in UTC with ``Z``,
decimals as strings). It does no authentication, no metadata lookup and no
validation: that is what "floor" means.

Clients: ``Client`` times single requests over one keep-alive connection (the
latency figures), ``wrk()`` runs ``wrk -t1 -c8 -d15s --latency`` and parses its
throughput and latency distribution.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import decimal
import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

from bench.common import REPO

#: The one server configuration both apps run under.
SERVER_ARGS = (
    "--workers",
    "2",
    "--worker-class",
    "gthread",
    "--threads",
    "4",
    "--keep-alive",
    "30",
    "--log-level",
    "warning",
)
FLOOR_ENV = "BENCH_FLOOR_APP"
APP_ENV = "BENCH_METACRM_APP"


# -- the apps (gunicorn imports these in its workers) --------------------------------------


def metacrm_app() -> Flask:
    """Return metacrm's application built from the settings overrides in ``$BENCH_METACRM_APP``."""
    from metacrm.app import create_app

    return create_app(json.loads(os.environ[APP_ENV]))


def _json_cell(value: Any) -> Any:
    """One cell as metacrm's record JSON shows it."""
    if value is None or isinstance(value, bool | int | str | float):
        return value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return format(value, "f")
    return str(value)


def _sqlite_cell(kind: str, value: Any) -> Any:
    """A SQLite cell (stored as metacrm stores it) shown as metacrm shows it."""
    if value is None:
        return None
    if kind == "uuid":
        return str(uuid.UUID(hex=value))
    if kind == "datetime":
        # Parsed and printed as metacrm prints it (no fraction when it is zero).
        return dt.datetime.fromisoformat(value).isoformat() + "Z"
    if kind == "decimal":
        return format(decimal.Decimal(str(value)).quantize(decimal.Decimal("0.01")), "f")
    return value


def floor_app() -> Flask:
    """Return B1: the B0 SQL behind minimal Flask views (configured by ``$BENCH_FLOOR_APP``).

    The configuration names the backend, the connection (libpq URI or SQLite
    file), the columns with their kinds, and the SQL of each view.
    """
    config = json.loads(os.environ[FLOOR_ENV])
    app = Flask("metacrm_bench_floor")
    app.json.ensure_ascii = False  # as metacrm's factory sets it
    local = threading.local()
    postgresql = config["backend"] == "postgresql"
    kinds: dict[str, str] = config["kinds"]

    def connection() -> Any:
        found = getattr(local, "connection", None)
        if found is None:
            if postgresql:
                import psycopg

                found = psycopg.connect(config["dsn"], autocommit=True)
            else:
                found = sqlite3.connect(config["path"], isolation_level=None)
                found.execute("PRAGMA journal_mode=WAL")
                found.execute("PRAGMA synchronous=NORMAL")
            local.connection = found
        return found

    def rows(sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        cursor = connection().execute(sql, params)
        names = [d[0] for d in cursor.description]
        if postgresql:
            return [{n: _json_cell(v) for n, v in zip(names, row, strict=True)} for row in cursor]
        return [
            {n: _sqlite_cell(kinds.get(n, ""), v) for n, v in zip(names, row, strict=True)}
            for row in cursor
        ]

    def record_id(value: str) -> Any:
        parsed = uuid.UUID(value)
        return parsed if postgresql else parsed.hex

    @app.get("/list/<name>")
    def list_view(name: str) -> Response:
        view = config["lists"][name]
        params = [request.args[p] for p in view["params"]]
        return jsonify({"items": rows(view["sql"], params), "next_cursor": None})

    @app.get("/get/<value>")
    def get_view(value: str) -> Response:
        found = rows(config["get"], [record_id(value)])
        if not found:
            return Response(status=404)
        response = jsonify(found[0])
        response.headers["ETag"] = f'"{found[0]["version"]}"'
        return response

    return app


# -- running a server ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A gunicorn process serving one app on 127.0.0.1."""

    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_ticks(self) -> dict[int, int]:
        """CPU time (user + system, clock ticks) of each gunicorn worker, by pid."""
        ticks = {}
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        for pid in children.read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except FileNotFoundError:
                continue  # a worker that exited meanwhile
            ticks[int(pid)] = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks


@contextlib.contextmanager
def serve(name: str, factory: str, env: dict[str, str], ready_path: str) -> Iterator[Server]:
    """Start gunicorn with ``SERVER_ARGS`` on ``factory``; wait until ``ready_path`` answers."""
    port = _free_port()
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or "gunicorn"
    command = [gunicorn, *SERVER_ARGS, "--bind", f"127.0.0.1:{port}", factory]
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL
    )
    server = Server(name, port, process)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} server exited with {process.returncode}")
            try:
                with Client(port) as client:
                    status, _ = client.get(ready_path)
                if status < 500:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} server did not answer {ready_path} within 60 s")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Client:
    """One keep-alive HTTP connection: the single client the latency figures are taken with."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = headers or {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.connection.close()

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, http.client.HTTPResponse]:
        all_headers = {**self.headers, **(headers or {})}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            all_headers["Content-Type"] = "application/json"
        try:
            self.connection.request(method, path, body=payload, headers=all_headers)
            response = self.connection.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closed an idle keep-alive connection (after its keep-alive time,
            # e.g. while wrk ran): open a new one and send the request again, once.
            self.connection.close()
            self.connection.request(method, path, body=payload, headers=all_headers)
            response = self.connection.getresponse()
        data = response.read()
        return response.status, data, response

    def get(self, path: str) -> tuple[int, bytes]:
        status, data, _ = self.request("GET", path)
        return status, data

    def checked(self, path: str) -> Callable[[], None]:
        """Return a function that GETs ``path`` and fails unless the answer is 200."""

        def call() -> None:
            status, data = self.get(path)
            if status != 200:
                raise RuntimeError(f"GET {path} answered {status}: {data[:300]!r}")

        return call


# -- wrk ----------------------------------------------------------------------------------

WRK_ARGS = ("-t1", "-c8", "--latency")
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured: requests/s and the latency distribution in ms."""

    requests_per_s: float
    p50: float
    p75: float
    p90: float
    p99: float
    requests: int
    errors: int
    #: Each worker's share of the server's CPU time during the run (None: not measured).
    worker_shares: tuple[float, ...] | None = None
    #: Runs before this one that were done again because one worker sat idle.
    redone: int = 0

    @classmethod
    def parse(cls, text: str) -> WrkResult:
        def latency(q: str) -> float:
            match = re.search(rf"^\s*{q}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
            return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")

        rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
        total = re.search(r"(\d+) requests in", text)
        errors = 0
        socket_errors = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
        )
        if socket_errors:
            errors += sum(int(g) for g in socket_errors.groups())
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        if non_2xx:
            errors += int(non_2xx.group(1))
        return cls(
            float(rate.group(1)) if rate else float("nan"),
            latency("50"),
            latency("75"),
            latency("90"),
            latency("99"),
            int(total.group(1)) if total else 0,
            errors,
        )


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


#: A run counts only when its least busy worker used at least this share of the busiest's CPU.
BALANCED = 0.5
#: Runs tried before giving up on a balanced one.
ATTEMPTS = 6


def balanced_wrk(
    server: Server, url: str, seconds: float, headers: dict[str, str] | None = None
) -> WrkResult:
    """Run ``wrk`` until both workers of ``server`` served a fair share of the run.

    Every gunicorn worker accepts connections from the shared socket, and wrk's 8
    keep-alive connections are often all taken by one worker, which then serves the
    whole run on one core behind its GIL: a third to half of the two workers'
    throughput, whichever app it is. Such a run measures a one-worker server, so it
    is done again (for metacrm and B1 alike), up to ``ATTEMPTS`` times; the result
    says how many runs were redone, and the last run counts if none was balanced.
    """
    redone = 0
    while True:
        before = server.worker_ticks()
        result = wrk(url, seconds, headers)
        after = server.worker_ticks()
        used = [after[pid] - before[pid] for pid in after if pid in before]
        shares = tuple(u / (sum(used) or 1) for u in used)
        balanced = len(used) > 1 and min(used) >= BALANCED * max(used)
        if balanced or redone + 1 >= ATTEMPTS:
            return dataclasses.replace(result, worker_shares=shares, redone=redone)
        redone += 1


def wrk(url: str, seconds: float, headers: dict[str, str] | None = None) -> WrkResult:
    """Run ``wrk -t1 -c8 -d<seconds>s --latency`` against ``url`` (127.0.0.1 only)."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError("wrk runs against 127.0.0.1 only")
    command = ["wrk", *WRK_ARGS, f"-d{max(1, round(seconds))}s"]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    result = subprocess.run(
        [*command, url], capture_output=True, text=True, timeout=seconds + 60, check=True
    )
    return WrkResult.parse(result.stdout)
