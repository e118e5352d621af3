"""A kernel interrupt that lands while a cold pool starts: the cell stops
with the interrupt, nothing else is printed anywhere (the kernel's own
stderr, which its helper processes share, and its output streams), nothing
leaks (no "leaked semaphore" warning from a resource tracker at shutdown,
/dev/shm as before), and the next call works."""

from __future__ import annotations

import os
import queue
import time

import psutil
import pytest

from shm_kernel_safe.memory.naming import parse_name

from ..helpers import SHM_DIR, shm_entries
from ..kernels import execute, kernel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

#: Seconds after the kernel's first child process appears (the forkserver,
#: a resource tracker or a worker): a cold pool takes ~0.3-2 s to start here
#: (a forkserver importing numpy, then a fork or an interpreter per worker).
#: Not timed from the cell's start: an interrupt that lands in ipykernel's
#: own message handling, before the cell runs, is ipykernel's to report.
DELAYS = (0.0, 0.05, 0.15, 0.4, 1.0)

CELL = (
    "%%shm_parallel nn in range(300) -n 2 --start-method {method} --progress none\n"
    "time.sleep(0.02)\n"
    "{use}\n"
)

#: A cell with a big input starts its pool in a background thread while the
#: input is copied to shared memory; one without starts it in the call.
USES = {"small-inputs": "nn", "big-input": "float(x[nn].sum())"}


def _interrupted_cell(km, client, code: str, delay: float) -> tuple[str | None, str]:
    """Run ``code``, interrupt the kernel ``delay`` s after its pool began to
    start; return the error's name (None if it completed) and every stream
    text the kernel sent meanwhile, whatever cell it was attributed to."""
    msg_id = client.execute(code)
    streams, error = "", None
    busy = False
    while not busy:
        msg = client.get_iopub_msg(timeout=60)
        if msg["msg_type"] == "stream":
            streams += msg["content"]["text"]
        busy = (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "busy"
        )
    kernel_proc = psutil.Process(km.provisioner.process.pid)
    deadline = time.monotonic() + 60
    while not kernel_proc.children() and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    km.interrupt_kernel()
    deadline = time.monotonic() + 90
    while True:
        try:
            msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty as exc:
            raise TimeoutError("the interrupted cell did not end") from exc
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            streams += content["text"]
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if kind == "error":
            error = content["ename"]
        if kind == "status" and content["execution_state"] == "idle":
            break
    while client.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != msg_id:
        pass
    return error, streams


@pytest.mark.parametrize("use", list(USES))
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_interrupt_during_cold_start_is_quiet_and_leaks_nothing(method, use, tmp_path):
    cell = CELL.format(method=method, use=USES[use])
    before = shm_entries()
    semaphores = {e for e in os.listdir(SHM_DIR) if e.startswith("sem.")}
    errors = []
    kernels: dict[int, object] = {}  # pid -> exit code, to name a leak's owner
    for delay in DELAYS:
        log = tmp_path / f"kernel-stderr-{delay}.txt"
        with open(log, "w") as fh, kernel("ipykernel", stderr=fh) as (km, client):
            process = km.provisioner.process
            execute(client, "%load_ext shm_kernel_safe\nimport time\nimport numpy as np")
            execute(client, "x = np.ones((200_000, 16))")  # 25.6 MB
            error, streams = _interrupted_cell(km, client, cell, delay)
            errors.append(error)
            assert error in ("ParallelInterrupt", "KeyboardInterrupt", None), (delay, error)
            assert "Traceback" not in streams and "Error" not in streams, (delay, streams)
            # The pool the interrupt met is usable, or replaced: the next call works.
            res = execute(client, cell.replace("300", "40"), timeout=120)
            assert res["status"] == "ok", (delay, res)
            assert "Traceback" not in res["stderr"], (delay, res["stderr"])
            assert km.is_alive()
        kernels[process.pid] = process.poll()  # negative: killed at shutdown
        text = log.read_text()
        assert "Traceback" not in text, (delay, text)
        assert "leaked" not in text, (delay, text)
        assert "KeyboardInterrupt" not in text, (delay, text)
    assert errors.count(None) < len(DELAYS)  # the interrupts met running cells
    left = shm_entries() - before
    owners = {name: getattr(parse_name(name), "pid", None) for name in left}
    assert not left, f"left {owners}; kernels (pid: exit code) {kernels}"
    assert {e for e in os.listdir(SHM_DIR) if e.startswith("sem.")} <= semaphores
