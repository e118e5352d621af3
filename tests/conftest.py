"""Shared fixtures: every test must leave /dev/shm and the process tree as it
found them, and nothing may hang (pytest-timeout is set in pyproject)."""

from __future__ import annotations

import _thread
import atexit
import functools
import gc
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import pytest

from . import sigint_scope
from .helpers import (
    SHM_DIR,
    cluster_sems,
    foreign_owners,
    live_pool_sems,
    loky_sems,
    sem_holders,
    settle,
    shm_entries,
    worker_children,
)

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
    """Shut warm pools down after the test and check no worker is left.

    Also checks that loky's named semaphores of this test's pools are gone:
    those that appeared during the test, and those of pools that were warm
    when it started (it stopped them). Entries an earlier test left are that
    test's failure (``no_leaked_semaphores``), not this one's.
    """
    before = loky_sems()
    inherited = before & live_pool_sems()
    yield
    mod = sys.modules.get("shm_kernel_safe.transports.local.pool")
    if mod is not None:
        mod.shutdown_all()
    deadline = time.monotonic() + 5
    while (alive := worker_children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"

    # loky's named semaphores must be gone once shutdown_all() has returned
    # (our dask cluster's, if one lives for the module, are its fixture's)
    left = settle(lambda: ((loky_sems() - before) | (loky_sems() & inherited)) - cluster_sems())
    assert not left, f"semaphores left in {SHM_DIR}: {sorted(left)}\n{sem_holders(left)}"


#: Semaphores of pools that were warm after the last test: legitimately
#: kept (a warm pool outlives the test that started it, by design), and
#: answerable for when a later test stops the pool.
_warm_sems: set[str] = set()


@pytest.fixture(autouse=True)
def no_leaked_semaphores(request):
    """Fail the test that leaves loky's named semaphores behind, by name.

    One listdir before and after each test. What a warm pool or our dask
    cluster holds is not a leak (``live_pool_sems``, ``cluster_sems``):
    both outlive tests by design. What a warm pool held when the test began
    and is still there once the pool is gone is (the test stopped the
    pool); the cluster's fixtures check theirs when they close it. Tests
    with ``no_orphans`` are checked there, strictly (it stops every pool).
    """
    global _warm_sems
    before = loky_sems()
    yield
    if "no_orphans" in request.fixturenames:
        _warm_sems = set()
        return

    def left() -> set[str]:
        now, live = loky_sems(), live_pool_sems() | cluster_sems()
        return ((now - before) | (now & _warm_sems)) - live

    leaked = settle(left) if left() else set()
    _warm_sems = loky_sems() & live_pool_sems()
    assert not leaked, (
        f"{request.node.nodeid} left loky's semaphores in {SHM_DIR} (no live pool "
        f"holds them): {sorted(leaked)}\n{sem_holders(leaked)}"
    )


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that can notice SIGINT's inherited disposition
    (``sigint``, the rule is in tests/sigint_scope.py): CI's stage 2 runs
    them again with SIGINT ignored (``-m sigint``)."""
    for item in items:
        why = sigint_scope.reason(item)
        if why is not None:
            item.add_marker(pytest.mark.sigint)
            item.user_properties.append(("sigint", why))


# The runtime half of the rule: what reading the source cannot see. While a
# test without the marker runs, a SIGINT sent or a kernel started from the
# pytest process is recorded, and fails the test (see _sigint_guard).
_MAIN_PID = os.getpid()
_guard: dict[str, Any] = {"test": None, "seen": []}


def _record(what: str) -> None:
    if _guard["test"] is not None and os.getpid() == _MAIN_PID:
        _guard["seen"].append(what)


def _watch_signal(func, signum_at: int):
    @functools.wraps(func)
    def watched(*args, **kwargs):
        if len(args) > signum_at and args[signum_at] == signal.SIGINT:
            _record(f"{func.__name__}(..., SIGINT)")
        return func(*args, **kwargs)

    return watched


def _watch_call(func, what: str):
    @functools.wraps(func)
    def watched(*args, **kwargs):
        _record(what)
        return func(*args, **kwargs)

    return watched


def pytest_configure(config: pytest.Config) -> None:
    os.kill = _watch_signal(os.kill, 1)
    if hasattr(os, "killpg"):
        os.killpg = _watch_signal(os.killpg, 1)
    signal.raise_signal = _watch_signal(signal.raise_signal, 0)
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill = _watch_signal(signal.pthread_kill, 1)
    _thread.interrupt_main = _watch_call(_thread.interrupt_main, "interrupt_main()")
    try:
        from jupyter_client.provisioning.local_provisioner import LocalProvisioner
    except ImportError:
        return
    launch = LocalProvisioner.launch_kernel

    @functools.wraps(launch)
    async def launch_kernel(self, *args, **kwargs):
        _record("a kernel start (jupyter_client)")
        return await launch(self, *args, **kwargs)

    LocalProvisioner.launch_kernel = launch_kernel


@pytest.fixture(autouse=True)
def _sigint_guard(request):
    """Fail a test that sends SIGINT or starts a kernel without being in
    stage 2's scope: the rule of tests/sigint_scope.py missed it (extend
    the rule, or mark the test ``sigint``)."""
    if request.node.get_closest_marker("sigint") is not None:
        yield
        return
    _guard["test"], _guard["seen"] = request.node.nodeid, []
    try:
        yield
    finally:
        _guard["test"] = None
    seen = sorted(set(_guard["seen"]))
    assert not seen, (
        f"{request.node.nodeid} sent or started {seen} but is not marked sigint: "
        "the rule of tests/sigint_scope.py misses it; extend the rule or mark it"
    )


@pytest.fixture(autouse=True)
def _no_known_kinds():
    """Each test starts as a new kernel does: no function's results are
    known, so its first run probes (``engine.known_kinds``)."""
    kinds = sys.modules.get("shm_kernel_safe.engine.known_kinds")
    if kinds is not None:
        kinds.clear()
