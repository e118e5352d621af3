"""No orphans, ever: a pool's processes die with its owner, however it dies.

Real processes, killed from outside with SIGKILL (what the OOM killer does):
a script killed mid-run, and the workers of a run whose items run a nested
``parallel_map`` killed mid-run. Afterwards, within a few seconds, none of
the processes the owner had started (workers, forkserver, resource
trackers, the nested pools) is alive; no item started later than one second
after the kill (each item appends a line to a side-channel file); and once
the janitor has run, /dev/shm holds nothing of theirs (segments and named
semaphores)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from shm_kernel_safe.memory.janitor import cleanup_stale

from ..helpers import SHM_DIR, shm_entries

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SCRIPT = r"""
import os, sys, time
import numpy as np
import shm_kernel_safe as sks

side, method, nested = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
big = np.ones((40_000, 16))  # 5 MB: reaches the workers in a shared segment

def item(i):
    with open(side, "a") as fh:
        fh.write(f"{time.time()} {os.getpid()} {i}\n")
    time.sleep(0.005)
    return float(big[i % 40_000].sum())

def outer(i):
    with open(side + ".outer", "a") as fh:
        fh.write(f"{os.getpid()}\n")
    inner = sks.parallel_map(item, range(20_000), processes=2, start_method=method)
    return float(inner.sum())

if nested:
    sks.parallel_map(outer, range(2), processes=2, start_method=method)
else:
    sks.parallel_map(item, range(1_000_000), processes=2, start_method=method)
"""

#: Seconds allowed for every process of a dead owner to be gone.
GONE_WITHIN = 10.0


def _semaphores() -> set[str]:
    return {e for e in os.listdir(SHM_DIR) if e.startswith("sem.")}


def _lines(path: str) -> list[str]:
    with open(path) as fh:
        return [line for line in fh.read().splitlines() if line.strip()]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            pass
    return out


def _run_and_kill(tmp_path, method: str, nested: bool) -> None:
    before_shm, before_sems = shm_entries(), _semaphores()
    side = str(tmp_path / "items.txt")
    script = tmp_path / "owner.py"
    script.write_text(SCRIPT)
    open(side, "w").close()
    open(side + ".outer", "w").close()
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script), side, method, "1" if nested else "0"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=str(tmp_path),
        )
    tree: list[psutil.Process] = []
    try:
        expected = 2 if nested else 0
        _wait_for(
            lambda: len(_lines(side)) >= 200 and len(_lines(side + ".outer")) >= expected,
            90,
            "the run never got going",
        )
        tree = psutil.Process(proc.pid).children(recursive=True)
        if nested:
            victims = [int(pid) for pid in _lines(side + ".outer")]
            assert len(tree) > 4  # the outer pool, and a pool in each outer worker
        else:
            victims = [proc.pid]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        proc.wait(timeout=60)  # nested: the owner's run fails, and it exits
        deadline = time.monotonic() + GONE_WITHIN
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [(p.pid, " ".join(p.cmdline())[:120]) for p in _alive(tree)]
        assert not survivors, f"processes outlived their owner: {survivors}"
        late = [line for line in _lines(side) if float(line.split()[0]) > killed_at + 1.0]
        assert not late, f"{len(late)} items started more than 1 s after the kill: {late[:3]}"
    finally:
        for p in _alive([psutil.Process(proc.pid), *tree] if proc.poll() is None else tree):
            p.kill()
        proc.wait(timeout=30)
    cleanup_stale()  # what %shm_cleanup / python -m shm_kernel_safe cleanup do
    assert shm_entries() <= before_shm
    assert _semaphores() <= before_sems, sorted(_semaphores() - before_sems)


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_owner_killed_mid_run_leaves_no_process_and_runs_no_more_items(method, tmp_path):
    _run_and_kill(tmp_path, method, nested=False)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_outer_workers_killed_during_nested_runs_leave_no_orphans(method, tmp_path):
    _run_and_kill(tmp_path, method, nested=True)


OWNER = r"""
import os, subprocess, sys, time
watched = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), sys.argv[2]])
print(watched.pid, flush=True)
time.sleep(600)
"""

WATCHED = r"""
import os, sys, time
from shm_kernel_safe.transports.local import parent_watch
if sys.argv[2] == "poll":
    del os.pidfd_open  # a platform without pidfds
