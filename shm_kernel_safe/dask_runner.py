"""``parallel_map(..., backend="dask")``: the same call on a dask cluster.

Same semantics as the local engine, different transport. Shared memory
cannot cross machines, so:

* the payload (function + items) is pickled once, with every big array cut
  out of it; payload and arrays are scattered with ``broadcast=True``: each
  worker receives them once per call, never once per task;
* items go out in chunks (a probe of item 0 first, then guided chunks of at
  least ~20 ms of work): dask's scheduler costs about a millisecond per
  task, which per item would dwarf short items;
* output arrays come back as the elements each chunk changed, applied to
  the caller's arrays once every chunk succeeded;
* errors are the local engine's: :class:`TaskError` with the item and the
  remote traceback, :class:`WorkerDiedError` when dask gives up on a chunk
  whose worker kept dying (it retries elsewhere first, as dask does).
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from . import dask_cluster, dask_worker, worker_warnings
from .chunking import guided_chunks
from .dask_kept import content_name, kept_arrays
from .errors import DaskBackendError, ParallelTimeoutError, WorkerDiedError
from .progress import ThrottledReport
from .runner import _short_repr, _stack_or_list, _task_error, _unpicklable_error
from .sharing import DEFAULT_THRESHOLD, ArrayPickler
from .worker import ChunkResult, Payload

#: Work per chunk below which dask's per-task cost (~1 ms) starts to show.
MIN_CHUNK_SECONDS = 0.02
#: How long running chunks get to notice a cancel before their workers are killed.
CANCEL_GRACE = 0.5
_POLL = 0.05

_active: dict[str, DaskCall] = {}  # call id -> call, for progress events
_subscribed: set[str] = set()  # client ids subscribed to progress events


class _ScatterPickler(ArrayPickler):
    """Cuts big arrays (and output arrays) out of the payload, by key."""

    def __init__(
        self, file: io.BytesIO, prefix: str, threshold: int, force: set[int], out: set[int]
    ) -> None:
        super().__init__(file)
        self.prefix = prefix
        self.threshold = threshold
        self.force = force
        self.out = out
        self.arrays: dict[str, np.ndarray] = {}
        self.outs: dict[str, np.ndarray] = {}
        self._keys: dict[int, str] = {}

    def reduce_array(self, arr: np.ndarray | None, handle: Any) -> tuple | None:
        if arr is None:
            arr = handle.view()  # a bare handle travels as the data it describes
        if id(arr) in self.out:
            return dask_worker.private_out, (self._key(arr, self.outs, "out"),)
        if handle is None and arr.nbytes < self.threshold and id(arr) not in self.force:
            return None
        return dask_worker.scattered_array, (self._key(arr, self.arrays, "arr"),)

    def _key(self, arr: np.ndarray, table: dict[str, np.ndarray], kind: str) -> str:
        key = self._keys.get(id(arr))
        if key is None:
            # Read-only inputs are named by content, so an unchanged array is
            # found on the cluster by the next call (see dask_kept); outputs
            # change, so not.
            out_key = f"{self.prefix}-out{len(table)}"
            key = content_name(arr) if kind == "arr" else out_key
            self._keys[id(arr)] = key
            table[key] = arr
        return key


def _on_progress(event: Any) -> None:
    """Runs in the client's event loop thread for every progress event."""
    _, (call_id, chunk, done) = event
    call = _active.get(call_id)
    if call is not None:
        call.partial[chunk] = max(call.partial.get(chunk, 0), done)


