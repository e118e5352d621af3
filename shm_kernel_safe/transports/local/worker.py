"""What runs inside a local worker process: chunks it claims, one after another.

A task message carries only small handles: the call's pickled payload sits
in a shared segment and is unpickled once per worker per call (not per
task), and every segment it references stays mapped in the worker for the
next call that uses it (``arrays.attached_root``). A worker's task
(:func:`run_rows`) claims chunks from the call's control block until none
is left, so a call costs one message per worker rather than one per
chunk (a loky round trip, 0.3-0.9 ms of an idle worker each). Progress is
one integer store per item in the control block, never a message.
"""

from __future__ import annotations

import functools
import os
import pickle
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle
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
    ledger: str | None = None  # path prefix of the run's per-chunk logs (see Log)
    # log every value that does not stack by the chunk's end: its worker goes
    # on to other chunks before the result message leaves (see run_rows)
    log_all: bool = False


@dataclass(frozen=True)
class RowsTask:
    """The message for one worker's part of a call: claim rows of
    ``control`` below ``stop`` (see ``control.NEXT``) and run their chunks.

    The other fields are :class:`ChunkTask`'s, the same for every chunk.
    """

    call_id: str
    payload: SharedArray
    control: SharedArray
    stop: int
    results: SharedArray | None = None
    scalar_type: type | None = None
    keep_going: bool = False
    track_time: bool = False
    ledger: str | None = None


#: A worker hands back what it ran at the end of the first chunk that ends
#: this many seconds after its task began, so the parent takes results (and
#: a journal records them) as the call goes on, not only at its end.
RETURN_SECONDS = 0.25

#: The lock over claims (``control.NEXT``) of every worker of this pool; the
#: pool's initializer sets it (:func:`set_claim_lock`).
_claim_lock: Any = None


def set_claim_lock(lock: Any) -> None:
    """Share the pool's claim lock with this worker (its initializer calls it)."""
    global _claim_lock
    _claim_lock = lock


class Log:
    """A chunk's log of what only a message would otherwise carry.

    Results that do not stack, results that do not fit the stacked array and
    (with ``errors="continue"``) items' errors are appended here, as records
    (item index, kind, pickled object), before the items are counted in the
    control block. Results that do not stack go in runs (``VALUES``: the
    list of the results of items ``index, index + 1, ...``), one record per
    :data:`FLUSH_SECONDS` of work: a pickle call per item would cost more
    than a tiny item itself. A record is one ``write``: once it returns,
    the bytes belong to the file (the page cache), not to the worker, so
    they outlive its death. The parent reads the log when the worker died
    before its chunk came back, so what it completed is kept. The control
    block's ``LOG_END`` slot says how many bytes are complete. (A
    memory-mapped file costs less per record but far more per page: a
    write into a file's hole allocates its blocks one fault at a time.)
    """

    HEAD = struct.Struct("<qq")  # item index, kind << 56 | length of the pickle

    def __init__(self, path: str, ctrl: memoryview, end_slot: int) -> None:
        self.path = path
        self.ctrl = ctrl
        self.end_slot = end_slot
        self.fd = -1
        self.end = 0

    def add(self, index: int, kind: int, obj: Any) -> bool:
        """Append a record; False if (part of) ``obj`` could not be pickled."""
        data = _pickled(obj)
        if data is None:
            # A run with one value that does not pickle: each value on its
            # own, so only that one is missing from the log (the chunk's
            # result message turns it into its item's error, see
            # ChunkResult.make_sendable).
            if kind == VALUES and len(obj) > 1:
                for k, value in enumerate(obj):
                    self.add(index + k, VALUES, [value])
            return False
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        record = self.HEAD.pack(index, kind << 56 | len(data)) + data
        view = memoryview(record)
        while view:  # a regular file takes it whole; a signal may cut it short
            view = view[os.write(self.fd, view) :]
        self.end += len(record)
        self.ctrl[self.end_slot] = self.end  # published after the bytes
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: Kinds of log records.
VALUES, MISFIT, FAILED = 0, 1, 2

