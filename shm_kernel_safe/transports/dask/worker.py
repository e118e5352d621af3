"""What runs on a dask worker: one chunk of items per dask task.

The call's pickled payload and its big arrays reach each worker once (the
parent scatters them with ``broadcast=True``); a task carries only futures
of those and an index range. The payload is unpickled once per worker per
call, its arrays rebuilt as read-only views of the worker's scattered copy.

Output arrays (``out=`` / ``--out``) cannot be written in place on another
machine, so each chunk works on a private copy and returns the elements it
changed, compared byte for byte with the original: the parent applies them
to the caller's array. Progress is a throttled structured event (at most
five per second per chunk); cancelling is a flag the parent sets on every
worker with ``Client.run``, read between items at the cost of a set lookup.

Each running chunk also notes the item it is at in a small file on the
worker's host (:class:`Record`): unlike the worker's memory and its
events, the file outlives a worker that dies inside an item, so the parent
learns exactly which item killed it (reading the file itself on our own
cluster, through the host's nannies on another machine).
"""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from ..._malloc import tune_malloc
from ...engine import captured
from ...engine.chunk_loop import run_items
from ...engine.protocol import ChunkResult, Payload, describe_error
from ...engine.threads import limit_threads

#: Event topic of progress reports: ``[call_id, chunk, items done]``.
PROGRESS_TOPIC = "shm_kernel_safe-progress"
REPORT_EVERY = 0.2

_lock = threading.Lock()
_payloads: collections.OrderedDict[str, Payload] = collections.OrderedDict()
_ended: dict[str, None] = {}  # calls that ended or were cancelled (a bounded set)
_running: collections.Counter[str] = collections.Counter()  # call id -> chunks in a thread
_loading = threading.local()  # arrays and out copies while a payload is unpickled


#: Item and start time (``time.time()``) in a record file; the item is
#: ``LOADING`` while the chunk unpickles its payload.
_RECORD = struct.Struct("<qd")
LOADING = -1


def records_dir() -> str:
    """Where workers on this host keep their records (the same for the
    worker, its nanny and, on our own cluster, the parent)."""
    return os.path.join(tempfile.gettempdir(), f"shm_kernel_safe-dask-{os.getuid()}")


#: Bytes of results one chunk keeps on disk at most: beyond, a death costs
#: running its items again rather than the disk writing big results twice.
KEEP_LIMIT = 64 * 2**20
#: Header of one kept result in a ``.values`` file: item, pickle length.
_VALUE = struct.Struct("<qQ")
VALUES = ".values"


