"""``%%shm_parallel ... --background`` in real kernels, driven as frontends
drive them: other cells run while it goes on and read ``NAME.partial``;
``NAME`` is the result from the cell after the end; an interrupt stops the
cell in front, never the run; ``%shm_cancel`` keeps what completed and
``--resume`` runs the rest; a kernel shut down mid-run leaves nothing in
/dev/shm and no process; Spyder's Variable Explorer refreshes safely."""

from __future__ import annotations

import time

import pytest

from ..helpers import shm_entries
from ..kernels import SpyderFrontend, evaluate, execute, kernel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: Hang guard for waits in these tests (never a timing assertion).
GUARD = 120

SETUP = """
%load_ext shm_kernel_safe
import time
import numpy as np
y = np.zeros(200)
y_id = id(y)
"""

#: About 5 s on two workers (200 items of 50 ms).
BACKGROUND_CELL = """%%shm_parallel nn in range(200) -n 2 --out y -r r --background
time.sleep(0.05)
y[nn] = 2.0 * nn
float(nn) ** 2
"""

#: A quick cell that checks the partial results against the items' values.
CHECK_PARTIAL = """
p = r.partial if not isinstance(r, np.ndarray) else r
if isinstance(p, list):
    k = 0
    assert p == [None] * 200
else:
    ok = ~np.ma.getmaskarray(p)
    k = int(ok.sum())
    assert np.array_equal(np.ma.getdata(p)[ok], np.arange(200)[ok] ** 2.0)
counts.append(k)
states.append(type(r).__name__)
"""


def until(client, expr: str, what: str) -> None:
    deadline = time.monotonic() + GUARD
    while evaluate(client, expr) != "True":
        assert time.monotonic() < deadline, f"hang guard: {what}"
        time.sleep(0.1)


def test_other_cells_run_during_a_background_cell_and_name_becomes_the_result():
    before = shm_entries()
    with kernel("ipykernel") as (_km, client):
        assert execute(client, SETUP + "counts, states = [], []")["status"] == "ok"
        res = execute(client, BACKGROUND_CELL)
        assert res["status"] == "ok", res
        assert "r: running in the background" in res["stdout"]
        assert evaluate(client, "type(r).__name__") == "'RunHandle'"
        for _ in range(10):
            quick = execute(client, CHECK_PARTIAL, timeout=GUARD)
            assert quick["status"] == "ok", quick
            # nothing from the background lands in other cells' output (text frontend)
            assert quick["stdout"] == "" and quick["stderr"] == "", quick
            time.sleep(0.25)
        counts = eval(evaluate(client, "counts"))
        states = eval(evaluate(client, "states"))
        assert counts == sorted(counts), counts
        assert states[0] == "RunHandle", "the kernel was blocked by the run"
        assert any(0 < k < 200 for k, s in zip(counts, states, strict=True) if s == "RunHandle")
        status = execute(client, "%shm_status")["stdout"]
        if evaluate(client, "isinstance(r, np.ndarray) or r.done()") != "True":
            assert "Background runs: 1" in status and "<run " in status, status
        until(client, "isinstance(r, np.ndarray) or r.done()", "the run's end")
        after = execute(client, "pass")  # the next cell: r is rebound before it runs
        assert "r: 200/200 items, done in" in after["stdout"], after
        assert "r holds the results" in after["stdout"]
        assert evaluate(client, "type(r).__name__") == "'ndarray'"
        assert evaluate(client, "bool(np.array_equal(r, np.arange(200) ** 2.0))") == "True"
        assert evaluate(client, "bool(np.array_equal(y, 2.0 * np.arange(200)))") == "True"
        assert evaluate(client, "id(y) == y_id") == "True"
        assert execute(client, "pass")["stdout"] == ""  # said once
    assert shm_entries() == before


