"""Nothing of a pool outlives ``shutdown_pools()``: loky's named semaphores
are gone when it returns, whatever order loky's threads finish in.

Each test forces the racing order deterministically instead of looping
until the race shows (``benchmarks/soak.py`` loops over the whole job)."""

from __future__ import annotations

import os
import signal
import time

import pytest

import shm_kernel_safe as sks
from shm_kernel_safe.transports.local import pool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60), pytest.mark.usefixtures("no_orphans")]


def loky_semaphores() -> list[str]:
    """loky's semaphores made by this process (others' are not ours to judge)."""
    return sorted(e for e in os.listdir("/dev/shm") if e.startswith(f"sem.loky-{os.getpid()}-"))


def test_shutdown_waits_for_the_call_queue_feeder(monkeypatch):
    """The demo's one failure in 13 runs: three semaphores of the call queue
    were still there after ``shutdown_pools()``. loky does not join the
    queue's feeder thread in the process that made the queue; while the
    feeder runs it holds the queue. Here it always finishes late."""
    from loky.backend import queues

    original = queues.Queue._feed

    def late_feeder(*args):
        original(*args)
        time.sleep(0.5)  # the feeder outlives the manager thread: the race, every time

    sks.shutdown_pools()
    assert loky_semaphores() == []
    monkeypatch.setattr(queues.Queue, "_feed", staticmethod(late_feeder))
    assert sks.parallel_map(lambda i: i, range(40), processes=2).sum() == 780
    sks.shutdown_pools()
    assert loky_semaphores() == []


def test_workers_loky_forgot_are_joined():
    """A worker that dies makes loky's manager thread pop and kill every
    worker without joining one; each unjoined process object kept its exit
    semaphore until exit (the ``known_loky_semaphore_leak``). Here the pool
    is broken and its manager gone before we shut it down."""
    sks.shutdown_pools()
    pids = sks.prestart(2, "forkserver")
    executor = pool.get_pool(2, "forkserver")
    manager = executor._executor_manager_thread
    os.kill(pids[0], signal.SIGKILL)
    manager.join(timeout=20)
    assert not manager.is_alive() and executor._processes == {}  # loky forgot them
    del executor, manager  # the test's own references would hold the queues
    sks.shutdown_pools()
    assert loky_semaphores() == []


def test_task_error_then_worker_death_leaves_no_semaphore():
    with pytest.raises(sks.TaskError):
        sks.parallel_map(lambda i: 1 / 0, range(50), processes=2)
    with pytest.raises(sks.WorkerDiedError):
        sks.parallel_map(lambda i: os._exit(1), range(50), processes=2)
    sks.shutdown_pools()
    assert loky_semaphores() == []


HANGS = r"""
import time
import shm_kernel_safe as sks
keep = sks.zeros(1000)          # a segment of its own
sks.prestart(2, "forkserver")   # workers, loky semaphores, forkserver, trackers
print("started", flush=True)
time.sleep(600)
"""


def test_a_hung_script_fails_its_test_and_leaves_nothing():
    """What the interrupt tests did when SIGINT never arrived: hang to the
    timeout, then leave the script's workers, segments and semaphores."""
    import subprocess

    import psutil

    from ..helpers import run_python, shm_entries

    def dead_loky_semaphores() -> set[str]:
        live = set(psutil.pids())
        return {
            e
            for e in os.listdir("/dev/shm")
            if e.startswith("sem.loky-") and int(e.split("-")[1]) not in live
        }

    before, sems_before = shm_entries(), dead_loky_semaphores()
    mine = set(psutil.Process().children(recursive=True))
    with pytest.raises(subprocess.TimeoutExpired):
        run_python(HANGS, timeout=8)
    left = [p for p in psutil.Process().children(recursive=True) if p not in mine]
    assert [p for p in left if p.status() != psutil.STATUS_ZOMBIE] == []
    assert shm_entries() == before
    assert dead_loky_semaphores() - sems_before == set()  # the script's trackers unlinked them
