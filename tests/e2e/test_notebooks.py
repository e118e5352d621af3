"""The shipped notebooks run clean in real kernels: the .ipynb files with
nbclient, the Spyder cell script cell by cell with Spyder's own %runcell."""

from __future__ import annotations

import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

from ..helpers import shm_entries
from ..kernels import execute, kernel

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _run_notebook(name: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_weather_hours_notebook():
    before = shm_entries()
    nb = _run_notebook("weather_hours.ipynb")
    text = _text(nb)
    assert "results agree" in text
    assert re.search(r"\d+ workers started", text)  # not a bare list of PIDs
    assert re.search(r"speed-up \d+\.\d+x", text)
    assert "Jan:" in text and "Dec:" in text
    assert not any(
        out.get("output_type") == "error" for c in nb.cells for out in c.get("outputs", [])
    )
    assert shm_entries() == before


def test_safety_notebook():
    nb = _run_notebook("safety.ipynb")
    text = _text(nb)
    assert "True" in text  # views read the right values after close + unlink
    assert "<DanglingArray shape=(1000,)" in text and "<DanglingArray shape=(24,)" in text
    assert "DanglingAttributeError" in text and "its data is gone" in text
    assert "Segments of this kernel" in text and "Stale segments" in text


def test_dask_backend_notebook(capfd):
    pytest.importorskip("distributed")
    before = shm_entries()
    nb = _run_notebook("dask_backend.ipynb")  # the kernel writes its stderr to ours
    text = _text(nb)
    kernel_stderr = capfd.readouterr().err
    # nbclient shuts the kernel down, and jupyter_client interrupts it first
    # (SIGINT to its process group): our cluster's workers must stay quiet
    assert "KeyboardInterrupt" not in kernel_stderr, kernel_stderr[-3000:]
    assert "Traceback" not in kernel_stderr, kernel_stderr[-3000:]
    assert "dask and local backends agree" in text
    assert "local cluster at tls://127.0.0.1:" in text
    assert "first day from the other cluster" in text
    # The failing cell shows what a user sees: the error and its traceback,
    # down to the line of the cell that raised.
    errors = [
        out for c in nb.cells for out in c.get("outputs", []) if out.get("output_type") == "error"
    ]
    assert [e["ename"] for e in errors] == ["TaskError"]
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(errors[0]["traceback"]))
    assert "item 42 (42) raised ValueError: bad hour 42" in traceback
    assert 'raise ValueError(f"bad hour {nn}")' in traceback
    assert shm_entries() == before


def test_spyder_console_script_cell_by_cell():
    # Spyder's %runcell fetches a cell's text from its editor over the comm;
    # we send each cell's text ourselves, to a real Spyder kernel.
    script = (NOTEBOOKS / "spyder_console.py").read_text()
    cells = [c.strip() for c in re.split(r"^# %%.*$", script, flags=re.M) if c.strip()]
    code_cells = [c for c in cells if not c.startswith("# ") or "\n" in c]
    with kernel("spyder") as (_km, client):
        outputs = []
        for index, code in enumerate(code_cells):
            res = execute(client, code, timeout=240)
            assert res["status"] == "ok", (index, code, res)
            outputs.append(res["stdout"])
        text = "".join(outputs)
        assert "agrees with a serial loop: True" in text
        assert "moved to shared memory" in text
        execute(client, "import shm_kernel_safe; shm_kernel_safe.shutdown_pools()")
