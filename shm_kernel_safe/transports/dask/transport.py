"""The dask transport: the same run on a ``dask.distributed`` cluster.

Shared memory cannot cross machines, so:

* the payload (function + items) is pickled once, with every big array cut
  out of it; payload and arrays are scattered with ``broadcast=True``: each
  worker receives them once per call, never once per task;
* chunks are dask tasks; dask's scheduler costs about a millisecond per
  task, so a chunk carries at least ~20 ms of work;
* output arrays come back as the elements each chunk changed, applied to
  the caller's arrays when the run lands its outputs;
* a worker that dies is the engine's to handle, as on the local transport:
  each running chunk notes its current item in a file on the worker's host
  (``worker.Record``), so a lost chunk names the exact item that was running
  when its worker died; chunks lost without having started are submitted
  again here; scattered data that died with the workers is scattered again
  from this process, which still holds it.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
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
from ...engine.transport import (
    Heartbeat,
    Inputs,
    Transport,
    TransportOptions,
    WorkerLost,
    warn_if_more_than_cpus,
)
from ...errors import DaskBackendError, InvalidArgumentError
from . import cluster
from .kept import content_name, kept_arrays

#: Times a broadcast is tried when a worker dies while it receives.
SCATTER_TRIES = 3

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
    #: Times a chunk lost before it ran an item is submitted again here,
    #: before the engine hears of it as a death it cannot place.
    RESUBMITS = 3

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
    def stops_items_with(cls, options: TransportOptions) -> bool:
        return options.client is None  # our own cluster's workers can be stopped

    @classmethod
    def from_options(cls, options: TransportOptions) -> DaskTransport:
        return cls(options.client, options.processes, options.threads_per_worker)

    def __init__(
        self,
        client: Any = None,
        processes: int | None = None,
        threads_per_worker: int | None = None,
    ) -> None:
        cluster.check_distributed()  # before any work: a one-line error
        if client is None:  # our own cluster's workers are processes of this machine
            # DaskTransport <- from_options <- parallel_map <- the caller
            warn_if_more_than_cpus(processes, stacklevel=4)
        self.requested_client = client
        # item_timeout= kills the worker running an overdue item: only on our
        # own cluster, whose workers are processes of this machine (a cluster
        # given to us is never touched).
        self.stops_single_items = client is None  # type: ignore[misc]
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
        self.lost: set[int] = set()  # chunks whose worker died under them
        self.losses: list[WorkerLost] = []  # deaths not yet reported to the engine
        self.resubmits: dict[int, int] = {}  # chunk -> times submitted again here
        self.killed: set[int] = set()  # worker pids stopped by stop_overdue
        self.generation = 0  # of scattered data: each scatter gets fresh keys
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
        if self.processes is not None:
            # Never more workers than items: each of our cluster's workers is
            # a process of this machine, and a thousand of them exhaust its
            # memory before the first item runs.
            self.processes = max(1, min(self.processes, len(payload.items)))
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
        self.outputs = inputs.outputs
        self.landed: set[int] = set()  # chunks whose writes output_state applied

    def start(self, chunk_bound: Callable[[int], int], heartbeat: Heartbeat) -> None:
        cluster.import_distributed()
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
        gen = f"{self.call_id}-g{self.generation}"
        self.generation += 1
        self.payload_future = self._broadcast(self.payload)
        self.scattered.append(self.payload_future)
        arrays: dict[str, Any] = {}
        missing: dict[str, str] = {}  # fresh dask key -> content name
        for name in self.arrays:
            found = kept_arrays.lookup(client, name)
            if found is not None:
                arrays[name] = found
            else:
                missing[f"sks-{gen}-in{len(missing)}"] = name
        if missing:
            wrapped = {key: Aligned(self.arrays[n]) for key, n in missing.items()}
            futures = self._broadcast(wrapped)
            for key, name in missing.items():
                arrays[name] = futures[key]
                kept_arrays.add(client, name, self.arrays[name], futures[key])
        self.array_futures = arrays
        self.inputs = list(arrays.values())  # kept by `kept`, never released here
        outs = {f"{k}-g{gen}": Aligned(a) for k, a in self.outs.items()}
        sent = self._broadcast(outs) if outs else {}
        self.out_futures = {k: sent[f"{k}-g{gen}"] for k in self.outs}
        self.scattered.extend(self.out_futures.values())
        self.sent_bytes = (
            len(self.payload)
            + sum(self.arrays[n].nbytes for n in missing.values())
            + sum(a.nbytes for a in self.outs.values())
        )

    def _broadcast(self, data: Any) -> Any:
        """``client.scatter(data, broadcast=True)``, tried again when a worker
        died while it received (the scheduler still listed it: a worker
        killed by the last run, or by this one, as its nanny replaces it)."""
        for attempt in range(SCATTER_TRIES):
            try:
                return self.client.scatter(data, broadcast=True, hash=False)
            # CommClosedError, "No valid workers found" (TimeoutError); a
            # KeyError naming a worker the scheduler removed in the middle
            # of the broadcast (its replicate step looks the worker up again).
            except (OSError, KeyError):
                if attempt == SCATTER_TRIES - 1:
                    raise
                # every worker died: wait for one to be back (and on our
                # cluster make sure one comes back)
                time.sleep(0.5)
                cluster.restore_local_workers(self.client)
                with contextlib.suppress(Exception):
                    self.client.wait_for_workers(1, timeout=cluster.WORKER_START_TIMEOUT)
        raise AssertionError("unreachable")

    def _data_on_cluster(self) -> bool:
        """Whether some worker still holds every piece of the run's data."""
        futures = [self.payload_future, *self.array_futures.values(), *self.out_futures.values()]
        if any(f.status != "finished" for f in futures):
            return False
        try:
            holders = self.client.who_has(futures)
        except Exception:
            return False
        return all(holders.get(f.key) for f in futures)

    def submit(self, chunk: Chunk) -> None:
        from .worker import DaskChunk, run_dask_chunk

        self.chunks[chunk.number] = chunk
        tries = self.resubmits.get(chunk.number, 0)
        spec = DaskChunk(self.call_id, chunk.number, chunk.start, chunk.stop, self.keep_going)
        fut = self.client.submit(
            run_dask_chunk,
            spec,
            self.payload_future,
            self.array_futures,
            self.out_futures,
            key=f"sks-chunk-{chunk.number}-{chunk.start}-{chunk.stop}-{tries}-{self.call_id}",
            pure=False,
        )
        fut.add_done_callback(lambda _: self._wake.set())
        self.futures[fut] = chunk
        self.all_futures.append(fut)

    def wait(self, timeout: float) -> list[ChunkResult]:
        if self.losses:
            raise self.losses.pop(0)
        # Futures call back when they finish; waiting on an event keeps the
        # engine's loop interruptible (Ctrl-C).
        self._wake.wait(timeout)
        self._wake.clear()
        finished = []
        lost = []
        for fut in [f for f in self.futures if f.done()]:
            chunk = self.futures.pop(fut)
            if self._died(fut):
                fut.release()
                lost.append(chunk)
                continue
            res = self._collect(fut, chunk)
            if res is None:  # its result died with a worker before it reached us
                fut.release()
                lost.append(chunk)
                continue
            # Released at once: a result the cluster still held for us would
            # be computed again (its items run twice) if its worker died.
            fut.release()
            self.finished[res.chunk] = res  # its writes land, also when an item failed
            finished.append(res)
        if lost:
            finished.extend(self._place_deaths(lost))
        if self.losses and not finished:
            raise self.losses.pop(0)
        return finished  # the results first; the next call reports the deaths

    def _died(self, fut: Any) -> bool:
        """The chunk's worker died under it (dask gave up on it), or the data
        it needs died with workers (dask cancels what depends on it)."""
        if fut.status == "cancelled":
            if self.client.status not in ("running", "connecting"):
                raise DaskBackendError(
                    "the dask tasks of this call were cancelled (the cluster was closed)"
                )
            return True
        return fut.status == "error" and type(fut.exception()).__name__ == "KilledWorker"

    def _collect(self, fut: Any, chunk: Chunk) -> ChunkResult | None:
        """The chunk's result; None when it was lost on the way (the worker
        holding it died, and dask could not compute it again)."""
        if fut.status == "finished":
            try:
                return fut.result()
            except Exception:
                if self._died(fut):
                    return None
                raise
        exc = fut.exception()
        raise DaskBackendError(
            f"dask could not run items {chunk.start}-{chunk.stop - 1}: {type(exc).__name__}: {exc}"
        ) from exc

    def _place_deaths(self, lost: list[Chunk]) -> list[ChunkResult]:
        """Find, from the records on the workers' hosts, the item each lost
        chunk was running when its worker died; returns what the lost
        chunks completed before (their kept results).

        A chunk with a record of a dead worker inside its range names its
        culprit; one that never started an item on a worker that died (dask
        had queued it there, or its data was lost) is submitted again here,
        as no item of it ran; any other is a death the engine cannot place.
        """
        from .worker import LOADING

        records = self._records()
        data_checked = False
        kept = []
        for chunk in lost:
            self.lost.add(chunk.number)
            self.partial.pop(chunk.number, None)
            dead = sorted(
                (started, item, pid)
                for number, item, started, pid, alive in records
                if number == chunk.number and not alive
            )
            # the latest death, if dask ran the chunk on several workers
            item, pid = (dead[-1][1], dead[-1][2]) if dead else (None, 0)
            if item is not None and chunk.start <= item < chunk.stop:
                res = self._kept_results(chunk, pid, item)
                if res is not None:
                    kept.append(res)
                self.losses.append(self._worker_died(chunk, item))
                continue
            if item is not None and item >= chunk.stop:
                # every item ran; the worker died before the results left it
                res = self._kept_results(chunk, pid, chunk.stop)
                if res is not None and res.done == chunk.size:
                    self.lost.discard(chunk.number)
                    kept.append(res)
                    continue
            tries = self.resubmits.get(chunk.number, 0)
            if item == LOADING or tries >= self.RESUBMITS:
                self.losses.append(self._worker_died(chunk, None))
                continue
            if not data_checked:
                self._ensure_data()
                data_checked = True
            self.resubmits[chunk.number] = tries + 1
            self.lost.discard(chunk.number)
            self.submit(chunk)
        return kept

    def _kept_results(self, chunk: Chunk, pid: int, stop: int) -> ChunkResult | None:
        """What a dead worker's chunk completed before item ``stop``, from the
        results it appended to its ``.values`` file (see ``worker.Record``)."""
        from .worker import parse_kept, read_kept

        if self.outs:
            return None  # the chunk's writes died with it: its items run again
        if cluster.is_local(self.client):
            data = read_kept(self.call_id, chunk.number, pid)
        else:
            try:
                found = self.client.run(read_kept, self.call_id, chunk.number, pid, nanny=True)
            except Exception:
                return None
            data = max(found.values(), key=len, default=b"")
        values = parse_kept(data, chunk.start, stop)
        if not values:
            return None
        res = ChunkResult(chunk.number, done=len(values), values=values)
        self.finished[chunk.number] = res
        return res

    def _records(self) -> list[tuple[int, int, float, int, bool]]:
        """The records of this call's chunks on every worker's host."""
        from .worker import read_records

        if cluster.is_local(self.client):
            return read_records(self.call_id)  # our workers run on this machine
        try:
            per_nanny = self.client.run(read_records, self.call_id, nanny=True)
        except Exception:  # workers without nannies: deaths are found by retrying
            return []
        return list({r for found in per_nanny.values() for r in found})

    def _ensure_data(self) -> None:
        """Scatter the run's data again when every copy of some of it died
        with the workers that held it (dask cannot recompute scattered data;
        this process still holds it)."""
        if not self._data_on_cluster():
            self._scatter()

    def _worker_died(self, chunk: Chunk, index: int | None) -> WorkerLost:
        if index is not None:
            return WorkerLost(
                chunks=[chunk.number],
                index=index,
                who="a dask worker",
                recovery="the cluster replaced it",
            )
        done = self.partial.get(chunk.number, 0)
        return WorkerLost(
            chunks=[chunk.number],
            span=f"one of items {chunk.start}-{chunk.stop - 1} "
            f"(at least {done} of them had finished)",
            who="a dask worker",
            recovery="the cluster replaced it",
        )

    def items_done(self) -> int:
        done = sum(res.done for res in list(self.finished.values()))
        return done + sum(
            n
            for c, n in list(self.partial.items())
            if c not in self.finished and c not in self.lost
        )

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
                    fut.release()
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
        """Dask's nannies replace dead workers themselves; what is left is
        the run's data, scattered again if it died with them."""
        self._ensure_data()

    def stop_overdue(self, seconds: float) -> list[int]:
        """Kill the workers of our cluster whose current item started more
        than ``seconds`` ago (their records say when); their nannies start
        fresh ones, and the engine hears of each as a death under that item.
        """
        from .worker import read_records

        now = time.time()
        stopped = []
        for number, item, started, pid, alive in read_records(self.call_id):
            chunk = self.chunks.get(number)
            if (
                alive
                and pid not in self.killed
                and chunk is not None
                and chunk.start <= item < chunk.stop
                and now - started > seconds
            ):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                self.killed.add(pid)
                stopped.append(item)
        return stopped

    def output_state(self) -> tuple[np.ndarray, ...] | None:
        # The writes travel with the chunks' results: applied to the caller's
        # arrays as they come back (land_outputs applies them all, in order, at the end).
        for c in sorted(set(self.finished) - self.landed):
            for key, (index, changed) in self.finished[c].writes.items():
                self.outs[key].flat[index] = changed
            self.landed.add(c)
        return tuple(self.outputs)

    def land_outputs(self) -> None:
        for c in sorted(self.finished):
            for key, (index, changed) in self.finished[c].writes.items():
                self.outs[key].flat[index] = changed

    def release(self) -> None:
        """Forget the run: its payload, chunks and outputs leave the workers'
        memory; its big inputs stay until a run does not need them."""
        from .worker import end_call, remove_records

        _active.pop(self.call_id, None)
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.run(end_call, self.call_id, wait=False)
            if cluster.is_local(self.client):
                remove_records(self.call_id)
            elif self.lost:
                with contextlib.suppress(Exception):
                    self.client.run(remove_records, self.call_id, nanny=True)
        for fut in self.all_futures + self.scattered:
            with contextlib.suppress(Exception):
                fut.release()
        self.all_futures.clear()
        self.futures.clear()
        self.scattered.clear()
        self.inputs.clear()  # dropped, not released: `kept` may keep them