def test_interrupt_stops_the_cell_in_front_not_the_run_and_cancel_keeps_partial():
    before = shm_entries()
    with kernel("ipykernel") as (km, client):
        assert execute(client, SETUP)["status"] == "ok"
        assert execute(client, BACKGROUND_CELL)["status"] == "ok"
        msg_id = client.execute("time.sleep(60)")
        time.sleep(1.0)
        km.interrupt_kernel()
        error = None
        deadline = time.monotonic() + GUARD
        while True:
            assert time.monotonic() < deadline, "hang guard: the interrupted cell"
            msg = client.get_iopub_msg(timeout=GUARD)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "error":
                error = msg["content"]["ename"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert error == "KeyboardInterrupt"
        assert evaluate(client, "r.state") in ("'running'", "'done'")
        # %shm_cancel stops it; r then holds what completed, --resume the rest
        res = execute(client, "%shm_cancel r")
        assert res["status"] == "ok", res
        if "cancelled" in res["stdout"]:
            assert "r holds the partial results" in res["stdout"], res
            assert evaluate(client, "isinstance(r, np.ma.MaskedArray)") == "True"
            kept = int(evaluate(client, "int(r.count())"))
            assert 0 < kept < 200
            assert (
                evaluate(client, "bool(np.array_equal(y[~r.mask], 2.0 * np.arange(200)[~r.mask]))")
                == "True"
            )
            resumed = execute(client, BACKGROUND_CELL.replace("--background", "--resume"))
            assert resumed["status"] == "ok", resumed
        assert evaluate(client, "bool(np.array_equal(r, np.arange(200) ** 2.0))") == "True"
        assert evaluate(client, "bool(np.array_equal(y, 2.0 * np.arange(200)))") == "True"
        assert execute(client, "%shm_wait")["status"] == "ok"
    assert shm_entries() == before


def test_kernel_shutdown_mid_run_leaves_nothing():
    """The ``kernel`` helper shuts the kernel down as frontends do and fails
    on any process left of it; /dev/shm must be as it was."""
    before = shm_entries()
    with kernel("ipykernel") as (_km, client):
        assert execute(client, SETUP)["status"] == "ok"
        cell = BACKGROUND_CELL.replace("range(200)", "range(100_000)").replace("--out y ", "")
        assert execute(client, cell)["status"] == "ok"
        until(client, "r.progress[0] > 4", "the run to start")
        assert shm_entries() - before  # the run's segments exist meanwhile
    deadline = time.monotonic() + 10
    while shm_entries() != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shm_entries() == before


def test_spyder_variable_explorer_refreshes_during_a_background_run():
    """Spyder's Variable Explorer (min/max on) reads the namespace 20 times
    while the run fills ``y`` and ``r``: the kernel lives, the handle's row
    shows its one-line repr, and the end is as in ipykernel."""
    before = shm_entries()
    with kernel("spyder") as (km, client):
        spyder = SpyderFrontend(client)
        spyder.configure_view(minmax=True)
        assert execute(client, SETUP)["status"] == "ok"
        assert execute(client, BACKGROUND_CELL)["status"] == "ok"
        spyder.after_execute()
        rows = []
        for _ in range(20):
            view = spyder.call("get_namespace_view")
            assert km.is_alive()
            rows.append(view["r"]["view"])
            assert "y" in view
            time.sleep(0.1)
        handle_rows = [v for v in rows if v.startswith("<run ")]
        assert handle_rows, rows
        assert all(" items, " in v for v in handle_rows), handle_rows
        until(client, "isinstance(r, np.ndarray) or r.done()", "the run's end")
        assert execute(client, "pass")["status"] == "ok"
        spyder.after_execute()
        view = spyder.call("get_namespace_view")
        assert view["r"]["type"] == "Array of float64", view["r"]
        assert evaluate(client, "bool(np.array_equal(r, np.arange(200) ** 2.0))") == "True"
        assert evaluate(client, "bool(np.array_equal(y, 2.0 * np.arange(200)))") == "True"
    assert shm_entries() == before


def test_the_widget_bar_stays_under_the_launching_cell_and_says_where_results_go():
    """In JupyterLab the bar is shown by the launching cell, which returns
    at once; the run's thread keeps updating it, and its last line says
    when ``r`` holds the results."""
    with kernel("ipykernel", env={"JPY_SESSION_NAME": "weather.ipynb"}) as (_km, client):
        assert execute(client, SETUP)["status"] == "ok"
        msg_id = client.execute(BACKGROUND_CELL)
        views, styles, labels, values = 0, [], [], []
        idle_before_end = None
        deadline = time.monotonic() + GUARD
        note = "r holds the results from the next cell on"
        while idle_before_end is None or not any(note in text for text in labels):
            assert time.monotonic() < deadline, "hang guard: the bar's end"
            msg = client.get_iopub_msg(timeout=GUARD)
            ours = msg["parent_header"].get("msg_id") == msg_id
            content = msg["content"]
            if ours and msg["msg_type"] == "display_data":
                views += "application/vnd.jupyter.widget-view+json" in content["data"]
            if ours and msg["msg_type"] == "status" and content["execution_state"] == "idle":
                idle_before_end = "success" not in styles
            if msg["msg_type"] == "comm_msg":
                state = content["data"].get("state", {})
                if "bar_style" in state:
                    styles.append(state["bar_style"])
                if isinstance(state.get("value"), str):
                    labels.append(state["value"])
                elif isinstance(state.get("value"), int):
                    values.append(state["value"])
        assert idle_before_end, "the launching cell waited for the run"
        assert views == 1
        assert max(values) == 200 and len(set(values)) > 2, values
        assert styles[-1] == "success" and "<b>done</b>" in labels[-1], (styles, labels[-1])
        assert execute(client, "pass")["status"] == "ok"
        assert evaluate(client, "bool(np.array_equal(r, np.arange(200) ** 2.0))") == "True"


def test_a_failed_background_cell_says_so_at_the_next_cell_and_resumes():
    before = shm_entries()
    with kernel("ipykernel") as (_km, client):
        assert execute(client, SETUP + "fixed = False")["status"] == "ok"
        cell = (
            "%%shm_parallel nn in range(100) -n 2 -r r --background\n"
            "if nn == 70 and not fixed:\n    raise ValueError('bad hour')\nfloat(nn)\n"
        )
        assert execute(client, cell)["status"] == "ok"
        until(client, "isinstance(r, np.ndarray) or r.done()", "the run's end")
        out = execute(client, "pass")["stdout"]
        assert "failed: TaskError" in out and "bad hour" in out, out
        assert "r holds the partial results" in out and "--resume" in out, out
        assert evaluate(client, "isinstance(r, np.ma.MaskedArray) and bool(r.mask[70])") == "True"
        execute(client, "fixed = True")
        resumed = execute(client, cell.replace("--background", "--resume"))
        assert resumed["status"] == "ok", resumed
        assert evaluate(client, "bool(np.array_equal(r, np.arange(100.0)))") == "True"
    assert shm_entries() == before


def test_a_frontends_hidden_execute_does_not_take_the_end_line():
    """JupyterLab's Variable Inspector runs a non-silent execute without
    history after each cell; the run's end line and the rebinding wait for
    the user's next cell, where the line is seen."""
    with kernel("ipykernel") as (_km, client):
        assert execute(client, SETUP)["status"] == "ok"
        cell = BACKGROUND_CELL.replace("range(200)", "range(20)").replace("--out y ", "")
        assert execute(client, cell)["status"] == "ok"
        until(client, "isinstance(r, np.ndarray) or r.done()", "the run's end")
        msg_id = client.execute("_sks_probe = 1", store_history=False)
        deadline = time.monotonic() + GUARD
        hidden = ""
        while True:
            assert time.monotonic() < deadline, "hang guard: the hidden execute"
            msg = client.get_iopub_msg(timeout=GUARD)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                hidden += msg["content"]["text"]
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert hidden == ""
        assert evaluate(client, "type(r).__name__") == "'RunHandle'"
        out = execute(client, "pass")["stdout"]
        assert "r: 20/20 items, done in" in out, out
        assert evaluate(client, "bool(np.array_equal(r, np.arange(20) ** 2.0))") == "True"


def interrupted(km, client, code: str, after: float = 1.0) -> str | None:
    """Run ``code``, interrupt the kernel ``after`` seconds in; the error's name."""
    msg_id = client.execute(code)
    time.sleep(after)
    km.interrupt_kernel()
    error = None
    deadline = time.monotonic() + GUARD
    while True:
        assert time.monotonic() < deadline, "hang guard: the interrupted cell"
        msg = client.get_iopub_msg(timeout=GUARD)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "error":
            error = msg["content"]["ename"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return error


def test_two_background_cells_an_interrupted_wait_and_cancel_all():
    before = shm_entries()
    with kernel("ipykernel") as (km, client):
        assert execute(client, SETUP)["status"] == "ok"
        long = BACKGROUND_CELL.replace("range(200)", "range(2000)").replace("--out y ", "")
        assert execute(client, long.replace("-r r", "-r a -n 1"))["status"] == "ok"
        assert execute(client, long.replace("-r r", "-r b -n 1"))["status"] == "ok"
        status = execute(client, "%shm_status")["stdout"]
        assert "Background runs: 2" in status, status
        assert "  a  <run " in status and "  b  <run " in status, status
        until(client, "a.progress[0] > 2 and b.progress[0] > 2", "both runs to start")
        # Ctrl-C during %shm_wait stops the waiting, not the runs
        assert interrupted(km, client, "%shm_wait a") == "KeyboardInterrupt"
        assert evaluate(client, "(a.state, b.state)") == "('running', 'running')"
        res = execute(client, "%shm_cancel")  # every background run of the magic
        assert res["status"] == "ok", res
        assert "a: " in res["stdout"] and "b: " in res["stdout"], res
        assert evaluate(client, "isinstance(a, np.ma.MaskedArray)") == "True"
        assert evaluate(client, "isinstance(b, np.ma.MaskedArray)") == "True"
        assert "Background runs: 0" in execute(client, "%shm_status")["stdout"]
    assert shm_entries() == before
