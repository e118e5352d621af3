"""Progress displays: the text bar's behaviour, and in real kernels the
choice of display and the widget's messages."""

from __future__ import annotations

import io
import queue
import time

import pytest

import shm_kernel_safe as sks
from shm_kernel_safe.displays import TextProgress, frontend_renders_widgets, make_progress

from ..kernels import evaluate, execute, kernel


def test_text_bar_waits_half_a_second_then_draws_in_place():
    out = io.StringIO()
    bar = TextProgress(stream=out, delay=0.2)
    bar(10, 100)
    assert out.getvalue() == ""  # a quick run shows nothing
    time.sleep(0.25)
    bar(50, 100)
    bar(100, 100)
    bar.close()
    text = out.getvalue()
    assert text.count("\r[") == 3 and "100/100" in text and text.endswith("done\n")
    assert "it/s" in text and "ETA" in text and "elapsed" in text


def test_text_bar_reports_failure_reason():
    out = io.StringIO()
    bar = TextProgress(stream=out, delay=0)
    bar(3, 10)
    bar.close(error=KeyboardInterrupt())
    assert "failed: KeyboardInterrupt" in out.getvalue()


def test_quick_run_prints_nothing_and_bad_mode_refused():
    out = io.StringIO()
    bar = TextProgress(stream=out)
    bar(5, 5)
    bar.close()
    assert out.getvalue() == ""
    with pytest.raises(sks.InvalidArgumentError, match="progress must be one of"):
        sks.parallel_map(abs, range(3), progress="fancy")
    assert make_progress("none") is None


def test_no_kernel_means_no_widgets():
    assert frontend_renders_widgets(shell=None, environ={"JPY_SESSION_NAME": "x"}) is False


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("no_orphans")
def test_parallel_map_text_progress_reaches_total(capsys):
    def slowish(i):
        time.sleep(0.01)
        return i

    sks.parallel_map(slowish, range(120), processes=2, progress="text")
    out = capsys.readouterr().out
    assert "120/120" in out and out.rstrip().endswith("done")


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("kind", "expected"), [("ipykernel", "WidgetProgress"), ("spyder", "TextProgress")]
)
def test_auto_picks_widget_in_jupyter_and_text_in_spyder(kind, expected):
    env = {"JPY_SESSION_NAME": "weather.ipynb"}  # as jupyter_server sets it
    with kernel(kind, env=env) as (_km, client):
        execute(client, "from shm_kernel_safe.displays import make_progress")
        assert evaluate(client, "type(make_progress('auto')).__name__") == repr(expected)


def _widget_traffic(client, code: str) -> tuple[int, list[str], list[int], str]:
    """Run a cell; count widget views, collect bar styles and values."""
    msg_id = client.execute(code)
    views, styles, values, status = 0, [], [], ""
    while True:
        try:
            msg = client.get_iopub_msg(timeout=60)
        except queue.Empty:
            raise AssertionError("no idle status") from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        content = msg["content"]
        if msg["msg_type"] == "display_data" and (
            "application/vnd.jupyter.widget-view+json" in content["data"]
        ):
            views += 1
        if msg["msg_type"] == "error":
            status = "error"
        if msg["msg_type"] == "comm_msg":
            state = content["data"].get("state", {})
            if "bar_style" in state:
                styles.append(state["bar_style"])
            if isinstance(state.get("value"), int):
                values.append(state["value"])
        if msg["msg_type"] == "status" and content["execution_state"] == "idle":
            return views, styles, values, status or "ok"


@pytest.mark.timeout(240)
def test_widget_bar_rendered_and_ends_green_or_red():
    with kernel("ipykernel", env={"JPY_SESSION_NAME": "weather.ipynb"}) as (_km, client):
        execute(client, "%load_ext shm_kernel_safe\nimport time")
        views, styles, values, status = _widget_traffic(
            client, "%%shm_parallel nn in range(200) -n 2\ntime.sleep(0.01)\n"
        )
        assert status == "ok" and views == 1
        assert styles[-1] == "success" and max(values) == 200
        views, styles, values, status = _widget_traffic(
            client,
            "%%shm_parallel nn in range(400) -n 2\ntime.sleep(0.01)\n"
            "if nn == 300:\n    raise ValueError('bad hour')\n",
        )
        assert status == "error" and views == 1 and styles[-1] == "danger"
        execute(client, "import shm_kernel_safe; shm_kernel_safe.shutdown_pools()")
