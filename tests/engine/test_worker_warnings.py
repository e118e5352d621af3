"""Warnings raised in workers point at the cell's line and name the item, in
a real kernel, and the kernel's own warning filters decide what is shown."""

from __future__ import annotations

import re

import pytest

from ..helpers import shm_entries
from ..kernels import execute, kernel

pytestmark = pytest.mark.timeout(240)

ODD = r"<shm_parallel cell \d+>:3: UserWarning: odd value \(item 3\)"
WARNING_CELL = """%%shm_parallel nn in range(200) -n 2 --progress none{extra}
import warnings
if nn % 20 == 3:
    warnings.warn("odd value", UserWarning)
"""


def _warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": UserWarning: " in line]


def test_cell_warning_shows_cell_line_and_item_once():
    before = shm_entries()
    with kernel("ipykernel") as (_km, client):
        execute(client, "%load_ext shm_kernel_safe")
        res = execute(client, WARNING_CELL.format(extra=""))
        assert res["status"] == "ok", res
        lines = _warning_lines(res["stderr"])
        # Ten items warn at one location, over two workers: shown once, at
        # the cell's line 3, naming the first item, with the source line.
        assert len(lines) == 1, res["stderr"]
        assert re.fullmatch(ODD, lines[0]), lines
        assert 'warnings.warn("odd value", UserWarning)' in res["stderr"]
        assert "<dynamic-code>" not in res["stderr"] + res["stdout"]

        # The kernel's filters apply, as to code run in the kernel.
        execute(client, "import warnings\nwarnings.filterwarnings('ignore', message='odd')")
        res = execute(client, WARNING_CELL.format(extra=""))
        assert res["status"] == "ok" and not _warning_lines(res["stderr"]), res
        execute(client, "warnings.resetwarnings(); warnings.simplefilter('error')")
        res = execute(client, WARNING_CELL.format(extra=""))
        assert res["status"] == "error" and res["error"]["ename"] == "UserWarning", res
        execute(client, "warnings.resetwarnings()")

        # A function defined in the notebook: its cell's file and line.
        execute(
            client,
            "import warnings\nimport shm_kernel_safe as sks\n"
            "def hourly(nn):\n"
            "    if nn == 5:\n"
            "        warnings.warn('hour five is odd', RuntimeWarning)\n"
            "    return nn\n",
        )
        res = execute(client, "r = sks.parallel_map(hourly, range(50), processes=2)")
        assert res["status"] == "ok", res
        shown = [ln for ln in res["stderr"].splitlines() if ": RuntimeWarning: " in ln]
        assert len(shown) == 1 and "hour five is odd (item 5)" in shown[0], res["stderr"]
        assert re.match(r".*ipykernel_\d+/\d+\.py:5: RuntimeWarning", shown[0]), shown
        assert "warnings.warn('hour five is odd', RuntimeWarning)" in res["stderr"]

        # A warning before an item fails: shown, and the cell fails on the item.
        res = execute(
            client,
            "%%shm_parallel nn in range(40) -n 2 --progress none\nimport warnings\n"
            "warnings.warn('about to fail')\nif nn == 30:\n    raise ValueError(nn)\n",
        )
        assert res["status"] == "error" and res["error"]["ename"] == "TaskError", res
        assert re.search(r"<shm_parallel cell \d+>:2: UserWarning: about to fail", res["stderr"])
        execute(client, "sks.shutdown_pools()")
    assert shm_entries() == before


def test_cell_warning_with_dask_backend():
    pytest.importorskip("distributed")
    with kernel("ipykernel") as (_km, client):
        execute(client, "%load_ext shm_kernel_safe")
        res = execute(client, WARNING_CELL.format(extra=" --backend dask"), timeout=120)
        assert res["status"] == "ok", res
        lines = _warning_lines(res["stderr"])
        assert len(lines) == 1, res["stderr"]
        assert re.fullmatch(ODD, lines[0]), lines
        assert "<dynamic-code>" not in res["stderr"] + res["stdout"]
