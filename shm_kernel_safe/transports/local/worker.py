"""What runs inside a local worker process: one chunk of items per task.

A task message carries only small handles: the call's pickled payload sits
in a shared segment and is unpickled once per worker per call (not per
task), and every segment it references stays mapped in the worker for the
next call that uses it (``arrays.attached_root``). Progress is one integer
store per item in the control block, never a message.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...engine import captured
from ...engine.chunk_loop import run_items
from ...engine.protocol import ChunkResult, Payload, describe_error
from ...memory import arrays
from ...memory.arrays import SharedArray
from . import control, sharing


@dataclass(frozen=True)
class ChunkTask:
    """The message for one chunk: handles and an index range."""

    call_id: str
    payload: SharedArray  # uint8 bytes of the pickled Payload
    control: SharedArray  # int64 control block, writable
    row: int  # this chunk's row in the control block
    chunk: int
    start: int
    stop: int
    results: SharedArray | None = None  # stacked results, when they stack
    scalar_type: type | None = None  # the type a stacked scalar result must have
    keep_going: bool = False  # go on past an item that raises
    track_time: bool = False  # note when each item starts (for item timeouts)


_current: dict[str, Any] = {"call_id": None, "payload": None}


def _payload_for(task: ChunkTask) -> Payload:
    if _current["call_id"] != task.call_id:
        _current["payload"] = None  # drop the previous call's objects first
        raw = task.payload.view()
        payload, names = sharing.loads(memoryview(raw))
        del raw
        # Captured arrays a write would silently change here only: read-only.
        captured.freeze(payload.fn, captured.keep_in_worker)
        names |= {task.payload.name, task.control.name}
        if task.results is not None:
            names.add(task.results.name)
        # Keep mapped what this call uses and what the parent still holds;
        # forget segments of earlier calls that are gone (auto-shared copies).
        arrays.release_attached(keep=names | payload.keep)
        _current.update(call_id=task.call_id, payload=payload)
    return _current["payload"]


def run_chunk(task: ChunkTask) -> ChunkResult:
    """Run one chunk; progress and state go to the control block."""
    # A memoryview indexes to plain ints, about twice as fast per item as
    # numpy scalar indexing; the per-item callbacks below are all overhead.
    ctrl = memoryview(task.control.view())
    row = control.HEADER + control.ROW * task.row
    ctrl[row + control.PID] = os.getpid()
    ctrl[row + control.STATE] = control.RUNNING
    result = ChunkResult(task.chunk)
    try:
        payload = _payload_for(task)
    except BaseException as exc:
        result.error = describe_error(exc, task.start, None, loading=True)
        ctrl[row + control.STATE] = control.FINISHED
        return result
    done_slot = row + control.DONE
    cancel_slot = control.CANCEL
    started_slot = row + control.ITEM_STARTED

    def cancelled() -> int:
        return ctrl[cancel_slot]

    def tick() -> None:
        ctrl[done_slot] += 1

    if task.track_time:
        ctrl[started_slot] = _now_ms()

        def tick() -> None:
            ctrl[done_slot] += 1
            ctrl[started_slot] = _now_ms()

    keep = None
    if task.results is not None:
        stacked = task.results.view()
        scalar_type, misfits = task.scalar_type, result.misfits

        def keep(i: int, value: Any) -> None:
            if not _store(stacked, i, value, scalar_type):
                misfits[i] = value

    run_items(
        payload.fn,
        payload.items,
        task.start,
        task.stop,
        result,
        cancelled=cancelled,
        keep=keep,
        tick=tick,
        keep_going=task.keep_going,
    )
    ctrl[row + control.STATE] = control.FINISHED
    return result


def _store(out: np.ndarray, i: int, value: Any, scalar_type: type | None) -> bool:
    """Write ``value`` into the stacked result if it fits exactly."""
    try:
        if scalar_type is not None:
            if type(value) is scalar_type:
                out[i] = value
                return True
            return False
        if (
            isinstance(value, np.ndarray)
            and value.shape == out.shape[1:]
            and value.dtype == out.dtype
        ):
            out[i] = value
            return True
    except (OverflowError, ValueError, TypeError):
        pass
    return False


def _now_ms() -> int:
    # time.monotonic() is system-wide (CLOCK_MONOTONIC, QueryPerformanceCounter,
    # mach_absolute_time): the parent compares it with its own.
    return int(time.monotonic() * 1000)


def ping() -> int:
    """A no-op task used to start workers ahead of a call."""
    return os.getpid()
