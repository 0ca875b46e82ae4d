"""The one error type the expression language raises, with a position for the editor."""

from __future__ import annotations

from typing import Any


class ExpressionError(Exception):
    """An expression that cannot be parsed, type-checked or compiled, with where it went wrong.

    ``line`` and ``column`` are 1-based and count characters, so an editor can
    put a marker under the culprit; ``message`` is plain English for an admin.
    """

    def __init__(self, message: str, line: int = 1, column: int = 1) -> None:
        super().__init__(message, line, column)
        self.message = message
        self.line = line
        self.column = column

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """Return the error as the JSON object the API puts in a problem response."""
        return {"message": self.message, "line": self.line, "column": self.column}
