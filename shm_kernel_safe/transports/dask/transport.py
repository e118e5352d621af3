"""The dask transport: the same run on a ``dask.distributed`` cluster.

Shared memory cannot cross machines, so:

* the payload (function + items) is pickled once, with every big array cut
  out of it; payload and arrays are scattered with ``broadcast=True``: each
  worker receives them once per call, never once per task;
* chunks are dask tasks; dask's scheduler costs about a millisecond per
  task, so a chunk carries at least ~20 ms of work;
* output arrays come back as the elements each chunk changed, applied to
  the caller's arrays when the run lands its outputs;
* a chunk whose workers kept dying (dask retries elsewhere first) is a
  dead worker for the engine, as on the local transport.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from ...engine.pickling import ArrayPickler
from ...engine.planning import Chunk
from ...engine.protocol import ChunkResult, Payload
from ...engine.transport import Heartbeat, Inputs, Transport, TransportOptions, WorkerLost
from ...errors import DaskBackendError, InvalidArgumentError
from . import cluster
from .kept import content_name, kept_arrays

_active: dict[str, DaskTransport] = {}  # call id -> run, for progress events
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
        from . import worker

        if arr is None:
            arr = handle.view()  # a bare handle travels as the data it describes
        if id(arr) in self.out:
            return worker.private_out, (self._key(arr, self.outs, "out"),)
        if handle is None and arr.nbytes < self.threshold and id(arr) not in self.force:
            return None
        return worker.scattered_array, (self._key(arr, self.arrays, "arr"),)

    def _key(self, arr: np.ndarray, table: dict[str, np.ndarray], kind: str) -> str:
        key = self._keys.get(id(arr))
        if key is None:
            # Read-only inputs are named by content, so an unchanged array is
            # found on the cluster by the next call (see kept); outputs
            # change, so not.
            out_key = f"{self.prefix}-out{len(table)}"
            key = content_name(arr) if kind == "arr" else out_key
            self._keys[id(arr)] = key
            table[key] = arr
        return key


def _on_progress(event: Any) -> None:
    """Runs in the client's event loop thread for every progress event."""
    _, (call_id, chunk, done) = event
    run = _active.get(call_id)
    if run is not None:
        run.partial[chunk] = max(run.partial.get(chunk, 0), done)


