"""Cells a spreadsheet would run as formulas: defused on the way out, restored on the way in.

A CSV cell starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return is
run as a formula by Excel and LibreOffice (OWASP "CSV injection"). Exports
prefix such text with ``'``, the quote spreadsheets themselves strip; imports
take it off again, so an exported file imports as it was.
"""

from __future__ import annotations

import re

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?", re.ASCII)


def defuse(text: str, *, keep_numbers: bool = False) -> str:
    """Return the cell text a spreadsheet shows as text, never runs.

    ``keep_numbers`` leaves plain numbers such as ``-12.50`` alone: a spreadsheet
    reads them as numbers anyway, and a quote would turn them into text.
    """
    if not text.startswith(FORMULA_START):
        return text
    if keep_numbers and _PLAIN_NUMBER.fullmatch(text):
        return text
    return "'" + text


def restore(text: str) -> str:
    """Return cell text without the quote :func:`defuse` put in front of a formula."""
    if text.startswith("'") and text[1:2] and text[1] in FORMULA_START:
        return text[1:]
    return text