class DaskCall:
    """One ``parallel_map`` call on a dask cluster."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        seq: Any,
        *,
        client: Any = None,
        processes: int | None = None,
        chunksize: int | None = None,
        timeout: float | None = None,
        threshold: int = DEFAULT_THRESHOLD,
        force: tuple[Any, ...] = (),
        out: tuple[np.ndarray, ...] = (),
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        dask_cluster.import_distributed()  # before any work: a one-line error
        self.n = len(seq)
        self.items = seq
        self.chunksize = chunksize
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.call_id = uuid.uuid4().hex
        self.fn = fn
        buf = io.BytesIO()
        pickler = _ScatterPickler(
            buf,
            f"sks-{self.call_id}",
            threshold,
            {id(a) for a in force},
            {id(a) for a in out},
        )
        try:
            pickler.dump(Payload(fn, seq))
        except Exception as exc:
            raise _unpicklable_error(fn, exc) from exc
        self.payload = buf.getvalue()
        self.arrays = pickler.arrays
        self.outs = pickler.outs
        self.client = dask_cluster.get_client(client, processes)
        self.workers = max(1, sum(self.client.nthreads().values()))
        self.futures: list[Any] = []
        self.scattered: list[Any] = []  # payload and outputs: released with the call
        self.inputs: list[Any] = []  # big inputs: left to dask_kept
        self.sent_bytes = 0  # what _scatter sent to each worker this call
        self.chunks: list[tuple[int, int]] = []
        self.partial: dict[int, int] = {}
        self.finished: dict[int, ChunkResult] = {}
        self.show_progress = ThrottledReport(progress, self.n, self._done)

    # -- the call ----------------------------------------------------------
    def run(self) -> np.ndarray | list:
        self._subscribe()
        _active[self.call_id] = self
        payload, arrays, outs = self._scatter()
        few = self.n <= 4 * self.workers
        if few:
            self.chunks = [(i, i + 1) for i in range(self.n)]
            self._wait(self._submit(range(self.n), payload, arrays, outs))
        else:
            self.chunks = [(0, 1)]
            self._wait(self._submit([0], payload, arrays, outs))
            per_item = self.finished[0].seconds
            floor = max(1, int(MIN_CHUNK_SECONDS / per_item)) if per_item > 0 else None
            self.chunks += guided_chunks(
                self.n, self.workers, chunksize=self.chunksize, first=1, min_chunk=floor
            )
            self._wait(self._submit(range(1, len(self.chunks)), payload, arrays, outs))
        self.show_progress(force=True)
        values: list = []
        for c in range(len(self.chunks)):
            res = self.finished[c]
            values.extend(res.values or [])
            for key, (index, changed) in res.writes.items():
                self.outs[key].flat[index] = changed
        return _stack_or_list(values)

    def _scatter(self) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """Send payload and arrays to every worker once; futures of them.

        Inputs an earlier run left on the cluster with the same content are
        not sent again (``dask_kept``). Each scatter gets fresh dask keys:
        re-using a key the scheduler is still forgetting is asking for a race.
        """
        client = self.client
        payload = client.scatter(self.payload, broadcast=True, hash=False)
        self.scattered.append(payload)
        arrays: dict[str, Any] = {}
        missing: dict[str, str] = {}  # fresh dask key -> content name
        for name in self.arrays:
            found = kept_arrays.lookup(client, name)
            if found is not None:
                arrays[name] = found
            else:
                missing[f"sks-{self.call_id}-in{len(missing)}"] = name
        if missing:
            wrapped = {key: dask_worker.Aligned(self.arrays[n]) for key, n in missing.items()}
            futures = client.scatter(wrapped, broadcast=True, hash=False)
            for key, name in missing.items():
                arrays[name] = futures[key]
                kept_arrays.add(client, name, self.arrays[name], futures[key])
        self.inputs = list(arrays.values())  # kept by dask_kept, never released here
        outs = {k: dask_worker.Aligned(a) for k, a in self.outs.items()}
        out_futures = client.scatter(outs, broadcast=True, hash=False) if outs else {}
        self.scattered.extend(out_futures.values())
        self.sent_bytes = (
            len(self.payload)
            + sum(self.arrays[n].nbytes for n in missing.values())
            + sum(a.nbytes for a in self.outs.values())
        )
        return payload, arrays, out_futures

    def _submit(self, chunk_numbers: Any, payload: Any, arrays: dict, outs: dict) -> list[Any]:
        submitted = []
        for c in chunk_numbers:
            start, stop = self.chunks[c]
            spec = dask_worker.DaskChunk(self.call_id, c, start, stop)
            fut = self.client.submit(
                dask_worker.run_dask_chunk,
                spec,
                payload,
                arrays,
                outs,
                key=f"sks-chunk-{start}-{stop}-{self.call_id}",
                pure=False,
            )
            submitted.append(fut)
        self.futures.extend(submitted)
        return submitted

    def _wait(self, futures: list[Any]) -> None:
        # Futures call back when they finish; the loop wakes for them, for
        # progress and the deadline, and is interruptible (Ctrl-C).
        wake = threading.Event()
        for fut in futures:
            fut.add_done_callback(lambda _: wake.set())
        pending = set(futures)
        try:
            while pending:
                timeout = _POLL
                if self.deadline is not None:
                    timeout = max(0.001, min(_POLL, self.deadline - time.monotonic()))
                wake.wait(timeout)
                wake.clear()
                for fut in [f for f in pending if f.done()]:
                    pending.discard(fut)
                    self._collect(fut)
                self.show_progress()
                if pending and self.deadline is not None and time.monotonic() >= self.deadline:
                    raise ParallelTimeoutError(
                        f"parallel_map did not finish within {self.timeout} s "
                        f"({self._done()}/{self.n} items done); its dask tasks were cancelled"
                    )
        except BaseException:
            self._cancel(pending)
            raise

    def _collect(self, fut: Any) -> None:
        if fut.status == "finished":
            res: ChunkResult = fut.result()
            worker_warnings.reissue(res.warnings, self.fn)
            if res.error is not None:
                raise _task_error(res.error, self.fn)
            self.finished[res.chunk] = res
            return
        chunk = _chunk_of(fut.key, self.chunks)
        if fut.status == "cancelled":
            if any(f.status != "finished" for f in self.scattered + self.inputs):
                raise self._data_lost() from None
            raise DaskBackendError(
                "the dask tasks of this call were cancelled (was the cluster restarted or closed?)"
            )
        exc = fut.exception()
        if type(exc).__name__ == "KilledWorker":
            raise self._worker_died(chunk, exc) from None
        start, stop = self.chunks[chunk]
        raise DaskBackendError(
            f"dask could not run items {start}-{stop - 1}: {type(exc).__name__}: {exc}"
        ) from exc

    def _data_lost(self) -> WorkerDiedError:
        """Every worker holding the call's scattered data died (dask cannot
        recompute scattered data): name the chunks that were running."""
        unfinished = [c for c in range(len(self.chunks)) if c not in self.finished]
        # Chunks that reported their start; a worker that died at once may
        # not have got its report out, then any unfinished one is a suspect.
        running = [c for c in unfinished if c in self.partial] or unfinished
        spans = ", ".join(_span(*self.chunks[c]) for c in running[:4])
        if len(running) > 4:
            spans += f" (or {len(running) - 4} more chunks)"
        index = self.chunks[running[0]][0] if len(running) == 1 else None
        return WorkerDiedError(
            f"dask workers died while running one of {spans}, and with them every copy of the "
            f"data sent for this call; the cluster replaced them, nothing else was lost",
            index,
        )

    def _worker_died(self, chunk: int, exc: BaseException) -> WorkerDiedError:
        start, stop = self.chunks[chunk]
        tries = getattr(exc, "allowed_failures", None)
        tried = f"dask ran it on {tries + 1} workers; each died" if tries is not None else ""
        if stop - start == 1:
            what = f"item {start} ({_short_repr(self.items, start)})"
            index: int | None = start
        else:
            done = self.partial.get(chunk, 0)
            what = f"one of items {start}-{stop - 1} (at least {done} of them had finished)"
            index = None
        return WorkerDiedError(
            f"dask workers died while running {what}; {tried}. The cluster replaced them; "
            f"nothing else was lost",
            index,
        )

    def _cancel(self, pending: set[Any]) -> None:
        """Stop queued chunks now and running ones at their next item.

        A chunk stuck inside one item cannot be stopped in its thread: on our
        own cluster its worker is killed after a grace period (its nanny
        starts a fresh one), as the local backend does with a stuck worker.
        A cluster the user gave us is never touched: its stuck chunks finish
        their current item, then stop.
        """
        with contextlib.suppress(Exception):
            self.client.cancel(list(pending))
        with contextlib.suppress(Exception):
            self.client.run(dask_worker.end_call, self.call_id, wait=False)
        if pending and dask_cluster.is_local(self.client):
            dask_cluster.stop_stuck(self.client, self.call_id, grace=CANCEL_GRACE)

    def release(self) -> None:
        """Forget the call: its payload, chunks and outputs leave the workers'
        memory; its big inputs stay until a call does not need them."""
        _active.pop(self.call_id, None)
        with contextlib.suppress(Exception):
            self.client.run(dask_worker.end_call, self.call_id, wait=False)
        for fut in self.futures + self.scattered:
            with contextlib.suppress(Exception):
                fut.release()
        self.futures.clear()
        self.scattered.clear()
        self.inputs.clear()  # dropped, not released: dask_kept may keep them

    # -- progress ----------------------------------------------------------
    def _subscribe(self) -> None:
        # Also without a progress display: the reports say which chunks were
        # running when workers died.
        if self.client.id not in _subscribed:
            self.client.subscribe_topic(dask_worker.PROGRESS_TOPIC, _on_progress)
            _subscribed.add(self.client.id)

    def _done(self) -> int:
        done = sum(res.done for res in self.finished.values())
        return done + sum(n for c, n in list(self.partial.items()) if c not in self.finished)


def _span(start: int, stop: int) -> str:
    return f"item {start}" if stop - start == 1 else f"items {start}-{stop - 1}"


def _chunk_of(key: str, chunks: list[tuple[int, int]]) -> int:
    _, _, start, stop, _ = key.split("-", 4)
    return chunks.index((int(start), int(stop)))
