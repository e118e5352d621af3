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
"""

from __future__ import annotations

import collections
import pickle
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
    try:
        return _run(spec, payload, arrays, outs, result)
    finally:
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
) -> ChunkResult:
    try:
        loaded, private = _load(spec.call_id, payload, arrays, outs)
    except BaseException as exc:
        result.error = describe_error(exc, spec.start, None, loading=True)
        return result
    reporter = _progress_reporter(spec)
    tick = None
    if reporter is not None:
        reporter(0)  # started: the parent learns which chunks are in flight
        done = 0
        next_report = time.perf_counter() + REPORT_EVERY

        def tick() -> None:
            nonlocal done, next_report
            done += 1
            if time.perf_counter() >= next_report:
                reporter(done)
                next_report = time.perf_counter() + REPORT_EVERY

    ended, call_id = _ended, spec.call_id
    run_items(
        loaded.fn,
        loaded.items,
        spec.start,
        spec.stop,
        result,
        cancelled=lambda: call_id in ended,
        tick=tick,
        keep_going=spec.keep_going,
    )
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