#: Results that do not stack are logged once per this many seconds of a
#: chunk's work: the most work a worker killed from outside loses (those
#: items run again). Chunks are sized to at least twice this (the local
#: transport's ``min_chunk_seconds``), so a log costs one file per chunk
#: at most, a few percent of it, and none for short chunks.
FLUSH_SECONDS = 0.002


def _pickled(obj: Any) -> bytes | None:
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        try:  # what the result message carries too: lambdas, local classes
            return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return None


class _LoggedDict(dict):
    """``ChunkResult.failed`` that logs each entry as it is made."""

    def __init__(self, log: Log) -> None:
        super().__init__()
        self.log = log

    def __setitem__(self, index: int, value: Any) -> None:
        self.log.add(index, FAILED, value)
        super().__setitem__(index, value)


def read_log(path: str, end: int) -> list[tuple[int, int, Any]]:
    """The complete records of a chunk's log, as (index, kind, object)."""
    if end <= 0:
        return []
    try:
        with open(path, "rb") as f:
            data = memoryview(f.read(end))
    except FileNotFoundError:
        return []
    records = []
    at = 0
    unpack, loads = Log.HEAD.unpack_from, pickle.loads
    low = (1 << 56) - 1
    while at + 16 <= len(data):
        index, word = unpack(data, at)
        stop = at + 16 + (word & low)
        if stop > len(data):
            break
        records.append((index, word >> 56, loads(data[at + 16 : stop])))
        at = stop
    return records


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


def run_rows(task: RowsTask) -> list[ChunkResult]:
    """Claim and run chunks until none is left below ``task.stop``.

    Returns the chunks' results, early at an item's error (the parent stops
    the call), a cancel, or after :data:`RETURN_SECONDS`. A claim is a few
    stores under the pool's lock. A worker killed while it holds the lock
    breaks its pool like any death (loky then stops every worker), so no
    worker waits on it for ever.
    """
    ctrl = memoryview(task.control.view())
    pid = os.getpid()
    results: list[ChunkResult] = []
    until = time.perf_counter() + RETURN_SECONDS
    lock = _claim_lock
    while not ctrl[control.CANCEL]:
        with lock:
            row = ctrl[control.NEXT]
            if row >= task.stop:
                break
            ctrl[control.NEXT] = row + 1
            base = control.HEADER + control.ROW * row
            ctrl[base + control.PID] = pid
            ctrl[base + control.STATE] = control.LOADING
        res = run_chunk(
            ChunkTask(
                task.call_id,
                task.payload,
                task.control,
                row,
                ctrl[base + control.CHUNK],
                ctrl[base + control.START],
                ctrl[base + control.STOP],
                task.results,
                task.scalar_type,
                task.keep_going,
                task.track_time,
                task.ledger,
                log_all=True,
            )
        )
        results.append(res)
        if res.error is not None or time.perf_counter() > until:
            break
    return results


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
    started_slot = row + control.ITEM_STARTED
    # The per-item callbacks are all overhead (~0.25 us per item, ~1% of a
    # 20 us item), so they are kept few: the cancel check is a C-level call
    # with no Python frame, and where every completed item is stored
    # (stacked scalars, a failed item stops the chunk, no item timeout)
    # ``keep`` also counts it, with one store instead of a read-modify-write:
    # items ``start..i`` are then exactly the ones done.
    cancelled = functools.partial(ctrl.__getitem__, control.CANCEL)

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
        else Log(f"{task.ledger}{task.chunk}", ctrl, row + control.LOG_END)
    )
    # What does not stack goes both in the chunk's log (read by the parent
    # only if the worker dies) and in the result message (read otherwise):
    # the extra pickling is the workers', in parallel, and the parent's
    # per-item cost stays that of one message per chunk.
    keep: Callable[[int, Any], None] | None = None
    logging_tick: Any = None
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
                    log.add(i, MISFIT, value)
                    misfits[i] = value

        if scalar_type is not None and not task.keep_going and not task.track_time:
            before = task.start - 1

            def keep(i: int, value: Any) -> None:
                if type(value) is scalar_type:
                    try:
                        stacked[i] = value
                    except (OverflowError, ValueError, TypeError):
                        if log is not None:
                            log.add(i, MISFIT, value)
                        misfits[i] = value
                else:
                    if log is not None:
                        log.add(i, MISFIT, value)
                    misfits[i] = value
                ctrl[done_slot] = i - before  # after the value and its log record

            tick = None  # type: ignore[assignment]

    elif log is not None:
        # run_items collects the values (None for a failed item) in
        # ``result.values``; ``tick`` counts each, and logs them in runs.
        tick = logging_tick = _logging_tick(log, result, task.start, ctrl, row, task.track_time)

    if log is not None and task.keep_going:
        result.failed = _LoggedDict(log)
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
    if logging_tick is not None and task.log_all:
        logging_tick.flush()
    if logging_tick is not None and logging_tick.saved and logging_tick.intact:
        # Pickled once: the message leaves out the values the log holds.
        result.logged = logging_tick.saved
        result.values = result.values[result.logged :]  # type: ignore[index]
    if log is not None:
        log.close()
        result.failed = dict(result.failed)
    ctrl[row + control.STATE] = control.FINISHED
    return result


