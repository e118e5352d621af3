"""The local transport with real worker processes under every start method:
sharing, warm pools, dead and stuck workers. Behaviour common to every
transport is in test_transports.py."""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest

import shm_kernel_safe as sks

from ..helpers import run_python, shm_entries

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_orphans")]

METHODS = ["forkserver", "spawn", "fork"]
X = np.random.default_rng(1).standard_normal((40_000, 16))  # 5 MB: shared, not pickled


def hourly(nn: int) -> float:
    return float(X[nn::100].sum())


@pytest.mark.parametrize("method", METHODS)
def test_closure_array_is_shared_read_only_not_copied_per_task(method):
    big = np.arange(2_000_000, dtype=np.float64)  # 16 MB

    def probe(i):
        from shm_kernel_safe.memory import arrays as a

        _root, mapping = a._root_and_mapping(big)
        return (
            i,
            big.flags.writeable,
            type(mapping).__name__,
            os.getpid(),
            len(a.attached_names()),
        )

    out = sks.parallel_map(probe, range(200), start_method=method, processes=2)
    assert all(w is False for _, w, _, _, _ in out)  # read-only in workers
    assert {m for _, _, m, _, _ in out} == {"mmap"}  # a view of shared memory
    # attached once per worker per call: payload + control + result + big array
    assert max(n for *_, n in out) <= 4


def test_preshared_array_travels_without_copy_and_is_writable():
    from shm_kernel_safe.transports.local import sharing

    x = sks.zeros((1000, 8))
    x[:] = 1.0
    y = sks.zeros(1000)

    def work(i):
        y[i] = x[i].sum() * 2
        return 0

    _, report = sharing.dumps(work)
    assert report.copied_bytes == 0 and {h.name for h in report.reused} >= {
        sks.handle_of(x).name,
        sks.handle_of(y).name,
    }
    sks.parallel_map(work, range(1000), processes=2)
    assert np.all(y == 16.0)


def test_same_segment_kept_mapped_across_calls_and_pool_reused():
    x = sks.zeros(300_000)

    def who(i):
        from shm_kernel_safe.memory import arrays as a

        return os.getpid(), tuple(sorted(a.attached_names()))

    pool_pids = set(sks.prestart(2))
    first = sks.parallel_map(lambda i: (*who(i), float(x[i])), range(100), processes=2)
    second = sks.parallel_map(lambda i: (*who(i), float(x[i])), range(100), processes=2)
    pids1 = {p for p, *_ in first}
    pids2 = {p for p, *_ in second}
    assert pids1 | pids2 <= pool_pids  # warm: the same workers, none started anew
    name = sks.handle_of(x).name
    assert all(name in names for _, names, _ in second)


@pytest.mark.parametrize("method", METHODS)
def test_worker_death_is_reported_fast_and_pool_replaced(method):
    def dies_on_42(i):
        if i == 42:
            os._exit(3)
        time.sleep(0.002)
        return i

    t0 = time.monotonic()
    with pytest.raises(sks.WorkerDiedError) as info:
        sks.parallel_map(dies_on_42, range(400), processes=2, start_method=method)
    assert time.monotonic() - t0 < 30  # a hang guard: loky notices the death at once
    err = info.value
    assert err.index == 42, str(err)
    assert "3" in err.exitcodes
    # a fresh pool serves the next call
    assert sks.parallel_map(lambda i: i, range(10), processes=2, start_method=method).sum() == 45


SEGFAULT_SCRIPT = """
import faulthandler, os, signal, sys, time, warnings
import shm_kernel_safe as sks

faulthandler.enable()  # as pytest, Spyder's kernels and python -X faulthandler do
# Tiny items on a cold pool would say so on stderr, which must hold the dump only.
warnings.simplefilter("ignore", sks.PerformanceHint)

def dies_on_42(i):
    if i == 42:
        os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(0.002)
    return i

try:
    sks.parallel_map(dies_on_42, range(400), processes=2, start_method=sys.argv[1])
except sks.WorkerDiedError as err:
    print("index", err.index)
    print("message", err)
print("after", sks.parallel_map(abs, range(10), processes=2, start_method=sys.argv[1]).sum())
"""


@pytest.mark.parametrize("method", METHODS)
def test_a_segfaulting_worker_is_reported_and_its_crash_dump_is_all_it_prints(method):
    # In a script of its own, so that the worker's stderr (which its
    # faulthandler writes the crash dump to) is captured and checked here,
    # whichever process started the worker, instead of landing in the log.
    res = run_python(SEGFAULT_SCRIPT, method, timeout=90)
    assert res.returncode == 0, res.stderr
    assert "index 42" in res.stdout and "SIGSEGV" in res.stdout, res.stdout
    assert "after 45" in res.stdout
    assert res.stderr.startswith("Fatal Python error: Segmentation fault"), res.stderr
    assert "dies_on_42" in res.stderr  # the dump names the user's frame
    assert "Traceback" not in res.stderr, res.stderr  # the parent printed nothing


