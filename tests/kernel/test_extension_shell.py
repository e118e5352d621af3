"""The extension in a real (in-process) IPython shell: load/unload symmetry,
the magic's semantics, usage errors. Real kernels are in test_kernels.py."""

from __future__ import annotations

import mmap
from multiprocessing import shared_memory

import numpy as np
import pytest
from IPython.core.interactiveshell import InteractiveShell

import shm_kernel_safe as sks
from shm_kernel_safe.kernel import inspection

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("no_orphans")]


@pytest.fixture
def ip():
    shell = InteractiveShell.instance()
    shell.user_ns.clear()
    shell.init_user_ns()
    yield shell
    shell.run_line_magic("unload_ext", "shm_kernel_safe")
    shell.user_ns.clear()


def run(ip, code: str):
    result = ip.run_cell(code, store_history=False)
    return result


def test_load_unload_restores_everything(ip):
    events_before = {k: list(v) for k, v in ip.events.callbacks.items()}
    close_before = shared_memory.SharedMemory.__dict__["close"]
    ip.run_line_magic("load_ext", "shm_kernel_safe")
    ip.run_line_magic("load_ext", "shm_kernel_safe")  # twice is harmless
    assert sks.is_protected()
    assert "shm_parallel" in ip.magics_manager.magics["cell"]
    assert ip.events.callbacks["post_execute"][0].__func__ is (
        inspection.InspectionHooks._on_post_execute
    )
    ip.run_line_magic("unload_ext", "shm_kernel_safe")
    assert {k: list(v) for k, v in ip.events.callbacks.items()} == events_before
    assert shared_memory.SharedMemory.__dict__["close"] is close_before
    for kind, name in [
        ("cell", "shm_parallel"),
        ("line", "shm_share"),
        ("line", "shm_status"),
        ("line", "shm_cleanup"),
    ]:
        assert name not in ip.magics_manager.magics[kind]


def test_unload_keeps_a_users_own_protect(ip):
    sks.protect()
    try:
        ip.run_line_magic("load_ext", "shm_kernel_safe")
        ip.run_line_magic("unload_ext", "shm_kernel_safe")
        assert sks.is_protected()
    finally:
        sks.unprotect()


def test_cell_magic_out_result_and_notebook_functions(ip):
    ip.run_line_magic("load_ext", "shm_kernel_safe")
    assert run(
        ip,
        """
import numpy as np
x = np.arange(400_000, dtype=np.float64).reshape(25_000, 16)   # 3.2 MB: shared
y = np.zeros(100)
y_id = id(y)
class Scale:
    def __init__(self, k): self.k = k
def hourly_calc(x, nn):
    return float(x[nn].sum()) * Scale(2).k
""",
    ).success
    res = run(
        ip,
        "%%shm_parallel nn in range(100) --out y -r r -n 2 --progress none\n"
        "y[nn] = hourly_calc(x, nn)\n"
        "tmp = nn * 3\n"
        "tmp + 1\n",
    )
    assert res.success, res.error_in_exec
    assert res.result is None
    ns = ip.user_ns
    expected = np.array([float(ns["x"][nn].sum()) * 2 for nn in range(100)])
    assert id(ns["y"]) == ns["y_id"] and np.allclose(ns["y"], expected)
    assert ns["r"].tolist() == [nn * 3 + 1 for nn in range(100)]
    assert "tmp" not in ns and "nn" not in ns  # names assigned in the cell stay in workers
    assert sks.handle_of(ns["y"]) is None and ns["r"].base is None  # owned memory


def test_shm_share_makes_zero_copy_input(ip, capsys):
    ip.run_line_magic("load_ext", "shm_kernel_safe")
    run(ip, "import numpy as np\nx = np.ones((300_000, 4))\nout = np.zeros(10)")
    ip.run_line_magic("shm_share", "x")
    assert sks.handle_of(ip.user_ns["x"]) is not None
    assert "moved to shared memory" in capsys.readouterr().out
    ip.run_line_magic("shm_share", "x")
    assert "already" in capsys.readouterr().out
    assert run(
        ip,
        "%%shm_parallel i in range(10) --out out --progress none\n"
        "out[i] = x[i * 1000:(i + 1) * 1000].sum()\n",
    ).success
    assert np.all(ip.user_ns["out"] == 4000.0)
    ip.run_line_magic("shm_status", "")
    status = capsys.readouterr().out
    assert "x: (300000, 4) float64" in status and "views alive" in status


@pytest.mark.parametrize(
    ("line", "cell", "message"),
    [
        ("nn range(5)", "pass", "expected 'VAR in ITERABLE"),
        ("nn in 5", "pass", "not an iterable"),
        ("nn in undefined_thing", "pass", "cannot evaluate"),
        ("nn in range(3) --out nothere", "pass", "no variable named 'nothere'"),
        ("nn in range(3) --out s", "pass", "not a numeric ndarray"),
        ("nn in range(3)", "missing_name(nn)", "'missing_name'"),
        ("nn in range(3) -r r", "z = nn", "must end with an expression"),
        ("nn in range(3)", "def (:", "syntax error"),
        ("nn in range(3) --bogus", "pass", "unrecognized"),
    ],
)
def test_bad_lines_are_one_line_usage_errors(ip, line, cell, message, capsys):
    ip.run_line_magic("load_ext", "shm_kernel_safe")
    run(ip, "s = 'text'")
    res = run(ip, f"%%shm_parallel {line}\n{cell}\n")
    assert not res.success
    err = capsys.readouterr()
    assert message in err.out + err.err
    assert "Traceback" not in err.out + err.err


