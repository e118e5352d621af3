"""``parallel_map``: the engine every front end (plain Python, the magic)
drives.

One call: pickle the payload once (big arrays to shared memory on the way),
put it in a segment, run the first item alone to learn the result layout,
then dispatch chunks of indices to a warm pool. Results that stack land in
one shared array the workers write in place. Whatever happens (a task
error, a dead worker, a timeout, Ctrl-C) the call cancels what is left,
stops stuck workers, and frees every segment it created before returning.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle
import numpy as np

from . import _platform, sharing, tracebacks, worker_warnings
from . import pool as pools
from .arrays import SharedArray, empty, handle_of, share
from .chunking import guided_chunks, min_chunk_for
from .control import ControlBlock
from .errors import ParallelTimeoutError, TaskError, WorkerDiedError
from .progress import ThrottledReport, make_progress
from .segments import live_segments, unlink_name
from .worker import ChunkResult, ChunkTask, Payload, RemoteError, run_chunk

ProgressCallback = Callable[[int, int], None]

#: How long running chunks get to notice a cancel flag before their workers are killed.
CANCEL_GRACE = 0.5
_POLL = 0.05
_SCALAR_TYPES = (bool, int, float, complex, np.bool_, np.number)


def parallel_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    processes: int | None = None,
    start_method: str | None = None,
    chunksize: int | None = None,
    timeout: float | None = None,
    share_threshold: int = sharing.DEFAULT_THRESHOLD,
    share: Iterable[Any] = (),
    out: Iterable[np.ndarray] = (),
    progress: ProgressCallback | str | None = None,
    backend: str = "local",
    client: Any = None,
) -> np.ndarray | list:
    """Apply ``fn`` to every item in worker processes; results in item order.

    Big arrays ``fn`` reaches (closure, globals, defaults) or found in
    ``items`` are shared with workers without pickling: read-only copies made
    once per call, or zero-copy when they already live in shared memory
    (:func:`shm_kernel_safe.empty`, :func:`~shm_kernel_safe.zeros`,
    :func:`~shm_kernel_safe.share`); a shared array that is writable here is
    writable in workers. Returns an ndarray when results are numbers or
    equal-shape arrays, else a list; never a view of shared memory.

    ``out`` lists arrays ``fn`` writes into (``y[i] = ...``): workers write
    them, and after a successful call the caller's array objects hold the
    writes (in place when already in shared memory, else copied back; on
    error an array that was not shared is left as it was).

    ``progress`` is ``"auto"`` (a widget bar in Jupyter, a text bar
    elsewhere), ``"widget"``, ``"text"``, or a callable ``(done, total)``
    called from this process at most ten times a second.

    ``backend="dask"`` runs the same call on a ``dask.distributed`` cluster
    (the ``dask`` extra): ``client`` is a ``distributed.Client``, a scheduler
    address, or None for a loopback ``LocalCluster`` of ``processes``
    workers, started once and reused. Big arrays are then sent to each
    worker once per call (scatter with broadcast) instead of being shared.

    Raises :class:`TaskError` (item + remote traceback) when a task raises,
    :class:`WorkerDiedError` when a worker dies, :class:`ParallelTimeoutError`
    past ``timeout`` seconds, and ``KeyboardInterrupt`` on interrupt; in
    every case remaining work stops and no segment is left behind.
    """
    backend = _validate_backend(backend, client, start_method, processes)
    requested_processes = processes
    processes, start_method = _validate(fn, processes, start_method, chunksize, timeout)
    outputs = _validate_out(out)
    seq = _as_sequence(items)
    n = len(seq)
    if n == 0:
        return []
    force = tuple(share)

    # A display made here (progress given as a mode) is ours to close, also
    # when the call fails before it runs (a cluster that cannot start).
    display = make_progress(progress) if isinstance(progress, str) else None
    callback = display if isinstance(progress, str) else progress
    call: _Call | Any = None
    try:
        if backend == "dask":
            from .dask_runner import DaskCall

            call = DaskCall(
                fn,
                seq,
                client=client,
                processes=requested_processes,
                chunksize=chunksize,
                timeout=timeout,
                threshold=share_threshold,
                force=force,
                out=outputs,
                progress=callback,
            )
        else:
            call = _Call(
                fn,
                seq,
                processes,
                start_method,
                chunksize,
                timeout,
                share_threshold,
                force,
                callback,
                outputs,
            )
        result = call.run()
    except BaseException as exc:
        if display is not None:
            display.close(error=exc)
        raise
    finally:
        if call is not None:
            call.release()
    if display is not None:
        display.close()
    return result


# -- validation -----------------------------------------------------------------
BACKENDS = ("local", "dask")


def _validate_backend(backend: Any, client: Any, start_method: Any, processes: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "local" and client is not None:
        raise ValueError("client= is for backend='dask'; the local backend has no client")
    if backend == "dask" and start_method is not None:
        raise ValueError(
            "start_method= is for the local backend; dask workers are started by the cluster"
        )
    if backend == "dask" and client is not None and processes is not None:
        raise ValueError(
            "processes= sizes the local dask cluster; a given client's cluster has its own workers"
        )
    return backend


def _validate_out(out: Iterable[Any]) -> tuple[np.ndarray, ...]:
    outputs = tuple(out)
    for i, arr in enumerate(outputs):
        if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
            raise TypeError(f"out[{i}] is a {type(arr).__name__}, not a numeric ndarray")
        if not arr.flags.writeable:
            raise ValueError(f"out[{i}] is read-only")
    return outputs


def _validate(fn, processes, start_method, chunksize, timeout) -> tuple[int, str]:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if processes is None:
        processes = pools.usable_cpus()
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
    start_method = start_method or _platform.default_start_method()
    if start_method not in _platform.available_start_methods():
        raise ValueError(
            f"unknown start method {start_method!r}; choose from "
            f"{', '.join(_platform.available_start_methods())}"
        )
    if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
        raise ValueError(f"chunksize must be an integer >= 1, got {chunksize!r}")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return processes, start_method


def _as_sequence(items: Any) -> Any:
    if isinstance(items, (range, list, tuple, np.ndarray)):
        return items
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(
            f"items must be an iterable of work items (a range, list, array...), "
            f"got {type(items).__name__}"
        )
    return list(items)


def _unpicklable_error(fn: Any, exc: Exception) -> TypeError:
    """The error for a function that cannot travel, naming the global at fault.

    Raised from the payload pickling itself (which shares big arrays instead
    of serialising them), before any process starts: a separate trial
    ``cloudpickle.dumps(fn)`` would serialise a closed-over 1.28 GB array.
    """
    culprit = _find_unpicklable_name(fn)
    where = f" (it uses {culprit})" if culprit else ""
    name = getattr(fn, "__qualname__", repr(fn))
    return TypeError(f"cannot send {name} to worker processes{where}: {exc}")


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


# -- one call -------------------------------------------------------------------
class _Call:
    def __init__(
        self, fn, seq, processes, start_method, chunksize, timeout, threshold, force, progress, out
    ):
        self.n = len(seq)
        self.processes = processes
        self.start_method = start_method
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.call_id = uuid.uuid4().hex
        self.fn = fn
        self.owned: list[str] = []
        self.out: np.ndarray | None = None
        # Output arrays outside shared memory: workers write a shared copy,
        # copied back into the caller's array when the call succeeds.
        self.copy_back: list[tuple[np.ndarray, np.ndarray]] = []
        self.report = sharing.SharingReport()
        replace: dict[int, SharedArray] = {}
        for arr in out:
            if handle_of(arr) is None:
                shared = share(arr)
                self.owned.append(shared.name)
                replace[id(arr)] = shared
                self.copy_back.append((arr, shared.view()))
        try:
            keep = frozenset(r.name for r in live_segments() if not r.unlinked)
            data, self.report = sharing.dumps(Payload(fn, seq, keep), threshold, force, replace)
        except Exception as exc:
            self.release()
            raise _unpicklable_error(fn, exc) from exc
        payload = empty(len(data), dtype=np.uint8)
        payload[:] = np.frombuffer(data, dtype=np.uint8)
        self.payload = _handle(payload, self.owned)
        few = self.n <= 4 * processes
        # Chunk 0 is the probe (item 0 alone): it tells the result layout and
        # the time per item, from which the rest are cut (see run()).
        self.chunksize = chunksize
        self.chunks = [(i, i + 1) for i in range(self.n)] if few else [(0, 1)]
        self.ctrl = ControlBlock.create(max(len(self.chunks), self._max_chunks()))
        self.control = _handle(self.ctrl.array, self.owned)
        self.stack_in_place = not few
        self.items = seq
        self.show_progress = ThrottledReport(progress, self.n, self.ctrl.done)

    def _max_chunks(self) -> int:
        if self.chunksize is not None:
            return 1 + -(-self.n // self.chunksize)
        return 1 + len(guided_chunks(self.n, self.processes, first=1, min_chunk=1))

    # The call's segments are unlinked here whatever happened; workers may
    # keep them mapped until their next call, the memory is never unmapped
    # under a live view.
    def release(self) -> None:
        sharing.release(self.report)
        for name in self.owned:
            unlink_name(name)
        self.owned.clear()
        self.out = None
        self.copy_back.clear()

    def task(self, chunk: int, out: SharedArray | None = None, scalar_type=None) -> ChunkTask:
        start, stop = self.chunks[chunk]
        return ChunkTask(
            self.call_id, self.payload, self.control, chunk, start, stop, out, scalar_type
        )

    def run(self) -> np.ndarray | list:
        executor = pools.get_pool(self.processes, self.start_method)
        results: dict[int, ChunkResult] = {}
        out_handle, scalar_type, rest = None, None, range(len(self.chunks))
        if self.stack_in_place:
            first = self._wait(executor, [executor.submit(run_chunk, self.task(0))])[0]
            results[0] = first
            out_handle, scalar_type = self._allocate_out(first.values[0])
            min_chunk = min_chunk_for(first.seconds, self.n, self.processes)
            self.chunks += guided_chunks(
                self.n, self.processes, chunksize=self.chunksize, first=1, min_chunk=min_chunk
            )
            rest = range(1, len(self.chunks))
        futures = [executor.submit(run_chunk, self.task(c, out_handle, scalar_type)) for c in rest]
        for res in self._wait(executor, futures):
            results[res.chunk] = res
        self.show_progress(force=True)
        for original, shared in self.copy_back:
            np.copyto(original, shared)
        return self._gather(results)

    # -- results ---------------------------------------------------------
    def _allocate_out(self, first: Any) -> tuple[SharedArray | None, type | None]:
        if isinstance(first, _SCALAR_TYPES):
            out = empty((self.n,), dtype=np.asarray(first).dtype)
            scalar_type: type | None = type(first)
        elif isinstance(first, np.ndarray) and not first.dtype.hasobject:
            out = empty((self.n, *first.shape), dtype=first.dtype)
            scalar_type = None
        else:
            return None, None
        out[0] = first
        self.out = out
        return _handle(out, self.owned), scalar_type

    def _gather(self, results: dict[int, ChunkResult]) -> np.ndarray | list:
        if self.out is None:
            values: list = []
            for c in range(len(self.chunks)):
                values.extend(results[c].values or [])
            return _stack_or_list(values)
        misfits: dict[int, Any] = {}
        for res in results.values():
            misfits.update(res.misfits)
        if not misfits:
            return np.array(self.out, copy=True)  # owned memory, never a view
        values = [misfits[i] if i in misfits else _owned(self.out[i]) for i in range(self.n)]
        return _stack_or_list(values)

    # -- waiting ---------------------------------------------------------
    def _wait(self, executor, futures: list[cf.Future]) -> list[ChunkResult]:
        pending = set(futures)
        finished: list[ChunkResult] = []
        try:
            while pending:
                timeout = _POLL
                if self.deadline is not None:
                    timeout = max(0.0, min(_POLL, self.deadline - time.monotonic()))
                done, pending = cf.wait(pending, timeout=timeout, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    res = fut.result()
                    worker_warnings.reissue(res.warnings, self.fn)
                    if res.error is not None:
                        raise _task_error(res.error, self.fn)
                    finished.append(res)
                self.show_progress()
                if pending and self.deadline is not None and time.monotonic() >= self.deadline:
                    raise ParallelTimeoutError(
                        f"parallel_map did not finish within {self.timeout} s "
                        f"({self.ctrl.done()}/{self.n} items done); its workers were stopped"
                    )
        except cf.process.BrokenProcessPool as exc:  # loky's TerminatedWorkerError too
            self._stop(kill=True)
            raise self._worker_died(exc) from None
        except BaseException:
            self._stop(kill=False)
            raise
        return finished

    def _stop(self, kill: bool) -> None:
        """Raise the cancel flag, let running chunks stop, kill them if stuck."""
        # No Future.cancel(): if the pool is then killed, loky's manager thread
        # fails every pending future and dies on one already cancelled, leaving
        # its semaphores behind. Queued chunks see the flag and return at once.
        self.ctrl.cancel()
        if not kill:
            deadline = time.monotonic() + CANCEL_GRACE
            while self.ctrl.running() and time.monotonic() < deadline:
                time.sleep(0.01)
            kill = bool(self.ctrl.running())
        if kill:
            pools.discard(self.processes, self.start_method)

    def _worker_died(self, exc: BaseException) -> WorkerDiedError:
        codes = _exit_codes(str(exc))
        dead = [
            (c, pid, done) for c, pid, done in self.ctrl.running() if not _platform.pid_alive(pid)
        ]
        how = f" (exit code {codes})" if codes else ""
        if dead:
            chunk, pid, done = dead[0]
            index = self.chunks[chunk][0] + done
            msg = (
                f"worker process {pid} died{how} while running item {index} "
                f"({_short_repr(self.items, index)}); the pool was replaced, "
                f"nothing else was lost"
            )
            return WorkerDiedError(msg, index, codes)
        return WorkerDiedError(f"a worker process died{how}; the pool was replaced", None, codes)


def _task_error(err: RemoteError, fn: Any) -> TaskError:
    """The error a user sees for a failed item, with their own source lines."""
    text = tracebacks.render(err.frames, err.exc_lines, tracebacks.code_files(fn))
    error = TaskError(err.index, err.item_repr, err.exc_type, err.message, text)
    error.__cause__ = err.original
    error.__suppress_context__ = True
    return error


def _handle(arr: np.ndarray, owned: list[str]) -> SharedArray:
    handle = handle_of(arr)
    assert handle is not None
    owned.append(handle.name)
    return handle


def _owned(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.copy()
    return value.item() if isinstance(value, np.generic) else value


def _stack_or_list(values: list) -> np.ndarray | list:
    """An ndarray when the values are numbers or equal-shape arrays, else the list."""
    if not values:
        return values
    if all(isinstance(v, _SCALAR_TYPES) for v in values):
        return np.asarray(values)
    if all(isinstance(v, np.ndarray) and not v.dtype.hasobject for v in values):
        shape = values[0].shape
        if all(v.shape == shape for v in values):
            return np.stack(values)
    return values


def _exit_codes(message: str) -> str:
    match = re.search(r"exit codes of the workers are \{(.*?)\}", message)
    return match.group(1) if match else ""


def _short_repr(items: Any, index: int) -> str:
    try:
        text = repr(items[index])
    except Exception:
        return f"<item {index}>"
    return text if len(text) <= 80 else text[:77] + "..."


def prestart(processes: int | None = None, start_method: str | None = None) -> list[int]:
    """Start a pool's workers now so the first call is warm; returns their pids."""
    from .worker import ping

    processes, start_method = _validate(ping, processes, start_method, None, None)
    executor = pools.get_pool(processes, start_method)
    futures = [executor.submit(ping) for _ in range(processes * 2)]
    for fut in futures:
        fut.result()
    return sorted(pools.worker_pids(executor))
