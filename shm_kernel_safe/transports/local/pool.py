"""Warm worker pools, one per (processes, start method, BLAS threads), kept
across calls.

Built on loky's ProcessPoolExecutor (joblib's backend) rather than
``multiprocessing.Pool``: loky notices a worker that dies (segfault,
``os._exit``, OOM kill) and fails the pending futures with the exit code
instead of hanging forever, can kill its workers on demand, and shuts down
cleanly at interpreter exit. We keep our own executors instead of loky's
process-global reusable one so joblib in the same kernel cannot resize or
kill ours.

Start methods never re-run the user's main module: under spawn and
forkserver the children's preparation data is stripped of ``__main__``
(cloudpickle sends what the work needs by value), so a notebook, a console,
or a script without ``if __name__ == "__main__"`` all work.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from typing import Any

from loky import ProcessPoolExecutor

from ... import lifecycle
from ...engine.threads import limit_threads
from ..main_free import interrupt_deferred, make_context, plain_start
from . import mp_helpers, parent_watch

#: Modules a forkserver imports once, so that every worker forks with them loaded.
FORKSERVER_PRELOAD = ("numpy", "cloudpickle", "shm_kernel_safe.transports.local.worker")

#: Idle workers exit after this many seconds, releasing what they keep mapped.
IDLE_TIMEOUT = 600.0

_lock = threading.RLock()
_pools: dict[tuple[int, str, int], ProcessPoolExecutor] = {}


def _init_worker(threads: int, owner_pid: int | None = None) -> None:
    """Runs once in each worker.

    Bounds BLAS/OpenMP threads to ``threads`` (``engine.threads``), ignores
    SIGINT (see below), ends the worker when ``owner_pid`` (the process that
    made the pool) is gone (``parent_watch``), and:

    loky restarts a worker whose RSS grew by 300 MB, taking it for a leak.
    Pages of shared segments count in RSS, so a worker that maps a 1.28 GB
    ``x`` would be recycled after its first task and lose its mappings: the
    opposite of a warm pool. Shared memory is not a leak; turn the check off.
    """
    import signal

    from loky import process_executor

    from ..._malloc import tune_malloc

    limit_threads(threads)  # before any item: workers x threads <= CPUs
    tune_malloc()  # see _malloc: up to 5x on tasks with MB-sized temporaries
    process_executor._MAX_MEMORY_LEAK_SIZE = 1 << 62
    # A kernel interrupt signals the whole process group. Workers leave it
    # to the parent, which cancels between items and kills what is stuck:
    # one behaviour on every platform (on Windows workers never see it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if owner_pid is not None:
        parent_watch.watch_owner(owner_pid)
    _forget_inherited_pools()


def _forget_inherited_pools() -> None:
    """A forked worker starts with no pool of its own.

    Under fork it inherits the owner's table of pools, and a nested run
    would submit to a copy of the owner's executor (its locks possibly held
    at the fork, its workers not its children): it hangs. Dropped, not
    shut down: they are the owner's.
    """
    global _lock
    _lock = threading.RLock()
    _pools.clear()


class _Executor(ProcessPoolExecutor):
    """loky's executor, remembering every worker it started.

    When a worker dies, loky's manager thread pops *all* workers from
    ``_processes`` and kills them, but joins none; a process object that is
    never joined stays in multiprocessing's list of children, and with it
    the named semaphore loky hangs on it (``_worker_exit_lock``) until the
    interpreter exits. :func:`_kill` joins every worker recorded here.
    """

    def _ensure_executor_running(self) -> None:
        # Starting workers is short; a kernel interrupt in the middle of it
        # would leave a worker started but recorded nowhere (main_free).
        if len(self._processes) == self._max_workers:
            super()._ensure_executor_running()
            return
        with interrupt_deferred():
            super()._ensure_executor_running()

    def _adjust_process_count(self) -> None:
        super()._adjust_process_count()
        workers = self.__dict__.setdefault("_sks_workers", weakref.WeakSet())
        workers.update(self._processes.values())


def get_pool(processes: int, start_method: str, threads: int = 1) -> ProcessPoolExecutor:
    """The warm pool of ``processes`` workers, each bounded to ``threads`` BLAS threads."""
    key = (processes, start_method, threads)
    with _lock:
        pool = _pools.get(key)
        if pool is not None and not _is_broken(pool):
            return pool
        if pool is not None:
            _kill(pool)
        with warnings.catch_warnings():
            # loky discourages fork; the user asked for it explicitly.
            warnings.filterwarnings("ignore", message=".*fork.*", category=UserWarning)
            # Made whole or not at all, and the resource tracker loky starts
            # here is a plain, interrupt-proof process (see main_free).
            with interrupt_deferred(), plain_start():
                pool = _Executor(
                    max_workers=processes,
                    context=make_context(start_method, preload=FORKSERVER_PRELOAD),
                    timeout=IDLE_TIMEOUT,
                    initializer=_init_worker,
                    initargs=(threads, os.getpid()),
                )
        _pools[key] = pool
    lifecycle.hook_kernel_shutdown()
    return pool


def start_in_background(processes: int, start_method: str, threads: int = 1) -> bool:
    """Start a pool's workers in a thread, unless the pool is already warm.

    Called when a call begins, so that starting workers (a forkserver that
    imports numpy, then a fork per worker; ~0.3-1 s) overlaps with the
    parent's own work before it needs them (copying big inputs to shared
    memory, pickling). Returns whether a start was begun.
    """
    key = (processes, start_method, threads)
    with _lock:
        pool = _pools.get(key)
        if pool is not None and not _is_broken(pool):
            return False
        pool = get_pool(processes, start_method, threads)

    def ping_all() -> None:
        from .worker import ping

        with contextlib.suppress(Exception):  # a failed start shows in the call itself
            for fut in [pool.submit(ping) for _ in range(processes)]:
                fut.result()

    threading.Thread(target=ping_all, name="shm_kernel_safe-pool-start", daemon=True).start()
    return True


def _is_broken(pool: ProcessPoolExecutor) -> bool:
    return bool(getattr(pool, "_flags", None) and pool._flags.broken) or bool(
        getattr(pool, "_shutdown_thread", False)
    )


def worker_pids(pool: ProcessPoolExecutor) -> list[int]:
    return list(getattr(pool, "_processes", {}) or {})


def discard(processes: int, start_method: str, threads: int = 1) -> None:
    """Kill a pool's workers now; the next call starts a fresh pool."""
    with _lock:
        pool = _pools.pop((processes, start_method, threads), None)
    if pool is not None:
        _kill(pool)


