"""The original question's script, scaled down: a Pool attaches to a shared
``x`` per task, then the segment is closed and unlinked while views of it are
still alive, as a variable explorer would find them."""

from __future__ import annotations

import signal

import pytest

from ..helpers import run_python

ORIGINAL_SCRIPT = r"""
import sys
import numpy as np
from multiprocessing import Pool, shared_memory, get_context

if sys.argv[1] == "protect":
    import shm_kernel_safe
    shm_kernel_safe.protect()

ROWS, COLS, HOURS = 20_000, 16, 48

def hourly_calc(args):
    name, shape, dtype, nn = args
    shm = shared_memory.SharedMemory(name=name)          # attach per task, as asked
    x = np.ndarray(shape, dtype=dtype, buffer=shm.buf)
    value = float(x[nn::HOURS].sum())
    del x
    shm.close()
    return value

if __name__ == "__main__":
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, COLS))
    shm = shared_memory.SharedMemory(create=True, size=x.nbytes)
    x_shared = np.ndarray(x.shape, dtype=x.dtype, buffer=shm.buf)
    x_shared[:] = x
    by_row = np.frombuffer(shm.buf, dtype=x.dtype)      # a second kind of view
    with get_context(sys.argv[2]).Pool(2) as pool:
        y = pool.map(hourly_calc, [(shm.name, x.shape, x.dtype, nn) for nn in range(HOURS)])
    corner = x_shared[:3, :2]                            # a slice kept in a container
    kept = {"corner": [corner], "transposed": x_shared.T}
    shm.close()
    shm.unlink()
    # What the variable explorer does next, on its own:
    assert np.allclose(y, [x[nn::HOURS].sum() for nn in range(HOURS)])
    assert x_shared.sum() == x.sum()
    assert np.array_equal(kept["corner"][0], x[:3, :2])
    assert np.array_equal(kept["transposed"], x.T)
    assert by_row.size == x.size and by_row[5] == x.ravel()[5]
    print("views alive after close+unlink:", float(x_shared.min()), float(x_shared.max()))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_original_script_survives_with_protect(start_method):
    proc = run_python(ORIGINAL_SCRIPT, "protect", start_method)
    assert proc.returncode == 0, proc.stderr
    assert "views alive after close+unlink" in proc.stdout
    # no BufferError from close()/__del__, no resource_tracker warning
    assert "BufferError" not in proc.stderr
    assert "leaked shared_memory" not in proc.stderr
    assert "Exception ignored" not in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_original_script_crashes_without_protect():
    """Proves the test above can fail: unprotected, the stdlib either raises
    BufferError (frombuffer view alive) or segfaults on the dangling view."""
    script = ORIGINAL_SCRIPT.replace("by_row = np.frombuffer", "by_row = None and np.frombuffer")
    script = script.replace("assert by_row.size", "assert True or by_row")
    proc = run_python(script, "plain", "fork")
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr[-2000:])
    proc = run_python(ORIGINAL_SCRIPT, "plain", "fork")
    assert proc.returncode != 0
    assert "BufferError" in proc.stderr
