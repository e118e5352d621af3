"""Progress reports of a run, throttled: the engine's side of a progress display.

The engine calls ``progress(done, total)`` from the parent's wait loop at
most ten times a second; workers only bump an integer in shared memory, so
a display costs no message per item. The displays themselves (a widget bar,
a text bar) belong to the front ends: :mod:`shm_kernel_safe.displays`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: Names of the displays a front end makes for ``progress=``; anything else is a callable.
PROGRESS_MODES = ("auto", "widget", "text", "none")


class ThrottledReport:
    """Calls ``callback(done, total)`` at most ten times a second.

    The engine reports from its wait loop, which wakes far more often;
    ``count`` (the transport's items done: shared counters, chunk reports)
    is only called when a report is due, and a report never goes below the
    last one (items a dead worker took along are run again). A None
    callback makes every call a no-op.
    """

    EVERY = 0.1

    def __init__(
        self, callback: Callable[[int, int], None] | None, total: int, count: Callable[[], int]
    ) -> None:
        self.callback = callback
        self.total = total
        self.count = count
        self.last = 0.0
        self.reported = 0

    def __call__(self, force: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if force or now - self.last >= self.EVERY:
            self.last = now
            self.reported = max(self.reported, min(self.count(), self.total))
            self.callback(self.reported, self.total)
