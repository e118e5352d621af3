"""Errors that match what happened, on every transport: no room in /dev/shm
is a SharedMemoryCapacityError (a MemoryError), a result that cannot be
pickled is a TaskError naming its item with the partial results, an item's
exception keeps its arguments, tracebacks say "remote" only when the item
ran in another process, and warnings point at the caller's line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest

import shm_kernel_safe as sks

from ..backends import backend, kw  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(240)

N = 300


# -- results that cannot be pickled -----------------------------------------------
def test_an_unpicklable_result_is_a_task_error_with_partial_results(kw):
    def lock_at_200(i):
        return threading.Lock() if i == 200 else float(i)

    with pytest.raises(sks.TaskError) as info:
        sks.parallel_map(lock_at_200, range(N), **kw)
    err = info.value
    assert err.index == 200 and err.exc_type == "TypeError"
    assert "result (a lock) cannot be pickled" in str(err)
    assert isinstance(err.__cause__, TypeError)
    done = err.done
    assert not done[200] and done[:1].all()
    assert np.array_equal(err.partial.compressed(), np.flatnonzero(done).astype(float))


def test_unpicklable_results_fail_only_their_items_with_errors_continue(kw):
    def gen_at(i):
        return (j for j in range(i)) if i in (7, 260) else i

    with pytest.warns(sks.ItemsFailedWarning, match="2 of 300 items failed: 7 TypeError"):
        out = sks.parallel_map(gen_at, range(N), errors="continue", **kw)
    assert isinstance(out, np.ma.MaskedArray)
    assert np.flatnonzero(out.mask).tolist() == [7, 260]
    failed = sks.last_errors()
    assert [e.index for e in failed] == [7, 260]
    assert "a generator" in failed[0].remote_message


# -- an item's exception -------------------------------------------------------------
class TwoArgs(Exception):
    pass


def test_an_items_exception_keeps_its_arguments_and_says_where_it_ran(kw):
    def key_error(i):
        if i == 3:
            raise KeyError(3)
        if i == 250:
            raise TwoArgs(250, [1, 2])
        return i

    def only_key_error(i):
        if i == 3:
            raise KeyError(3)
        return i

    with pytest.raises(sks.TaskError) as info:
        sks.parallel_map(only_key_error, range(N), **kw)
    cause = info.value.__cause__
    assert type(cause) is KeyError and cause.args == (3,)  # an int, not '3'
    remote = kw["backend"] != "serial"
    assert ("Remote traceback:" in str(info.value)) is remote
    assert "raise KeyError(3)" in str(info.value)
    with pytest.warns(sks.ItemsFailedWarning) as caught:
        sks.parallel_map(key_error, range(N), errors="continue", **kw)
    # Only the failures' warning: a PerformanceHint may come too (tiny items, cold pool).
    (failed,) = [w for w in caught if issubclass(w.category, sks.ItemsFailedWarning)]
    message = str(failed.message)
    assert "3 KeyError(3)" in message and "250 TwoArgs(250, [1, 2])" in message, message
    assert failed.filename == __file__  # the caller's line, not the package's
    assert sks.last_errors()[1].__cause__.args == (250, [1, 2])


# -- no room in /dev/shm -------------------------------------------------------------
CAPACITY = r"""
import json, sys
import numpy as np
import shm_kernel_safe as sks

backend = sys.argv[1]
kw = {"backend": backend}
if backend.startswith("local"):
    kw = {"backend": "local", "start_method": backend.split("-")[1], "processes": 2}
if backend == "dask":
    kw["processes"] = 1
x = np.ones(4 << 20)  # 32 MiB: does not fit in the 16 MiB /dev/shm
y = np.zeros(4 << 20)

def read(i):
    return float(x[i])

def write(i):
    y[i] = 1.0

def big(i):
    return np.ones(1 << 17)  # 1 MiB each, 64 MiB stacked

calls = {
    "input": lambda: sks.parallel_map(read, range(8), **kw),
    "out": lambda: sks.parallel_map(write, range(8), out=[y], **kw),
    "results": lambda: sks.parallel_map(big, range(64), **kw),
}
outcome = {}
for name, call in calls.items():
    try:
        call()
        outcome[name] = "ok"
    except MemoryError as exc:
        outcome[name] = type(exc).__name__
    except Exception as exc:
        outcome[name] = f"{type(exc).__name__}: {exc}"[:300]
print(json.dumps(outcome))
"""


@pytest.mark.parametrize(
    "where", ["local-forkserver", "local-spawn", "local-fork", "serial", "dask"]
)
def test_no_room_in_dev_shm_is_a_capacity_error_on_every_path(where):
    if where == "dask":
        pytest.importorskip("distributed")
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "capacity.py")
        with open(script, "w") as fh:
            fh.write(CAPACITY)
        shell = (
            f"mount -t tmpfs -o size=16m tmpfs /dev/shm && exec {sys.executable} {script} {where}"
        )
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", shell]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp)
        except FileNotFoundError:
            pytest.skip("no unshare here")
    if proc.returncode != 0 and "mount" in proc.stderr and "permission" in proc.stderr.lower():
        pytest.skip("cannot mount a private /dev/shm here (needs root)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    if where.startswith("local"):
        expected = dict.fromkeys(("input", "out", "results"), "SharedMemoryCapacityError")
    else:  # these send arrays by message, not through /dev/shm
        expected = dict.fromkeys(("input", "out", "results"), "ok")
    assert outcome == expected, (outcome, proc.stderr[-2000:])
