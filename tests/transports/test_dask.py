"""The dask backend on a real LocalCluster: two worker processes on
loopback, the original question's workload scaled down, compared with the
local backend; errors, dead workers, timeouts, interrupts, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import sys
import threading
import time
import warnings

import numpy as np
import psutil
import pytest

import shm_kernel_safe as sks

pytest.importorskip("distributed")

from shm_kernel_safe.errors import DaskBackendError
from shm_kernel_safe.transports.dask import cluster as dask_cluster
from shm_kernel_safe.transports.dask import worker as dask_worker

from ..helpers import cluster_sems, loky_sems, run_python, settle, worker_children

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

HOURS = 240
X = np.random.default_rng(7).standard_normal((HOURS * 50, 64))  # 6.1 MB: scattered
W = np.linspace(0.0, 1.0, 64)  # 512 B: pickled inline


def hourly_calc(x: np.ndarray, nn: int) -> float:
    return float((x[nn * 50 : (nn + 1) * 50] @ W).sum())


@pytest.fixture(scope="module")
def client():
    """Our own loopback LocalCluster, 2 worker processes; all gone afterwards."""
    c = dask_cluster.get_client(None, processes=2)
    assert dask_cluster.is_local(c)
    yield c
    held = cluster_sems()
    dask_cluster.close_all()
    deadline = time.monotonic() + 10
    while (alive := worker_children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"dask processes left behind: {[p.cmdline() for p in alive]}"
    left = settle(lambda: loky_sems() & held)
    assert not left, f"our dask cluster's semaphores outlived it: {sorted(left)}"


def back_to_two(client) -> None:
    """Wait until both workers of our cluster are up: a killed worker is
    restarting (slowly on a loaded machine, when dask may give up on its
    nanny: ``restore_local_workers``)."""
    dask_cluster.wait_for_local_workers(client, 2, timeout=150)


@pytest.fixture
def two_workers(client):
    """Both workers of our cluster up before a test kills one."""
    back_to_two(client)


def worker_pids(client) -> list[int]:
    return sorted(client.run(os.getpid).values())


def test_weather_workload_matches_local_backend(client):
    x = X
    y_dask = np.zeros(HOURS)
    y_local = np.zeros(HOURS)

    def cell_dask(nn):
        y_dask[nn] = hourly_calc(x, nn)
        return nn * 2

    def cell_local(nn):
        y_local[nn] = hourly_calc(x, nn)
        return nn * 2

    r_dask = sks.parallel_map(cell_dask, range(HOURS), backend="dask", out=[y_dask])
    r_local = sks.parallel_map(cell_local, range(HOURS), processes=2, out=[y_local])
    expected = np.array([hourly_calc(X, n) for n in range(HOURS)])
    np.testing.assert_array_equal(y_dask, expected)
    np.testing.assert_array_equal(y_dask, y_local)
    assert r_dask.dtype == r_local.dtype and np.array_equal(r_dask, r_local)
    sks.shutdown_pools()


def test_result_types_match_local_backend(client):
    cases = [
        (lambda i: i * 1.5, range(50)),  # floats -> float64 array
        (lambda i: np.full(3, i, dtype=np.int32), range(40)),  # stacked int32 rows
        (lambda i: [i] * (i % 3), range(30)),  # ragged -> list
        (lambda s: s.upper(), ["a", "b", "c"]),  # any items
    ]
    for fn, items in cases:
        got = sks.parallel_map(fn, items, backend="dask")
        want = sks.parallel_map(fn, items, processes=2)
        assert type(got) is type(want)
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and np.array_equal(got, want)
        else:
            assert got == want
    sks.shutdown_pools()


def test_big_array_reaches_each_worker_once_read_only(client):
    x = X

    def probe(nn):
        time.sleep(0.002)
        return os.getpid(), x.__array_interface__["data"][0], bool(x.flags.writeable)

    def transfers(dask_worker):
        return dask_worker.state.transfer_incoming_count_total

    before = client.run(transfers)
    out = sks.parallel_map(probe, range(HOURS), backend="dask")
    after = client.run(transfers)
    by_pid: dict[int, set[int]] = {}
    for pid, address, writable in out:
        assert writable is False
        by_pid.setdefault(pid, set()).add(address)
    assert set(by_pid) == set(worker_pids(client))  # both workers ran chunks
    assert all(len(addresses) == 1 for addresses in by_pid.values())  # one copy each
    assert after == before  # no worker fetched the data from another: the broadcast did it


def keys_on_cluster(client) -> set:
    """Keys held by any worker."""
    return {k for keys in client.has_what().values() for k in keys}


def test_unchanged_array_is_not_sent_again_and_a_changed_one_is(client):
    """Big inputs stay on the cluster between calls, named by content: the
    next call with the same x sends nothing but the payload; after an
    in-place change, x is sent again and the results see the change."""
    import gc

    from shm_kernel_safe.engine.pickling import DEFAULT_THRESHOLD
    from shm_kernel_safe.engine.run import Run
    from shm_kernel_safe.engine.transport import Inputs
    from shm_kernel_safe.transports.dask.kept import kept_arrays
    from shm_kernel_safe.transports.dask.transport import DaskTransport

    x = X + 1.0  # content no earlier test sent

    def run() -> tuple[np.ndarray, int]:
        transport = DaskTransport()
        run = Run(
            lambda nn: hourly_calc(x, nn),
            range(HOURS),
            transport,
            inputs=Inputs(DEFAULT_THRESHOLD),
        )
        try:
            return run.execute(), transport.sent_bytes
        finally:
            transport.release()

    n0, bytes0 = kept_arrays.summary(client)  # X, kept by earlier tests: it is alive
    inputs_before = keys_on_cluster(client)
    first, sent = run()
    assert sent >= x.nbytes
    again, sent = run()
    assert sent < 100_000 and np.array_equal(again, first)  # the payload only
    assert kept_arrays.summary(client) == (n0 + 1, bytes0 + x.nbytes)
    x[1234, 5] += 1.0  # in place: same object, same id, same address
    changed, sent = run()
    assert sent >= x.nbytes
    expected = np.array([hourly_calc(x, n) for n in range(HOURS)])
    assert np.array_equal(changed, expected) and not np.array_equal(changed, first)
    assert kept_arrays.summary(client) == (n0 + 1, bytes0 + x.nbytes)  # stale one replaced

    held = {k for k in keys_on_cluster(client) if "-in" in str(k)} - inputs_before
    assert held  # x, on the workers
    x = None  # the kernel lets go of x: the cluster copy goes too
    gc.collect()
    assert kept_arrays.summary(client) == (n0, bytes0)
    deadline = time.monotonic() + 5
    while held & keys_on_cluster(client) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not held & keys_on_cluster(client)


def test_task_error_names_item_and_remote_traceback(client):
    def cell(nn):
        if nn == 42:
            raise KeyError(f"hour {nn}")
        return nn

    with pytest.raises(sks.TaskError) as info:
        sks.parallel_map(cell, range(200), backend="dask")
    err = info.value
    assert err.index == 42 and err.exc_type == "KeyError"
    assert 'raise KeyError(f"hour {nn}")' in err.remote_traceback
    assert isinstance(err.__cause__, KeyError)
    # the cluster is fine afterwards
    assert sks.parallel_map(lambda i: i + 1, range(10), backend="dask").tolist() == list(
        range(1, 11)
    )


def records_of(pids) -> list[str]:
    """Record files (``worker.Record``) of the given worker pids."""
    directory = dask_worker.records_dir()
    names = os.listdir(directory) if os.path.isdir(directory) else []
    names = [n for n in names if not n.endswith(dask_worker.VALUES)]
    return [n for n in names if int(n.rsplit("-", 1)[1]) in set(pids)]


def kill_inside_an_item(pid: int, after: int = 20) -> None:
    """SIGKILL worker ``pid`` once its record shows it inside an item past
    ``after`` (as the OOM killer would), not between two chunks, nor in the
    probe (item 0, the engine's case)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for name in records_of([pid]):
            with contextlib.suppress(OSError, struct.error):
                with open(os.path.join(dask_worker.records_dir(), name), "rb") as f:
                    item, _ = struct.unpack("<qd", f.read(16))
                if item >= after:
                    os.kill(pid, signal.SIGKILL)
                    return
        time.sleep(0.02)
    raise AssertionError(f"worker {pid} never ran an item")


def squares(nn):
    time.sleep(0.01)
    return nn * nn


@pytest.mark.parametrize("mode", ["retries", "continue", "raise"])
def test_worker_killed_from_outside_mid_item(client, two_workers, mode):
    """A worker SIGKILLed inside an item: retries=1 runs that item again
    (full results), errors="continue" masks exactly that item, errors="raise"
    names it; whatever completed elsewhere is kept and right."""
    pids = worker_pids(client)
    victim = pids[0]
    options = {"retries": {"retries": 1}, "continue": {"errors": "continue"}, "raise": {}}[mode]
    killer = threading.Thread(target=kill_inside_an_item, args=(victim,))
    killer.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = sks.parallel_map(squares, range(400), backend="dask", **options)
    except sks.WorkerDiedError as exc:
        assert mode == "raise"
        err = exc
    else:
        assert mode != "raise", "the kill went unnoticed"
    killer.join()
    if mode == "retries":
        assert isinstance(out, np.ndarray) and out.tolist() == [n * n for n in range(400)]
        assert not caught
    elif mode == "continue":
        errors = sks.last_errors()
        assert len(errors) == 1 and isinstance(errors[0], sks.WorkerDiedError)
        assert np.flatnonzero(out.mask).tolist() == [errors[0].index]
        assert out.compressed().tolist() == [n * n for n in range(400) if n != errors[0].index]
    else:
        assert err.index is not None and not err.done[err.index]
        assert f"died while running item {err.index}" in str(err)
        assert 0 < err.done.sum() < 400
        assert all(err.partial[i] == i * i for i in np.flatnonzero(err.done))
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
    back_to_two(client)
    assert not records_of(pids)  # the dead worker's record went with the run


def test_item_that_kills_its_worker_is_a_clear_error(client, two_workers):
    def cell(nn):
        if nn == 42:
            os._exit(3)
        time.sleep(0.005)
        return nn

    t0 = time.monotonic()
    with pytest.raises(sks.WorkerDiedError) as info:
        sks.parallel_map(cell, range(200), backend="dask")
    assert time.monotonic() - t0 < 60
    err = info.value
    assert err.index == 42
    assert str(err).startswith("a dask worker died while running item 42 (42)")
    assert not err.done[42] and err.done.any()
    assert all(err.partial[i] == i for i in np.flatnonzero(err.done))
    # next call: a full cluster again, right results
    assert sks.parallel_map(lambda i: -i, range(20), backend="dask").tolist() == [
        -i for i in range(20)
    ]
    assert len(worker_pids(client)) == 2


def test_keep_going_masks_exactly_the_item_that_kills_its_worker(client, two_workers):
    """errors="continue": the dying item is masked, every other result is
    right, items that raise are masked too; twice in one run."""

    def cell(i):
        if i in (17, 612):
            raise KeyError(f"hour {i}")
        if i in (301, 777):
            os._exit(7)
        return float(i)

    with pytest.warns(sks.ItemsFailedWarning, match="4 of 1000 items failed"):
        out = sks.parallel_map(cell, range(1000), backend="dask", errors="continue")
    bad = [17, 301, 612, 777]
    assert np.flatnonzero(out.mask).tolist() == bad
    assert out.compressed().tolist() == [float(i) for i in range(1000) if i not in bad]
    errors = sks.last_errors()
    assert [e.index for e in errors] == bad
    assert [type(e).__name__ for e in errors] == [
        "TaskError",
        "WorkerDiedError",
        "TaskError",
        "WorkerDiedError",
    ]


def ran_log(path):
    """An item function that appends its item to ``path`` (a side channel
    that survives workers) and kills its worker at item 500 the first time."""
    flag = path + ".died"

    def cell(i):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, f"{i}\n".encode())
        os.close(fd)
        if i == 500 and not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(3)
        time.sleep(0.002)
        return i * 3

    return cell


