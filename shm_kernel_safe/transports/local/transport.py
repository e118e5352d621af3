"""The local transport: this machine's warm loky pool over shared memory.

The payload is pickled once (big arrays moved to shared memory on the way,
see :mod:`~shm_kernel_safe.transports.local.sharing`) into a segment every worker
unpickles once per call; a chunk's message is a few handles and an index
range. Workers report progress and the chunk they run in a control block
in shared memory, never by message, so a dead worker's item is known
exactly. Results that stack are stored by workers into one shared array.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

from ... import _platform
from ...engine.planning import Chunk
from ...engine.protocol import ChunkResult, Payload
from ...engine.results import stack_layout
from ...engine.threads import threads_for
from ...engine.transport import Heartbeat, Inputs, Transport, TransportOptions, WorkerLost
from ...memory.arrays import SharedArray, empty, handle_of, share
from ...memory.segments import live_segments, unlink_name
from . import pool as pools
from . import sharing
from .control import DONE, ITEM_STARTED, PID, RUNNING, STATE, ControlBlock
from .worker import ChunkTask, run_chunk


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
    min_chunk_seconds = 0.004  # a loky message costs ~0.1-0.3 ms
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
        # Options arrive checked (check_options, before any process starts).
        self.workers = processes or _platform.usable_cpus()
        self.start_method = start_method or _platform.default_start_method()
        self.threads = threads_for(self.workers, threads_per_worker)
        self.call_id = uuid.uuid4().hex
        self.owned: list[str] = []  # segment names this run created
        self.report = sharing.SharingReport()
        # Output arrays outside shared memory: workers write a shared copy,
        # copied back into the caller's array when the run ends.
        self.copy_back: list[tuple[np.ndarray, np.ndarray]] = []
        self.futures: dict[cf.Future, Chunk] = {}
        self.results_handle: SharedArray | None = None
        self.scalar_type: type | None = None
        self.executor: Any = None
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
        self.lost_done = 0  # items counted in blocks but lost with a broken pool
        self.first_block = 1

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
        replace: dict[int, SharedArray] = {}
        for arr in inputs.outputs:
            if handle_of(arr) is None:
                shared = share(arr)
                self.owned.append(shared.name)
                replace[id(arr)] = shared
                self.copy_back.append((arr, shared.view()))
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
        self.executor = pools.get_pool(self.workers, self.start_method, self.threads)

    def stack_results(self, first: Any, n_items: int) -> np.ndarray | None:
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
        task = ChunkTask(
            self.call_id,
            self.payload,
            self.blocks[block][1],
            row,
            chunk.number,
            chunk.start,
            chunk.stop,
            self.results_handle,
            self.scalar_type,
            self.keep_going,
            self.track_time,
        )
        self.futures[self.executor.submit(run_chunk, task)] = chunk

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
        done, _ = cf.wait(list(self.futures), timeout=timeout, return_when=cf.FIRST_COMPLETED)
        results = []
        for fut in done:
            try:
                results.append(fut.result())
            except cf.process.BrokenProcessPool as exc:  # loky's TerminatedWorkerError too
                raise self._lost(exc) from None
            del self.futures[fut]
        return results

    def items_done(self) -> int:
        return sum(ctrl.done() for ctrl, _ in self.blocks) - self.lost_done

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
                    results.append(fut.result())
            kill = bool(pending)
        self.futures.clear()
        if kill:
            pools.discard(self.workers, self.start_method, self.threads)
        return results

    def recover(self) -> None:
        """Replace the broken pool; rows of the old one stop counting as running."""
        lost = 0
        for chunk in self.futures.values():
            block, row = self.rows[chunk.number]
            lost += int(self.blocks[block][0].table[row, DONE])
        self.lost_done += lost
        self.futures.clear()
        pools.discard(self.workers, self.start_method, self.threads)
        self.executor = pools.get_pool(self.workers, self.start_method, self.threads)
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
                index = self._chunk(chunk).start + int(table[row, DONE])
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()
                table[row, ITEM_STARTED] = 0  # stopped once
                overdue.append(index)
        return overdue

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

    # -- helpers -----------------------------------------------------------------
    def _own(self, arr: np.ndarray) -> SharedArray:
        handle = handle_of(arr)
        assert handle is not None
        self.owned.append(handle.name)
        return handle

    def _chunk(self, number: int) -> Chunk:
        for chunk in self.futures.values():
            if chunk.number == number:
                return chunk
        raise KeyError(number)

    def _lost(self, exc: BaseException) -> WorkerLost:
        match = re.search(r"exit codes of the workers are \{(.*?)\}", str(exc))
        codes = match.group(1) if match else ""
        how = f" (exit code {codes})" if codes else ""
        lost_chunks = [c.number for c in self.futures.values()]
        by_place = {place: number for number, place in self.rows.items()}
        dead = []
        for block in range(self.live_from, len(self.blocks)):
            for row, pid, done, _ in self.blocks[block][0].running():
                number = by_place.get((block, row))
                if number in lost_chunks and not _platform.pid_alive(pid):
                    dead.append((number, pid, done))
        recovery = "the pool was replaced"
        if not dead:
            return WorkerLost(chunks=lost_chunks, how=how, recovery=recovery, exitcodes=codes)
        number, pid, done = dead[0]
        return WorkerLost(
            chunks=lost_chunks,
            index=self._chunk(number).start + done,
            who=f"worker process {pid}",
            how=how,
            recovery=recovery,
            exitcodes=codes,
        )


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
        fut.result()
    return sorted(pools.worker_pids(executor))
