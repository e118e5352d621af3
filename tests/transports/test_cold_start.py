"""A cold pool: started in the background while a call copies its inputs,
or at ``%load_ext`` when asked for."""

from __future__ import annotations

import time

import numpy as np
import pytest
from IPython.core.interactiveshell import InteractiveShell

import shm_kernel_safe as sks
from shm_kernel_safe.transports.local import pool

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_orphans")]


def started_pids() -> list[int]:
    return [pid for info in pool.pool_info() for pid in info["pids"]]


def test_load_ext_starts_no_pool_by_default(monkeypatch):
    monkeypatch.delenv("SHM_KERNEL_SAFE_PRESTART", raising=False)
    sks.shutdown_pools()
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "shm_kernel_safe")
    try:
        assert pool.pool_info() == []
    finally:
        shell.run_line_magic("unload_ext", "shm_kernel_safe")


def test_load_ext_prestarts_when_asked(monkeypatch):
    monkeypatch.setenv("SHM_KERNEL_SAFE_PRESTART", "1")
    sks.shutdown_pools()
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "shm_kernel_safe")
    try:
        deadline = time.monotonic() + 60
        while len(started_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(started_pids()) >= 2
        pids = set(started_pids())
        used = sks.parallel_map(lambda i: __import__("os").getpid(), range(20), processes=None)
        assert set(used) <= pids  # the call ran on the prestarted pool
    finally:
        shell.run_line_magic("unload_ext", "shm_kernel_safe")
    assert pool.pool_info() == []  # %unload_ext stopped it


def test_a_call_that_copies_starts_its_pool_in_the_background(monkeypatch):
    # The call itself starts the cold pool, in the background, before it
    # copies ``x`` (25.6 MB, not shared yet) to shared memory: the spy only
    # records what the real start-up returned.
    sks.shutdown_pools()
    calls = []
    real = pool.start_in_background

    def spy(*args):
        started = real(*args)
        calls.append((args, started, sks.live_segments()))
        return started

    monkeypatch.setattr(pool, "start_in_background", spy)
    x = np.ones((200_000, 16))
    y = sks.parallel_map(lambda i: float(x[i].sum()), range(50), processes=2)
    assert np.array_equal(y, np.full(50, 16.0))
    assert len(calls) == 1
    args, started, segments_then = calls[0]
    assert args[0] == 2 and started is True
    assert not any(seg.nbytes >= x.nbytes for seg in segments_then)  # before the copy


def test_workers_import_only_what_they_run():
    # A worker's start imports the package first (a forkserver preloads the
    # worker module): the API, the engine's run, background runs, journals
    # and the kernel side must not come with it (~80 ms of every cold pool).
    sks.shutdown_pools()
    modules = sks.parallel_map(
        lambda i: sorted(m for m in __import__("sys").modules if m.startswith("shm_kernel")),
        range(2),
        processes=2,
        start_method="forkserver",
    )
    for names in modules:
        assert "shm_kernel_safe.transports.local.worker" in names
        assert not {
            "shm_kernel_safe.api",
            "shm_kernel_safe.engine.run",
            "shm_kernel_safe.engine.background",
            "shm_kernel_safe.engine.journal",
            "shm_kernel_safe.kernel",
        } & set(names)


def test_every_public_name_resolves_in_a_fresh_interpreter():
    # Public names are imported on first use; what a user reaches (a name
    # in __all__, dir(), a star import, a subpackage by attribute) is the same.
    code = (
        "import shm_kernel_safe as sks\n"
        "assert set(sks.__all__) <= set(dir(sks)), set(sks.__all__) - set(dir(sks))\n"
        "assert all(getattr(sks, n) is not None for n in sks.__all__)\n"
        "assert sks.shutdown_pools.__name__ == 'shutdown_all'\n"
        "assert sks.memory.janitor.remove_old_journals\n"
        "ns = {}\n"
        "exec('from shm_kernel_safe import *', ns)\n"
        "assert set(sks.__all__) <= set(ns)\n"
        "try:\n"
        "    sks.no_such_name\n"
        "except AttributeError as exc:\n"
        "    assert 'no_such_name' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
