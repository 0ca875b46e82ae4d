"""The facts an expression reads from outside the record: the clock and the user."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class EvalContext:
    """Values for ``now()``, ``today()``, ``me()`` and ``my_team()``.

    The caller gives ``today`` in the tenant's time zone; both compilers read
    these values instead of the database clock so that SQL and Python agree.
    ``team_ids`` holds the user's team and every team below it; any sequence
    will do, so the runtime can pass one that reads the teams only when an
    expression calls ``my_team()``.
    """

    now: dt.datetime
    today: dt.date
    user_id: uuid.UUID | None = None
    team_ids: Sequence[uuid.UUID] = ()

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            raise ValueError("EvalContext.now must be time-zone aware")
        if isinstance(self.today, dt.datetime):
            raise TypeError("EvalContext.today must be a date, not a datetime")
