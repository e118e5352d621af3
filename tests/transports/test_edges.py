"""Nothing lost at the edges, on the local transport: the first item's worker
dies or is stopped, workers SIGKILLed from outside mid-run (one, two at
once), concurrent runs from two threads, nested runs, more workers than
items. Every check compares the run's ledger (``exc.done``, the result's
mask) with what the items themselves wrote, and proves from a side-channel
file that no completed item ran twice."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections import Counter

import numpy as np
import pytest

import shm_kernel_safe as sks
from shm_kernel_safe.transports.local import pool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240), pytest.mark.usefixtures("no_orphans")]

METHODS = ["forkserver", "spawn", "fork"]


def executions(path) -> Counter:
    """How many times each item completed (one line per completed item)."""
    if not os.path.exists(path):
        return Counter()
    with open(path) as f:
        return Counter(int(line) for line in f.read().split())


def recorder(path, rows, *, die_at=None, sleep=0.002, marker=None):
    """An item that writes its index into ``rows`` and appends it to ``path``.

    ``die_at``: the item whose worker ``os._exit``s (once, if ``marker``).
    """

    def item(i):
        if i == die_at and (marker is None or not os.path.exists(marker)):
            if marker is not None:
                open(marker, "w").close()
            os._exit(9)
        time.sleep(sleep)
        rows[i] = i + 1
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{i}\n".encode())
        os.close(fd)
        return i

    return item


# -- case 1: the first item ---------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_first_item_worker_dies_with_errors_continue(method, tmp_path):
    rows = np.zeros(200)
    log = tmp_path / "ran"
    fn = recorder(log, rows, die_at=0, sleep=0)
    with pytest.warns(sks.ItemsFailedWarning, match="1 of 200"):
        out = sks.parallel_map(
            fn, range(200), processes=2, start_method=method, errors="continue", out=[rows]
        )
    assert np.flatnonzero(out.mask).tolist() == [0]
    assert np.array_equal(out.compressed(), np.arange(1, 200))
    assert isinstance(sks.last_errors()[0], sks.WorkerDiedError)
    assert sks.last_errors()[0].index == 0
    ran = executions(log)
    assert set(ran) == set(range(1, 200)) and max(ran.values()) == 1


@pytest.mark.parametrize("method", METHODS)
def test_first_item_worker_dies_once_with_retries(method, tmp_path):
    rows = np.zeros(200)
    log = tmp_path / "ran"
    fn = recorder(log, rows, die_at=0, sleep=0, marker=tmp_path / "died")
    out = sks.parallel_map(fn, range(200), processes=2, start_method=method, retries=1, out=[rows])
    assert np.array_equal(out, np.arange(200))
    assert np.array_equal(rows, np.arange(1, 201))
    ran = executions(log)
    assert set(ran) == set(range(200)) and max(ran.values()) == 1


def test_first_item_timed_out():
    def stuck_first(i):
        if i == 0:
            time.sleep(3600)
        return i

    with pytest.warns(sks.ItemsFailedWarning, match="0 TimeoutError"):
        out = sks.parallel_map(
            stuck_first, range(100), processes=2, errors="continue", item_timeout=1.0
        )
    assert np.flatnonzero(out.mask).tolist() == [0]
    with pytest.raises(sks.TaskError, match="TimeoutError") as info:
        sks.parallel_map(stuck_first, range(100), processes=2, item_timeout=1.0)
    assert info.value.index == 0 and not info.value.done[0]
    assert info.value.partial is not None


def test_first_item_worker_dies_without_recovery_names_it(tmp_path):
    rows = np.zeros(50)
    with pytest.raises(sks.WorkerDiedError) as info:
        sks.parallel_map(
            recorder(tmp_path / "ran", rows, die_at=0), range(50), processes=2, out=[rows]
        )
    assert info.value.index == 0 and not info.value.done.any()


# -- case 2: workers SIGKILLed from outside -----------------------------------------
def kill_workers_when(log, count: int, victims: int, killed: list) -> threading.Thread:
    """SIGKILL ``victims`` of the warm pool's workers once ``count`` items completed."""

    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sum(executions(log).values()) >= count:
                pids = [pid for info in pool.pool_info() for pid in info["pids"]]
                for pid in pids[:victims]:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("victims", [1, 2])
@pytest.mark.parametrize("mode", ["raise", "continue", "retries"])
def test_sigkill_from_outside_keeps_what_completed(mode, victims, tmp_path):
    n = 2000
    rows = sks.zeros(n)
    log = tmp_path / "ran"
    fn = recorder(log, rows, sleep=0.002)
    sks.prestart(processes=2)
    killed: list[int] = []
    watcher = kill_workers_when(log, 300, victims, killed)
    options = {"raise": {}, "continue": {"errors": "continue"}, "retries": {"retries": 2}}[mode]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sks.ItemsFailedWarning)
        try:
            out = sks.parallel_map(fn, range(n), processes=2, out=[rows], **options)
            err = None
        except sks.WorkerDiedError as exc:
            err, out = exc, None
    watcher.join()
    assert len(killed) == victims
    ran = executions(log)
    wrote = rows != 0
    twice = [i for i, c in ran.items() if c > 1]
    # An item killed between its own write and being counted ran, and may run
    # again: at most one per worker, and only where a worker was killed.
    assert len(twice) <= 2, twice
    if mode == "raise":
        assert err is not None
        done = err.done
        assert not (done & ~wrote).any()  # the ledger claims nothing that was not written
        assert (wrote & ~done).sum() <= 2  # killed between write and count
        assert done.sum() >= 300
        assert np.array_equal(err.partial.compressed(), np.flatnonzero(done))
        return
    assert err is None
    if mode == "retries":
        assert np.array_equal(out, np.arange(n)) and wrote.all()
        return
    masked = np.flatnonzero(np.ma.getmaskarray(out)).tolist()
    failed = [e.index for e in sks.last_errors()]
    assert masked == failed and 1 <= len(failed) <= victims
    assert all(isinstance(e, sks.WorkerDiedError) for e in sks.last_errors())
    assert len({str(e) for e in sks.last_errors()}) == len(failed)  # each names its worker
    assert not wrote[failed].any()
    assert wrote.sum() == n - len(failed)


