"""The magic's default journal, in real kernels killed with SIGKILL.

A real ipykernel runs ``%%shm_parallel nn in range(N) --out y -r r``
(~5 ms items); the test kills the kernel's whole process group at random
moments (among the first items, in the middle, among the last), starts a
new kernel, runs the same cells, until one run finishes: ``r`` and ``y``
equal an uninterrupted run's, and a per-item side channel (each item
appends its index to a file of its kernel) shows that no item the journal
had recorded before a kill ran again.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import time

import numpy as np
import psutil
import pytest

from shm_kernel_safe.engine import journal as jmod

from ..kernels import execute, kernel

pytestmark = pytest.mark.slow  # kernels started, and killed again and again

N = 2000
KILLS = int(os.environ.get("SKS_JOURNAL_KERNEL_KILLS", "20"))

SETUP = """
import os
import numpy as np
os.chdir({folder!r})
%load_ext shm_kernel_safe
x = np.arange({n} * 4, dtype=np.float64).reshape({n}, 4)
y = np.zeros({n})
"""

CELL = """%%shm_parallel nn in range({n}) --out y -r r -n 2
import os, time
fd = os.open(os.environ["SKS_SIDE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
os.write(fd, b"%d\\n" % nn)
os.close(fd)
time.sleep(0.005)
y[nn] = x[nn].sum() + 1
float(nn) * 2
"""


def _side(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [int(line) for line in fh if line.strip()]


def _journal_files(cache: str) -> list[str]:
    return glob.glob(os.path.join(cache, "shm_kernel_safe", "journals", "*.sksj"))


@pytest.mark.timeout(900)
def test_killed_kernels_resume_the_cell_without_rerunning_recorded_items(tmp_path, stale_cleaned):
    cache = str(tmp_path / "cache")
    folder = str(tmp_path / "notebook")
    os.makedirs(folder)
    rng = random.Random(23)
    kills = 0
    attempt = 0
    resumed_from = 0  # the most items a journal held when a run started
    resumed_lines = []
    while True:
        side = str(tmp_path / f"side{attempt}")
        files = _journal_files(cache)
        assert len(files) <= 1
        before = jmod.recorded_mask(files[0]) if files else np.zeros(N, dtype=bool)
        env = {"XDG_CACHE_HOME": cache, "SKS_SIDE": side, "SHM_KERNEL_SAFE_JOURNAL": "1"}
        with kernel(env=env) as (km, client):
            out = execute(client, SETUP.format(folder=folder, n=N))
            assert out["status"] == "ok", out
            if kills < KILLS:
                left = N - int(before.sum())
                target = rng.choice([1, 3, rng.randrange(1, left), left - rng.randrange(1, 20)])
                target = max(1, min(target, left))
                client.execute(CELL.format(n=N))
                pid = km.provisioner.process.pid
                deadline = time.monotonic() + 120
                while len(_side(side)) < target and time.monotonic() < deadline:
                    time.sleep(0.002)
                family = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
                os.killpg(os.getpgid(pid), signal.SIGKILL)
                psutil.wait_procs([psutil.Process(p) for p in family if psutil.pid_exists(p)], 20)
                kills += 1
                finished = False
            else:
                out = execute(client, CELL.format(n=N), timeout=300)
                assert out["status"] == "ok", out
                resumed_lines.append(out["stdout"])
                out = execute(
                    client,
                    f"np.save({folder!r} + '/y.npy', y); np.save({folder!r} + '/r.npy', r)",
                )
                assert out["status"] == "ok", out
                finished = True
        resumed_from = max(resumed_from, int(before.sum()))
        again = sorted(set(_side(side)) & set(np.flatnonzero(before).tolist()))
        assert not again, f"recorded items ran again after kill {kills}: {again[:10]}"
        attempt += 1
        if finished:
            break
    assert resumed_from > 0, "no run started from a journal that recorded items"
    y = np.load(os.path.join(folder, "y.npy"))
    r = np.load(os.path.join(folder, "r.npy"))
    x = np.arange(N * 4, dtype=np.float64).reshape(N, 4)
    np.testing.assert_array_equal(y, x.sum(axis=1) + 1)
    np.testing.assert_array_equal(r, np.arange(N) * 2.0)
    assert "resuming: " in resumed_lines[-1] and f"of {N} items recorded" in resumed_lines[-1]
    assert _journal_files(cache) == []  # a finished run's journal is removed


@pytest.mark.timeout(300)
def test_magic_flags_and_refusal(tmp_path):
    cache = str(tmp_path / "cache")
    folder = str(tmp_path / "nb")
    os.makedirs(folder)
    flag = str(tmp_path / "stop")
    cell = (
        "%%shm_parallel nn in range(40) --out y -r r --backend serial {opts}\n"
        f"if nn == 30 and os.path.exists({flag!r}):\n"
        "    raise ValueError('stop')\n"
        "y[nn] = x[nn].sum() * 2\n"
        "nn\n"
    )
    with kernel(env={"XDG_CACHE_HOME": cache, "SHM_KERNEL_SAFE_JOURNAL": "1"}) as (_, client):
        out = execute(client, SETUP.format(folder=folder, n=40))
        assert out["status"] == "ok", out
        open(flag, "w").close()
        out = execute(client, cell.format(opts=""))
        assert out["error"] and out["error"]["ename"] == "TaskError"
        assert len(_journal_files(cache)) == 1
        out = execute(client, "%shm_status")
        assert "Journals of unfinished runs: 1" in out["stdout"]
        assert "30 of 40 items" in out["stdout"]
        # x changed: refused in one line, naming the journal and the flag
        out = execute(client, "x = x + 1")
        out = execute(client, cell.format(opts=""))
        text = out["stderr"]  # IPython shows a UsageError as one line there
        assert text.startswith("UsageError: journal ") and text.count("\n") <= 1, text
        assert "(x)" in text and "--journal-reset" in text and _journal_files(cache)[0] in text
        os.unlink(flag)
        out = execute(client, cell.format(opts="--journal-reset --keep-journal"))
        assert out["status"] == "ok", out
        assert "resuming" not in out["stdout"]
        assert len(_journal_files(cache)) == 1  # kept
        out = execute(client, cell.format(opts="--keep-journal"))
        assert "resuming: 40 of 40 items recorded" in out["stdout"]
        out = execute(client, cell.format(opts="--no-journal --journal-reset"))
        assert out["status"] == "ok", out
        out = execute(client, cell.format(opts=""))  # finished: its journal goes
        assert out["status"] == "ok", out
        assert _journal_files(cache) == []
        path = str(tmp_path / "named.sksj")
        open(flag, "w").close()
        out = execute(client, cell.format(opts=f"--journal {path}"))
        assert out["error"]["ename"] == "TaskError" and os.path.exists(path)
        out = execute(client, f"import shm_kernel_safe as sks; sks.discard_journal({path!r})")
        assert out["status"] == "ok" and not os.path.exists(path)
    with kernel(env={"XDG_CACHE_HOME": cache, "SHM_KERNEL_SAFE_JOURNAL": "0"}) as (_, client):
        out = execute(client, SETUP.format(folder=folder, n=40))
        out = execute(client, cell.format(opts=""))
        assert out["error"]["ename"] == "TaskError"
        assert _journal_files(cache) == []
    os.unlink(flag)
