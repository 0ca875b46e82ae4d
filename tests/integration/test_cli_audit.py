"""``metacrm audit verify`` and ``metacrm audit export``, on SQLite and PostgreSQL.

Verification must pass on an untouched log and fail (exit 1, no traceback)
naming the seq of each kind of tampering.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from metacrm.runtime import audittrail
from metacrm.runtime.store import audit, audit_head

from .test_cli import Cli, cheap_password_hashes, cli, pg_cli  # noqa: F401 - fixtures


@pytest.fixture(params=["sqlite", "postgresql"])
def any_cli(request: pytest.FixtureRequest) -> Cli:
    return request.getfixturevalue("cli" if request.param == "sqlite" else "pg_cli")


def _store(any_cli: Cli, slug: str):  # noqa: ANN202 - a TenantStore and its platform
    platform = any_cli.platform()
    with platform.session() as session:
        tenant = platform.tenant(session, slug)
    return platform, platform.store(tenant)


def _fill(any_cli: Cli, slug: str, count: int) -> None:
    platform, store = _store(any_cli, slug)
    try:
        for i in range(count):
            with store.begin() as connection:
                audittrail.append(
                    connection,
                    action="auth.login",
                    actor_id=None,
                    actor_name=f"user{i}@example.com",
                    ip="192.0.2.1",
                )
    finally:
        platform.close()


def _tamper(any_cli: Cli, slug: str, *statements: sa.Executable) -> None:
    platform, store = _store(any_cli, slug)
    try:
        with store.begin() as connection:
            # An attacker with the database's admin rights first removes the guard.
            if store.dialect == "postgresql":
                connection.exec_driver_sql(
                    f'ALTER TABLE "{store.schema}"._audit DISABLE TRIGGER _audit_append_only'
                )
            else:
                connection.exec_driver_sql("DROP TRIGGER _audit_no_update")
                connection.exec_driver_sql("DROP TRIGGER _audit_no_delete")
            for statement in statements:
                connection.execute(statement)
    finally:
        platform.close()


def test_verify_passes_on_an_untouched_log(any_cli):
    any_cli.create("acme")
    _fill(any_cli, "acme", 3)
    result = any_cli("audit", "verify", "--tenant", "acme")
    assert result.stdout.startswith("OK: 4 entries, chain intact; head seq 4 hash ")


@pytest.mark.parametrize(
    ("statements", "expected"),
    [
        ([audit.update().where(audit.c.seq == 2).values(ip="10.0.0.1")], "[changed] seq 2:"),
        ([audit.delete().where(audit.c.seq == 3)], "[missing] seq 4:"),
        (
            [
                audit.update().where(audit.c.seq == 2).values(seq=-1),
                audit.update().where(audit.c.seq == 3).values(seq=2),
                audit.update().where(audit.c.seq == -1).values(seq=3),
            ],
            "[reordered] seq 2:",
        ),
        ([audit.delete().where(audit.c.seq == 4)], "[missing] seq 4:"),
        ([audit_head.update().values(seq=2)], "[inserted] seq 2:"),
    ],
    ids=["changed", "deleted", "reordered", "deleted-last", "inserted-after-head"],
)
def test_verify_names_each_kind_of_tampering(any_cli, statements, expected):
    any_cli.create("acme")
    _fill(any_cli, "acme", 3)
    _tamper(any_cli, "acme", *statements)
    result = any_cli("audit", "verify", "--tenant", "acme", code=1)
    assert expected in result.stdout, result.stdout
    assert "TAMPERED" in result.stdout
    assert "fails verification" in result.stderr and "Traceback" not in result.stderr


def _rebuild_from(any_cli: Cli, slug: str, seq: int) -> None:
    """Change entry ``seq`` and recompute every hash after it: a consistent forgery."""
    platform, store = _store(any_cli, slug)
    try:
        with store.begin() as connection:
            rows = [
                dict(r)
                for r in connection.execute(sa.select(audit).order_by(audit.c.seq)).mappings()
            ]
            statements = []
            previous = audittrail.GENESIS
            for row in rows:
                if row["seq"] == seq:
                    row["actor_name"] = "nobody"
                row["prev_hash"] = previous
                row["hash"] = previous = audittrail.entry_hash(row, previous)
                statements.append(
                    audit.update()
                    .where(audit.c.seq == row["seq"])
                    .values(
                        actor_name=row["actor_name"], prev_hash=row["prev_hash"], hash=row["hash"]
                    )
                )
            statements.append(audit_head.update().values(hash=previous))
    finally:
        platform.close()
    _tamper(any_cli, slug, *statements)


def test_an_anchor_catches_a_rebuilt_chain(any_cli):
    any_cli.create("acme")
    _fill(any_cli, "acme", 3)
    printed = any_cli("audit", "verify", "--tenant", "acme").stdout
    anchor = printed.split("--anchor ")[1].strip()
    assert anchor.startswith("4:") and len(anchor) == 66
    _rebuild_from(any_cli, "acme", 2)
    any_cli("audit", "verify", "--tenant", "acme")  # consistent in itself
    result = any_cli("audit", "verify", "--tenant", "acme", "--anchor", anchor, code=1)
    assert "[changed] seq 4:" in result.stdout and "rebuilt" in result.stdout
    gone = "9:" + "a" * 64
    result = any_cli("audit", "verify", "--tenant", "acme", "--anchor", gone, code=1)
    assert "[missing] seq 9:" in result.stdout


@pytest.mark.parametrize(
    "anchor", ["4", "x:" + "a" * 64, "4:" + "A" * 64, "4:abc", "-1:" + "a" * 64]
)
def test_a_malformed_anchor_is_refused(any_cli, anchor):
    any_cli.create("acme")
    result = any_cli("audit", "verify", "--tenant", "acme", "--anchor", anchor, code=1)
    assert "--anchor must be SEQ:HASH" in result.stderr and "Traceback" not in result.stderr


def test_verify_of_an_unknown_tenant_fails_clearly(any_cli):
    result = any_cli("audit", "verify", "--tenant", "ghost", code=1)
    assert "there is no tenant 'ghost'" in result.stderr


def test_export_writes_every_entry_and_is_audited(any_cli, tmp_path: Path):
    any_cli.create("acme")
    _fill(any_cli, "acme", 2)
    target = tmp_path / "audit.csv"
    result = any_cli("audit", "export", "--tenant", "acme", str(target))
    assert "Wrote 3 audit entries" in result.stdout
    rows = list(csv.DictReader(io.StringIO(target.read_text("utf-8"))))
    assert [r["seq"] for r in rows] == ["1", "2", "3"]
    assert rows[1]["actor_name"] == "user0@example.com" and rows[1]["ip"] == "192.0.2.1"
    lines = any_cli("audit", "export", "--tenant", "acme", "--format", "jsonl", "-").stdout
    entries = [json.loads(line) for line in lines.splitlines()]
    # The first export is now in the trail, and the second export stopped before itself.
    assert [e["action"] for e in entries][-1] == "audit.export"
    assert entries[-1]["actor_name"] == "operator (command line)"
    # JSON lines are exact: each entry's hash recomputes from what was exported.
    for entry in entries:
        parsed = {
            **entry,
            "at": dt.datetime.fromisoformat(entry["at"]),
        }
        assert audittrail.entry_hash(parsed, entry["prev_hash"]) == entry["hash"]
    any_cli("audit", "verify", "--tenant", "acme")


def test_export_filters_and_bad_options(any_cli, tmp_path: Path):
    any_cli.create("acme")
    target = tmp_path / "x.csv"
    any_cli("audit", "export", "--tenant", "acme", "--since", "2999-01-01T00:00:00Z", str(target))
    assert target.read_text("utf-8").count("\n") == 1  # the header only
    for option, value, message in [
        ("--since", "yesterday", "--since must be an ISO 8601"),
        ("--until", "2026-01-01T00:00:00", "--until must carry a time zone"),
        ("--since", "0001-01-01T00:00:00+08:00", "--since is out of range"),
    ]:
        result = any_cli("audit", "export", "--tenant", "acme", option, value, str(target), code=1)
        assert message in result.stderr
    result = any_cli(
        "audit", "export", "--tenant", "acme", "--since", "2026-02-01T00:00:00Z",
        "--until", "2026-01-01T00:00:00Z", str(target), code=1,
    )  # fmt: skip
    assert "--until must be later than --since" in result.stderr
    result = any_cli("audit", "export", "--tenant", "acme", str(tmp_path / "no" / "x.csv"), code=1)
    assert "cannot write" in result.stderr
    result = any_cli("audit", "export", "--tenant", "acme", "--format", "xml", "-", code=2)
    assert "Traceback" not in result.stderr
