"""Retrying a step that another process's set-up of the same SQLite file can refuse.

Two API worker processes starting together on a new SQLite file (the decision log, the rate
store) both set it up. SQLite can refuse one side at once with "database is locked", without
waiting out busy_timeout (a transaction that read and then wants to write while the other holds
the write lock could deadlock, so SQLite does not wait), or one side's CREATE finds the other's
table. The other side's set-up is short: wait a little and try again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

ATTEMPTS = 8  # waits of 0.05 s .. 3.2 s between them, 6.35 s in all


def retry_racing(step: Callable[[], T], racing: Callable[[BaseException], bool]) -> T:
    """`step()`, tried again after an exception `racing` accepts, with doubling waits; any other
    exception, or the last attempt's, is raised."""
    for attempt in range(ATTEMPTS):
        try:
            return step()
        except Exception as e:
            if not racing(e) or attempt == ATTEMPTS - 1:
                raise
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")
