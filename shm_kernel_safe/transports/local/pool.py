"""The local backend's workers: one warm pool per process, kept across calls
and resized on demand, plus a private executor for a run that starts while
another holds the pool.

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
import functools
import os
import threading
import time
import warnings
import weakref
from typing import Any

from loky import ProcessPoolExecutor

from ... import _checks, lifecycle
from ..._platform import interrupt_deferred
from ...engine.threads import limit_threads
from ..main_free import make_context, plain_start
from . import mp_helpers, parent_watch

#: Modules a forkserver imports once, so that every worker forks with them loaded.
FORKSERVER_PRELOAD = (
    "numpy",
    "cloudpickle",
    "threadpoolctl",
    "shm_kernel_safe.transports.local.worker",
)

#: Idle workers exit after this many seconds, releasing what they keep mapped.
IDLE_TIMEOUT = 600.0

#: Seconds idle extra workers get to exit when the pool shrinks (then it is replaced).
RESIZE_WAIT = 2.0
#: Seconds a background start waits for each worker's first answer.
START_WAIT = 120.0

_lock = threading.RLock()
#: The process's one warm pool, and whether a run holds it.
_warm: _Executor | None = None
_leased = False
#: Executors of runs that started while the warm pool was held (retired at their end).
_private: set[_Executor] = set()


def _init_worker(threads: int, owner_pid: int | None = None, claim_lock: Any = None) -> None:
    """Runs once in each worker.

    Bounds BLAS/OpenMP threads to ``threads`` (``engine.threads``), ignores
    SIGINT (see below), ends the worker when ``owner_pid`` (the process that
    made the pool) is gone (``parent_watch``), keeps the pool's
    ``claim_lock`` (workers claim chunks under it, ``worker.run_rows``), and:

    loky restarts a worker whose RSS grew by 300 MB, taking it for a leak.
    Pages of shared segments count in RSS, so a worker that maps a 1.28 GB
    ``x`` would be recycled after its first task and lose its mappings: the
    opposite of a warm pool. Shared memory is not a leak; turn the check off.
    """
    import signal

    from loky import process_executor

    from ..._malloc import tune_malloc
    from .worker import set_claim_lock

    set_claim_lock(claim_lock)
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
    global _lock, _warm, _leased, _private
    _lock = threading.RLock()
    _warm, _leased, _private = None, False, set()


class _Executor(ProcessPoolExecutor):
    """loky's executor, remembering every worker it started and which died.

    When a worker dies, loky's manager thread pops *all* workers from
    ``_processes`` and kills them, but joins none; a process object that is
    never joined stays in multiprocessing's list of children, and with it
    the named semaphore loky hangs on it (``_worker_exit_lock``) until the
    interpreter exits. :func:`_kill` joins every worker recorded here.

    loky then kills the healthy workers too, with the same signal, so their
    exit codes cannot tell the culprit from the collateral afterwards. The
    manager's ``terminate_broken`` is wrapped to note, first, the workers
    that had exited on their own (``dead``): the futures fail after that, so
    whoever sees a failed future sees the culprits already noted.
    """

    dead: dict[int, int]

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

    def _start_executor_manager_thread(self) -> None:
        fresh = self._executor_manager_thread is None
        super()._start_executor_manager_thread()
        manager = self._executor_manager_thread
        if fresh and manager is not None:
            # Weak references only: a cycle through the manager would keep
            # loky's queues and semaphores alive until the next gc pass.
            manager.terminate_broken = functools.partial(
                _note_dead, weakref.ref(self), weakref.ref(manager)
            )


def _note_dead(executor: weakref.ref, manager_ref: weakref.ref, bpe: Any) -> None:
    manager = manager_ref()
    if manager is None:
        return
    dead = {}
    for pid, proc in list(manager.processes.items()):
        with contextlib.suppress(Exception):
            if proc.exitcode is not None:
                dead[pid] = proc.exitcode
    owner = executor()
    if owner is not None:
        owner.dead = dead
    type(manager).terminate_broken(manager, bpe)


def _new_executor(processes: int, start_method: str, threads: int) -> _Executor:
    with warnings.catch_warnings():
        # loky discourages fork; the user asked for it explicitly.
        warnings.filterwarnings("ignore", message=".*fork.*", category=UserWarning)
        # Made whole or not at all, and the resource tracker loky starts
        # here is a plain, interrupt-proof process (see main_free).
        with interrupt_deferred(), plain_start():
            context = make_context(start_method, preload=FORKSERVER_PRELOAD)
            # One per pool: a pool that broke (a worker died, maybe holding
            # it) is replaced with its lock.
            claim_lock = context.Lock()
            pool = _Executor(
                max_workers=processes,
                context=context,
                timeout=IDLE_TIMEOUT,
                initializer=_init_worker,
                initargs=(threads, os.getpid(), claim_lock),
            )
    pool.dead = {}
    pool.__dict__["_sks_claim_lock"] = claim_lock
    pool.__dict__["_sks_kind"] = (start_method, threads)
    lifecycle.hook_kernel_shutdown()
    return pool


def _fits(pool: Any, start_method: str, threads: int) -> bool:
    return pool.__dict__.get("_sks_kind") == (start_method, threads) and not _is_broken(pool)


def _resize(pool: Any, processes: int) -> bool:
    """Give an idle pool exactly ``processes`` workers; False if it could not.

    Growing starts the missing workers; shrinking asks idle workers to exit
    (loky's own sentinel, as its reusable executor does when resized) and
    waits for them at most :data:`RESIZE_WAIT` seconds.
    """
    if pool._max_workers == processes:
        return True
    if pool._executor_manager_thread is None:  # no worker started yet
        pool._max_workers = processes
        return True
    if pool._pending_work_items:  # a prestart still pinging: not idle
        return False
    with pool._processes_management_lock:
        alive = sum(p.is_alive() for p in list(pool._processes.values()))
        pool._max_workers = processes
        for _ in range(processes, alive):
            pool._call_queue.put(None)
    deadline = time.monotonic() + RESIZE_WAIT
    while len(pool._processes) > processes:
        if _is_broken(pool) or time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    with pool._processes_management_lock:
        pool._adjust_process_count()
    pool._executor_manager_thread_wakeup.wakeup()
    return True


class Lease:
    """A run's hold on workers: the warm pool, or its own executor.

    Loky breaks a whole executor when one of its workers dies, failing every
    future it holds. So a run holds its executor alone: the first run takes
    the process's warm pool, a run that starts while it is taken (another
    thread, a callback) gets a private executor of its own, stopped when
    that run ends. A worker death, an item timeout or a cancel in one run
    thus never touches another run's workers.
    """

    def __init__(self, executor: _Executor, private: bool, spec: tuple[int, str, int]) -> None:
        self.executor = executor
        self.private = private
        self.spec = spec
        self.released = False

    def replace(self) -> _Executor:
        """Kill this lease's workers and go on with a fresh executor."""
        old = self.executor
        self.executor = _new_executor(*self.spec)
        global _warm
        with _lock:
            if self.private:
                _private.discard(old)
                _private.add(self.executor)
            elif _warm is old:
                _warm = self.executor
        _kill(old)
        return self.executor

    def stop_workers(self) -> None:
        """Kill and join this lease's workers (its executor broke); see :meth:`replace`."""
        _kill(self.executor)

    def kill(self) -> None:
        """Kill this lease's workers now (stuck items); the lease ends."""
        global _warm, _leased
        with _lock:
            if not self.released:
                self.released = True
                if self.private:
                    _private.discard(self.executor)
                elif _warm is self.executor:
                    _warm, _leased = None, False
        _kill(self.executor)

    def release(self) -> None:
        """The run ended: the warm pool stays warm, a private executor stops."""
        global _leased
        with _lock:
            if self.released:
                return
            self.released = True
            # Not the warm pool any more (shutdown_pools() ran meanwhile): stop it.
            stop = self.private or _warm is not self.executor
            if self.private:
                _private.discard(self.executor)
            elif _warm is self.executor:
                _leased = False
        if stop:
            _kill(self.executor)