def _logging_tick(
    log: Log,
    result: ChunkResult,
    start: int,
    ctrl: memoryview,
    row: int,
    track_time: bool,
) -> Callable[[], None]:
    """The per-item callback of a chunk whose results do not stack.

    It counts the item (``DONE``, progress) and, once per
    :data:`FLUSH_SECONDS` of the chunk's work, appends the values since the
    last run (``result.values``, which the chunk loop fills) to the log, then
    publishes how many items are saved (``SAVED``, the parent's ledger for
    this chunk if its worker dies). ``tick.flush()`` logs what is left: a
    chunk run on its own (``ChunkTask.log_all`` false) and shorter than that
    writes no log at all, its result message is enough; one a worker
    claimed among others is logged whole before the next one starts, as
    its message leaves only with theirs. A closure, not a method: it runs
    once per item. ``tick.saved`` is the count saved, ``tick.intact`` false
    once a value could not be logged.
    """
    clock = time.perf_counter
    done_slot, saved_slot = row + control.DONE, row + control.SAVED
    started_slot = row + control.ITEM_STARTED if track_time else -1
    next_flush = clock() + FLUSH_SECONDS
    flushed = 0

    def flush() -> None:
        nonlocal flushed
        values = result.values
        n = len(values)  # type: ignore[arg-type]
        if n == flushed:
            return
        if not log.add(start + flushed, VALUES, values[flushed:n]):  # type: ignore[index]
            tick.intact = False  # type: ignore[attr-defined]
        flushed = n
        tick.saved = n  # type: ignore[attr-defined]
        ctrl[saved_slot] = n  # after the record

    def tick() -> None:
        nonlocal next_flush
        ctrl[done_slot] += 1
        if started_slot >= 0:
            ctrl[started_slot] = _now_ms()
        if clock() >= next_flush:
            flush()
            next_flush = clock() + FLUSH_SECONDS

    tick.saved, tick.intact, tick.flush = 0, True, flush  # type: ignore[attr-defined]
    return tick


def _store(out: np.ndarray, i: int, value: Any, scalar_type: type | None) -> bool:
    """Write ``value`` into the stacked result if it fits exactly."""
    try:
        if scalar_type is not None:
            if type(value) is scalar_type:
                out[i] = value
                return True
            return False
        if (
            type(value) is np.ndarray  # a subclass (a masked array) travels as it is
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