def ran_counts(path, n):
    with open(path) as f:
        return np.bincount([int(line) for line in f], minlength=n)


@pytest.mark.parametrize("mode", ["retries", "continue", "raise"])
def test_items_completed_before_a_death_do_not_run_again(client, two_workers, tmp_path, mode):
    """The dying worker's own chunk kept what it completed before the fatal
    item (its results were appended on the worker's host): with retries=1
    only the fatal item runs twice; with errors="continue" every item runs
    once; errors="raise" reports as done only items that ran, with right
    results."""
    path = str(tmp_path / "ran")
    options = {"retries": {"retries": 1}, "continue": {"errors": "continue"}, "raise": {}}[mode]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sks.ItemsFailedWarning)  # errors="continue"
            out = sks.parallel_map(ran_log(path), range(1000), backend="dask", **options)
    except sks.WorkerDiedError as exc:
        assert mode == "raise" and exc.index == 500
        ran = ran_counts(path, 1000)
        assert not exc.done[500] and exc.done.sum() > 0
        assert (ran[exc.done] == 1).all()
        assert all(exc.partial[i] == 3 * i for i in np.flatnonzero(exc.done))
        return
    assert mode != "raise"
    ran = ran_counts(path, 1000)
    expected_runs = np.ones(1000, dtype=int)
    if mode == "retries":
        expected_runs[500] = 2
        assert out.tolist() == [3 * i for i in range(1000)]
    else:
        assert np.flatnonzero(out.mask).tolist() == [500]
    assert ran.tolist() == expected_runs.tolist()


