"""The local transport: this machine's warm loky pool over shared memory.

The payload is pickled once (big arrays moved to shared memory on the way,
see :mod:`~shm_kernel_safe.transports.local.sharing`) into a segment every worker
unpickles once per call; a chunk's message is a few handles and an index
range. Chunks are written into a control block in shared memory and each
worker claims them one after another in one task (``worker.run_rows``):
one message per worker, not per chunk. Workers report progress and the
chunk they run there too, never by message, so a dead worker's item is
known exactly. Results that stack are stored by workers into one shared
array.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

from ... import _platform
from ..._text import shorten
from ...engine.planning import Chunk
from ...engine.protocol import ChunkResult, Payload
from ...engine.results import stack_layout
from ...engine.threads import threads_for
from ...engine.transport import (
    Heartbeat,
    Inputs,
    Transport,
    TransportOptions,
    WorkerLost,
    warn_if_more_than_cpus,
)
from ...memory.arrays import SharedArray, empty, handle_of, share
from ...memory.segments import live_segments, unlink_name
from . import pool as pools
from . import sharing
from .control import (
    DONE,
    ITEM_STARTED,
    LOADING,
    LOG_END,
    PID,
    RUNNING,
    SAVED,
    STATE,
    ControlBlock,
)
from .worker import FAILED, MISFIT, VALUES, RowsTask, read_log, run_rows

#: Seconds chunks may wait with no worker running any of them before the
#: run ends as stalled: far above a cold start under load (a few seconds).
STALL_SECONDS = 60.0

#: Seconds a worker may lie dead under a chunk, unreported by loky, before
#: the run reports it itself.
DEATH_GRACE = 5.0


class _NamedNow:
    """``Payload.keep``, read when it is pickled: after ``fn`` and ``items``
    (a dataclass pickles its fields in order), so a cached copy that this
    very payload replaced (its array changed) is no longer named, and
    workers drop it now rather than one call later."""

    def __reduce__(self) -> tuple:
        return frozenset, (frozenset(r.name for r in live_segments() if not r.unlinked),)


class LocalTransport(Transport):
    """Chunks run in a warm pool of ``processes`` workers started with
    ``start_method``, each bounded to ``threads_per_worker`` BLAS/OpenMP
    threads (default: the CPUs shared out, see ``engine.threads``)."""

    name = "local"
    min_chunk_seconds = 0.004  # a claim and a chunk's set-up cost ~0.1 ms
    stops_single_items = True  # one worker per item in flight: killing it stops the item
    writes_shared_in_place = True

    @classmethod
    def from_options(cls, options: TransportOptions) -> LocalTransport:
        return cls(options.processes, options.start_method, options.threads_per_worker)

    def __init__(
        self,
        processes: int | None = None,
        start_method: str | None = None,
        threads_per_worker: int | None = None,
    ) -> None:
        # LocalTransport <- from_options <- parallel_map <- the caller
        warn_if_more_than_cpus(processes, stacklevel=4)
        cpus = _platform.usable_cpus()
        self.workers = processes or cpus
        # Options arrive checked (check_options, before any process starts).
        self.start_method = start_method or _platform.default_start_method()
        self.threads = threads_for(self.workers, threads_per_worker)
        self.call_id = uuid.uuid4().hex
        self.owned: list[str] = []  # segment names this run created
        self.report = sharing.SharingReport()
        # Output arrays outside shared memory: workers write a shared copy,
        # copied back into the caller's array when the run ends.
        self.copy_back: list[tuple[np.ndarray, np.ndarray]] = []
        # Workers' tasks (worker.run_rows), each with the control block whose
        # rows it claims; and the chunks submitted whose result has not come.
        self.futures: dict[cf.Future, int] = {}
        self.outstanding: dict[int, Chunk] = {}
        self.filled: dict[int, int] = {}  # block -> rows written
        self.launched: dict[int, int] = {}  # block -> rows workers were sent for
        self.chunks: dict[int, Chunk] = {}  # every chunk submitted, by number
        self.unstacked: set[int] = set()  # chunks whose results travel in their log
        self.results_handle: SharedArray | None = None
        self.scalar_type: type | None = None
        self.executor: Any = None
        self.lease: pools.Lease | None = None
        # Path prefix of the chunks' logs (worker.Log): files are made only by
        # chunks that log something, and known from the control block.
        self.ledger: str | None = None
        self.payload: SharedArray | None = None
        self.keep_going = False
        self.track_time = False
        # Control blocks: one row per chunk, a new block when one is full
        # (chunks run again after a worker died need rows too). Rows of
        # blocks from before a pool was replaced are no longer "live".
        self.blocks: list[tuple[ControlBlock, SharedArray]] = []
        self.live_from = 0  # index of the first block of the current pool
        self.rows: dict[int, tuple[int, int]] = {}  # chunk -> (block, row)
        self.next_row = 0
        self.first_block = 1
        self.quiet_since = time.monotonic()  # last time a chunk ran or came back
        self.next_death_check = 0.0
        self.seen_dead: dict[int, float] = {}  # pid -> when first seen dead

    def encode(
        self,
        payload: Payload,
        inputs: Inputs,
        *,
        keep_going: bool = False,
        item_timeout: float | None = None,
    ) -> None:
        self.keep_going = keep_going
        self.track_time = item_timeout is not None
        # Never more workers than items: a worker costs a process start.
        self.workers = max(1, min(self.workers, len(payload.items)))
        self.ledger = os.path.join(tempfile.gettempdir(), f"sks-ledger-{self.call_id}-")
        replace: dict[int, SharedArray] = {}
        self.outputs_now: list[np.ndarray] = []
        for arr in inputs.outputs:
            if handle_of(arr) is None:
                shared = share(arr)
                self.owned.append(shared.name)
                replace[id(arr)] = shared
                self.copy_back.append((arr, shared.view()))
                self.outputs_now.append(self.copy_back[-1][1])
            else:
                self.outputs_now.append(arr)
        data, self.report = sharing.dumps(
            Payload(payload.fn, payload.items, _NamedNow()),  # type: ignore[arg-type]
            inputs.threshold,
            inputs.force,
            replace,
            # A cold pool starts in the background while big inputs are copied.
            before_copy=lambda: pools.start_in_background(
                self.workers, self.start_method, self.threads
            ),
        )
        buffer = empty(len(data), dtype=np.uint8)
        buffer[:] = np.frombuffer(data, dtype=np.uint8)
        self.payload = self._own(buffer)

    def start(self, chunk_bound: Callable[[int], int], heartbeat: Heartbeat) -> None:
        self.first_block = chunk_bound(self.workers)
        self.lease = pools.lease(self.workers, self.start_method, self.threads)
        self.executor = self.lease.executor

    def stack_results(self, first: Any, n_items: int) -> np.ndarray | None:
        # Workers' tasks carry the stacked array: none may be out with rows
        # of chunks submitted before it existed.
        assert not self.outstanding
        layout = stack_layout(first)
        if layout is None:
            return None
        shape, dtype, self.scalar_type = layout
        stacked = empty((n_items, *shape), dtype=dtype)
        stacked[0] = first
        self.results_handle = self._own(stacked)
        return stacked

    def submit(self, chunk: Chunk) -> None:
        assert self.payload is not None
        block, row = self._row_for(chunk.number)
        self.blocks[block][0].publish(row, chunk.number, chunk.start, chunk.stop)
        self.filled[block] = row + 1
        self.chunks[chunk.number] = chunk
        if not self.outstanding:  # the stall clock starts with the first chunk queued
            self.quiet_since = time.monotonic()
        self.outstanding[chunk.number] = chunk
        if self.results_handle is None:
            self.unstacked.add(chunk.number)

    def _launch(self) -> None:
        """Send workers tasks for the rows no worker has claimed yet.

        Called when the engine waits, so a batch of chunks goes out as one
        task per worker. A task claims rows of one block written before it
        was sent; at most one task per worker is out, for the first blocks
        with rows waiting, so chunks run in about the order they were cut
        (a block's rows before the next block's). Rows left by tasks that
        returned (see ``worker.RETURN_SECONDS``) get new ones.
        """
        free = self.workers - len(self.futures)
        for block in range(self.live_from, len(self.blocks)):
            if free <= 0:
                return
            filled = self.filled.get(block, 0)
            waiting = filled - self.blocks[block][0].claimed()
            if waiting <= 0:
                continue
            wanted = min(self.workers, waiting)
            if filled == self.launched.get(block, 0):
                # tasks out on this block can still claim its waiting rows
                wanted -= sum(1 for b in self.futures.values() if b == block)
            wanted = min(wanted, free)
            if wanted > 0:
                self.launched[block] = filled
                for _ in range(wanted):
                    self._send_rows(block, filled)
                free -= wanted

    def _send_rows(self, block: int, stop: int) -> None:
        task = RowsTask(
            self.call_id,
            self.payload,  # type: ignore[arg-type]
            self.blocks[block][1],
            stop,
            self.results_handle,
            self.scalar_type,
            self.keep_going,
            self.track_time,
            self.ledger,
        )
        try:
            future = self.executor.submit(run_rows, task)
        except cf.process.BrokenProcessPool as exc:
            # A worker died while none of our tasks was queued (idle, or
            # between the probe and the rest): the chunks are lost like the
            # others, and :meth:`wait` reports it the one way.
            future = cf.Future()
            future.set_exception(exc)
        self.futures[future] = block

    def _row_for(self, chunk: int) -> tuple[int, int]:
        if not self.blocks or self.next_row >= self.blocks[-1][0].capacity:
            size = self.first_block if not self.blocks else max(16, 2 * self.workers)
            ctrl = ControlBlock.create(size)
            self.blocks.append((ctrl, self._own(ctrl.array)))
            self.next_row = 0
        place = (len(self.blocks) - 1, self.next_row)
        self.rows[chunk] = place
        self.next_row += 1
        return place

    def wait(self, timeout: float) -> list[ChunkResult]:
        self._launch()
        if not self.futures:  # nothing of ours is out: a lost chunk, see below
            time.sleep(timeout)
        done, _ = cf.wait(list(self.futures), timeout=timeout, return_when=cf.FIRST_COMPLETED)
        # A broken pool is reported before any result of the batch is taken:
        # chunks that came back in the same batch are then part of the loss
        # (their results kept as salvage), never dropped between the two.
        for fut in done:
            exc = fut.exception()
            if isinstance(exc, cf.process.BrokenProcessPool):  # loky's TerminatedWorkerError too
                raise self._lost(exc) from None
        results = []
        for fut in done:
            results.extend(self._results_of(fut))
            del self.futures[fut]
        for res in results:
            self.outstanding.pop(res.chunk, None)
        if not any(res.error is not None for res in results):
            self._launch()  # rows a task left when it returned early
        now = time.monotonic()
        if results or self._any_running():
            self.quiet_since = now
        elif now - self.quiet_since > STALL_SECONDS:  # results are never dropped here
            raise self._stalled()
        if not results and self.outstanding and now >= self.next_death_check:
            self.next_death_check = now + 1.0
            unreported = self._dead_unreported(now)
            if unreported:
                raise self._lost(None, unreported)
        return results

    def _dead_unreported(self, now: float) -> dict[int, int]:
        """Workers dead for :data:`DEATH_GRACE` s under a chunk of ours that
        loky has not reported (it notices a death within milliseconds; this
        bounds the wait if it ever does not)."""
        dead = {}
        for chunk in self.outstanding.values():
            block, row = self.rows[chunk.number]
            table = self.blocks[block][0].table
            pid = int(table[row, PID])
            if table[row, STATE] not in (RUNNING, LOADING) or _platform.pid_alive(pid):
                continue
            seen = self.seen_dead.setdefault(pid, now)
            if now - seen > DEATH_GRACE:
                dead[pid] = -1
        return dead

    def _any_running(self) -> bool:
        return any(
            (self.blocks[b][0].table[r, STATE] == RUNNING)
            for b, r in (self.rows[c.number] for c in self.outstanding.values())
        )

    def _stalled(self) -> WorkerLost:
        """Chunks wait and no worker runs any: the pool stopped taking work
        (workers that never started or hung before their first item, a lost
        message). The run ends with what completed instead of waiting for
        ever. An item that runs long is not a stall: its row is RUNNING."""
        assert self.lease is not None
        self.lease.stop_workers()
        lost = sorted(self.outstanding.values(), key=lambda c: c.number)
        return WorkerLost(
            chunks=[c.number for c in lost],
            salvage=[
                self._with_log(ChunkResult(c.number, done=self._row_done(c.number))) for c in lost
            ],
            recoverable=False,
            span=f"items {_spans(lost)}",
            who="the local pool",
            how=f" or hung: for {STALL_SECONDS:.0f} s no worker ran any of the queued chunks",
            recovery="its workers were stopped",
        )

    def _with_log(self, res: ChunkResult) -> ChunkResult:
        """``res``, the salvage of a chunk whose worker died, with what the
        worker put in the chunk's log (see ``worker.Log``).

        Only the records of counted items (``done``) are kept: a worker that
        died between logging an item and counting it has not completed it.
        """
        chunk = self.chunks[res.chunk]
        block, row = self.rows[res.chunk]
        end = int(self.blocks[block][0].table[row, LOG_END])
        if res.values is None and res.chunk in self.unstacked:
            res.values = [None] * res.done
        if not end:
            return res
        stop = chunk.start + res.done
        for index, kind, obj in read_log(f"{self.ledger}{res.chunk}", end):
            if index >= stop:
                continue
            if kind == VALUES and res.values is not None:
                for k, value in enumerate(obj[: stop - index]):
                    res.values[index - chunk.start + k] = value
            elif kind == MISFIT:
                res.misfits[index] = obj
            elif kind == FAILED:
                res.failed[index] = obj
        return res

    def _results_of(self, future: cf.Future) -> list[ChunkResult]:
        """A worker's task's chunk results, whole: every path that takes
        them (results, a cancel, a broken pool's salvage) goes through here."""
        results = future.result()
        for res in results:
            if res.logged:
                self._values_from_log(res)
        return results

    def _values_from_log(self, res: ChunkResult) -> None:
        """Put back the values a chunk's message left in its log."""
        start = self.chunks[res.chunk].start
        block, row = self.rows[res.chunk]
        end = int(self.blocks[block][0].table[row, LOG_END])
        head: list = [None] * res.logged
        for index, kind, obj in read_log(f"{self.ledger}{res.chunk}", end):
            if kind == VALUES and index < start + res.logged:
                head[index - start : index - start + len(obj)] = obj
        res.values = head + (res.values or [])
        res.logged = 0

    def items_done(self) -> int:
        # Every row counts: what a dead worker completed stays completed.
        return sum(ctrl.done() for ctrl, _ in self.blocks)

    def cancel(self, grace: float, kill: bool) -> list[ChunkResult]:
        """Raise the cancel flag, collect chunks that stop, kill what is stuck."""
        # No Future.cancel(): if the pool is then killed, loky's manager thread
        # fails every pending future and dies on one already cancelled, leaving
        # its semaphores behind. Queued chunks see the flag and return at once.
        for ctrl, _ in self.blocks:
            ctrl.cancel()
        results: list[ChunkResult] = []
        if not kill and self.futures:
            done, pending = cf.wait(list(self.futures), timeout=grace)
            for fut in done:
                with contextlib.suppress(Exception):
                    results.extend(self._results_of(fut))
            kill = bool(pending)
        self.futures.clear()
        self.outstanding.clear()
        if kill and self.lease is not None:
            self.lease.kill()
        return results

    def recover(self) -> None:
        """Go on with fresh workers; rows of the old ones stop counting as running."""
        self.futures.clear()
        self.outstanding.clear()
        assert self.lease is not None
        self.executor = self.lease.replace()
        self.live_from = len(self.blocks)
        self.next_row = 1 << 62  # the next submit starts a fresh block

    def stop_overdue(self, seconds: float) -> list[int]:
        now = int(time.monotonic() * 1000)
        overdue = []
        for chunk, (block, row) in list(self.rows.items()):
            if block < self.live_from:
                continue
            table = self.blocks[block][0].table
            if table[row, STATE] != RUNNING or table[row, ITEM_STARTED] == 0:
                continue
            if now - int(table[row, ITEM_STARTED]) > seconds * 1000:
                pid = int(table[row, PID])
                index = self.chunks[chunk].start + int(table[row, DONE])
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()
                table[row, ITEM_STARTED] = 0  # stopped once
                overdue.append(index)
        return overdue

    def output_state(self) -> tuple[np.ndarray, ...] | None:
        # Workers write the shared copies (or the caller's shared arrays) in place.
        return tuple(self.outputs_now)

    def land_outputs(self) -> None:
        for original, shared in self.copy_back:
            np.copyto(original, shared)

    def release(self) -> None:
        # The run's segments are unlinked here whatever happened; workers may
        # keep them mapped until their next call, the memory is never
        # unmapped under a live view.
        sharing.release(self.report)
        for name in self.owned:
            unlink_name(name)
        self.owned.clear()
        self.copy_back.clear()
        self.futures.clear()
        if self.lease is not None:
            self.lease.release()
        for number, (block, row) in self.rows.items():
            # a worker that died as it made its log may not have counted a byte
            if self.ledger is not None and (
                self.blocks[block][0].table[row, LOG_END] or self.live_from
            ):
                with contextlib.suppress(OSError):
                    os.unlink(f"{self.ledger}{number}")
        self.ledger = None

    # -- helpers -----------------------------------------------------------------
    def _own(self, arr: np.ndarray) -> SharedArray:
        handle = handle_of(arr)
        assert handle is not None
        self.owned.append(handle.name)
        return handle

    def _lost(self, exc: BaseException | None, dead: dict[int, int] | None = None) -> WorkerLost:
        """What a broken pool took: which workers died on which items, and
        what every chunk it held had completed (``WorkerLost.salvage``).

        ``exc`` is loky's error; ``dead`` the workers found dead without it.
        """
        match = re.search(r"exit codes of the workers are \{(.*?)\}", str(exc or ""))
        codes = match.group(1) if match else ""
        how = f" (exit code {codes})" if codes else ""
        # The workers that died on their own, noted before loky killed the
        # others; then every worker is stopped and joined, so no counter in
        # the control block moves while it is read.
        if dead is None:
            dead = dict(getattr(self.executor, "dead", {}) or {})
        assert self.lease is not None
        self.lease.stop_workers()
        lost = sorted(self.outstanding.values(), key=lambda c: c.number)
        came_back = {
            res.chunk: res
            for f in list(self.futures)
            if f.done() and not f.cancelled() and f.exception() is None
            for res in self._results_of(f)
        }
        salvage = [
            came_back.get(c.number)
            or self._with_log(ChunkResult(c.number, done=self._row_done(c.number)))
            for c in lost
        ]
        culprits: list[tuple[int, int]] = []  # (item, pid)
        for chunk in lost:
            block, row = self.rows[chunk.number]
            table = self.blocks[block][0].table
            pid = int(table[row, PID])
            index = chunk.start + int(table[row, DONE])
            if table[row, STATE] in (RUNNING, LOADING) and pid in dead and index < chunk.stop:
                culprits.append((index, pid))
        culprits.sort()
        recovery = "the pool was replaced"
        common = {
            "chunks": [c.number for c in lost],
            "salvage": salvage,
            "how": how,
            "recovery": recovery,
            "exitcodes": codes,
        }
        if not culprits:
            # Workers died, but none while running an item of this run (idle,
            # or between chunks): nothing to blame, every chunk goes again.
            return WorkerLost(blameless=bool(dead), **common)
        who = ", ".join(str(pid) for _, pid in culprits)
        plural = "es" if len(culprits) > 1 else ""
        return WorkerLost(
            indices=[index for index, _ in culprits],
            workers={index: f"worker process {pid}" for index, pid in culprits},
            who=f"worker process{plural} {who}",
            **common,
        )

    def _row_done(self, number: int) -> int:
        """Items of chunk ``number`` completed with their results where the
        parent finds them without the chunk's message (see ``control``)."""
        block, row = self.rows[number]
        slot = SAVED if number in self.unstacked else DONE
        return int(self.blocks[block][0].table[row, slot])


def _spans(chunks: list[Chunk]) -> str:
    text = ", ".join(f"{c.start}-{c.stop - 1}" if c.size > 1 else str(c.start) for c in chunks)
    return shorten(text, 60)


def prestart(
    processes: int | None = None,
    start_method: str | None = None,
    threads_per_worker: int | None = None,
) -> list[int]:
    """Start a pool's workers now so the first call is warm; returns their pids."""
    from .worker import ping

    options = LocalTransport.check_options(
        TransportOptions(processes, start_method, None, threads_per_worker)
    )
    transport = LocalTransport.from_options(options)
    executor = pools.get_pool(transport.workers, transport.start_method, transport.threads)
    futures = [executor.submit(ping) for _ in range(transport.workers * 2)]
    for fut in futures:
        fut.result(timeout=pools.START_WAIT)
    return sorted(pools.worker_pids(executor))