class DaskTransport(Transport):
    """Chunks run as dask tasks on ``client``'s cluster (ours when None)."""

    name = "dask"
    min_chunk_seconds = 0.02  # dask's scheduler costs ~1 ms per task
    stopped_text = "its dask tasks were cancelled"

    @classmethod
    def check_options(cls, options: TransportOptions) -> TransportOptions:
        if options.start_method is not None:
            raise InvalidArgumentError(
                "start_method",
                "is for the local backend; dask workers are started by the cluster",
                message="start_method= is for the local backend; "
                "dask workers are started by the cluster",
            )
        checked = super().check_options(replace(options, client=None))
        if options.client is not None and checked.processes is not None:
            raise InvalidArgumentError(
                "processes",
                "sizes the local dask cluster; a given client's cluster has its own workers",
                message="processes= sizes the local dask cluster; "
                "a given client's cluster has its own workers",
            )
        if options.client is not None and checked.threads_per_worker is not None:
            raise InvalidArgumentError(
                "threads_per_worker",
                "bounds the workers of the local dask cluster; a given client's cluster "
                "keeps its own settings",
                message="threads_per_worker= bounds the workers of the local dask cluster; "
                "a given client's cluster keeps its own settings",
            )
        return replace(checked, client=options.client)

    @classmethod
    def from_options(cls, options: TransportOptions) -> DaskTransport:
        return cls(options.client, options.processes, options.threads_per_worker)

    def __init__(
        self,
        client: Any = None,
        processes: int | None = None,
        threads_per_worker: int | None = None,
    ) -> None:
        cluster.import_distributed()  # before any work: a one-line error
        self.requested_client = client
        self.processes = processes
        self.threads_per_worker = threads_per_worker
        self.call_id = uuid.uuid4().hex
        self.client: Any = None
        self.futures: dict[Any, Chunk] = {}  # dask future -> chunk, while pending
        self.all_futures: list[Any] = []
        self.scattered: list[Any] = []  # payload and outputs: released with the run
        self.inputs: list[Any] = []  # big inputs: left to kept
        self.sent_bytes = 0  # what _scatter sent to each worker this run
        self.partial: dict[int, int] = {}  # chunk -> items done, from progress events
        self.finished: dict[int, ChunkResult] = {}
        self.chunks: dict[int, Chunk] = {}
        self._wake = threading.Event()

    # -- the run -------------------------------------------------------------------
    def encode(
        self,
        payload: Payload,
        inputs: Inputs,
        *,
        keep_going: bool = False,
        item_timeout: float | None = None,
    ) -> None:
        self.keep_going = keep_going
        self.items = payload.items
        buf = io.BytesIO()
        pickler = _ScatterPickler(
            buf,
            f"sks-{self.call_id}",
            inputs.threshold,
            {id(a) for a in inputs.force},
            {id(a) for a in inputs.outputs},
        )
        pickler.dump(Payload(payload.fn, payload.items))
        self.payload = buf.getvalue()
        self.arrays = pickler.arrays
        self.outs = pickler.outs

    def start(self, chunk_bound: Callable[[int], int], heartbeat: Heartbeat) -> None:
        from .worker import PROGRESS_TOPIC

        self.client = cluster.get_client(
            self.requested_client, self.processes, self.threads_per_worker
        )
        self.workers = max(1, sum(self.client.nthreads().values()))
        # Also without a progress display: the reports say which chunks were
        # running when workers died.
        if self.client.id not in _subscribed:
            self.client.subscribe_topic(PROGRESS_TOPIC, _on_progress)
            _subscribed.add(self.client.id)
        _active[self.call_id] = self
        self._scatter()

    def _scatter(self) -> None:
        """Send payload and arrays to every worker once.

        Inputs an earlier run left on the cluster with the same content are
        not sent again (``kept``). Each scatter gets fresh dask keys:
        re-using a key the scheduler is still forgetting is asking for a race.
        """
        from .worker import Aligned

        client = self.client
        self.payload_future = client.scatter(self.payload, broadcast=True, hash=False)
        self.scattered.append(self.payload_future)
        arrays: dict[str, Any] = {}
        missing: dict[str, str] = {}  # fresh dask key -> content name
        for name in self.arrays:
            found = kept_arrays.lookup(client, name)
            if found is not None:
                arrays[name] = found
            else:
                missing[f"sks-{self.call_id}-in{len(missing)}"] = name
        if missing:
            wrapped = {key: Aligned(self.arrays[n]) for key, n in missing.items()}
            futures = client.scatter(wrapped, broadcast=True, hash=False)
            for key, name in missing.items():
                arrays[name] = futures[key]
                kept_arrays.add(client, name, self.arrays[name], futures[key])
        self.array_futures = arrays
        self.inputs = list(arrays.values())  # kept by `kept`, never released here
        outs = {k: Aligned(a) for k, a in self.outs.items()}
        self.out_futures = client.scatter(outs, broadcast=True, hash=False) if outs else {}
        self.scattered.extend(self.out_futures.values())
        self.sent_bytes = (
            len(self.payload)
            + sum(self.arrays[n].nbytes for n in missing.values())
            + sum(a.nbytes for a in self.outs.values())
        )

    def submit(self, chunk: Chunk) -> None:
        from .worker import DaskChunk, run_dask_chunk

        self.chunks[chunk.number] = chunk
        spec = DaskChunk(self.call_id, chunk.number, chunk.start, chunk.stop, self.keep_going)
        fut = self.client.submit(
            run_dask_chunk,
            spec,
            self.payload_future,
            self.array_futures,
            self.out_futures,
            key=f"sks-chunk-{chunk.start}-{chunk.stop}-{self.call_id}",
            pure=False,
        )
        fut.add_done_callback(lambda _: self._wake.set())
        self.futures[fut] = chunk
        self.all_futures.append(fut)

    def wait(self, timeout: float) -> list[ChunkResult]:
        # Futures call back when they finish; waiting on an event keeps the
        # engine's loop interruptible (Ctrl-C).
        self._wake.wait(timeout)
        self._wake.clear()
        finished = []
        for fut in [f for f in self.futures if f.done()]:
            chunk = self.futures.pop(fut)
            res = self._collect(fut, chunk)
            self.finished[res.chunk] = res  # its writes land, also when an item failed
            finished.append(res)
        return finished

    def _collect(self, fut: Any, chunk: Chunk) -> ChunkResult:
        if fut.status == "finished":
            return fut.result()
        if fut.status == "cancelled":
            if any(f.status != "finished" for f in self.scattered + self.inputs):
                raise self._data_lost() from None
            raise DaskBackendError(
                "the dask tasks of this call were cancelled (was the cluster restarted or closed?)"
            )
        exc = fut.exception()
        if type(exc).__name__ == "KilledWorker":
            raise self._worker_died(chunk, exc) from None
        raise DaskBackendError(
            f"dask could not run items {chunk.start}-{chunk.stop - 1}: {type(exc).__name__}: {exc}"
        ) from exc

    def _data_lost(self) -> WorkerLost:
        """Every worker holding the run's scattered data died (dask cannot
        recompute scattered data): name the chunks that were running."""
        unfinished = [c for c in self.chunks if c not in self.finished]
        # Chunks that reported their start; a worker that died at once may
        # not have got its report out, then any unfinished one is a suspect.
        running = [c for c in unfinished if c in self.partial] or unfinished
        spans = ", ".join(_span(self.chunks[c]) for c in running[:4])
        if len(running) > 4:
            spans += f" (or {len(running) - 4} more chunks)"
        index = self.chunks[running[0]].start if len(running) == 1 else None
        return WorkerLost(
            chunks=running,
            recoverable=False,
            index=index,
            span=f"one of {spans}",
            who="dask workers",
            recovery="every copy of the data sent for this call died with them; "
            "the cluster replaced them",
        )

    def _worker_died(self, chunk: Chunk, exc: BaseException) -> WorkerLost:
        tries = getattr(exc, "allowed_failures", None)
        tried = f" (dask ran it on {tries + 1} workers; each died)" if tries is not None else ""
        if chunk.size == 1:
            return WorkerLost(
                index=chunk.start,
                who="dask workers",
                how=tried,
                recovery="the cluster replaced them",
            )
        done = self.partial.get(chunk.number, 0)
        return WorkerLost(
            chunks=[chunk.number],
            span=f"one of items {chunk.start}-{chunk.stop - 1} "
            f"(at least {done} of them had finished)",
            who="dask workers",
            how=tried,
            recovery="the cluster replaced them",
        )

    def items_done(self) -> int:
        done = sum(res.done for res in list(self.finished.values()))
        return done + sum(n for c, n in list(self.partial.items()) if c not in self.finished)

    def cancel(self, grace: float, kill: bool) -> list[ChunkResult]:
        """Stop queued chunks now and running ones at their next item.

        Running chunks get ``grace`` seconds to come back with what they
        completed. A chunk stuck inside one item cannot be stopped in its
        thread: on our own cluster its worker is killed (its nanny starts a
        fresh one), as the local transport does with a stuck worker. A
        cluster the user gave us is never touched: its stuck chunks finish
        their current item, then stop.
        """
        from .worker import end_call

        with contextlib.suppress(Exception):
            self.client.run(end_call, self.call_id, wait=False)
        running = {f for f in self.futures if f.status == "pending"}
        deadline = time.monotonic() + grace
        while running and time.monotonic() < deadline:
            self._wake.wait(0.02)
            self._wake.clear()
            running = {f for f in running if not f.done()}
        results = []
        for fut in list(self.futures):
            if fut.status == "finished":
                with contextlib.suppress(Exception):
                    res = fut.result()
                    self.finished[res.chunk] = res
                    results.append(res)
        pending = [f for f in self.futures if not f.done()]
        self.futures.clear()
        with contextlib.suppress(Exception):
            self.client.cancel(pending)
        if pending and cluster.is_local(self.client):
            cluster.stop_stuck(self.client, self.call_id, grace=0.0)
        return results

    def recover(self) -> None:
        """Nothing to do: dask's nannies replace dead workers themselves."""

    def land_outputs(self) -> None:
        for c in sorted(self.finished):
            for key, (index, changed) in self.finished[c].writes.items():
                self.outs[key].flat[index] = changed

    def release(self) -> None:
        """Forget the run: its payload, chunks and outputs leave the workers'
        memory; its big inputs stay until a run does not need them."""
        from .worker import end_call

        _active.pop(self.call_id, None)
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.run(end_call, self.call_id, wait=False)
        for fut in self.all_futures + self.scattered:
            with contextlib.suppress(Exception):
                fut.release()
        self.all_futures.clear()
        self.futures.clear()
        self.scattered.clear()
        self.inputs.clear()  # dropped, not released: `kept` may keep them


def _span(chunk: Chunk) -> str:
    return f"item {chunk.start}" if chunk.size == 1 else f"items {chunk.start}-{chunk.stop - 1}"