def lease(processes: int, start_method: str, threads: int = 1) -> Lease:
    """Workers for one run: the warm pool when free, else a private executor."""
    global _leased
    spec = (processes, start_method, threads)
    with _lock:
        if not _leased:
            pool = _warm_pool(processes, start_method, threads)
            _leased = True
            return Lease(pool, False, spec)
        pool = _new_executor(processes, start_method, threads)
        _private.add(pool)
        return Lease(pool, True, spec)


def _warm_pool(processes: int, start_method: str, threads: int) -> _Executor:
    """The process's one warm pool, sized and started for this request.

    A different start method or thread bound replaces it; a different number
    of workers resizes it (idle extra workers exit). Caller holds ``_lock``.
    """
    global _warm
    pool = _warm
    if pool is not None and _fits(pool, start_method, threads) and _resize(pool, processes):
        return pool
    if pool is not None:
        _warm = None
        _kill(pool)
    _warm = _new_executor(processes, start_method, threads)
    return _warm


def get_pool(processes: int, start_method: str, threads: int = 1) -> ProcessPoolExecutor:
    """The warm pool with ``processes`` workers, each bounded to ``threads`` BLAS threads.

    While a run holds it, it is returned as it is (resizing it would stop
    that run's workers).
    """
    with _lock:
        if _leased and _warm is not None:
            return _warm
        return _warm_pool(processes, start_method, threads)


