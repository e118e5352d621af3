"""Drive real kernels the way frontends do: jupyter_client for execution,
and Spyder's ``spyder_api`` comm for its Variable Explorer calls."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import tempfile
import time
import uuid
from typing import Any

from jupyter_client.manager import KernelManager

#: The weather scenario's definitions, as a notebook's first cells make them.
WEATHER_DEFS = """
import numpy as np
x = np.random.default_rng(3).standard_normal((50_000, 16))   # 6.4 MB, shared
y = np.zeros(500)
y_id = id(y)
class Weights:
    def __init__(self):
        self.w = np.linspace(0, 1, 16)
def hourly_calc(x, nn):
    return float((x[nn * 100:(nn + 1) * 100] @ Weights().w).sum())
"""


@contextlib.contextmanager
def kernel(kind: str = "ipykernel", env: dict[str, str] | None = None):
    """A real kernel process (ipykernel or spyder-kernels) and a client."""
    module = "ipykernel_launcher" if kind == "ipykernel" else "spyder_kernels.console"
    with tempfile.TemporaryDirectory() as tmp:
        spec_dir = os.path.join(tmp, "kernels", f"sks-{kind}")
        os.makedirs(spec_dir)
        with open(os.path.join(spec_dir, "kernel.json"), "w") as fh:
            json.dump(
                {
                    "argv": [sys.executable, "-m", module, "-f", "{connection_file}"],
                    "display_name": kind,
                    "language": "python",
                    "interrupt_mode": "signal",
                },
                fh,
            )
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = tmp
        try:
            km = KernelManager(kernel_name=f"sks-{kind}")
            km.start_kernel(env={**os.environ, **(env or {})}, cwd=tmp)
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old
        client = km.client()
        client.start_channels()
        kernel_pid = km.provisioner.process.pid
        try:
            client.wait_for_ready(timeout=60)
            yield km, client
        finally:
            descendants = _descendants(kernel_pid)
            client.stop_channels()
            km.shutdown_kernel(now=False)  # graceful, as frontends do: clean-up must run
            survivors = _wait_gone(descendants, 10)
            for proc in survivors:
                with contextlib.suppress(Exception):
                    proc.kill()
            assert not survivors, f"processes outlived their kernel: {survivors}"


def execute(client, code: str, timeout: float = 60) -> dict[str, Any]:
    """Run code; collect stdout, stderr, error and the reply status."""
    msg_id = client.execute(code, store_history=True)
    out = {"stdout": "", "stderr": "", "error": None, "status": None, "comm_msgs": []}
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no idle status within {timeout}s for {code[:60]!r}")
        try:
            msg = client.get_iopub_msg(timeout=remaining)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out[content["name"]] += content["text"]
        elif kind == "error":
            out["error"] = content
        elif kind == "status" and content["execution_state"] == "idle":
            break
    reply = client.get_shell_msg(timeout=timeout)
    out["status"] = reply["content"]["status"]
    out["reply"] = reply["content"]
    return out


def evaluate(client, expr: str, timeout: float = 60) -> Any:
    """Value of ``expr`` in the kernel, via user_expressions (repr string)."""
    msg_id = client.execute("", silent=True, user_expressions={"v": expr})
    while True:
        reply = client.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    value = reply["content"]["user_expressions"]["v"]
    if value["status"] != "ok":
        raise RuntimeError(f"{expr}: {value.get('ename')}: {value.get('evalue')}")
    return value["data"]["text/plain"]


class SpyderFrontend:
    """The part of Spyder's frontend that talks to its kernel's comm."""

    def __init__(self, client) -> None:
        self.client = client
        self.comm_id = uuid.uuid4().hex
        msg = client.session.msg(
            "comm_open", {"comm_id": self.comm_id, "target_name": "spyder_api", "data": {}}
        )
        client.shell_channel.send(msg)
        self.comm_msgs: list[dict] = []

    def call(self, name: str, *args: Any, timeout: float = 20, **kwargs: Any) -> Any:
        call_id = uuid.uuid4().hex
        data = {
            "spyder_msg_type": "remote_call",
            "content": {
                "call_name": name,
                "call_id": call_id,
                "call_args": list(args),
                "call_kwargs": kwargs,
                "buffered_args": [],
                "buffered_kwargs": [],
                "settings": {"blocking": True, "send_reply": True},
            },
        }
        msg = self.client.session.msg("comm_msg", {"comm_id": self.comm_id, "data": data})
        self.client.shell_channel.send(msg)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = self.client.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if reply["msg_type"] != "comm_msg":
                continue
            body = reply["content"]["data"]
            if body.get("spyder_msg_type") != "remote_call_reply":
                continue
            content = body["content"]
            if content["call_id"] != call_id:
                continue
            if content["is_error"]:
                raise RuntimeError(f"{name} failed in the kernel: {content['call_return_value']}")
            if reply.get("buffers"):
                return bytes(reply["buffers"][0])
            return content["call_return_value"]
        raise TimeoutError(f"no reply to {name} within {timeout}s")

    def configure_view(self, minmax: bool = True) -> None:
        """The Variable Explorer's settings, as Spyder sends them on start."""
        settings = {
            "check_all": False,
            "exclude_private": True,
            "exclude_uppercase": False,
            "exclude_capitalized": False,
            "exclude_unsupported": False,
            "exclude_callables_and_modules": True,
            "excluded_names": [],
            "minmax": minmax,
            "show_callable_attributes": False,
            "show_special_attributes": False,
            "filter_on": True,
        }
        self.call("set_configuration", {"namespace_view_settings": settings})


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _wait_gone(procs: list, timeout: float) -> list:
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