def test_task_error_shows_item_and_cell_line(ip, capsys):
    ip.run_line_magic("load_ext", "shm_kernel_safe")
    res = run(
        ip,
        "%%shm_parallel nn in range(50) -n 2 --progress none\n"
        "a = nn + 1\n"
        "if nn == 13:\n"
        "    raise ValueError(f'bad hour {nn}')\n",
    )
    assert isinstance(res.error_in_exec, sks.TaskError)
    text = "".join(res.error_in_exec._render_traceback_())
    assert "item 13" in text and "bad hour 13" in text
    assert "raise ValueError(f'bad hour {nn}')" in text  # the cell's own line
    assert "shm_parallel cell" in text and "line 3" in text


def test_sanitizer_replaces_dangling_arrays_everywhere(ip):
    ip.run_line_magic("load_ext", "shm_kernel_safe")
    mm = mmap.mmap(-1, 8 * 100)
    arr = np.ndarray((100,), np.float64, buffer=mm)

    class Holder:
        pass

    holder = Holder()
    holder.data = arr[10:20]
    ns = ip.user_ns
    ns.update(
        top=arr,
        in_list=[1, arr],
        in_tuple=(arr.T, 2),
        in_dict={"k": arr},
        holder=holder,
        fine=np.zeros(3),
    )
    mm.close()  # unmaps under every view above
    replaced = inspection.sanitize_namespace(ns)
    assert set(replaced) == {"top", "in_list[1]", "in_tuple[0]", "in_dict['k']", "holder.data"}
    for value in (
        ns["top"],
        ns["in_list"][1],
        ns["in_tuple"][0],
        ns["in_dict"]["k"],
        ns["holder"].data,
    ):
        assert isinstance(value, inspection.DanglingArray)
        assert "shape=" in repr(value)
    with pytest.raises(sks.DanglingArrayError):
        np.asarray(ns["top"])
    with pytest.raises(sks.DanglingArrayError):
        ns["top"][0]
    assert not hasattr(ns["top"], "min")
    assert isinstance(ns["fine"], np.ndarray)
    # The events do it too, before the next cell and ahead of other post_execute hooks.
    ns["again"] = arr
    del arr
    assert run(ip, "again_repr = repr(again)").success
    assert "DanglingArray" in ns["again_repr"]


def test_serial_backend_fails_like_the_others_and_debug_lands_in_the_cell(ip, capsys):
    """--backend serial: the same TaskError (item, the cell's line), and the
    traceback %debug reads ends in the cell's frame with the item bound."""
    import sys

    ip.run_line_magic("load_ext", "shm_kernel_safe")
    run(ip, "import numpy as np\ny = np.zeros(20)")
    res = run(
        ip,
        "%%shm_parallel nn in range(20) --out y --backend serial -n 4 --progress none\n"
        "y[nn] = nn\n"
        "if nn == 13:\n"
        "    raise ValueError(f'bad hour {nn}')\n",
    )
    err = res.error_in_exec
    assert isinstance(err, sks.TaskError) and err.index == 13
    text = "".join(err._render_traceback_())
    assert "raise ValueError(f'bad hour {nn}')" in text and "line 3" in text
    tb = sys.last_traceback  # what %debug post-mortems
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert "shm_parallel cell" in tb.tb_frame.f_code.co_filename
    assert tb.tb_frame.f_locals["nn"] == 13
    assert ip.user_ns["y"][:13].tolist() == list(range(13))  # written in place, as it ran


def test_engine_argument_errors_read_as_the_magics_options(ip, capsys):
    ip.run_line_magic("load_ext", "shm_kernel_safe")
    run(ip, "import numpy as np\nro = np.zeros(3)\nro.flags.writeable = False")
    cases = {
        "nn in range(3) --out ro": "--out ro: ro is read-only",
        "nn in range(3) --timeout -2": "--timeout must be a positive number",
        "nn in range(3) -n 0": "-n/--processes must be an integer >= 1",
        "nn in range(3) --backend dask --start-method spawn": "--start-method is for the local",
        "nn in range(3) --scheduler tcp://127.0.0.1:1": "--scheduler/--client is for --backend",
        "nn in range(3) --backend serial --chunksize 0": "--chunksize must be an integer >= 1",
    }
    for line, message in cases.items():
        res = run(ip, f"%%shm_parallel {line}\npass\n")
        assert not res.success
        err = capsys.readouterr()
        assert message in err.out + err.err, (line, err.out + err.err)
        assert "Traceback" not in err.out + err.err
