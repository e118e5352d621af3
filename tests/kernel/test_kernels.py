"""The product in real kernels: spyder-kernels driven over its comm the way
Spyder's Variable Explorer does, ipykernel queried the way JupyterLab's
Variable Inspector does, and %%shm_parallel under spawn with interrupts."""

from __future__ import annotations

import json
import time

import pytest

from ..helpers import shm_entries
from ..kernels import WEATHER_DEFS, SpyderFrontend, evaluate, execute, kernel, wait_dead

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# The original question, as typed in a console: the views outlive close+unlink.
ORIGINAL_CELL = """
import numpy as np
from multiprocessing import shared_memory
x = np.random.default_rng(0).standard_normal((20_000, 16))
shm = shared_memory.SharedMemory(create=True, size=x.nbytes)
x_shared = np.ndarray(x.shape, dtype=x.dtype, buffer=shm.buf)
x_shared[:] = x
x_hour = x_shared[5]
kept = {"block": x_shared[:100], "T": x_shared.T}
shm.close()
shm.unlink()
"""

# Arrays made dangling behind any close we could intercept: a timer closes
# the mmap after the cell finished, so only the comm-path guards can help.
MAKE_DANGLING_LATER = """
import mmap, threading
import numpy as np
def make_dangling(name, delay=0.3):
    mm = mmap.mmap(-1, 8 * 1000)
    arr = np.ndarray((1000,), np.float64, buffer=mm)
    arr[:] = 2.0
    globals()[name] = arr
    globals()[name + "_nested"] = {"inner": [arr[::2]]}
    threading.Timer(delay, mm.close).start()
"""


def test_spyder_view_survives_original_code_with_extension():
    with kernel("spyder") as (km, client):
        spyder = SpyderFrontend(client)
        spyder.configure_view(minmax=True)
        assert execute(client, "%load_ext shm_kernel_safe")["status"] == "ok"
        res = execute(client, ORIGINAL_CELL)  # Spyder's post_execute builds the view here
        assert res["status"] == "ok", res
        assert km.is_alive()
        view = spyder.call("get_namespace_view")
        assert "x_shared" in view and "Min" in view["x_shared"]["view"]
        props = spyder.call("get_var_properties")
        assert list(props["x_shared"]["array_shape"]) == [20000, 16]
        raw = spyder.call("get_value", "x_hour", encoded=True)  # opening the variable
        import cloudpickle
        import numpy as np

        x_hour = cloudpickle.loads(raw)
        expected = np.random.default_rng(0).standard_normal((20_000, 16))[5]
        assert np.array_equal(x_hour, expected)
        assert evaluate(client, "float(x_shared.sum()) == float(x.sum())") == "True"


def test_spyder_kernel_dies_without_extension():
    """Proves the test above can fail: unprotected, the Variable Explorer's
    own min/max after the cell reads unmapped memory and kills the kernel."""
    with kernel("spyder") as (km, client):
        spyder = SpyderFrontend(client)
        spyder.configure_view(minmax=True)
        client.execute(ORIGINAL_CELL)
        time.sleep(3.0)  # the cell's own run (longer on a loaded machine)
        spyder.after_execute()
        assert wait_dead(km), "the unprotected kernel should have died"


@pytest.mark.parametrize(
    "path",
    ["get_namespace_view", "get_var_properties", "get_value", "copy_value", "save_namespace"],
)
def test_spyder_paths_never_see_dangling_arrays(path, tmp_path):
    with kernel("spyder") as (km, client):
        spyder = SpyderFrontend(client)
        spyder.configure_view(minmax=True)
        execute(client, "%load_ext shm_kernel_safe")
        execute(client, MAKE_DANGLING_LATER)
        assert execute(client, "make_dangling('a')")["status"] == "ok"
        time.sleep(0.8)  # the mmap is closed now, with no execute since
        if path == "get_namespace_view":
            view = spyder.call(path)
            assert view["a"]["view"] == "array (1000,) float64: its shared memory was closed"
        elif path == "get_var_properties":
            props = spyder.call(path)
            assert props["a"]["is_array"] is False
        elif path == "get_value":
            import cloudpickle

            value = cloudpickle.loads(spyder.call(path, "a", encoded=True))
            assert "DanglingArray" in repr(value)
        elif path == "copy_value":
            spyder.call(path, "a", "b")
            assert "DanglingArray" in evaluate(client, "repr(b)")
        else:
            spyder.call(path, str(tmp_path / "ns.spydata"))
        assert km.is_alive()
        assert "DanglingArray" in evaluate(client, "repr(a_nested['inner'][0])")


INSPECTOR = """
for _name, _value in list(globals().items()):
    if not _name.startswith("_"):
        str(_value); repr(_value)
"""

