"""Identifiers are the only names ever put into SQL, so the check must be exact."""

import pytest

from metacrm.metadata.identifiers import RESERVED, identifier_problem, is_identifier


@pytest.mark.parametrize("name", ["lead", "a", "customer_2", "x" * 63, "deal_items"])
def test_valid_identifiers_pass(name):
    assert identifier_problem(name) is None


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("lead\n", "may contain only"),
        ("Lead", "lower case"),
        ("x; drop table t", "may contain only"),
        ("lеad", "ASCII"),  # Cyrillic е
        ("x" * 64, "64 characters"),
        ("1abc", "start with a letter"),
        ("_hidden", "start with a letter"),
        ("", "empty"),
        ("deal__items", "'__'"),
        ("select", "reserved"),
        ("id", "reserved"),
        ("deleted_at", "reserved"),
        ("records", "reserved"),
        (None, "string"),
        (12, "string"),
    ],
)
def test_bad_identifiers_say_why(name, says):
    problem = identifier_problem(name)
    assert problem is not None and says in problem
    assert not is_identifier(name)


def test_reserved_list_covers_sql_keywords_of_both_backends():
    assert {"order", "user", "group", "table", "pragma", "vacuum", "limit"} <= RESERVED
