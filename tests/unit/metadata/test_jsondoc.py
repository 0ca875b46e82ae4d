"""Strict JSON decoding of outside documents."""

import pytest

from metacrm.metadata.jsondoc import DocumentError, loads


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b"[NaN]", "NaN"),
        (b'{"x": Infinity}', "Infinity"),
        (b"[-Infinity]", "Infinity"),
        (b"[" * 10_000 + b"]" * 10_000, "nesting deeper than 64"),
        (b'{"a": "\xff"}', "not valid UTF-8"),
        (b'{"a": ', "invalid JSON"),
        (b"", "invalid JSON"),
    ],
)
def test_hostile_documents_are_refused_with_a_reason(data, says):
    with pytest.raises(DocumentError) as info:
        loads(data)
    assert says in str(info.value)


def test_size_limit():
    with pytest.raises(DocumentError, match="the limit is 100"):
        loads(b'"' + b"x" * 200 + b'"', max_bytes=100)


def test_brackets_inside_strings_do_not_count_as_nesting():
    text = "[" * 100
    assert loads(('{"a": "' + text + '"}').encode()) == {"a": text}


def test_escaped_quote_does_not_end_the_string():
    assert loads('["a\\"[[", 1]') == ['a"[[', 1]


def test_plain_documents_decode():
    assert loads(b'\xef\xbb\xbf{"name": "\xe5\xae\xa2\xe6\x88\xb7", "n": 1.5}') == {
        "name": "客户",
        "n": 1.5,
    }
