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