parent_watch.watch_owner(int(sys.argv[1]))
print("watching", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["pidfd", "poll"])
def test_watch_owner_ends_the_process_when_its_owner_is_killed(how):
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, WATCHED, how], stdout=subprocess.PIPE, text=True
    )
    try:
        watched = psutil.Process(int(owner.stdout.readline()))
        assert owner.stdout.readline().strip() == "watching"
        time.sleep(0.5)
        assert _alive([watched])  # its owner lives: it stays
        owner.kill()
        owner.wait(10)
        deadline = time.monotonic() + GONE_WITHIN
        while _alive([watched]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive([watched])
    finally:
        owner.kill()
        owner.wait(10)
        owner.stdout.close()


KERNEL_CELL = (
    "%%shm_parallel nn in range(1_000_000) -n 2 --start-method {method} --progress none\n"
    "with open({side!r}, 'a') as fh:\n"
    "    fh.write(f'{{time.time()}} {{os.getpid()}} {{nn}}\\n')\n"
    "time.sleep(0.005)\n"
    "float(x[nn % 40_000].sum())\n"
)


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_kernel_killed_mid_cell_leaves_no_process_and_runs_no_more_items(method, tmp_path):
    """The OOM killer's way: a real ipykernel SIGKILLed while a cell runs.
    ``kernel()`` also fails the test if any process it started outlives it."""
    from ..kernels import execute, kernel

    before_shm, before_sems = shm_entries(), _semaphores()
    side = str(tmp_path / "items.txt")
    open(side, "w").close()
    with kernel("ipykernel") as (km, client):
        execute(client, "%load_ext shm_kernel_safe\nimport os, time\nimport numpy as np")
        execute(client, "x = np.ones((40_000, 16))")
        client.execute(KERNEL_CELL.format(method=method, side=side))
        _wait_for(lambda: len(_lines(side)) >= 200, 90, "the cell never got going")
        kernel_proc = psutil.Process(km.provisioner.process.pid)
        tree = kernel_proc.children(recursive=True)
        assert len(tree) >= 2
        kernel_proc.kill()
        killed_at = time.time()
        deadline = time.monotonic() + GONE_WITHIN
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [(p.pid, " ".join(p.cmdline())[:120]) for p in _alive(tree)]
        assert not survivors, f"processes outlived their kernel: {survivors}"
    late = [line for line in _lines(side) if float(line.split()[0]) > killed_at + 1.0]
    assert not late, f"{len(late)} items started more than 1 s after the kill: {late[:3]}"
    cleanup_stale()
    assert shm_entries() <= before_shm
    assert _semaphores() <= before_sems, sorted(_semaphores() - before_sems)


GIL_HOLDER = r"""
import os, re, sys
import shm_kernel_safe as sks

def stuck(i):
    os.write(1, f"{os.getpid()}\n".encode())  # one write: the workers share the pipe
    # Backtracks for ages inside the re module, which never releases the GIL.
    return bool(re.match(r"(a+)+$", "a" * 64 + "b"))

sks.parallel_map(stuck, range(2), processes=2, chunksize=1, start_method="forkserver")
"""


def test_forkserver_workers_stuck_holding_the_gil_die_with_their_owner(tmp_path):
    """A watching thread cannot run while an item holds the GIL; under
    forkserver the kernel kills the worker when the forkserver exits."""
    script = tmp_path / "owner.py"
    script.write_text(GIL_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    tree: list[psutil.Process] = []
    try:
        workers = [psutil.Process(int(proc.stdout.readline())) for _ in range(2)]
        tree = [*psutil.Process(proc.pid).children(recursive=True), *workers]
        time.sleep(0.5)
        assert len(_alive(workers)) == 2  # still stuck in their items
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + GONE_WITHIN
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [(p.pid, " ".join(p.cmdline())[:120]) for p in _alive(tree)]
        assert not survivors, f"processes outlived their owner: {survivors}"
    finally:
        for p in _alive(tree):
            p.kill()
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
        for p in psutil.wait_procs(_alive(tree), timeout=10)[1]:
            p.kill()
        cleanup_stale()