def test_timeout_stops_workers():
    t0 = time.monotonic()
    with pytest.raises(sks.ParallelTimeoutError, match="within 1"):
        sks.parallel_map(lambda i: time.sleep(30), range(8), processes=2, timeout=1)
    assert time.monotonic() - t0 < 4


def test_bad_input_is_refused_before_any_process_starts():
    lock = threading.Lock()

    def uses_lock(i):
        with lock:
            return i

    with pytest.raises(TypeError, match="iterable"):
        sks.parallel_map(hourly, 5)
    with pytest.raises(TypeError, match="callable"):
        sks.parallel_map(3, range(3))
    with pytest.raises(ValueError, match="processes"):
        sks.parallel_map(hourly, range(3), processes=0)
    with pytest.raises(ValueError, match="start_method must be one of"):
        sks.parallel_map(hourly, range(3), start_method="thread")
    with pytest.raises(TypeError, match="closure variable 'lock'"):
        sks.parallel_map(uses_lock, range(3))
    with pytest.raises(ValueError, match="chunksize"):
        sks.parallel_map(hourly, range(3), chunksize=0)
    from shm_kernel_safe.transports.local import pool

    assert pool.pool_info() == []  # nothing was started


def test_no_segment_left_after_failures():
    before = shm_entries()
    with pytest.raises(sks.TaskError):
        sks.parallel_map(lambda i: 1 / 0, range(50), processes=2)
    with pytest.raises(sks.WorkerDiedError):
        sks.parallel_map(lambda i: os._exit(1), range(50), processes=2)
    assert shm_entries() == before


def test_workers_touching_big_shared_arrays_are_not_recycled():
    """loky's leak guard counts shared pages as RSS growth; it must not
    restart our workers (and drop their mappings) for touching ``x``."""
    x = sks.zeros(50_000_000)  # 400 MB, every page touched by the workers
    pool_pids = set(sks.prestart(2))

    def touch(i):
        return os.getpid(), float(x[i::4].sum())

    for _ in range(2):
        out = sks.parallel_map(touch, range(4), processes=2)
        time.sleep(1.1)  # loky checks memory at most once a second
        out += sks.parallel_map(touch, range(4), processes=2)
        assert {pid for pid, _ in out} <= pool_pids


def test_workers_keep_segments_the_parent_still_holds():
    """A call that does not use the shared x must not make workers drop it
    (re-mapping 1.28 GB costs a page fault per 4 KiB on the next call)."""
    x = sks.zeros(300_000)
    held = {"other": np.ones(200_000)}  # auto-shared (cached while it lives), then gone
    name = sks.handle_of(x).name

    def names(i):
        from shm_kernel_safe.memory import arrays as a

        return os.getpid(), tuple(sorted(a.attached_names()))

    from shm_kernel_safe.memory.segments import live_segments

    sks.prestart(2)
    first = sks.parallel_map(lambda i: (names(i), float(x[i]))[0], range(50), processes=2)
    had_x = {pid for pid, n in first if name in n}  # workers that attached x
    assert had_x
    with_other = sks.parallel_map(
        lambda i: (names(i), float(held["other"][i]))[0], range(50), processes=2
    )
    assert all(name in n for pid, n in with_other if pid in had_x)  # kept though unused
    held.clear()  # its cached shared copy goes with it
    gc.collect()
    after = sks.parallel_map(lambda i: names(i), range(50), processes=2)
    assert all(name in n for pid, n in after if pid in had_x)
    live = {r.name for r in live_segments() if not r.unlinked}
    # Beyond live segments, workers map only the current call's own
    # segments; in the call that used `other`, its auto-shared copy too.
    # The next call has dropped it.
    extra_with = min(len(set(n) - live) for _, n in with_other)
    extra_after = max(len(set(n) - live) for _, n in after)
    assert extra_after < extra_with, (with_other[0], after[0], live)


def test_workers_start_in_steady_malloc_state(monkeypatch):
    from shm_kernel_safe import _malloc

    sks.shutdown_pools()
    tuned = sks.parallel_map(
        lambda i: __import__("shm_kernel_safe._malloc")._malloc.TUNED, range(4), processes=2
    )
    assert all(tuned)
    sks.shutdown_pools()
    monkeypatch.setenv("SHM_KERNEL_SAFE_MALLOC_TUNING", "0")
    assert _malloc.tune_malloc() is False  # the opt-out is honoured
