"""The per-call control block: a small int64 array in shared memory.

Workers write to it, the parent only reads it, so progress and "which item
was a dead worker on" cost no message at all:

* slot ``CANCEL``: the parent sets it to ask running chunks to stop between
  items (on a task error, a timeout or an interrupt);
* one row per chunk: pid of the worker running it, items done, state.
"""

from __future__ import annotations

import numpy as np

from ...memory.arrays import empty

CANCEL = 0
HEADER = 8
ROW = 4
PID, DONE, STATE = 0, 1, 2
PENDING, RUNNING, FINISHED = 0, 1, 2


class ControlBlock:
    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.table = array[HEADER:].reshape(-1, ROW)

    @classmethod
    def create(cls, n_chunks: int) -> ControlBlock:
        return cls(empty(HEADER + ROW * max(n_chunks, 1), dtype=np.int64))

    def cancel(self) -> None:
        self.array[CANCEL] = 1

    def done(self) -> int:
        return int(self.table[:, DONE].sum())

    def running(self) -> list[tuple[int, int, int]]:
        """(chunk, pid, items done) of chunks a worker started and did not finish."""
        rows = np.nonzero(self.table[:, STATE] == RUNNING)[0]
        return [(int(c), int(self.table[c, PID]), int(self.table[c, DONE])) for c in rows]
