"""Shared fixtures: every test must leave /dev/shm and the process tree as it
found them, and nothing may hang (pytest-timeout is set in pyproject)."""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import sys
import tempfile
import time

import pytest

from .helpers import SHM_DIR, foreign_owners, shm_entries, worker_children

# Journals go to a folder of this session, never to the user's own cache;
# kernels the tests start inherit it. The magic's default journal is off
# here: these tests are about runs within one kernel (a journal would
# refuse a cell run again with other inputs); the journal tests turn it on
# (SHM_KERNEL_SAFE_JOURNAL=1) for the kernels they start.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sks-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)
os.environ["SHM_KERNEL_SAFE_JOURNAL"] = "0"


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Fail a test that leaves one of our segments in /dev/shm."""
    before = shm_entries()
    foreign = foreign_owners()
    yield
    # Cached copies of arrays a test keeps alive (module globals) are held
    # on purpose, as warm pools are: drop them, as no_orphans stops pools.
    cache = sys.modules.get("shm_kernel_safe.memory.share_cache")
    if cache is not None:
        cache.cache.clear()
    gc.collect()
    deadline = time.monotonic() + 5
    while (leaked := _ours(shm_entries() - before, foreign)) and time.monotonic() < deadline:
        time.sleep(0.05)
        gc.collect()
    assert not leaked, f"segments left in {SHM_DIR}: {sorted(leaked)}"


@pytest.fixture
def no_orphans():
    """Shut warm pools down after the test and check no worker is left."""
    yield
    mod = sys.modules.get("shm_kernel_safe.transports.local.pool")
    if mod is not None:
        mod.shutdown_all()
    deadline = time.monotonic() + 5
    while (alive := worker_children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"

    # loky's named semaphores must be gone once shutdown_all() has returned
    def sems() -> list[str]:
        return [e for e in os.listdir(SHM_DIR) if e.startswith(f"sem.loky-{os.getpid()}-")]

    deadline = time.monotonic() + 3
    while sems() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    assert not sems(), f"semaphores left in {SHM_DIR}: {sems()}"


def _ours(entries: set[str], foreign: set[int]) -> set[str]:
    """Drop segments of processes that were unrelated and alive at the start
    (they may die during the test; their segments are not the test's)."""
    from shm_kernel_safe.memory.naming import parse_name

    return {e for e in entries if (p := parse_name(e)) is None or p.pid not in foreign}


@pytest.fixture
def stale_cleaned():
    """For tests that SIGKILL whole process groups (an owner with its
    resource tracker): what they leave (our segments, loky's semaphores)
    is what the janitor is for. It must remove all of it."""
    yield
    import shm_kernel_safe as sks

    sks.cleanup_stale()
    assert not sks.find_stale(), "the janitor left stale entries behind"
