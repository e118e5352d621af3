"""The JupyterLab debugger's Variables panel, against a real ipykernel with
its debugpy-backed debugger: ``debug_request`` messages on the control
channel (``initialize``, ``attach``, ``configurationDone``, then
``inspectVariables`` / ``variables`` / ``richInspectVariables`` as the panel
sends them), answered with no IPython event around them."""

from __future__ import annotations

import time

import pytest

from ..kernels import DANGLING_LATER, DebugSession, execute, kernel, wait_dead

pytest.importorskip("debugpy")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TEXT = "its shared memory was closed"


def test_variables_panel_with_extension():
    with kernel("ipykernel") as (km, client):
        assert execute(client, "%load_ext shm_kernel_safe")["status"] == "ok"
        debug = DebugSession(client)
        debug.start()
        assert execute(client, DANGLING_LATER)["status"] == "ok"
        before = debug.variables_panel()  # the panel refreshes after the cell
        assert before["a"]["type"] == "ndarray"
        rows_ref = before["rows"]["variablesReference"]
        time.sleep(0.8)  # the mmap is closed now

        # Expanding `rows` before any refresh, with the reference debugpy
        # handed out while the array was alive: no crash, no children.
        reply = debug.request("variables", {"variablesReference": rows_ref})
        assert reply.get("success"), reply
        # Refresh of the panel: the array shows as the placeholder.
        panel = debug.variables_panel()
        assert panel["a"]["type"] == "DanglingArray" and TEXT in panel["a"]["value"]
        # ... and with the fresh one: the list's first element is a placeholder.
        fresh = debug.variables_panel()["rows"]["variablesReference"]
        reply = debug.request("variables", {"variablesReference": fresh})
        values = [v["value"] for v in reply["body"]["variables"]]
        assert any(TEXT in v for v in values), values
        # Its rich view (the panel's "show in viewer").
        reply = debug.request("richInspectVariables", {"variableName": "a"})
        assert reply.get("success"), reply
        assert TEXT in reply["body"]["data"]["text/plain"]
        assert km.is_alive()
        debug.request("disconnect", {"restart": False, "terminateDebuggee": True})
        assert execute(client, "print(1 + 1)")["stdout"].strip() == "2"

        # %unload_ext gives ipykernel its own handlers back.
        execute(client, "%unload_ext shm_kernel_safe")
        check = execute(
            client,
            "d = get_ipython().kernel.debugger\n"
            "print(all(not hasattr(h, '__shm_kernel_safe_original__') for t in "
            "(d.static_debug_handlers, d.started_debug_handlers) for h in t.values()))",
        )
        assert check["stdout"].strip() == "True", check


def test_variables_panel_without_extension_kills_the_kernel():
    """Proves the test above can fail: unguarded, the panel's refresh reads
    the unmapped array on the control thread and the kernel dies."""
    with kernel("ipykernel") as (km, client):
        debug = DebugSession(client)
        debug.start()
        assert execute(client, DANGLING_LATER)["status"] == "ok"
        time.sleep(0.8)
        msg = client.session.msg(
            "debug_request", {"type": "request", "seq": 99, "command": "inspectVariables"}
        )
        client.control_channel.send(msg)
        assert wait_dead(km), "the unguarded kernel should have died"
