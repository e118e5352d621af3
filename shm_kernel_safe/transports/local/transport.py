"""The local transport: this machine's warm loky pool over shared memory.

The payload is pickled once (big arrays moved to shared memory on the way,
see :mod:`~shm_kernel_safe.engine.sharing`) into a segment every worker
unpickles once per call; a chunk's message is a few handles and an index
range. Workers report progress and the chunk they run in a control block
in shared memory, never by message, so a dead worker's item is known
exactly. Results that stack are stored by workers into one shared array.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from ... import _platform
from ...engine import sharing
from ...engine.planning import Chunk
from ...engine.protocol import ChunkResult, Payload
from ...engine.results import stack_layout
from ...engine.threads import threads_for
from ...engine.transport import Heartbeat, Inputs, Transport, WorkerLost, wait_until
from ...errors import InvalidArgumentError
from ...memory.arrays import SharedArray, empty, handle_of, share
from ...memory.segments import live_segments, unlink_name
from . import pool as pools
from .control import ControlBlock
from .worker import ChunkTask, run_chunk


def check_start_method(start_method: str | None) -> str:
    """The start method to use, or a one-line error naming the choices."""
    start_method = start_method or _platform.default_start_method()
    if start_method not in _platform.available_start_methods():
        raise InvalidArgumentError(
            "start_method",
            f"{start_method!r} is not a start method here; choose from "
            f"{', '.join(_platform.available_start_methods())}",
            message=f"unknown start method {start_method!r}; choose from "
            f"{', '.join(_platform.available_start_methods())}",
        )
    return start_method


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

    def __init__(
        self,
        processes: int | None = None,
        start_method: str | None = None,
        threads_per_worker: int | None = None,
    ) -> None:
        self.workers = processes or _platform.usable_cpus()
        self.start_method = check_start_method(start_method)
        self.threads = threads_for(self.workers, threads_per_worker)
        self.call_id = uuid.uuid4().hex
        self.owned: list[str] = []  # segment names this run created
        self.report = sharing.SharingReport()
        # Output arrays outside shared memory: workers write a shared copy,
        # copied back into the caller's array when the run succeeds.
        self.copy_back: list[tuple[np.ndarray, np.ndarray]] = []
        self.futures: set[cf.Future] = set()
        self.results_handle: SharedArray | None = None
        self.scalar_type: type | None = None
        self.executor: Any = None
        self.ctrl: ControlBlock | None = None
        self.payload: SharedArray | None = None
        self.chunks: dict[int, Chunk] = {}

    def encode(self, payload: Payload, inputs: Inputs) -> None:
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
        self.ctrl = ControlBlock.create(chunk_bound(self.workers))
        self.control = self._own(self.ctrl.array)
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
        self.chunks[chunk.number] = chunk
        task = ChunkTask(
            self.call_id,
            self.payload,
            self.control,
            chunk.number,
            chunk.start,
            chunk.stop,
            self.results_handle,
            self.scalar_type,
        )
        self.futures.add(self.executor.submit(run_chunk, task))

    def wait(self, timeout: float) -> list[ChunkResult]:
        done, self.futures = cf.wait(self.futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        try:
            return [fut.result() for fut in done]
        except cf.process.BrokenProcessPool as exc:  # loky's TerminatedWorkerError too
            raise self._lost(exc) from None

    def items_done(self) -> int:
        return self.ctrl.done() if self.ctrl is not None else 0

    def cancel(self, grace: float, kill: bool) -> None:
        """Raise the cancel flag, let running chunks stop, kill them if stuck."""
        if self.ctrl is None:
            return
        # No Future.cancel(): if the pool is then killed, loky's manager thread
        # fails every pending future and dies on one already cancelled, leaving
        # its semaphores behind. Queued chunks see the flag and return at once.
        self.ctrl.cancel()
        if not kill:
            kill = not wait_until(lambda: not self.ctrl.running(), grace)
        if kill:
            pools.discard(self.workers, self.start_method, self.threads)

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

    def _lost(self, exc: BaseException) -> WorkerLost:
        match = re.search(r"exit codes of the workers are \{(.*?)\}", str(exc))
        codes = match.group(1) if match else ""
        how = f" (exit code {codes})" if codes else ""
        assert self.ctrl is not None
        dead = [
            (c, pid, done) for c, pid, done in self.ctrl.running() if not _platform.pid_alive(pid)
        ]
        recovery = "the pool was replaced"
        if not dead:
            return WorkerLost(how=how, recovery=recovery, exitcodes=codes)
        chunk, pid, done = dead[0]
        return WorkerLost(
            index=self.chunks[chunk].start + done,
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

    transport = LocalTransport(processes, start_method, threads_per_worker)
    executor = pools.get_pool(transport.workers, transport.start_method, transport.threads)
    futures = [executor.submit(ping) for _ in range(transport.workers * 2)]
    for fut in futures:
        fut.result()
    return sorted(pools.worker_pids(executor))