def _kill(pool: ProcessPoolExecutor, join_timeout: float = 5.0) -> None:
    """Kill the workers and wait (bounded) until loky has released its
    queues and semaphores, so nothing of the pool outlives this call."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    procs += [p for p in list(getattr(pool, "_sks_workers", ())) if p not in procs]
    # Taken before shutdown(), which forgets them; joining the manager thread
    # and then the call queue's feeder thread is what waits for loky to
    # release its queues and their named semaphores. The feeder is not joined
    # by loky in the process that made the queue (``join_thread()`` is a
    # no-op there): while it still runs, it holds the queue and its three
    # semaphores, and a check of /dev/shm right after shutdown finds them.
    manager = getattr(pool, "_executor_manager_thread", None)
    call_queue = getattr(pool, "_call_queue", None)
    with contextlib.suppress(Exception):
        pool.shutdown(wait=False, kill_workers=True)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.kill()
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.join(timeout=min(2.0, join_timeout))
    if manager is not None:
        with contextlib.suppress(Exception):
            manager.join(timeout=join_timeout)
    feeder = getattr(call_queue, "_thread", None)
    if feeder is not None:
        with contextlib.suppress(Exception):
            feeder.join(timeout=join_timeout)


def shutdown_all(join_timeout: float = 5.0) -> None:
    """Stop every warm pool of the local backend (``sks.shutdown_pools()``).

    ``%unload_ext`` and interpreter exit call it; the next call starts a
    pool again. Idempotent.

    Parameters
    ----------
    join_timeout : float, default 5.0
        Seconds to wait for each pool's workers before killing them.

    See Also
    --------
    prestart

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> sks.shutdown_pools()
    """
    with _lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        _kill(pool, join_timeout)


def pool_info() -> list[dict[str, Any]]:
    with _lock:
        return [
            {"processes": k[0], "start_method": k[1], "threads": k[2], "pids": worker_pids(p)}
            for k, p in _pools.items()
        ]


def _close_pools(event: str) -> None:
    # At exit and kernel shutdown within a second: a process that lingers
    # may be killed, and then no clean-up runs at all.
    shutdown_all(join_timeout=5.0 if event == lifecycle.UNLOAD else 1.0)


lifecycle.register("local-pools", _close_pools, order=20)
# After the pools: the helpers they started (forkserver, resource trackers).
lifecycle.register(
    "mp-helpers", mp_helpers.stop_helpers, order=90, events={lifecycle.KERNEL_SHUTDOWN}
)
