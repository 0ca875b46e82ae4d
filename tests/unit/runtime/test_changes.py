"""Which statements a change watch's write hook announces (``changes._RAW_WRITE``, topics)."""

from __future__ import annotations

import pytest

from metacrm.runtime import changes


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
