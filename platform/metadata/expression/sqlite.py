"""SQL functions the expression language needs on SQLite, registered on each connection.

SQLite's own lower() and upper() only know ASCII, and its arithmetic on
decimals (stored as REAL) is binary floating point; these functions make
SQLite fold text and compute decimals exactly as the Python evaluator does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metacrm.metadata.expression import arithmetic
from metacrm.metadata.expression.casefold import simple_lower, simple_upper


def register_sqlite_functions(dbapi_connection: Any) -> None:
    """Register the ``mc_*`` functions on a raw sqlite3 connection; call it from a connect hook."""
    functions: dict[str, tuple[int, Callable[..., Any]]] = {
        "mc_lower": (1, _text(simple_lower)),
        "mc_upper": (1, _text(simple_upper)),
        "mc_add": (2, _number(arithmetic.add)),
        "mc_sub": (2, _number(arithmetic.subtract)),
        "mc_mul": (2, _number(arithmetic.multiply)),
        "mc_div": (2, _number(arithmetic.divide)),
        "mc_round": (2, _number(arithmetic.round_half_up)),
    }
    for name, (arity, function) in functions.items():
        dbapi_connection.create_function(name, arity, function, deterministic=True)


def _text(fold: Callable[[str], str]) -> Callable[[Any], str | None]:
    def apply(value: Any) -> str | None:
        if value is None:
            return None
        return fold(value if isinstance(value, str) else str(value))

    return apply


def _number(operation: Callable[..., Any]) -> Callable[..., float | None]:
    def apply(*values: Any) -> float | None:
        if any(value is None for value in values):
            return None
        result = operation(*values)
        return None if result is None else float(result)

    return apply