class Record:
    """The item one running chunk is at: a 16-byte file named after the
    call, the chunk and the worker's pid, rewritten before each item and
    removed when the chunk returns. A file is what survives a worker that
    dies inside an item (``os._exit``, a segfault, the OOM killer), and it
    costs one ``pwrite`` per item.

    With ``keep_values`` the results of the items that completed are
    appended, pickled, to a second file: a chunk returns its results when
    it ends, so without it those of a dying worker's chunk would die with
    it and run again. Not for runs with output arrays (their writes come
    back only at the chunk's end); results that do not pickle, a failed
    item (``errors="continue"``), a full disk or ``KEEP_LIMIT`` end the
    keeping there.
    """

    def __init__(self, call_id: str, chunk: int, start: int, keep_values: bool) -> None:
        directory = records_dir()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.path = os.path.join(directory, f"{call_id}-{chunk}-{os.getpid()}")
        self.fd = os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        self.values_fd = -1
        self.next = start  # the next item whose result is kept
        self.kept_bytes = 0
        if keep_values:
            flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_APPEND
            self.values_fd = os.open(self.path + VALUES, flags, 0o600)
        self.at(LOADING)

    def at(self, index: int) -> None:
        os.pwrite(self.fd, _RECORD.pack(index, time.time()), 0)

    def keep(self, index: int, value: Any) -> None:
        """Append item ``index``'s result; never raises (it runs inside the
        item loop, where an exception would be the item's)."""
        if self.values_fd < 0:
            return
        try:
            if index != self.next:
                raise ValueError("an item between failed")
            data = pickle.dumps(value, protocol=5)
            self.kept_bytes += len(data)
            if self.kept_bytes > KEEP_LIMIT:
                raise ValueError("kept enough")
            os.write(self.values_fd, _VALUE.pack(index, len(data)) + data)
            self.next += 1
        except Exception:
            os.close(self.values_fd)
            self.values_fd = -1

    def close(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self.values_fd >= 0:
            os.close(self.values_fd)
        with contextlib.suppress(OSError):
            os.unlink(self.path + VALUES)


def _open_record(spec: DaskChunk, keep_values: bool) -> Record | None:
    try:
        return Record(spec.call_id, spec.chunk, spec.start, keep_values)
    except OSError:  # no writable temporary directory: deaths are then found by retrying
        return None


def read_records(call_id: str) -> list[tuple[int, int, float, int, bool]]:
    """Records of ``call_id`` on this host: ``(chunk, item, started, pid,
    alive)`` each. Runs in the parent on our own cluster, in a nanny
    (``Client.run(..., nanny=True)``) on another machine."""
    import psutil

    found = []
    directory = records_dir()
    try:
        names = [
            n
            for n in os.listdir(directory)
            if n.startswith(call_id + "-") and not n.endswith(VALUES)
        ]
    except OSError:
        return []
    for name in names:
        try:
            with open(os.path.join(directory, name), "rb") as f:
                item, started = _RECORD.unpack(f.read(_RECORD.size))
        except (OSError, struct.error):
            continue  # removed meanwhile, or not written yet
        _, chunk, pid = name.rsplit("-", 2)
        try:
            alive = psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        found.append((int(chunk), item, started, int(pid), alive))
    return found


def read_kept(call_id: str, chunk: int, pid: int) -> bytes:
    """The ``.values`` file a chunk's worker left (empty when there is none)."""
    path = os.path.join(records_dir(), f"{call_id}-{chunk}-{pid}{VALUES}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def parse_kept(data: bytes, start: int, stop: int) -> list:
    """Results of items ``start``, ``start + 1``... read from a ``.values``
    file, up to ``stop`` (exclusive) or the first record cut short."""
    values: list = []
    offset = 0
    while start + len(values) < stop and offset + _VALUE.size <= len(data):
        index, size = _VALUE.unpack_from(data, offset)
        body = data[offset + _VALUE.size : offset + _VALUE.size + size]
        if index != start + len(values) or len(body) < size:
            break
        try:
            values.append(pickle.loads(body))
        except Exception:
            break
        offset += _VALUE.size + size
    return values


def remove_records(call_id: str) -> None:
    """Remove what is left of ``call_id``'s records on this host (those of
    workers that died; a chunk that returns removes its own)."""
    directory = records_dir()
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if name.startswith(call_id + "-"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))


@dataclass(frozen=True)
class DaskChunk:
    call_id: str
    chunk: int
    start: int
    stop: int
    keep_going: bool = False


def run_dask_chunk(
    spec: DaskChunk,
    payload: bytes,
    arrays: dict[str, Aligned],
    outs: dict[str, Aligned],
) -> ChunkResult:
    """One dask task. ``arrays``/``outs`` arrive resolved from scattered futures."""
    result = ChunkResult(spec.chunk)
    if spec.call_id in _ended:
        return result
    with _lock:
        _running[spec.call_id] += 1
    record = _open_record(spec, keep_values=not outs)
    try:
        return _run(spec, payload, arrays, outs, result, record)
    finally:
        if record is not None:
            record.close()
        with _lock:
            _running[spec.call_id] -= 1
            if not _running[spec.call_id]:
                del _running[spec.call_id]


def _run(
    spec: DaskChunk,
    payload: bytes,
    arrays: dict[str, Aligned],
    outs: dict[str, Aligned],
    result: ChunkResult,
    record: Record | None = None,
) -> ChunkResult:
    try:
        loaded, private = _load(spec.call_id, payload, arrays, outs)
    except BaseException as exc:
        result.error = describe_error(exc, spec.start, None, loading=True)
        return result
    reporter = _progress_reporter(spec)
    if reporter is not None:
        reporter(0)  # started: the parent learns which chunks are in flight
    if record is not None:
        record.at(spec.start)
    done = 0
    next_report = time.perf_counter() + REPORT_EVERY

    def tick() -> None:
        nonlocal done, next_report
        done += 1
        if record is not None:
            record.at(spec.start + done)  # the next item, from now
        if reporter is not None and time.perf_counter() >= next_report:
            reporter(done)
            next_report = time.perf_counter() + REPORT_EVERY

    keep = None
    values: list = []
    if record is not None and record.values_fd >= 0:

        def keep(i: int, value: Any) -> None:
            values.extend([None] * (i - spec.start - len(values)))  # failed items
            values.append(value)
            record.keep(i, value)

    ended, call_id = _ended, spec.call_id
    run_items(
        loaded.fn,
        loaded.items,
        spec.start,
        spec.stop,
        result,
        cancelled=lambda: call_id in ended,
        keep=keep,
        tick=tick,
        keep_going=spec.keep_going,
    )
    if keep is not None:
        values.extend([None] * (result.done - len(values)))
        result.values = values
    # Also after a failed item: the writes of the items that completed land
    # (and those the failed item made before it raised, as locally).
    result.writes = {key: changed_elements(private[key], outs[key].array) for key in private}
    return result


def _load(
    call_id: str, payload: bytes, arrays: dict[str, Aligned], outs: dict[str, Aligned]
) -> tuple[Payload, dict[str, np.ndarray]]:
    """The call's payload: cached per worker, unless it has output arrays,
    which every chunk gets fresh (its own copies)."""
    if not outs:
        with _lock:
            cached = _payloads.get(call_id)
            if cached is None:
                cached, _ = _unpickle(payload, arrays, outs)
                _payloads[call_id] = cached
                while len(_payloads) > 4:
                    _payloads.popitem(last=False)
        return cached, {}
    return _unpickle(payload, arrays, outs)


def _unpickle(payload: bytes, arrays: dict, outs: dict) -> tuple[Payload, dict[str, np.ndarray]]:
    _loading.arrays, _loading.outs, _loading.private = arrays, outs, {}
    try:
        loaded, private = pickle.loads(payload), _loading.private
        # Captured arrays a write would silently change here only: read-only.
        kept = {id(a) for a in private.values()}
        captured.freeze(loaded.fn, lambda arr: id(arr) in kept)
        return loaded, private
    finally:
        _loading.arrays = _loading.outs = _loading.private = None


class Aligned:
    """An array scattered so that it lands in aligned memory on the worker.

    Dask places a received ndarray wherever its frame happens to sit in the
    message buffer: measured here at an odd address, and items reading it
    ran 13% slower than on an aligned copy. Wrapped, the worker rebuilds it
    in memory numpy allocates (aligned, huge-page advised): one copy per
    worker per call, during deserialization, after which the frame is freed.
    """

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __reduce__(self) -> tuple:
        contiguous = np.ascontiguousarray(self.array)
        return _rebuild_aligned, (
            pickle.PickleBuffer(contiguous),
            contiguous.dtype,
            contiguous.shape,
        )


def _rebuild_aligned(buffer: Any, dtype: np.dtype, shape: tuple) -> Aligned:
    array = np.empty(shape, dtype)
    array.reshape(-1).view(np.uint8)[:] = np.frombuffer(buffer, dtype=np.uint8)
    return Aligned(array)


def scattered_array(key: str) -> np.ndarray:
    """Rebuilds a big array as a read-only view of the worker's scattered copy."""
    view = _loading.arrays[key].array.view()
    view.flags.writeable = False
    return view


def private_out(key: str) -> np.ndarray:
    """Rebuilds an output array as this chunk's own writable copy."""
    copy = np.array(_loading.outs[key].array, copy=True)
    _loading.private[key] = copy
    return copy


def changed_elements(private: np.ndarray, original: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices and values of the elements that differ, byte for byte.

    Bytes, not ``!=``: a NaN written over a NaN, or -0.0 over 0.0, must still
    count as written or not exactly as the memory says.
    """
    size = original.dtype.itemsize
    mine = np.ascontiguousarray(private).view(np.uint8).reshape(-1, size)
    theirs = np.ascontiguousarray(original).view(np.uint8).reshape(-1, size)
    index = np.flatnonzero((mine != theirs).any(axis=1))
    return index, private.reshape(-1)[index]


def _progress_reporter(spec: DaskChunk) -> Any:
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None  # not on a dask worker (direct calls in tests)

    def report(done: int) -> None:
        worker.log_event(PROGRESS_TOPIC, [spec.call_id, spec.chunk, done])

    return report


async def end_call(call_id: str) -> None:
    """Run on every worker (``Client.run``) when a call ends or is cancelled:
    running chunks stop at their next item, the cached payload is dropped.

    A coroutine: it runs in the worker's event loop, never queued behind
    busy task threads, and only a coroutine may be fired without waiting.
    """
    with _lock:
        _ended[call_id] = None
        while len(_ended) > 256:
            del _ended[next(iter(_ended))]
        _payloads.pop(call_id, None)


def busy_with(call_id: str) -> bool:
    """Whether a task thread of this worker still runs a chunk of the call."""
    with _lock:
        return _running.get(call_id, 0) > 0


async def exit_worker() -> None:
    """Ends this worker process now; its nanny starts a fresh one."""
    import os

    os._exit(1)


class MallocTuning(WorkerPlugin):
    """Puts each worker of *our* cluster, restarted ones too, in glibc's
    steady malloc state, as our local pools are (see ``_malloc``). Dask's
    nanny starts workers with a 64 KiB trim threshold: MB-sized temporaries
    were page-faulted anew in every item, 6x slower on the benchmark. A
    cluster the user gave us is left as its owner configured it."""

    name = "shm_kernel_safe-malloc-tuning"

    def setup(self, worker: Any) -> None:
        tune_malloc()


class InterruptsToTheKernel(WorkerPlugin):
    """Workers of *our* cluster ignore SIGINT, as our local pool's workers do.

    They are children of the kernel, in its process group, and a kernel
    interrupt signals the whole group: jupyter_client interrupts the kernel
    first thing in ``shutdown_kernel`` too. Each worker's asyncio runner
    turned that SIGINT into a KeyboardInterrupt traceback on the kernel's
    stderr (and a restart by its nanny). An interrupt is the kernel's to
    handle: it cancels the run and stops stuck workers itself.
    """

    name = "shm_kernel_safe-interrupts-to-the-kernel"

    def setup(self, worker: Any) -> None:
        import signal

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class ThreadLimits(WorkerPlugin):
    """Bounds BLAS/OpenMP threads in each worker of *our* cluster, restarted
    ones too (see ``engine.threads``); registered again, under the same
    name, when a call asks for another bound. A cluster the user gave us is
    left as its owner configured it."""

    name = "shm_kernel_safe-thread-limits"

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def setup(self, worker: Any) -> None:
        limit_threads(self.threads)