def test_item_timeout_stops_one_item_on_our_cluster(client, two_workers):
    """item_timeout=: the worker running an overdue item is killed (its nanny
    starts a fresh one) and the item fails with TimeoutError."""

    def stuck_at_40(i):
        if i == 40:
            time.sleep(3600)
        time.sleep(0.002)
        return i

    t0 = time.monotonic()
    with pytest.warns(sks.ItemsFailedWarning, match="40 TimeoutError"):
        out = sks.parallel_map(
            stuck_at_40, range(300), backend="dask", errors="continue", item_timeout=1.0
        )
    assert time.monotonic() - t0 < 60
    assert np.flatnonzero(out.mask).tolist() == [40]
    assert out.compressed().tolist() == [i for i in range(300) if i != 40]
    with pytest.raises(sks.TaskError, match="TimeoutError") as info:
        sks.parallel_map(stuck_at_40, range(300), backend="dask", item_timeout=1.0)
    assert info.value.index == 40
    back_to_two(client)
    assert sks.parallel_map(lambda i: i, range(10), backend="dask").sum() == 45


def test_a_cluster_given_to_us_keeps_going_past_an_item_that_kills_workers(client):
    """A cluster we did not start keeps dask's own retries (allowed-failures
    3): the fatal chunk kills each worker in turn and every copy of the
    scattered x with them; the run scatters x again, names the item from
    the records its nannies read, and masks exactly that item."""
    import distributed

    x = np.arange(300_000.0)  # 2.4 MB: scattered, not pickled

    def cell(i):
        if i == 301:
            os._exit(7)
        time.sleep(0.001)
        return float(x[i] * 2)

    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as other,
        distributed.Client(other, set_as_default=False) as theirs,
    ):
        with pytest.warns(sks.ItemsFailedWarning, match="301 WorkerDiedError"):
            out = sks.parallel_map(
                cell, range(1000), backend="dask", client=theirs, errors="continue"
            )
        assert np.flatnonzero(out.mask).tolist() == [301]
        assert out.compressed().tolist() == [2.0 * i for i in range(1000) if i != 301]


