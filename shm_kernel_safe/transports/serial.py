"""The serial transport: every item in the calling process, for debugging.

Same run as on the other transports (same planning, results, errors with
the item and the cell's line, ``out=`` arrays, progress), but no process,
no pickling and no shared memory: the function sees the caller's own
objects, so ``breakpoint()`` stops in it, ``%debug`` after a failure lands
in the frame where the item failed, and print output appears in order. It
is what joblib's ``n_jobs=1`` and dask's synchronous scheduler are to them.

The arrays the function captures are read-only for the run, as in
workers, except ``out=`` arrays and writable shared arrays (which workers
write in place too), so a write lands or fails the same way on every
backend. Differences, by nature: ``out=`` arrays are written directly, so
they also hold the writes of a run that failed; a ``timeout`` stops the
run between items (an item running is not interrupted); Ctrl-C raises
``KeyboardInterrupt`` from inside the item. What it keeps the same on
purpose: results must pickle (a result that could not come back from a
worker fails its item here too), and the results are copies.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from ..engine import captured
from ..engine.chunk_loop import run_items
from ..engine.planning import Chunk
from ..engine.protocol import ChunkResult, Payload
from ..engine.transport import Heartbeat, Inputs, Transport, TransportOptions


class SerialTransport(Transport):
    """Chunks run one after the other in this process, in the engine's thread."""

    name = "serial"
    min_chunk_seconds = 0.0  # no message to amortise
    stopped_text = "it stopped between items"
    writes_shared_in_place = True  # the caller's own arrays

    @classmethod
    def from_options(cls, options: TransportOptions) -> SerialTransport:
        # -n, --start-method and --threads are accepted (checked by the
        # base) and ignored, so that a cell is switched to serial for
        # debugging by adding one option; items run in this process, whose
        # BLAS threads are the user's.
        return cls()

    def __init__(self) -> None:
        self.workers = 1
        self.queue: deque[Chunk] = deque()
        self.done = 0
        self.stopped = False
        self.heartbeat: Heartbeat = lambda: False
        self.heartbeat_error: BaseException | None = None
        self.interrupted: ChunkResult | None = None
        self.keep_going = False
        self.frozen: list[np.ndarray] = []
        self.outputs: tuple[np.ndarray, ...] = ()

    def encode(
        self,
        payload: Payload,
        inputs: Inputs,
        *,
        keep_going: bool = False,
        item_timeout: float | None = None,
    ) -> None:
        self.fn, self.items = payload.fn, payload.items
        self.keep_going = keep_going
        # The arrays the function captures are read-only for the run, as in
        # workers (where a write would change a copy), except outputs and
        # writable shared arrays, which workers write in place too.
        outputs = self.outputs = inputs.outputs
        self.frozen = captured.freeze(
            payload.fn,
            lambda arr: (
                any(arr is o or arr.base is o for o in outputs) or captured.keep_in_worker(arr)
            ),
        )

    def start(self, chunk_bound: Callable[[int], int], heartbeat: Heartbeat) -> None:
        self.heartbeat = heartbeat

    def submit(self, chunk: Chunk) -> None:
        self.queue.append(chunk)

    def wait(self, timeout: float) -> list[ChunkResult]:
        if not self.queue:
            return []
        chunk = self.queue.popleft()
        result = ChunkResult(chunk.number)
        try:
            run_items(
                self.fn,
                self.items,
                chunk.start,
                chunk.stop,
                result,
                cancelled=self._cancelled,
                keep=None,
                tick=self._tick,
                keep_going=self.keep_going,
                in_process=True,
            )
        except KeyboardInterrupt:
            self.interrupted = result  # what completed before Ctrl-C: kept by cancel()
            raise
        if self.heartbeat_error is not None:
            error, self.heartbeat_error = self.heartbeat_error, None
            raise error
        _as_from_a_worker(result)
        return [result]

    def _cancelled(self) -> bool:
        try:
            if self.heartbeat():
                self.stopped = True  # past the deadline: the engine raises the timeout
        except BaseException as exc:  # the progress display failed: not the item's fault
            self.heartbeat_error = exc
            self.stopped = True
        return self.stopped

    def _tick(self) -> None:
        self.done += 1

    def items_done(self) -> int:
        return self.done

    def output_state(self) -> tuple[np.ndarray, ...] | None:
        return self.outputs  # items write the caller's own arrays

    def cancel(self, grace: float, kill: bool) -> list[ChunkResult]:
        self.stopped = True
        self.queue.clear()
        interrupted, self.interrupted = self.interrupted, None
        if interrupted is not None:
            _as_from_a_worker(interrupted)
            return [interrupted]
        return []

    def release(self) -> None:
        captured.thaw(self.frozen)
        self.queue.clear()
        self.fn = self.items = None


def _as_from_a_worker(result: ChunkResult) -> None:
    """The chunk's results as a worker would send them back."""
    # A result that cannot be pickled fails its item here too, so that a
    # cell debugged on serial fails where it fails on the other backends.
    result.make_sendable()
    # What workers return is unpickled, so never a view of the caller's
    # data; here a function may return one (x[nn]): give a copy.
    result.values = [_unshared(v) for v in result.values or []]


def _unshared(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.base is not None:
        return value.copy()
    return value
