"""A kernel interrupt during a dask run on our cluster: the kernel's to
handle. The workers are children of the kernel, in its process group, so
the SIGINT reaches them too; they must neither die of it (a restart, and the
kept inputs lost) nor print tracebacks on the kernel's stderr, then or at
shutdown (jupyter_client interrupts the kernel before shutting it down)."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("distributed")

from ..kernels import evaluate, execute, kernel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

PIDS = (
    "__import__('json').dumps(sorted(__import__('shm_kernel_safe.transports.dask.cluster')"
    ".transports.dask.cluster._local['client'].run(__import__('os').getpid).values()))"
)


def test_kernel_interrupt_leaves_our_dask_workers_alive_and_quiet(capfd):
    with kernel("ipykernel") as (km, client):
        assert execute(client, "%load_ext shm_kernel_safe\nimport time")["status"] == "ok"
        first = execute(
            client, "%%shm_parallel nn in range(4) --backend dask -n 2 --progress none\nnn", 120
        )
        assert first["status"] == "ok", first
        pids = json.loads(evaluate(client, PIDS).strip("'"))
        assert len(pids) == 2
        msg_id = client.execute(
            "%%shm_parallel nn in range(400) --backend dask -n 2 --progress none\n"
            "time.sleep(0.05)\n"
        )
        time.sleep(2.0)
        km.interrupt_kernel()  # SIGINT to the kernel's process group
        error = None
        while True:
            msg = client.get_iopub_msg(timeout=60)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                error = msg["content"]["ename"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert error == "ParallelInterrupt"  # a KeyboardInterrupt carrying what completed
        while client.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != msg_id:
            pass  # the interrupted cell's reply
        again = execute(
            client, "%%shm_parallel nn in range(6) --backend dask -n 2 --progress none\nnn", 120
        )
        assert again["status"] == "ok", again
        assert json.loads(evaluate(client, PIDS).strip("'")) == pids  # same workers
    kernel_stderr = capfd.readouterr().err  # the kernel writes its stderr to ours
    assert "KeyboardInterrupt" not in kernel_stderr, kernel_stderr[-3000:]
    assert "Traceback" not in kernel_stderr, kernel_stderr[-3000:]