# -- case 3: concurrent runs --------------------------------------------------------
#: Rounds of the two-thread test (SKS_EDGE_ROUNDS=20 for a longer check).
ROUNDS = int(os.environ.get("SKS_EDGE_ROUNDS", "3"))


def two_runs_at_once(log) -> dict[str, object]:
    """A healthy run and a run whose item 120 kills its worker, from two threads."""
    outcome: dict[str, object] = {}

    def healthy():
        try:
            outcome["healthy"] = sks.parallel_map(_slow_square, range(300), processes=2)
        except BaseException as exc:  # reported by the caller
            outcome["healthy"] = exc

    def dying():
        rows = np.zeros(300)
        fn = recorder(log, rows, die_at=120)
        try:
            # (warnings' filters are the process's, not this thread's: the
            # caller ignores the failures' summary around both threads)
            outcome["dying"] = sks.parallel_map(
                fn, range(300), processes=2, errors="continue", out=[rows]
            )
        except BaseException as exc:
            outcome["dying"] = exc

    threads = [threading.Thread(target=healthy), threading.Thread(target=dying)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sks.ItemsFailedWarning)
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    return outcome


def test_a_worker_death_in_one_thread_never_fails_another(tmp_path):
    for r in range(ROUNDS):
        outcome = two_runs_at_once(tmp_path / f"ran{r}")
        assert isinstance(outcome["healthy"], np.ndarray), (r, outcome["healthy"])
        assert np.array_equal(outcome["healthy"], np.arange(300) ** 2)
        dying = outcome["dying"]
        assert isinstance(dying, np.ma.MaskedArray), (r, dying)
        assert np.flatnonzero(dying.mask).tolist() == [120]
        assert max(executions(tmp_path / f"ran{r}").values()) == 1
    assert len([p for p in pool.pool_info() if not p["private"]]) == 1
    assert not [p for p in pool.pool_info() if p["private"]]  # retired with their run


def _slow_square(i):
    time.sleep(0.003)
    return i * i


def _inner(i):
    from shm_kernel_safe.transports.local import mp_helpers

    try:
        return int(sks.parallel_map(abs, range(-i, 1), processes=2).sum())
    finally:
        # The worker's own pool and helpers go now: killed with the outer
        # pool, they would outlive it (and hold the parent's resource
        # tracker open) until orphan handling catches them.
        sks.shutdown_pools()
        mp_helpers.stop_helpers()


def test_nested_runs():
    out = sks.parallel_map(_inner, range(6), processes=2)
    assert out.tolist() == [i * (i + 1) // 2 for i in range(6)]


def test_nested_runs_with_a_concurrent_run():
    results = {}

    def other():
        results["other"] = sks.parallel_map(_slow_square, range(200), processes=2)

    t = threading.Thread(target=other)
    t.start()
    nested = sks.parallel_map(_inner, range(6), processes=2)
    t.join(120)
    assert nested.tolist() == [i * (i + 1) // 2 for i in range(6)]
    assert np.array_equal(results["other"], np.arange(200) ** 2)


# -- #20: one pool per process ------------------------------------------------------
def test_more_workers_than_items_starts_one_per_item():
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="processes=37 is more than"):
        out = sks.parallel_map(abs, range(5), processes=37)
    assert out.tolist() == list(range(5))
    assert time.monotonic() - t0 < 60  # a hang guard, not a timing claim
    (info,) = pool.pool_info()
    assert info["processes"] <= 5 and len(info["pids"]) <= 5


def test_one_pool_per_process_resized_on_demand():
    sks.parallel_map(abs, range(100), processes=2)
    sks.parallel_map(abs, range(100), processes=1)
    (info,) = pool.pool_info()
    assert info["processes"] == 1 and len(info["pids"]) == 1  # the idle extra retired
    sks.parallel_map(abs, range(100), processes=2, start_method="spawn")
    (info,) = pool.pool_info()  # replaced, not added
    assert info["start_method"] == "spawn" and len(info["pids"]) <= 2


# -- build item 8: no run can hang --------------------------------------------------
def _hang_forever():
    time.sleep(3600)


class _HangsWhenLoaded:
    """Unpickling this (in a worker, with the call's payload) never returns."""

    def __reduce__(self):
        return (_hang_forever, ())


def test_a_pool_that_runs_nothing_ends_the_run_with_a_named_cause(monkeypatch):
    from shm_kernel_safe.transports.local import transport

    monkeypatch.setattr(transport, "STALL_SECONDS", 3.0)
    blocker = _HangsWhenLoaded()

    def fn(i):
        return i if blocker else -1

    t0 = time.monotonic()
    with pytest.raises(sks.WorkerDiedError, match="no worker ran any of the queued chunks") as info:
        sks.parallel_map(fn, range(50), processes=2, start_method="fork")
    assert time.monotonic() - t0 < 60  # a hang guard
    assert info.value.done is not None and not info.value.done.any()
