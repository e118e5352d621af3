"""A real browser: JupyterLab on loopback runs weather_hours.ipynb, and the
progress widget must render (not "Error displaying widget") and reach 100%.

Needs Debian's Chromium (/usr/bin/chromium, installed by .ci/run) and the
``browser`` extra (jupyterlab, playwright); skipped without them. Playwright
drives the system Chromium: no browser download.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
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
        env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")},
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


def test_progress_widget_renders_in_jupyterlab(jupyterlab):
    sync_api = pytest.importorskip("playwright.sync_api")
    base, token = jupyterlab
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            # Twice the pixels of a 1150-px-wide page: the screenshot of the
            # cell and its bar stays readable where the docs scale it down.
            page = browser.new_page(viewport={"width": 1150, "height": 900}, device_scale_factor=2)
            page.goto(f"{base}/lab/tree/weather_hours.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            # A fresh JupyterLab may ask which kernel to start: accept its choice,
            # as a first-time user would.
            try:
                page.wait_for_selector(".jp-Dialog", timeout=10_000)
                page.click(".jp-Dialog .jp-mod-accept")
            except sync_api.TimeoutError:
                pass
            page.wait_for_selector(
                ".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000
            )
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
            # What the page showed, for whoever reads the CI log.
            failure = ROOT / "docs" / "browser_failure.png"
            failure.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(failure), full_page=True)
            print("page text at failure:", page.inner_text("body")[-3000:])
            raise
        finally:
            browser.close()
