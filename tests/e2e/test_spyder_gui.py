"""The real Spyder application, headless, as a user runs it.

Spyder (from PyPI, PyQt5) runs in its own process (``tests/spyder_gui_driver.py``)
under Xvfb when Debian's ``xvfb`` is installed, else on Qt's ``offscreen``
platform. The extension is in its Startup > Run code > Lines preference,
"Show arrays min/max" is on, the Variable Explorer is visible above the
console in a landscape window, wide enough for whole rows (its screenshot
of a background run is docs/long_run_spyder.png), and the cells are
executed in its IPython console. Needs the ``gui-test`` extra; skipped
without it. Screenshots of each check are kept (the failure message says
where; ``SKS_GUI_ARTIFACTS`` names a folder to copy them to).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("spyder", reason="the real Spyder needs the gui-test extra")
psutil = pytest.importorskip("psutil")

pytestmark = [pytest.mark.gui, pytest.mark.timeout(330)]

DRIVER = Path(__file__).resolve().parents[1] / "spyder_gui_driver.py"
PLACEHOLDER_TEXT = "array (200000, 16) float64: its shared memory was closed"


@pytest.fixture(scope="module")
def display_env():
    """An X display from Xvfb if installed, else Qt's offscreen platform."""
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        env["QT_QPA_PLATFORM"] = "offscreen"
        yield env
        return
    read_fd, write_fd = os.pipe()
    # Room for the driver's window (WINDOW_SIZE) drawn at twice the pixels.
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write_fd), "-screen", "0", "2560x1800x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as fh:
            number = fh.readline().strip()
        assert number, "Xvfb did not start"
        env["DISPLAY"] = f":{number}"
        env.pop("QT_QPA_PLATFORM", None)
        yield env
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


def _run_spyder(mode: str, out: Path, env: dict[str, str]) -> dict:
    """Run the driver; return what it saw. Every process it started is gone
    when this returns."""
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "spyder.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), str(out), mode],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen: set[int] = set()
    deadline = time.monotonic() + 270
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                seen.update(p.pid for p in psutil.Process(proc.pid).children(recursive=True))
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        # kernels and their workers that outlived Spyder (a kernel it
        # restarted after a crash is not always shut down by close_all_clients)
        survivors = []
        for pid in seen:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    survivors.append(p)
        for p in survivors:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(survivors, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
    result_file = out / "result.json"
    assert result_file.exists(), f"Spyder gave no result; log: {(out / 'spyder.log').read_text()}"
    return json.loads(result_file.read_text())


def _explain(result: dict, out: Path) -> str:
    target = os.environ.get("SKS_GUI_ARTIFACTS")
    if target:
        dest = Path(target) / out.name
        shutil.copytree(out, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("conf"))
        out = dest
    steps = "\n".join(result.get("steps", []))
    return (
        f"screenshots and log in {out}\nsteps:\n{steps}\nerror: {result.get('error')}\n"
        f"checks: {json.dumps(result.get('checks'), indent=1)}\n"
        f"console (end):\n{result.get('console', '')[-3000:]}"
    )


def test_real_spyder_with_extension(display_env, tmp_path):
    out = tmp_path / "spyder-with-extension"
    result = _run_spyder("with", out, display_env)
    why = _explain(result, out)
    checks = result["checks"]
    assert result["error"] is None, why
    assert checks["extension_loaded"], why
    assert not checks["kernel_died_after_seed"] and not checks["kernel_died_at_end"], why
    assert checks["kernel_pids_at_end"] == checks["kernel_pids_at_start"], why
    assert checks["seed_sum_agrees"], why
    rows = checks["rows"]
    # The arrays over the closed segment: sane rows, min/max computed.
    for name, size in (("x_shared", "[200000, 16]"), ("x_hour", "[16]")):
        row = rows[name]
        assert row["Type"] == "Array of float64" and row["Size"] == size, why
        assert row["Value"].startswith("Min: ") and "Max: " in row["Value"], why
    # An array unmapped behind our back: a row that says so.
    assert rows["lost"]["Value"] == PLACEHOLDER_TEXT, why
    assert rows["lost"]["Size"] == "[200000, 16]", why
    # %%shm_parallel --out, with a worker's print in the console.
    assert checks["worker_print_seen"] and checks["parallel_agrees"], why
    assert rows["y"]["Size"] == "[300]", why
    # --background: the handle's row while the run goes on, the results after.
    assert "items" in checks["background_row"]["Value"], why
    # ... and the screenshot of it (docs/long_run_spyder.png) shows it whole.
    width, height = checks["window_size"]
    assert width > height, why
    assert checks["background_value_fits"], why
    assert checks["background_agrees"], why


def test_real_spyder_without_extension_kernel_dies(display_env, tmp_path):
    """Proves the test above can fail: the same seed, no extension, and the
    Variable Explorer's refresh kills the kernel (Spyder restarts it)."""
    out = tmp_path / "spyder-without-extension"
    result = _run_spyder("without", out, display_env)
    why = _explain(result, out)
    checks = result["checks"]
    assert result["error"] is None, why
    assert not checks["extension_loaded"], why
    assert checks["kernel_died_after_seed"], why
    assert checks["kernel_pids_after_seed"] != checks["kernel_pids_at_start"], why