def start_in_background(processes: int, start_method: str, threads: int = 1) -> bool:
    """Start the warm pool's workers in a thread, unless it is warm or in use.

    Called when a call begins, so that starting workers (a forkserver that
    imports numpy, then a fork per worker; ~0.3-1 s) overlaps with the
    parent's own work before it needs them (copying big inputs to shared
    memory, pickling). Returns whether a start was begun.
    """
    with _lock:
        pool = _warm
        if _leased or (
            pool is not None
            and _fits(pool, start_method, threads)
            and pool._max_workers == processes
        ):
            return False
        pool = _warm_pool(processes, start_method, threads)

    def ping_all() -> None:
        from .worker import ping

        with contextlib.suppress(Exception):  # a failed start shows in the call itself
            for fut in [pool.submit(ping) for _ in range(processes)]:
                fut.result(timeout=START_WAIT)

    threading.Thread(target=ping_all, name="shm_kernel_safe-pool-start", daemon=True).start()
    return True


def _is_broken(pool: ProcessPoolExecutor) -> bool:
    return bool(getattr(pool, "_flags", None) and pool._flags.broken) or bool(
        getattr(pool, "_shutdown_thread", False)
    )


def worker_pids(pool: ProcessPoolExecutor) -> list[int]:
    return list(getattr(pool, "_processes", {}) or {})


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
    # The claim lock is a named semaphore until it is collected: a pool kept
    # referenced (by a traceback, say) must not keep it.
    pool.__dict__.pop("_sks_claim_lock", None)
    pool._initargs = ()
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
    global _warm, _leased
    join_timeout = _checks.seconds("join_timeout", join_timeout, optional=False)  # type: ignore[assignment]
    with _lock:
        pools = [p for p in (_warm, *_private) if p is not None]
        _warm, _leased = None, False
        _private.clear()
    for pool in pools:
        _kill(pool, join_timeout)


def pool_info() -> list[dict[str, Any]]:
    """The warm pool, then executors private to runs in progress (``private``)."""
    with _lock:
        pools = [(p, False) for p in (_warm,) if p is not None]
        pools += [(p, True) for p in _private]
    info = []
    for p, private in pools:
        start_method, threads = p.__dict__["_sks_kind"]
        info.append(
            {
                "processes": p._max_workers,
                "start_method": start_method,
                "threads": threads,
                "pids": worker_pids(p),
                "private": private,
            }
        )
    return info


def _close_pools(event: str) -> None:
    # At exit and kernel shutdown within a second: a process that lingers
    # may be killed, and then no clean-up runs at all.
    shutdown_all(join_timeout=5.0 if event == lifecycle.UNLOAD else 1.0)


lifecycle.register("local-pools", _close_pools, order=20)
# After the pools: the helpers they started (forkserver, resource trackers).
lifecycle.register(
    "mp-helpers", mp_helpers.stop_helpers, order=90, events={lifecycle.KERNEL_SHUTDOWN}
)
