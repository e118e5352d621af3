"""One run of a function over items, on any transport: the engine.

It owns, once for every transport: validating the arguments, building the
payload, planning chunks (a probe, then guided chunks), the wait loop
(deadline, progress, interrupt), mapping failures to the errors users see,
and gathering the results. Whatever happens (an item that raises, a dead
worker, a timeout, Ctrl-C) the run cancels what is left, stops stuck
workers, and releases everything it holds before returning.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle
import numpy as np

from ..errors import (
    InvalidArgumentError,
    InvalidArgumentTypeError,
    ParallelTimeoutError,
    TaskError,
    WorkerDiedError,
)
from . import tracebacks
from .planning import Chunk, Plan
from .progress import ThrottledReport
from .protocol import ChunkResult, Payload, RemoteError
from .results import gather
from .transport import Inputs, Transport, WorkerLost

ProgressCallback = Callable[[int, int], None]

#: How long running chunks get to notice a cancel before their workers are stopped.
CANCEL_GRACE = 0.5
#: How often the wait loop wakes for progress and the deadline, in seconds.
POLL_INTERVAL = 0.05


# -- validation -------------------------------------------------------------------
def check_options(
    fn: Any, chunksize: Any, timeout: Any, out: Iterable[Any], items: Any
) -> tuple[tuple[np.ndarray, ...], Any]:
    """The run's output arrays and items as a sequence; raises before any work."""
    if not callable(fn):
        raise InvalidArgumentTypeError("fn", f"must be callable, got {type(fn).__name__}")
    if chunksize is not None and (
        isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1
    ):
        raise InvalidArgumentError("chunksize", f"must be an integer >= 1, got {chunksize!r}")
    if timeout is not None and not (
        isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
    ):
        raise InvalidArgumentError(
            "timeout", f"must be a positive number of seconds, got {timeout!r}"
        )
    outputs = tuple(out)
    for i, arr in enumerate(outputs):
        if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
            raise InvalidArgumentTypeError(
                "out", f"is a {type(arr).__name__}, not a numeric ndarray", index=i
            )
        if not arr.flags.writeable:
            raise InvalidArgumentError("out", "is read-only", index=i)
    return outputs, as_sequence(items)


def check_processes(processes: Any) -> None:
    """``processes`` is None or a positive integer."""
    if processes is not None and (
        isinstance(processes, bool) or not isinstance(processes, int) or processes < 1
    ):
        raise InvalidArgumentError("processes", f"must be an integer >= 1, got {processes!r}")


def as_sequence(items: Any) -> Any:
    """``items`` as something with ``len()`` and ``[]`` (lists only what must be listed)."""
    if isinstance(items, (range, list, tuple, np.ndarray)):
        return items
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise InvalidArgumentTypeError(
            "items",
            f"is a {type(items).__name__}, not an iterable of work items (a range, list, array...)",
        )
    return list(items)


