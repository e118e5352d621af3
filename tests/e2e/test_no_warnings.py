"""No "leaked shared_memory objects" warning and no early unlink, on any
Python: a child IPython runs parallel_map and %%shm_parallel under each start
method, and its stderr is read."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from ..helpers import shm_entries

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SESSION = r"""
%load_ext shm_kernel_safe
import numpy as np
import shm_kernel_safe as sks
x = np.random.default_rng(0).standard_normal((100_000, 16))   # 12.8 MB: shared
y = np.zeros(300)
def hourly(nn):
    return float(x[nn::300].sum())
r1 = sks.parallel_map(hourly, range(300), start_method="{method}", processes=2)
assert np.allclose(r1, [hourly(n) for n in range(300)])
%shm_share x
get_ipython().run_cell_magic(  # what a %%shm_parallel cell compiles to
    "shm_parallel", "nn in range(300) --out y --start-method {method} -n 2 --progress none",
    "y[nn] = hourly(nn)\n")
"""

CHECK = """
assert np.allclose(y, r1), "results differ"
import gc; gc.collect()
print("session ok")
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_child_ipython_stderr_is_clean(method):
    before = shm_entries()
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "session.ipy")
        with open(script, "w") as fh:
            fh.write(SESSION.format(method=method) + "\n" + CHECK)
        proc = subprocess.run(
            [sys.executable, "-m", "IPython", "--no-banner", "--quick", "--colors=nocolor", script],
            capture_output=True,
            text=True,
            timeout=150,
            cwd=tmp,
            env={**os.environ, "PYTHONWARNINGS": "default"},
        )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "session ok" in proc.stdout
    for noise in (
        "leaked shared_memory",
        "resource_tracker",
        "No such file or directory",
        "Traceback",
        "UserWarning",
    ):
        assert noise not in proc.stderr, proc.stderr
    assert shm_entries() == before
