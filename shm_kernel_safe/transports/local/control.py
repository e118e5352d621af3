"""The per-call control block: a small int64 array in shared memory.

Workers write to it, the parent only reads it, so progress and "which item
was a dead worker on" cost no message at all:

* slot ``CANCEL``: the parent sets it to ask running chunks to stop between
  items (on a task error, a timeout or an interrupt);
* slot ``NEXT``: the first row no worker has claimed yet. The parent writes
  a chunk's row (its number and item range) and a worker claims it by
  moving ``NEXT`` on, under a lock its pool shares (``worker.run_rows``):
  a worker runs chunk after chunk with no message in between;
* one row per chunk: pid of the worker running it, items done, state,
  (when the run has an item timeout) when its current item started, in
  milliseconds of the system-wide monotonic clock, how many bytes of the
  chunk's log are complete (``worker.Log``), how many items it saved, and
  the chunk (number, first item, end) as the parent wrote it.

``DONE`` counts the items a chunk processed (progress; the item at
``start + DONE`` is the one its worker runs). It is also the ledger's
source where results stack: items ``start .. start + DONE - 1`` completed,
and their results and ``out=`` writes are where the parent finds them (the
stacked array, the arrays), even when the worker died before its chunk's
result message was sent. Where results do not stack, ``SAVED`` is: the
items whose results are in the chunk's log (``worker.Log``), which trails
``DONE`` by at most ``worker.FLUSH_SECONDS`` of work.
"""

from __future__ import annotations

import numpy as np

from ...memory.arrays import empty

CANCEL, NEXT = 0, 1
HEADER = 8
ROW = 9
PID, DONE, STATE, ITEM_STARTED, LOG_END, SAVED, CHUNK, START, STOP = range(ROW)
# LOADING: a worker took the chunk and loads the call's payload; RUNNING: it
# runs items. Only RUNNING counts as progress for the stall check.
PENDING, RUNNING, FINISHED, LOADING = 0, 1, 2, 3


class ControlBlock:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.table = array[HEADER:].reshape(-1, ROW)

    @classmethod
    def create(cls, n_chunks: int) -> ControlBlock:
        return cls(empty(HEADER + ROW * max(n_chunks, 1), dtype=np.int64))

    def cancel(self) -> None:
        self.array[CANCEL] = 1

    def publish(self, row: int, chunk: int, start: int, stop: int) -> None:
        """Write a chunk into ``row``, for a worker to claim (see ``NEXT``)."""
        self.table[row, [CHUNK, START, STOP]] = (chunk, start, stop)

    def claimed(self) -> int:
        """Rows claimed by workers so far: rows ``NEXT`` and up wait for one."""
        return int(self.array[NEXT])

    @property
    def capacity(self) -> int:
        return len(self.table)

    def done(self) -> int:
        return int(self.table[:, DONE].sum())

    def running(self) -> list[tuple[int, int, int, int]]:
        """(row, pid, items done, item start ms) of chunks started and not finished."""
        rows = np.nonzero(np.isin(self.table[:, STATE], (RUNNING, LOADING)))[0]
        t = self.table
        return [(int(r), int(t[r, PID]), int(t[r, DONE]), int(t[r, ITEM_STARTED])) for r in rows]
