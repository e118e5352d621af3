"""What runs inside a local worker process: one chunk of items per task.

A task message carries only small handles: the call's pickled payload sits
in a shared segment and is unpickled once per worker per call (not per
task), and every segment it references stays mapped in the worker for the
next call that uses it (``arrays.attached_root``). Progress is one integer
store per item in the control block, never a message.
"""

from __future__ import annotations

import mmap
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...engine import sharing
from ...engine.chunk_loop import run_items
from ...engine.protocol import ChunkResult, Payload, describe_error
from ...memory import arrays
from ...memory.arrays import SharedArray
from . import control


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
    ledger: str | None = None  # directory of the run's per-chunk logs (see Log)


class Log:
    """A chunk's log of what only a message would otherwise carry.

    Results that do not stack, results that do not fit the stacked array and
    (with ``errors="continue"``) items' errors are appended here, each as
    one pickled ``(index, kind, object)`` record, before the item is counted
    in the control block. The file is memory-mapped: a record is a memcpy,
    never a message or a system call, and it survives the worker's death
    (the pages belong to the file). The parent reads it when the chunk comes
    back and when its worker died, so what a dead worker completed is kept.
    The control block's ``LOG_END`` slot says how many bytes are complete.
    """

    FIRST_SIZE = 1 << 16

    def __init__(self, path: str, ctrl: memoryview, end_slot: int) -> None:
        self.path = path
        self.ctrl = ctrl
        self.end_slot = end_slot
        self.fd = -1
        self.map: mmap.mmap | None = None
        self.size = 0
        self.end = 0

    def add(self, index: int, kind: str, obj: Any) -> None:
        data = pickle.dumps((index, kind, obj), protocol=pickle.HIGHEST_PROTOCOL)
        stop = self.end + 8 + len(data)
        if stop > self.size:
            self._grow(stop)
        assert self.map is not None
        self.map[self.end : self.end + 8] = len(data).to_bytes(8, "little")
        self.map[self.end + 8 : stop] = data
        self.end = stop
        self.ctrl[self.end_slot] = stop  # published after the bytes

    def _grow(self, need: int) -> None:
        size = max(self.FIRST_SIZE, 2 * self.size)
        while size < need:
            size *= 2
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self.fd, size)
        if self.map is not None:
            self.map.close()
        self.map = mmap.mmap(self.fd, size)
        self.size = size

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
        if self.fd >= 0:
            os.close(self.fd)


class _LoggedDict(dict):
    """``ChunkResult.failed`` that logs each entry instead of keeping it:
    the parent reads the chunk's failures from the log."""

    def __init__(self, log: Log, kind: str) -> None:
        super().__init__()
        self.log = log
        self.kind = kind

    def __setitem__(self, index: int, value: Any) -> None:
        self.log.add(index, self.kind, value)


def read_log(path: str, end: int) -> list[tuple[int, str, Any]]:
    """The complete records of a chunk's log (see :class:`Log`)."""
    if end <= 0:
        return []
    try:
        with open(path, "rb") as f:
            data = f.read(end)
    except FileNotFoundError:
        return []
    records = []
    at = 0
    while at + 8 <= len(data):
        n = int.from_bytes(data[at : at + 8], "little")
        if at + 8 + n > len(data):
            break
        records.append(pickle.loads(data[at + 8 : at + 8 + n]))
        at += 8 + n
    return records


_current: dict[str, Any] = {"call_id": None, "payload": None}


def _payload_for(task: ChunkTask) -> Payload:
    if _current["call_id"] != task.call_id:
        _current["payload"] = None  # drop the previous call's objects first
        raw = task.payload.view()
        payload, names = sharing.loads(memoryview(raw))
        del raw
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
    ctrl[row + control.STATE] = control.LOADING
    result = ChunkResult(task.chunk)
    try:
        payload = _payload_for(task)
    except BaseException as exc:
        result.error = describe_error(exc, task.start, None, loading=True)
        ctrl[row + control.STATE] = control.FINISHED
        return result
    ctrl[row + control.STATE] = control.RUNNING
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

    log = (
        None
        if task.ledger is None
        else Log(os.path.join(task.ledger, str(task.chunk)), ctrl, row + control.LOG_END)
    )
    keep: Callable[[int, Any], None] | None = None
    if task.results is not None:
        stacked = task.results.view()
        scalar_type, misfits = task.scalar_type, result.misfits
        if log is None:

            def keep(i: int, value: Any) -> None:
                if not _store(stacked, i, value, scalar_type):
                    misfits[i] = value

        else:

            def keep(i: int, value: Any) -> None:
                if not _store(stacked, i, value, scalar_type):
                    log.add(i, "misfit", value)

    elif log is not None:
        # With a log, what does not stack travels in the log only (values,
        # misfits, failures): the parent reads it whether the chunk comes
        # back or its worker dies, so nothing is pickled twice.
        def keep(i: int, value: Any) -> None:
            log.add(i, "value", value)

    if log is not None and task.keep_going:
        result.failed = _LoggedDict(log, "failed")
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
    if log is not None:
        log.close()
        result.failed = {}
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
