"""A ``%%shm_parallel`` cell with the notebook's debugger on.

JupyterLab's debugger (and VS Code's "Debug Cell") is debugpy inside
ipykernel, enabled by ``debug_request`` messages ``initialize`` and
``attach`` on the control channel. debugpy then patches process creation so
that every new Python process connects back and waits for a debugger client
that never comes to pool workers: the cell would never finish. Workers must
start as ordinary processes."""

from __future__ import annotations

import ast

import pytest

from ..helpers import shm_entries
from ..kernels import DebugSession, evaluate, execute, kernel

pytest.importorskip("debugpy")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CELL = (
    "%%shm_parallel nn in range(200) --out y -r r -n 2 --start-method {method} --progress none\n"
    "y[nn] = nn * 0.5\n"
    "os.getpid()\n"
)

# The command lines of the workers that ran the items and of their parents
# (a forkserver, or the kernel): a debuggee runs under pydevd's launcher.
WORKER_COMMANDS = """
import psutil
def worker_commands(pids):
    procs = [psutil.Process(p) for p in set(pids)]
    return [" ".join(p.cmdline()) for q in procs for p in (q, q.parent())]
"""


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_cell_finishes_with_the_debugger_attached(method):
    before = shm_entries()
    with kernel("ipykernel") as (_km, client):
        debug = DebugSession(client)
        debug.start()  # initialize, attach, configurationDone: as JupyterLab
        execute(client, "%load_ext shm_kernel_safe\nimport os\nimport numpy as np")
        execute(client, "y = np.zeros(200)")
        res = execute(client, CELL.format(method=method), timeout=120)
        assert res["status"] == "ok", res
        assert "Traceback" not in res["stderr"], res["stderr"]
        check = "bool((y == np.arange(200) * 0.5).all()) and len(set(r.tolist()) - {os.getpid()})"
        assert evaluate(client, check) in ("1", "2")  # every item ran, in workers
        # The workers (and the forkserver) are ordinary processes, not debuggees.
        execute(client, WORKER_COMMANDS)
        commands = ast.literal_eval(evaluate(client, "worker_commands(r.tolist())"))
        assert commands and not [c for c in commands if "pydevd" in c or "debugpy" in c]
        # The second call on the warm pool too.
        assert execute(client, CELL.format(method=method), timeout=120)["status"] == "ok"
        execute(client, "import shm_kernel_safe; shm_kernel_safe.shutdown_pools()")
    assert shm_entries() == before
