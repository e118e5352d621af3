"""A real browser: JupyterLab on loopback runs real notebooks in a real kernel.

* weather_hours.ipynb: the progress widget must render (not "Error
  displaying widget") and reach 100%.
* a background run (``%%shm_parallel ... --background -r r``): a later cell
  plots ``r.partial`` while the run's bar still advances, and the run then
  ends with the right results.

Each test saves the screenshot the docs show (docs/progress_widget.png,
docs/long_run_notebook.png) once it has checked what the picture shows.

Needs Debian's Chromium (/usr/bin/chromium, installed by .ci/run) and the
``browser`` extra (jupyterlab, playwright, matplotlib); skipped without
them. Playwright drives the system Chromium: no browser download.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = pathlib.Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "progress_widget.png"
LONG_RUN_SCREENSHOT = ROOT / "docs" / "long_run_notebook.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    pytest.importorskip("jupyterlab")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    shutil.copy(ROOT / "notebooks" / "weather_hours.ipynb", tmp_path)
    # JupyterLab's "get notified about Jupyter news?" toast would cover the
    # bottom right of the screenshots; "never" answers it and stays offline.
    notification = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false}'
    )
    port, token = _free_port(), "sks-test-token"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            f"--port={port}",
            "--ServerApp.ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={tmp_path}",
            "--ServerApp.open_browser=False",
            "--allow-root",  # CI runs as root
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
            "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        },
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited: {proc.stdout.read()[-3000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("jupyter lab did not start")
    try:
        yield base, token
    finally:
        proc.terminate()
        with contextlib.suppress(Exception):
            print("jupyter lab log (tail):", proc.stdout.read()[-4000:])
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _open_notebook(page, url: str) -> None:
    """Open a notebook and wait until its kernel is idle."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(url)
    page.wait_for_selector(".jp-Notebook", timeout=120_000)
    # A fresh JupyterLab may ask which kernel to start: accept its choice,
    # as a first-time user would.
    try:
        page.wait_for_selector(".jp-Dialog", timeout=10_000)
        page.click(".jp-Dialog .jp-mod-accept")
    except PlaywrightTimeout:
        pass
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)


def _show_failure(page) -> None:
    """What the page showed, for whoever reads the CI log."""
    failure = ROOT / "docs" / "browser_failure.png"
    failure.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(failure), full_page=True)
    print("page text at failure:", page.inner_text("body")[-3000:])


def test_progress_widget_renders_in_jupyterlab(jupyterlab):
    sync_api = pytest.importorskip("playwright.sync_api")
    base, token = jupyterlab
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            # Twice the pixels of a 1150-px-wide page: the screenshot of the
            # cell and its bar stays readable where the docs scale it down.
            page = browser.new_page(viewport={"width": 1150, "height": 900}, device_scale_factor=2)
            _open_notebook(page, f"{base}/lab/tree/weather_hours.ipynb?token={token}")
            page.click("text=Run", timeout=30_000)
            page.click("text=Run All Cells", timeout=30_000)
            bar = page.wait_for_selector(".widget-hprogress .progress-bar", timeout=240_000)
            page.wait_for_function(
                "() => { const b = document.querySelector('.widget-hprogress .progress-bar');"
                " return b && b.classList.contains('progress-bar-success'); }",
                timeout=240_000,
            )
            assert "100" in (bar.get_attribute("style") or "")
            assert page.locator("text=Error displaying widget").count() == 0
            page.wait_for_selector("text=results agree", timeout=240_000)
            cell = page.locator(".jp-Cell", has=page.locator(".widget-hprogress")).first
            cell.scroll_into_view_if_needed()
            SCREENSHOT.parent.mkdir(exist_ok=True)
            cell.screenshot(path=str(SCREENSHOT))
        except Exception:
            _show_failure(page)
            raise
        finally:
            browser.close()


# A month of hourly items, each a slow model of one hour: about 20 s on two
# workers, long enough to plot its first part while the rest runs.
LONG_RUN_CELLS = [
    """\
%load_ext shm_kernel_safe
%config InlineBackend.figure_formats = ["retina"]
import time

import matplotlib.pyplot as plt
import numpy as np

hours = np.arange(24 * 30)  # a month of hourly items


def temperature(hour):
    \"\"\"A slow model of one hour (or of all hours at once).\"\"\"
    time.sleep(0.05)
    return 10 + 8 * np.sin(2 * np.pi * (hour - 9) / 24) + 3 * np.sin(2 * np.pi * hour / 240)""",
    """\
%%shm_parallel hour in hours --background -r r -n 2
temperature(hour)""",
    """\
p = r.partial  # a copy of the hours done so far, masked where not done
print(r)
fig, ax = plt.subplots(figsize=(9, 2.4))
ax.plot(hours, p)
ax.set(xlim=(0, hours.size), ylim=(-3, 23), xlabel="hour", ylabel="°C")
ax.set_title(f"r.partial: {p.count()} of {p.size} hours done")
plt.show()""",
    """\
%shm_wait r
print("results agree:", bool(np.allclose(r, temperature(hours))))""",
]

