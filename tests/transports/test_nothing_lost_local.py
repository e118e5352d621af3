"""Nothing lost, where it takes one transport or a whole process: dead and
stuck local workers, retries, item timeouts, interrupts in a script, and the
magic's --resume in a real kernel. (Every transport: test_nothing_lost.py.)"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

import shm_kernel_safe as sks

from ..helpers import run_python, shm_entries

pytestmark = pytest.mark.timeout(240)


# -- local only: dead workers, retries, item timeouts -----------------------------
@pytest.mark.usefixtures("no_orphans")
@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_retries_run_a_killed_item_again_on_a_fresh_worker(method, tmp_path):
    marker = tmp_path / "killed-once"

    def oom_once(i):
        if i == 123 and not marker.exists():
            marker.write_text("x")
            os._exit(9)  # as the OOM killer would
        return i

    out = sks.parallel_map(oom_once, range(400), processes=2, start_method=method, retries=1)
    assert np.array_equal(out, np.arange(400))
    marker.unlink()
    with pytest.raises(sks.WorkerDiedError) as info:  # default: no retry
        sks.parallel_map(oom_once, range(400), processes=2, start_method=method)
    assert info.value.index == 123 and not info.value.done[123]


@pytest.mark.usefixtures("no_orphans")
def test_item_timeout_stops_one_stuck_item_and_the_pool_stays_healthy():
    def stuck_at_40(i):
        if i == 40:
            time.sleep(3600)
        time.sleep(0.002)
        return i

    t0 = time.monotonic()
    with pytest.warns(sks.ItemsFailedWarning, match="40 TimeoutError"):
        out = sks.parallel_map(
            stuck_at_40, range(300), processes=2, errors="continue", item_timeout=1.0
        )
    assert time.monotonic() - t0 < 30
    assert np.flatnonzero(out.mask).tolist() == [40]
    assert sks.parallel_map(lambda i: i, range(10), processes=2).sum() == 45  # healthy
    with pytest.raises(sks.TaskError, match="TimeoutError") as info:
        sks.parallel_map(stuck_at_40, range(300), processes=2, item_timeout=1.0)
    assert info.value.index == 40


@pytest.mark.parametrize("backend", ["serial"])
def test_item_timeout_is_refused_where_an_item_cannot_be_stopped(backend):
    with pytest.raises(ValueError, match=f"item_timeout is not supported by backend='{backend}'"):
        sks.parallel_map(abs, range(3), backend=backend, item_timeout=1.0)


# -- interrupts, in a script that makes its own SIGINT ------------------------------
INTERRUPTED = r"""
import json, os, signal, sys, threading, time
import numpy as np
import shm_kernel_safe as sks
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIG_IGN
backend = sys.argv[1]
kw = {"processes": 2} if backend == "local" else {}

def slow(i):
    time.sleep(0.1)
    return i * 2

def interrupt():
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=interrupt, daemon=True).start()
try:
    sks.parallel_map(slow, range(100), backend=backend, **kw)
    print(json.dumps({"outcome": "finished"}))
    sys.exit(0)
except KeyboardInterrupt as exc:
    caught = exc
done = caught.done
ok = all(caught.partial[i] == 2 * i for i in np.flatnonzero(done))
rest = sks.parallel_map(slow, range(100), backend=backend, resume=caught, **kw)
print(json.dumps({"outcome": type(caught).__name__, "done": int(done.sum()), "consistent": ok,
                  "complete": rest.tolist() == [2 * i for i in range(100)]}))
"""


@pytest.mark.parametrize("backend", ["local", "serial"])
def test_an_interrupt_keeps_what_completed_and_resumes(backend):
    before = shm_entries()
    proc = run_python(INTERRUPTED, backend, sigint_ignored=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["outcome"] == "ParallelInterrupt", res
    assert 0 < res["done"] < 100 and res["consistent"] and res["complete"], res
    assert shm_entries() == before
    assert "leaked" not in proc.stderr


# -- the magic in a real kernel ----------------------------------------------------
def test_magic_keeps_partial_results_and_resumes_in_a_real_kernel():
    from ..kernels import evaluate, execute, kernel

    cell = "%%shm_parallel nn in range(500) --out y -r r -n 2 --progress none\nbad[nn] + y_of(nn)\n"
    with kernel("ipykernel") as (_km, kc):
        execute(kc, "%load_ext shm_kernel_safe")
        execute(
            kc,
            "import numpy as np\n"
            "y = np.zeros(500)\n"
            "bad = {i: 0.0 for i in range(500)}\n"
            "del bad[321]\n"
            "def y_of(nn):\n"
            "    y[nn] = nn + 1.0\n"
            "    return nn * 2.0\n",
        )
        res = execute(kc, cell)
        assert res["status"] == "error" and res["error"]["ename"] == "TaskError"
        text = "\n".join(res["error"]["traceback"])
        assert "item 321" in text and "--resume" in text and "items completed" in text
        assert evaluate(kc, "type(r).__name__") == "'MaskedArray'"
        assert evaluate(kc, "bool(r.mask[321])") == "True"
        kept = int(evaluate(kc, "int((~r.mask).sum())"))
        assert kept == int(evaluate(kc, "int((y > 0).sum())"))  # the writes of those items
        res = execute(kc, "%%shm_parallel nn in range(400) --out y -r r --resume\nnn\n")
        assert res["status"] == "error" and "UsageError" in res["stderr"]
        execute(kc, "bad[321] = 0.0")  # fix the input, not the cell
        res = execute(kc, cell.replace("--progress none", "--progress none --resume"))
        assert res["status"] == "ok", res
        assert evaluate(kc, "type(r).__name__") == "'ndarray'"
        assert evaluate(kc, "bool(np.array_equal(r, np.arange(500) * 2.0))") == "True"
        assert evaluate(kc, "bool(np.array_equal(y, np.arange(500) + 1.0))") == "True"