DANGLING_NOW = """
import mmap
import numpy as np
mm = mmap.mmap(-1, 8 * 1000)
arr = np.ndarray((1000,), np.float64, buffer=mm)
arr[:] = 1.0
pair = (arr[:10], "label")
mm.close()
"""


@pytest.mark.parametrize("loaded", [True, False])
def test_jupyterlab_variable_inspector(loaded):
    with kernel("ipykernel") as (km, client):
        if loaded:
            execute(client, "%load_ext shm_kernel_safe")
        execute(client, DANGLING_NOW)
        if loaded:
            res = execute(client, INSPECTOR)  # what the inspector runs after each cell
            assert res["status"] == "ok" and km.is_alive()
            assert "DanglingArray" in evaluate(client, "repr(pair[0])")
        else:
            client.execute(INSPECTOR)
            assert wait_dead(km), "without the extension this read must crash the kernel"


def test_cell_magic_in_kernel_under_spawn():
    before = shm_entries()
    with kernel("ipykernel") as (_km, client):
        execute(client, "%load_ext shm_kernel_safe")
        execute(client, WEATHER_DEFS)
        res = execute(
            client,
            "%%shm_parallel nn in range(500) --out y -r r --start-method spawn"
            " -n 2\ny[nn] = hourly_calc(x, nn)\nnn * 2\n",
        )
        assert res["status"] == "ok", res
        check = (
            "bool(id(y) == y_id and np.allclose(y, [hourly_calc(x, n) for n in range(500)])"
            " and r.tolist() == [2 * n for n in range(500)])"
        )
        assert evaluate(client, check) == "True"
        res = execute(
            client,
            "%%shm_parallel nn in range(100) --start-method spawn -n 2\n"
            "if nn == 42:\n    raise KeyError(nn)\n",
        )
        assert res["status"] == "error" and res["error"]["ename"] == "TaskError"
        text = "\n".join(res["error"]["traceback"])
        assert "item 42" in text and "raise KeyError(nn)" in text
        res = execute(client, "%%shm_parallel nn range(5)\npass\n")
        assert res["status"] == "error" and "UsageError: expected 'VAR in ITERABLE" in res["stderr"]
        assert "Traceback" not in res["stderr"]
        execute(client, "import shm_kernel_safe; shm_kernel_safe.shutdown_pools()")
    assert shm_entries() == before


def test_kernel_interrupt_stops_cell_within_a_second():
    before = shm_entries()
    with kernel("ipykernel") as (km, client):
        execute(client, "%load_ext shm_kernel_safe\nimport time")
        execute(client, "import shm_kernel_safe as sks; sks.prestart(2, 'spawn')")
        msg_id = client.execute(
            "%%shm_parallel nn in range(400) -n 2 --start-method spawn"
            " --progress none\ntime.sleep(0.2)\n"
        )
        time.sleep(2.0)
        t0 = time.monotonic()
        km.interrupt_kernel()
        error, idle_at = None, None
        while idle_at is None:
            msg = client.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                error = msg["content"]["ename"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle_at = time.monotonic()
        assert error == "ParallelInterrupt"  # a KeyboardInterrupt carrying what completed
        assert idle_at - t0 < 1.5
        assert km.is_alive()
        assert execute(client, "print(1 + 1)")["stdout"].strip() == "2"
        pids = json.loads(
            evaluate(
                client,
                "__import__('json').dumps([p for i in sks.transports.local.pool.pool_info() "
                "for p in i['pids']])",
            ).strip("'")
        )
        assert len(pids) <= 2
        execute(client, "sks.shutdown_pools()")
    assert shm_entries() == before


def test_kernel_shutdown_with_warm_pool_is_quick_and_leaves_nothing():
    """ipykernel kills its children at shutdown and waits until none is
    listed; unreaped helpers (forkserver, resource tracker) used to keep it
    waiting until the frontend killed it, with no clean-up at all."""
    import os

    from jupyter_client.manager import KernelManager

    before = shm_entries()
    km = KernelManager(kernel_name="python3")
    km.start_kernel()
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        res = execute(
            client,
            "%load_ext shm_kernel_safe\nimport numpy as np\n"
            "x = np.ones(400_000)\n%shm_share x\nimport shm_kernel_safe as sks\n"
            "print(sks.parallel_map(lambda i: float(x[i]), range(100)).sum())",
        )
        assert res["stdout"].strip().endswith("100.0"), res
        assert shm_entries() - before  # the shared x exists while the kernel lives
    finally:
        kernel_pid = km.provisioner.process.pid
        client.stop_channels()
        t0 = time.monotonic()
        km.shutdown_kernel(now=False)
        took = time.monotonic() - t0
    assert took < 2.0, f"shutdown took {took:.1f} s (the frontend kills after 2.5 s)"
    assert shm_entries() == before
    leftovers = [e for e in os.listdir("/dev/shm") if e.startswith(f"sem.loky-{kernel_pid}-")]
    assert not leftovers, leftovers