# -- the run ----------------------------------------------------------------------
class Run:
    """One call: ``fn`` over ``items`` on ``transport``.

    Parameters
    ----------
    fn, items
        The function and its work items (a sequence).
    transport
        Where the chunks run; the run releases it when it ends.
    chunksize
        Fixed items per chunk, or None to plan from the probe.
    timeout
        Seconds after which the run stops with :class:`ParallelTimeoutError`.
    inputs
        How arrays travel (sharing threshold, forced and output arrays).
    progress
        ``progress(done, total)``, called from this thread, throttled.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        items: Any,
        transport: Transport,
        *,
        chunksize: int | None = None,
        timeout: float | None = None,
        inputs: Inputs,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.fn = fn
        self.items = items
        self.n_items = len(items)
        self.transport = transport
        self.chunksize = chunksize
        self.timeout = timeout
        self.inputs = inputs
        self.deadline: float | None = None
        self.results: dict[int, ChunkResult] = {}
        self.stacked: np.ndarray | None = None
        self.plan: Plan | None = None
        self.show_progress = ThrottledReport(progress, self.n_items, transport.items_done)

    def execute(self) -> np.ndarray | list:
        """Run every item; the results in item order."""
        if self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout
        transport = self.transport
        try:
            transport.encode(Payload(self.fn, self.items), self.inputs)
        except InvalidArgumentError:
            raise
        except Exception as exc:
            raise unpicklable_error(self.fn, exc) from exc
        transport.start(self._chunk_bound, self._heartbeat)
        plan = self.plan = Plan(self.n_items, transport.workers, self.chunksize)
        self._run_chunks(plan.chunks)
        if plan.probing:
            probe = self.results[0]
            self.stacked = transport.stack_results(probe.values[0], self.n_items)  # type: ignore[index]
            self._run_chunks(plan.cut_rest(probe.seconds, transport.min_chunk_seconds))
        self.show_progress(force=True)
        transport.land_outputs()
        return gather(self.results.values(), self.n_items, self.stacked)

    def _chunk_bound(self, workers: int) -> int:
        # The most chunks the run sends to ``workers`` workers: asked by a
        # transport that sizes per-chunk state up front (local: its control block).
        return Plan(self.n_items, workers, self.chunksize).max_chunks()

    # -- waiting ---------------------------------------------------------------
    def _run_chunks(self, chunks: list[Chunk]) -> None:
        transport = self.transport
        for chunk in chunks:
            transport.submit(chunk)
        pending = {c.number for c in chunks}
        try:
            while pending:
                for res in transport.wait(self._poll_timeout()):
                    if res.error is not None:
                        raise task_error(res.error, self.fn)
                    if res.done < self.plan.chunks[res.chunk].size:  # type: ignore[union-attr]
                        continue  # stopped early (its deadline passed): not complete
                    self.results[res.chunk] = res
                    pending.discard(res.chunk)
                self.show_progress()
                if pending and self._past_deadline():
                    raise ParallelTimeoutError(
                        f"parallel_map did not finish within {self.timeout} s "
                        f"({transport.items_done()}/{self.n_items} items done); "
                        f"{transport.stopped_text}"
                    )
        except WorkerLost as lost:
            transport.cancel(CANCEL_GRACE, kill=True)
            raise self._worker_died(lost) from None
        except BaseException:
            transport.cancel(CANCEL_GRACE, kill=False)
            raise

    def _poll_timeout(self) -> float:
        if self.deadline is None:
            return POLL_INTERVAL
        return max(0.001, min(POLL_INTERVAL, self.deadline - time.monotonic()))

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _heartbeat(self) -> bool:
        self.show_progress()
        return self._past_deadline()

    # -- errors ------------------------------------------------------------------
    def _worker_died(self, lost: WorkerLost) -> WorkerDiedError:
        if lost.index is not None:
            what = f"item {lost.index} ({short_repr(self.items, lost.index)})"
        else:
            what = lost.span
        message = f"{lost.who} died{lost.how}"
        if what:
            message += f" while running {what}"
        if lost.recovery:
            message += f"; {lost.recovery}, nothing else was lost"
        return WorkerDiedError(message, lost.index, lost.exitcodes)


def task_error(err: RemoteError, fn: Any) -> TaskError:
    """The error a user sees for a failed item, with their own source lines."""
    text = tracebacks.render(err.frames, err.exc_lines, tracebacks.code_files(fn))
    error = TaskError(err.index, err.item_repr, err.exc_type, err.message, text)
    error.__cause__ = err.original
    error.__suppress_context__ = True
    if err.traceback is not None:
        # In-process (serial): the error's traceback leads into the user's
        # frame, so %debug and pdb.post_mortem stop where the item failed.
        error = error.with_traceback(err.traceback)
    return error


def unpicklable_error(fn: Any, exc: Exception) -> InvalidArgumentTypeError:
    """The error for a function that cannot travel, naming the global at fault.

    Raised from the payload pickling itself (which shares big arrays instead
    of serialising them), before any process starts: a separate trial
    ``cloudpickle.dumps(fn)`` would serialise a closed-over 1.28 GB array.
    """
    culprit = _find_unpicklable_name(fn)
    where = f" (it uses {culprit})" if culprit else ""
    name = getattr(fn, "__qualname__", repr(fn))
    return InvalidArgumentTypeError(
        "fn",
        f"cannot be sent to worker processes{where}: {exc}",
        message=f"cannot send {name} to worker processes{where}: {exc}",
    )


def _find_unpicklable_name(fn: Any) -> str | None:
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    candidates: list[tuple[str, Any]] = []
    globs = getattr(fn, "__globals__", {})
    candidates += [(f"global {n!r}", globs[n]) for n in code.co_names if n in globs]
    cells = getattr(fn, "__closure__", None) or ()
    for var, cell in zip(code.co_freevars, cells, strict=False):
        with contextlib.suppress(ValueError):
            candidates.append((f"closure variable {var!r}", cell.cell_contents))
    for label, value in candidates:
        if isinstance(value, np.ndarray):
            continue
        try:
            cloudpickle.dumps(value)
        except Exception:
            return f"{label} of type {type(value).__name__}"
    return None


def short_repr(items: Any, index: int) -> str:
    """A repr of ``items[index]`` short enough for a one-line message."""
    try:
        text = repr(items[index])
    except Exception:
        return f"<item {index}>"
    return text if len(text) <= 80 else text[:77] + "..."