BAR_STATE = """() => {
    const bar = document.querySelector('.widget-hprogress .progress-bar');
    if (!bar) return null;
    return {
        width: parseFloat(bar.style.width || '0'),
        success: bar.classList.contains('progress-bar-success'),
        label: (document.querySelector('.widget-hprogress ~ .widget-html') || {}).innerText || '',
    };
}"""


def _run_cell(page, cell) -> None:
    """Select ``cell`` (command mode, as a click on its prompt does) and run it."""
    cell.locator(".jp-InputPrompt").click()
    page.keyboard.press("Shift+Enter")


def _executed(page, cell, timeout: float) -> None:
    """Wait until ``cell``'s prompt shows an execution count (it ran)."""
    prompt = cell.locator(".jp-InputPrompt")
    deadline = time.monotonic() + timeout
    while not re.fullmatch(r"\[\d+\]:", prompt.inner_text().strip()):
        assert time.monotonic() < deadline, f"cell did not run: {prompt.inner_text()!r}"
        page.wait_for_timeout(200)


def test_background_run_partial_plot_in_jupyterlab(jupyterlab, tmp_path):
    """A plot of ``r.partial`` appears while the run's bar is below its max,
    the bar keeps advancing afterwards, and the run ends with the right
    results: what docs/long_run_notebook.png shows."""
    sync_api = pytest.importorskip("playwright.sync_api")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("matplotlib")
    base, token = jupyterlab
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(code) for code in LONG_RUN_CELLS]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, tmp_path / "long_run.ipynb")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1150, "height": 900}, device_scale_factor=2)
            _open_notebook(page, f"{base}/lab/tree/long_run.ipynb?token={token}")
            cells = page.locator(".jp-Notebook .jp-Cell")
            assert cells.count() == len(LONG_RUN_CELLS)
            setup, launch, plot, finish = (cells.nth(i) for i in range(4))
            _run_cell(page, setup)
            _executed(page, setup, 120)
            _run_cell(page, launch)
            _executed(page, launch, 60)  # returns at once: the run goes on
            # Wait for part of the run to be done, so the plot has something.
            page.wait_for_function(
                f"() => {{ const s = ({BAR_STATE})(); return s && s.width >= 35; }}",
                timeout=120_000,
            )
            _run_cell(page, plot)
            plot.locator(".jp-OutputArea-output img").wait_for(timeout=120_000)
            _executed(page, plot, 60)
            before = page.evaluate(BAR_STATE)
            plot.scroll_into_view_if_needed()
            top, bottom = launch.bounding_box(), plot.bounding_box()
            clip = {
                "x": top["x"],
                "y": top["y"],
                "width": max(top["width"], bottom["width"]),
                "height": bottom["y"] + bottom["height"] - top["y"],
            }
            shot = page.screenshot(clip=clip)
            after = page.evaluate(BAR_STATE)
            # The picture was taken between two readings of a bar that only
            # grows: both below 100% means the picture shows it unfinished.
            assert 0 < before["width"] <= after["width"] < 100, (before, after)
            assert not after["success"], after
            printed = plot.locator(".jp-OutputArea-output pre").first.inner_text()
            match = re.search(r"<run (\d+)/720 items, .*left>", printed)
            assert match, printed
            assert 0 < int(match.group(1)) < 720, printed
            # The bar goes on advancing after the plot cell finished.
            page.wait_for_function(
                f"() => ({BAR_STATE})().width > {after['width']}", timeout=120_000
            )
            _run_cell(page, finish)
            finish.get_by_text("results agree: True").wait_for(timeout=120_000)
            # The bar's last update travels on its own message: wait for it.
            page.wait_for_function(f"() => ({BAR_STATE})().success", timeout=60_000)
            end = page.evaluate(BAR_STATE)
            assert end["success"] and end["width"] == 100, end
            assert "720/720" in end["label"] and "done" in end["label"], end
            assert page.locator("text=Error displaying widget").count() == 0
            LONG_RUN_SCREENSHOT.write_bytes(shot)
        except Exception:
            _show_failure(page)
            raise
        finally:
            browser.close()
