"""A placeholder row says what happened, in each variable viewer, and stays
unusable as data: Spyder's Variable Explorer (its kernel's own
``get_namespace_view`` over the comm, spyder-kernels 2.x and 3.x),
JupyterLab's Variable Inspector and VS Code's variable viewer (the code they
run in the kernel, reduced to what decides a row's text)."""

from __future__ import annotations

import json
import time

import pytest

from ..kernels import DANGLING_LATER, SpyderFrontend, evaluate, execute, kernel

pytestmark = pytest.mark.timeout(180)

TEXT = "array (2000, 16) float64: its shared memory was closed"


DANGLING_NOW = """
import mmap
import numpy as np
_mm = mmap.mmap(-1, 8 * 2000 * 16)
a = np.ndarray((2000, 16), np.float64, buffer=_mm)
a[:] = 1.0
_mm.close()
del _mm
"""

# What JupyterLab's Variable Inspector (lckr_jupyterlab_variableinspector)
# evaluates after each cell, reduced to the parts that decide whether a row
# is shown and what its Type and Content columns say: rows whose str()
# starts with "<" are hidden, the content is repr() for ndarrays, str() else.
INSPECTOR = """
def _sks_inspector_rows():
    import json
    import numpy
    rows = []
    for name in get_ipython().run_line_magic("who_ls", ""):
        obj = eval(name)
        try:
            if not isinstance(obj, str) and str(obj)[0] == "<":
                continue
        except Exception:
            continue
        content = repr(obj) if isinstance(obj, numpy.ndarray) else str(obj)
        rows.append({"varName": name, "varType": type(obj).__name__,
                     "varContent": content[:150]})
    return json.dumps(rows)
print(_sks_inspector_rows())
"""

# VS Code's (vscode-jupyter) variable viewer: Type is type(v).__name__,
# Value is str(v) truncated, Shape from a tuple-valued .shape, Count from len().
VSCODE = """
def _sks_vscode_row(v):
    import json
    row = {"type": type(v).__name__, "value": str(v)[:1000], "shape": "", "count": 0}
    if hasattr(v, "shape") and isinstance(v.shape, tuple):
        row["shape"] = str(v.shape)
    if hasattr(v, "__len__"):
        try:
            row["count"] = len(v)
        except TypeError:
            pass
    return json.dumps(row)
print(_sks_vscode_row(a))
"""

STILL_UNUSABLE = """
from shm_kernel_safe.errors import DanglingArrayError
_failures = []
for _use in (lambda: np.asarray(a), lambda: a[0], lambda: a.sum(), lambda: a + 1):
    try:
        _use()
        _failures.append("used")
    except (DanglingArrayError, TypeError):
        pass
print("unusable" if not _failures else _failures)
"""


def test_spyder_variable_explorer_row_says_what_happened():
    with kernel("spyder") as (km, client):
        spyder = SpyderFrontend(client)
        spyder.configure_view(minmax=True)
        assert execute(client, "%load_ext shm_kernel_safe")["status"] == "ok"
        assert execute(client, DANGLING_LATER)["status"] == "ok"
        spyder.after_execute()
        time.sleep(0.8)  # the mmap is closed now, with no execute since: a Refresh
        view = spyder.call("get_namespace_view")
        assert view["a"]["view"] == TEXT, view["a"]
        assert list(view["a"]["size"]) == [2000, 16]
        assert "array (10, 16) float64: its shared memory was closed" in view["rows"]["view"]
        assert km.is_alive()
        assert execute(client, STILL_UNUSABLE)["stdout"].strip() == "unusable"
        # %unload_ext gives Spyder its own display function back
        execute(client, "%unload_ext shm_kernel_safe")
        restored = "hasattr(spyder_kernels.utils.nsview.value_to_display, '__wrapped__')"
        execute(client, "import spyder_kernels.utils.nsview")
        assert evaluate(client, restored) == "False"
        view = spyder.call("get_namespace_view")
        assert "DanglingArray object" in view["a"]["view"]  # Spyder's generic text again


def test_jupyterlab_inspector_and_vscode_rows_say_what_happened():
    with kernel("ipykernel") as (km, client):
        execute(client, "%load_ext shm_kernel_safe")
        assert execute(client, DANGLING_NOW)["status"] == "ok"
        res = execute(client, INSPECTOR)
        assert res["status"] == "ok", res
        rows = {r["varName"]: r for r in json.loads(res["stdout"])}
        assert rows["a"]["varContent"] == TEXT and rows["a"]["varType"] == "DanglingArray"
        res = execute(client, VSCODE)
        assert res["status"] == "ok", res
        row = json.loads(res["stdout"])
        assert row == {"type": "DanglingArray", "value": TEXT, "shape": "(2000, 16)", "count": 0}
        assert execute(client, STILL_UNUSABLE)["stdout"].strip() == "unusable"
        assert km.is_alive()