def test_item_timeout_is_refused_on_a_cluster_given_to_us(client):
    """A cluster we did not start is never touched: no worker of it is
    killed for an item, so item_timeout= is refused."""
    with pytest.raises(ValueError, match="item_timeout is not supported by backend='dask'"):
        sks.parallel_map(abs, range(3), backend="dask", client=client, item_timeout=1.0)


def test_timeout_stops_stuck_workers_of_our_cluster(client):
    pids_before = worker_pids(client)

    def cell(nn):
        time.sleep(60 if nn == 5 else 0.01)
        return nn

    t0 = time.monotonic()
    with pytest.raises(sks.ParallelTimeoutError):
        sks.parallel_map(cell, range(10), backend="dask", timeout=1)
    assert time.monotonic() - t0 < 3  # 1 s + the 0.5 s grace + killing
    t0 = time.monotonic()
    assert sks.parallel_map(lambda i: i, range(10), backend="dask").tolist() == list(range(10))
    assert time.monotonic() - t0 < 30
    back_to_two(client)  # its replacement may still be starting
    after = worker_pids(client)
    assert len(after) == 2 and after != pids_before  # the stuck one was replaced


def test_progress_reaches_total_with_intermediate_reports(client):
    seen: list[tuple[int, int]] = []

    def cell(nn):
        time.sleep(0.01)
        return nn

    sks.parallel_map(cell, range(200), backend="dask", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (200, 200)
    assert any(0 < d < 200 for d, _ in seen)  # live, from the workers' reports
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_text_progress_bar(client, capsys):
    sks.parallel_map(lambda i: time.sleep(0.01), range(300), backend="dask", progress="text")
    text = capsys.readouterr().out  # the bar shows after 0.5 s, redrawn in place
    assert "300/300" in text and text.endswith("done\n")


def test_writes_to_outputs_come_back_exactly(client):
    """Byte-exact changes, NaN and -0.0 included; untouched elements stay."""
    y = np.full(100, 7.0)

    def cell(nn):
        if nn % 10 == 0:
            y[nn] = np.nan
        elif nn % 10 == 1:
            y[nn] = -0.0
        elif nn % 10 == 2:
            pass  # untouched
        else:
            y[nn] = nn

    sks.parallel_map(cell, range(100), backend="dask", out=[y])
    for nn in range(100):
        if nn % 10 == 0:
            assert np.isnan(y[nn])
        elif nn % 10 == 1:
            assert y[nn] == 0 and np.signbit(y[nn])
        elif nn % 10 == 2:
            assert y[nn] == 7.0
        else:
            assert y[nn] == nn


def test_completed_writes_land_when_a_task_fails(client):
    y = np.zeros(50)

    def cell(nn):
        y[nn] = 1.0
        if nn == 30:
            raise ValueError("no")

    with pytest.raises(sks.TaskError) as info:
        sks.parallel_map(cell, range(50), backend="dask", out=[y])
    done = info.value.done
    assert done.any() and not done[30]
    assert np.all(y[done] == 1.0)  # every write of every completed item landed


def test_changed_elements_is_byte_exact():
    original = np.array([0.0, np.nan, 1.0, 2.0])
    mine = original.copy()
    mine[0] = -0.0
    mine[1] = np.nan  # same bytes: not a change
    mine[3] = 5.0
    index, values = dask_worker.changed_elements(mine, original)
    assert index.tolist() == [0, 3] and values[1] == 5.0 and np.signbit(values[0])


def test_connects_to_a_running_scheduler_by_address(client):
    """--scheduler ADDRESS: a cluster we did not start; reused, never restarted."""
    import distributed

    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as other:
        address = other.scheduler_address
        assert address.startswith("tcp://")  # left as its owner configured it: no TLS
        got = sks.parallel_map(lambda i: i * 3, range(30), backend="dask", client=address)
        assert got.tolist() == [i * 3 for i in range(30)]
        first = dask_cluster.get_client(other.scheduler_address)
        assert dask_cluster.get_client(other.scheduler_address) is first  # reused
        assert not dask_cluster.is_local(first)
        assert any(f"scheduler {address}" in line for line in dask_cluster.status_lines())
        with distributed.Client(other, set_as_default=False) as mine:
            got = sks.parallel_map(lambda i: i + 0.5, range(10), backend="dask", client=mine)
            assert got.tolist() == [i + 0.5 for i in range(10)]
        first.close()


def test_unreachable_scheduler_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(dask_cluster, "CONNECT_TIMEOUT", 2.0)
    t0 = time.monotonic()
    with pytest.raises(DaskBackendError) as info:
        sks.parallel_map(abs, range(3), backend="dask", client="tcp://127.0.0.1:9")
    assert time.monotonic() - t0 < 10
    message = str(info.value)
    assert "\n" not in message and "tcp://127.0.0.1:9" in message and "scheduler" in message


def test_missing_distributed_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails as if absent
    with pytest.raises(DaskBackendError) as info:
        sks.parallel_map(abs, range(3), backend="dask")
    assert "pip install 'shm_kernel_safe[dask]'" in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_backend_arguments_are_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        sks.parallel_map(abs, range(3), backend="ray")
    with pytest.raises(ValueError, match="client= is for backend='dask'"):
        sks.parallel_map(abs, range(3), client="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="start_method= is for the local backend"):
        sks.parallel_map(abs, range(3), backend="dask", start_method="spawn")
    with pytest.raises(ValueError, match="processes= sizes the local dask cluster"):
        sks.parallel_map(abs, range(3), backend="dask", client="tcp://x:1", processes=2)
    with pytest.raises(TypeError, match="client must be"):
        sks.parallel_map(abs, range(3), backend="dask", client=42)
    with pytest.raises(TypeError, match="out\\[0\\] is a list"):
        sks.parallel_map(abs, range(3), backend="dask", out=[[1, 2]])


def test_interrupt_stops_a_dask_run_in_a_script():
    """Ctrl-C during a dask call in a script without a main guard: the call
    raises KeyboardInterrupt within a second, the next call works, and the
    interpreter exits leaving no process behind."""
    code = """
import os, signal, threading, time
import shm_kernel_safe as sks

signal.signal(signal.SIGINT, signal.default_int_handler)  # whoever started us

def cell(nn):
    time.sleep(0.05)
    return nn

print(sks.parallel_map(cell, range(4), backend="dask", processes=2).tolist(), flush=True)
threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    sks.parallel_map(cell, range(400), backend="dask", processes=2)
except KeyboardInterrupt:
    print("interrupted after", round(time.monotonic() - t0 - 1.0, 2), flush=True)
print(sks.parallel_map(cell, range(6), backend="dask", processes=2).tolist(), flush=True)
from shm_kernel_safe.transports.dask import cluster as dask_cluster
print("pids", *dask_cluster._local["client"].run(os.getpid).values(), flush=True)
"""
    proc = run_python(code, timeout=120, sigint_ignored=True)  # as CI may start it
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "[0, 1, 2, 3]" and lines[-2] == "[0, 1, 2, 3, 4, 5]", proc.stdout
    pids = [int(p) for p in lines[-1].split()[1:]]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(psutil.pid_exists(p) for p in pids), "dask workers outlived the script"
    late = float(lines[1].split()[-1])
    assert late < 1.0, proc.stdout
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr


INTERRUPTS = r"""
import json, os, signal, sys, threading, time
import numpy as np
import shm_kernel_safe as sks
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIG_IGN

def slow(i):
    time.sleep(0.02)
    return i * 2

def interrupt_after(seconds):
    timer = threading.Timer(seconds, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    return timer

# the first while our cluster starts, the others at random points of warm runs
rng = np.random.default_rng(int(sys.argv[1]))
for delay in [0.3, *rng.uniform(0.05, 1.5, 5)]:
    interrupt_after(delay)
    try:
        sks.parallel_map(slow, range(300), backend="dask", processes=2)
        outcome = {"outcome": "finished"}
    except KeyboardInterrupt as exc:
        ok = hasattr(exc, "done") and all(
            exc.partial[i] == 2 * i for i in np.flatnonzero(exc.done))
        outcome = {"outcome": type(exc).__name__, "consistent": bool(ok),
                   "done": int(exc.done.sum()) if hasattr(exc, "done") else None}
        if ok:
            rest = sks.parallel_map(slow, range(300), backend="dask", resume=exc)
            outcome["complete"] = rest.tolist() == [2 * i for i in range(300)]
    time.sleep(0.2)  # a late SIGINT of a finished run lands here, not in the next run
    print(json.dumps(outcome), flush=True)
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_interrupt_of_a_dask_run_carries_what_completed(seed):
    """Ctrl-C while our cluster starts, or anywhere in a warm run: always a
    ParallelInterrupt with done/partial, and resume= completes the run."""
    proc = run_python(INTERRUPTS, str(seed), timeout=150, sigint_ignored=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(outcomes) == 6, proc.stdout
    assert outcomes[0]["outcome"] == "ParallelInterrupt" and outcomes[0]["done"] == 0
    for res in outcomes:
        if res["outcome"] != "finished":  # a delay past the run's end
            assert res["outcome"] == "ParallelInterrupt", res
            assert res["consistent"] and res["complete"], res
    assert sum(res["outcome"] == "ParallelInterrupt" for res in outcomes) >= 4, outcomes


def test_cell_magic_on_dask_in_a_real_kernel():
    """%%shm_parallel --backend dask in ipykernel: our LocalCluster started
    on first use and shown by %shm_status, --out into the same array object,
    --result, errors; --scheduler/--client to a cluster started elsewhere;
    one-line UsageErrors; the kernel shuts down leaving no process."""
    import distributed

    from ..kernels import WEATHER_DEFS, evaluate, execute, kernel

    with (
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as other,
        kernel("ipykernel") as (km, kc),
    ):
        execute(kc, "%load_ext shm_kernel_safe")
        execute(kc, WEATHER_DEFS)
        res = execute(
            kc,
            "%%shm_parallel nn in range(500) --out y -r r --backend dask -n 2 --progress none\n"
            "y[nn] = hourly_calc(x, nn)\nnn * 2\n",
        )
        assert res["status"] == "ok", res
        check = (
            "bool(id(y) == y_id and np.allclose(y, [hourly_calc(x, n) for n in range(500)])"
            " and r.tolist() == [2 * n for n in range(500)])"
        )
        assert evaluate(kc, check) == "True"
        status = execute(kc, "%shm_status")["stdout"]
        assert "Dask clusters: 1" in status and "local cluster at tls://127.0.0.1:" in status
        assert "2 workers" in status

        res = execute(
            kc,
            "%%shm_parallel nn in range(100) --backend dask\n"
            "if nn == 42:\n    raise KeyError(nn)\n",
        )
        assert res["status"] == "error" and res["error"]["ename"] == "TaskError"
        text = "\n".join(res["error"]["traceback"])
        assert "item 42" in text and "raise KeyError(nn)" in text

        address = other.scheduler_address
        res = execute(
            kc,
            f"%%shm_parallel nn in range(50) --backend dask --scheduler {address} -r s\nnn + 0.5\n",
        )
        assert res["status"] == "ok", res
        assert evaluate(kc, "s.tolist() == [n + 0.5 for n in range(50)]") == "True"
        execute(kc, f"from distributed import Client\nc = Client({address!r})")
        res = execute(kc, "%%shm_parallel nn in range(20) --backend dask --client c -r t\nnn\n")
        assert res["status"] == "ok", res
        assert evaluate(kc, "t.tolist() == list(range(20))") == "True"
        execute(kc, "c.close()")

        execute(kc, "from shm_kernel_safe.transports.dask import cluster as dask_cluster")
        execute(kc, "dask_cluster.CONNECT_TIMEOUT = 2")
        bad = {
            "--scheduler tcp://127.0.0.1:9": "cannot reach the dask scheduler",
            "--backend dask --scheduler tcp://127.0.0.1:9": "cannot reach the dask scheduler",
            "--backend dask --client nope": "no variable named 'nope'",
            "--backend dask --client y": "not a distributed.Client",
            "--backend dask --start-method spawn": "--start-method is for the local backend",
            "--backend dask --scheduler a --client c": "not both",
        }
        for options, expected in bad.items():
            res = execute(kc, f"%%shm_parallel nn in range(3) {options}\nnn\n")
            assert res["status"] == "error", options
            if options.startswith("--scheduler"):
                expected = "--scheduler/--client is for --backend dask"
            assert f"UsageError: {expected}" in res["stderr"] or expected in res["stderr"], (
                options,
                res["stderr"],
            )
            assert "Traceback" not in res["stderr"], res["stderr"]
        assert km.is_alive()

        # %unload_ext stops our cluster now, not at kernel shutdown
        pids = json.loads(
            evaluate(
                kc,
                "__import__('json').dumps(list(dask_cluster._local['client']"
                ".run(__import__('os').getpid).values()))",
            ).strip("'")
        )
        assert len(pids) == 2
        execute(kc, "%unload_ext shm_kernel_safe")
        assert evaluate(kc, "len(dask_cluster._local)") == "0"
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(psutil.pid_exists(p) for p in pids)


def test_cell_magic_on_dask_in_a_spyder_console():
    """The same cell in a real spyder-kernels console: the Variable Explorer
    then shows and opens the --out array; the console's shutdown closes
    our cluster (the harness checks no process outlives the kernel)."""
    import cloudpickle

    from ..kernels import WEATHER_DEFS, SpyderFrontend, evaluate, execute, kernel

    with kernel("spyder") as (km, kc):
        spyder = SpyderFrontend(kc)
        spyder.configure_view(minmax=True)
        execute(kc, "%load_ext shm_kernel_safe")
        execute(kc, WEATHER_DEFS)
        res = execute(
            kc,
            "%%shm_parallel nn in range(500) --out y --backend dask -n 2\n"
            "y[nn] = hourly_calc(x, nn)\n",
        )
        assert res["status"] == "ok", res
        assert "500/500" in res["stdout"] or res["stdout"] == ""  # text bar, if it showed
        assert evaluate(kc, "bool(id(y) == y_id and y.any())") == "True"
        view = spyder.call("get_namespace_view")
        assert "Min" in view["y"]["view"]
        y = cloudpickle.loads(spyder.call("get_value", "y", encoded=True))
        expected = evaluate(kc, "repr(float(sum(hourly_calc(x, n) for n in range(500))))")
        assert abs(float(y.sum()) - float(expected.strip("'"))) < 1e-6
        assert "local cluster at tls://127.0.0.1:" in execute(kc, "%shm_status")["stdout"]
        assert km.is_alive()
