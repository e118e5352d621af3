"""The dask backend on a real LocalCluster: two worker processes on
loopback, the original question's workload scaled down, compared with the
local backend; errors, dead workers, timeouts, interrupts, bad input."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import numpy as np
import psutil
import pytest

import shm_kernel_safe as sks

pytest.importorskip("distributed")

from shm_kernel_safe.errors import DaskBackendError
from shm_kernel_safe.transports.dask import cluster as dask_cluster
from shm_kernel_safe.transports.dask import worker as dask_worker

from .conftest import worker_children
from .helpers import run_python

pytestmark = pytest.mark.timeout(180)

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
    dask_cluster.close_all()
    deadline = time.monotonic() + 10
    while (alive := worker_children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive, f"dask processes left behind: {[p.cmdline() for p in alive]}"


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


def test_worker_killed_mid_run_is_retried_by_dask(client):
    """Dask reruns the chunks of a worker that died on the others; the
    result is complete and right, and the cluster is back to 2 workers."""
    victim = worker_pids(client)[0]

    def cell(nn):
        time.sleep(0.01)
        return nn * nn

    def kill_soon():
        time.sleep(0.8)
        os.kill(victim, signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    out = sks.parallel_map(cell, range(300), backend="dask")
    killer.join()
    assert out.tolist() == [n * n for n in range(300)]
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
    client.wait_for_workers(2, timeout=60)


def test_item_that_kills_every_worker_is_a_clear_error(client):
    def cell(nn):
        if nn == 42:
            os._exit(3)
        time.sleep(0.005)
        return nn

    t0 = time.monotonic()
    with pytest.raises(sks.WorkerDiedError) as info:
        sks.parallel_map(cell, range(200), backend="dask")
    assert time.monotonic() - t0 < 60
    message = str(info.value)
    assert "dask workers died while running" in message
    assert "the cluster replaced them" in message
    assert not info.value.done[42] and info.value.partial is not None
    # next call: a full cluster again, right results
    assert sks.parallel_map(lambda i: -i, range(20), backend="dask").tolist() == [
        -i for i in range(20)
    ]
    assert len(worker_pids(client)) == 2


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


def test_cell_magic_on_dask_in_a_real_kernel():
    """%%shm_parallel --backend dask in ipykernel: our LocalCluster started
    on first use and shown by %shm_status, --out into the same array object,
    --result, errors; --scheduler/--client to a cluster started elsewhere;
    one-line UsageErrors; the kernel shuts down leaving no process."""
    import distributed

    from .kernels import WEATHER_DEFS, evaluate, execute, kernel

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

    from .kernels import WEATHER_DEFS, SpyderFrontend, evaluate, execute, kernel

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
