"""Which statements a change watch's write hook announces, and SQLite's marks.

``changes._RAW_WRITE`` and topics; ``changes._DataVersion``, asked from several threads.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest

from metacrm.runtime import changes
from metacrm.runtime.changes import _DataVersion


@pytest.mark.parametrize(
    ("statement", "table"),
    [
        ("UPDATE api_token SET revoked_at = %(v)s", "api_token"),
        ('update "ctl"."membership" set is_active = false', "membership"),
        ("INSERT INTO tenant (id) VALUES (1)", "tenant"),
        ('DELETE FROM "team" WHERE id = 1', "team"),
        ("  TRUNCATE TABLE user_account", "user_account"),
        ('INSERT INTO "t_ab12_acme"._meta_version (version) VALUES (2)', "_meta_version"),
    ],
)
def test_raw_writes_name_their_table(statement: str, table: str) -> None:
    match = changes._RAW_WRITE.match(statement)
    assert match is not None and match.group(1).lower() == table
    assert changes.TOPIC_TABLES[table] in (changes.CONTROL, "meta")


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM api_token WHERE id = 1",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "EXPLAIN UPDATE api_token SET name = 'x'",
        "SELECT pg_notify('metacrm_changes', 'control')",
    ],
)
def test_reads_are_not_writes(statement: str) -> None:
    assert changes._RAW_WRITE.match(statement) is None


def test_meta_topics_name_the_schema() -> None:
    assert changes.meta_topic("t_acme") == "meta:t_acme"
    assert changes.meta_topic(None) == "meta:"


# -- SQLite's data_version, asked on several connections (changes._DataVersion) ------------


def _commit(path: str) -> None:
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("INSERT INTO t VALUES (1)")
    finally:
        writer.close()


def _watched_file(tmp_path) -> str:  # noqa: ANN001
    path = str(tmp_path / "watched.db")
    created = sqlite3.connect(path, isolation_level=None)
    created.execute("PRAGMA journal_mode=WAL")
    created.execute("CREATE TABLE t (n integer)")
    created.close()
    return path


def _two_idle_connections(watch: _DataVersion, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ask from two threads at once, so that the watch keeps two connections."""
    barrier = threading.Barrier(2)
    original = sqlite3.connect

    def connect(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        barrier.wait(timeout=5)  # both threads are past the idle stack before either connects
        return original(*args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(sqlite3, "connect", connect)
        threads = [threading.Thread(target=watch.mark, args=("control",)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(watch._idle) == 2


def test_the_mark_holds_while_nothing_is_committed(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    watch = _DataVersion(_watched_file(tmp_path))
    try:
        _two_idle_connections(watch, monkeypatch)
        marks = {watch.mark("control") for _ in range(6)}  # both connections take turns
        assert len(marks) == 1
    finally:
        watch.close()


def test_a_commit_moves_the_mark_whichever_connection_asks(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    path = _watched_file(tmp_path)
    watch = _DataVersion(path)
    try:
        _two_idle_connections(watch, monkeypatch)
        before = watch.mark("control")  # asked on the last connection given back
        _commit(path)
        after = watch.mark("control")  # asked on that same connection: it saw the commit
        assert after != before
        again = watch.mark("control")  # the other connection: it too saw a commit
        assert again not in (before, None)
        settled = {watch.mark("control") for _ in range(4)}
        assert len(settled) == 1 and before not in settled
    finally:
        watch.close()


def test_a_new_connection_never_repeats_an_old_mark(tmp_path) -> None:  # noqa: ANN001
    """A connection has no history: its first look moves the mark on, whatever it reads."""
    path = _watched_file(tmp_path)
    watch = _DataVersion(path)
    try:
        before = watch.mark("control")
        _commit(path)
        idle = watch._idle.pop()  # as if a concurrent request held the only connection
        try:
            assert watch.mark("control") != before
        finally:
            idle[0].close()
    finally:
        watch.close()


def test_closing_closes_the_idle_connections(tmp_path) -> None:  # noqa: ANN001
    watch = _DataVersion(_watched_file(tmp_path))
    watch.mark("control")
    ((connection, _),) = watch._idle
    watch.close()
    with pytest.raises(sqlite3.ProgrammingError):
        connection.execute("SELECT 1")
    assert watch._idle == []
