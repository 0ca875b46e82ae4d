"""Case mapping one character at a time, the way PostgreSQL's lower() and upper() do it.

Python's ``str.lower`` applies context rules (a final sigma becomes 'ς') and
``str.upper`` may turn one character into two ('ß' becomes 'SS'); databases
map each character on its own. Both compilers and the SQLite functions use
these versions so that a filter and a rule fold text identically.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=4096)
def _lower_char(char: str) -> str:
    folded = char.lower()
    if len(folded) == 1:
        return folded
    # Only U+0130 (İ) lowers to two characters; its simple mapping is a plain i.
    return "i" if char == "\u0130" else char


@functools.lru_cache(maxsize=4096)
def _upper_char(char: str) -> str:
    folded = char.upper()
    if len(folded) == 1:
        return folded
    # Where the full mapping is two characters, the title-case one is the
    # simple mapping when it is a single character ('ᾳ' → 'ᾼ'); else keep it ('ß').
    titled = char.title()
    return titled if len(titled) == 1 else char


def simple_lower(text: str) -> str:
    """Lower-case text character by character."""
    if text.isascii():
        return text.lower()
    return "".join(map(_lower_char, text))


def simple_upper(text: str) -> str:
    """Upper-case text character by character."""
    if text.isascii():
        return text.upper()
    return "".join(map(_upper_char, text))
