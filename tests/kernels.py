"""Drive real kernels the way frontends do: jupyter_client for execution,
and Spyder's ``spyder_api`` comm for its Variable Explorer calls."""

from __future__ import annotations

import contextlib
import itertools
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


# Arrays over an mmap closed by a timer after the cell ended: no execute and
# no IPython event lies between the close and a viewer's next read, so only
# the guards in front of the viewers' own calls can catch it.
DANGLING_LATER = """
import mmap, threading
import numpy as np
_mm = mmap.mmap(-1, 8 * 2000 * 16)
a = np.ndarray((2000, 16), np.float64, buffer=_mm)
a[:] = 1.0
rows = [a[:10], "label"]
threading.Timer(0.3, _mm.close).start()
del _mm
"""


def wait_dead(km, timeout: float = 15.0) -> bool:
    """True once the kernel process ``km`` runs has died, False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not km.is_alive():
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def kernel(kind: str = "ipykernel", env: dict[str, str] | None = None, stderr: Any = None):
    """A real kernel process (ipykernel or spyder-kernels) and a client.

    ``stderr``: a file for the kernel process's own file descriptor 2 (what
    its helper processes print there too); inherited when None.
    """
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
            extra = {} if stderr is None else {"stderr": stderr}
            km.start_kernel(env={**os.environ, **(env or {})}, cwd=tmp, **extra)
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
    while True:  # skip stale replies (jupyter_client 7's wait_for_ready leaves
        # the replies to its repeated kernel_info requests on the shell channel)
        reply = client.get_shell_msg(timeout=timeout)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
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
    """The part of Spyder's frontend that talks to its kernel's comm.

    Speaks both protocols: spyder-kernels 3.x (Spyder 6: JSON call content)
    and 2.x (Spyder 5: arguments and return values cloudpickled in the
    message's buffer, ``set_namespace_view_settings`` instead of
    ``set_configuration``), chosen by the spyder-kernels this environment has,
    which is the one the test kernels run.
    """

    def __init__(self, client) -> None:
        import spyder_kernels

        self.legacy = int(spyder_kernels.__version__.split(".")[0]) < 3
        self.client = client
        self.comm_id = uuid.uuid4().hex
        data = {"pickle_protocol": 4} if self.legacy else {}
        msg = client.session.msg(
            "comm_open", {"comm_id": self.comm_id, "target_name": "spyder_api", "data": data}
        )
        client.shell_channel.send(msg)
        self.comm_msgs: list[dict] = []

    def _message(self, name: str, call_id: str, args: tuple, kwargs: dict) -> dict:
        settings = {"blocking": True, "send_reply": True}
        if not self.legacy:
            content = {
                "call_name": name,
                "call_id": call_id,
                "call_args": list(args),
                "call_kwargs": kwargs,
                "buffered_args": [],
                "buffered_kwargs": [],
                "settings": settings,
            }
            data = {"spyder_msg_type": "remote_call", "content": content}
            return self.client.session.msg("comm_msg", {"comm_id": self.comm_id, "data": data})
        import cloudpickle

        content = {
            "call_name": name,
            "call_id": call_id,
            "settings": settings,
            "pickle_highest_protocol": 4,
        }
        data = {
            "spyder_msg_type": "remote_call",
            "content": content,
            "pickle_protocol": 4,
            "python_version": sys.version,
        }
        msg = self.client.session.msg("comm_msg", {"comm_id": self.comm_id, "data": data})
        msg["buffers"] = [cloudpickle.dumps({"call_args": args, "call_kwargs": kwargs}, 4)]
        return msg

    def call(self, name: str, *args: Any, timeout: float = 20, **kwargs: Any) -> Any:
        """Call ``name`` in the kernel as Spyder does; its return value.

        ``get_value(name, encoded=True)`` returns the pickled bytes under
        both protocols (2.x always pickles).
        """
        if self.legacy:
            name = {"set_configuration": "set_namespace_view_settings"}.get(name, name)
            kwargs.pop("encoded", None)
        call_id = uuid.uuid4().hex
        self.client.shell_channel.send(self._message(name, call_id, args, kwargs))
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
            if self.legacy:
                import cloudpickle

                raw = bytes(reply["buffers"][0])
                if content["is_error"]:
                    raise RuntimeError(f"{name} failed in the kernel: {cloudpickle.loads(raw)}")
                return raw if name == "get_value" else cloudpickle.loads(raw)
            if content["is_error"]:
                raise RuntimeError(f"{name} failed in the kernel: {content['call_return_value']}")
            if reply.get("buffers"):
                return bytes(reply["buffers"][0])
            return content["call_return_value"]
        raise TimeoutError(f"no reply to {name} within {timeout}s")

    def after_execute(self) -> None:
        """What Spyder does after each execution for its Variable Explorer.

        Spyder 6's kernel pushes the view from its own ``post_execute``;
        Spyder 5 asks for it over the comm. A kernel that dies meanwhile
        gives no reply: that is for the caller to check.
        """
        if self.legacy:
            with contextlib.suppress(TimeoutError):
                self.call("get_namespace_view", timeout=10)

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
        if self.legacy:
            self.call("set_namespace_view_settings", settings)
        else:
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


class DebugSession:
    """The requests JupyterLab's debugger sends, over the control channel."""

    def __init__(self, client) -> None:
        self.client = client
        self.seq = itertools.count(1)

    def request(self, command: str, arguments: dict | None = None, timeout: float = 20) -> dict:
        content = {
            "type": "request",
            "seq": next(self.seq),
            "command": command,
            "arguments": arguments or {},
        }
        msg = self.client.session.msg("debug_request", content)
        self.client.control_channel.send(msg)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self.client.get_control_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return reply["content"]
        raise TimeoutError(f"no debug_reply to {command} within {timeout}s")

    def start(self) -> None:
        init = self.request(
            "initialize",
            {
                "clientID": "jupyterlab",
                "clientName": "JupyterLab",
                "adapterID": "python",
                "pathFormat": "path",
                "linesStartAt1": True,
                "columnsStartAt1": True,
                "supportsVariableType": True,
                "supportsVariablePaging": True,
                "supportsRunInTerminalRequest": True,
                "locale": "en",
            },
        )
        assert init.get("success"), init
        assert self.request("attach").get("success")
        assert self.request("configurationDone").get("success")

    def variables_panel(self) -> dict[str, dict]:
        reply = self.request("inspectVariables")
        assert reply.get("success"), reply
        return {v["name"]: v for v in reply["body"]["variables"]}
