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
    in_process: bool = False,
) -> ChunkResult:
    """Run ``fn(items[i])`` for ``i`` in ``start..stop-1`` into ``result``.

    Parameters
    ----------
    cancelled
        Checked before each item; true stops the chunk there.
    keep
        ``keep(i, value)`` stores a result; None collects them in
        ``result.values``.
    tick
        Called after each completed item (progress).
    in_process
        The loop runs in the caller's own process (the serial transport):
        ``KeyboardInterrupt`` propagates as an interrupt instead of failing
        the item, and the error keeps its live traceback for the debugger.

    Returns
    -------
    ChunkResult
        ``result``, with ``done``, ``seconds``, ``values`` and, when an item
        raised, ``error`` (the chunk stops at that item).
    """
    values: list | None = [] if keep is None else None
    done = 0
    i = start
    t0 = time.perf_counter()
    try:
        for i in range(start, stop):
            if cancelled():
                break
            value = fn(items[i])
            if values is not None:
                values.append(value)
            else:
                keep(i, value)  # type: ignore[misc]
            done += 1
            if tick is not None:
                tick()
    except BaseException as exc:
        if in_process and isinstance(exc, KeyboardInterrupt):
            raise
        result.error = describe_error(exc, i, items, keep_traceback=in_process)
    result.seconds = time.perf_counter() - t0
    result.done = done
    result.values = values
    return result
