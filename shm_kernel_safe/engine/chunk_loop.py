"""The loop over one chunk's items, the same on both sides of every
process boundary (a loky worker, a dask worker, the calling process).

Transports differ only in three small callables: how a worker learns the
run was cancelled (a shared flag, a set of ended calls, an attribute), where
a result goes (a list, a slot of a shared array), and how progress is
reported (a counter in shared memory, a throttled event, a callback). The
loop itself is all per-item overhead, so it stays this short.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from . import worker_warnings
from .protocol import ChunkResult, describe_error


def _never() -> bool:
    return False


def run_items(
    fn: Callable[[Any], Any],
    items: Any,
    start: int,
    stop: int,
    result: ChunkResult,
    *,
    cancelled: Callable[[], Any] = _never,
    keep: Callable[[int, Any], None] | None = None,
    tick: Callable[[], None] | None = None,
    keep_going: bool = False,
    in_process: bool = False,
) -> ChunkResult:
    """Run ``fn(items[i])`` for ``i`` in ``start..stop-1`` into ``result``.

    Parameters
    ----------
    cancelled
        Checked before each item; true stops the chunk there.
    keep
        ``keep(i, value)`` stores a result; None collects them in
        ``result.values`` (None stands for a failed item).
    tick
        Called after each processed item (progress).
    keep_going
        An item that raises is recorded in ``result.failed`` and the chunk
        goes on; otherwise it stops the chunk (``result.error``).
    in_process
        The loop runs in the caller's own process (the serial transport):
        ``KeyboardInterrupt`` propagates as an interrupt instead of failing
        the item (``result`` then holds what completed), and errors keep
        their live traceback for the debugger.

    Returns
    -------
    ChunkResult
        ``result``, with ``done`` (items processed from ``start``),
        ``seconds`` and ``values``.
    """
    values: list | None = [] if keep is None else None
    result.values = values  # filled as items complete: ``tick`` may read it
    result.source = (items, start, keep_going)
    done = 0
    # Warnings are recorded (once per chunk and location, with their item)
    # and re-issued by the parent at the cell's line, where its filters apply.
    with worker_warnings.recording(items) as seen:
        # Timed from here: ``seconds`` of the one-item probe sizes the run's
        # smallest chunk, and setting up the recording (~3 us) is no item's.
        t0 = time.perf_counter()
        try:
            for i in range(start, stop):
                if cancelled():
                    break
                seen.index = i
                try:
                    value = fn(items[i])
                except BaseException as exc:
                    if in_process and isinstance(exc, KeyboardInterrupt):
                        raise
                    error = describe_error(exc, i, items, keep_traceback=in_process)
                    if not keep_going:
                        result.error = error
                        break
                    result.failed[i] = error
                    if values is not None:
                        values.append(None)
                else:
                    if values is not None:
                        values.append(value)
                    else:
                        keep(i, value)  # type: ignore[misc]
                done += 1
                if tick is not None:
                    tick()
        finally:
            result.seconds = time.perf_counter() - t0
            result.done = done
            result.values = values
            result.warnings = seen.captured
    return result
