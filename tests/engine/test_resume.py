"""resume= merges only what it can merge safely, on every transport: the
run checks the failed run's record (items, function, out= arrays) before
anything runs; and the magic's --resume finds its run whatever the order
and spacing of the line's options. Real processes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import shm_kernel_safe as sks

from ..backends import backend, kw  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(240)

N = 400


def failing_at(bad: int):
    def cell(i):
        if i == bad:
            raise ValueError(f"bad item {i}")
        return i * 2.0

    return cell


def failed_run(kw, items=range(N), out=(), bad=321):
    with pytest.raises(sks.TaskError) as info:
        sks.parallel_map(failing_at(bad), items, out=out, **kw)
    return info.value


def test_the_error_records_its_run_and_resume_completes_it(kw):
    err = failed_run(kw)
    assert isinstance(err.run.id, str) and len(err.run.items) == 32
    assert not err.done[321] and err.done.sum() >= 1
    again = failed_run(kw)
    assert again.run.id != err.run.id  # each call is its own run
    assert again.run.items == err.run.items and again.run.function == err.run.function
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same function: no warning
        full = sks.parallel_map(failing_at(-1), range(N), resume=err, **kw)
    assert np.array_equal(full, np.arange(N) * 2.0)


def test_other_items_of_the_same_length_are_refused(kw):
    err = failed_run(kw)
    other = list(range(1000, 1000 + N))  # 400 items, other values
    with pytest.raises(sks.InvalidArgumentError, match=r"from another run .*items differ") as info:
        sks.parallel_map(failing_at(-1), other, resume=err, **kw)
    assert err.run.id in str(info.value) and info.value.argument == "resume"
    # Another run's error with other items, the same count: refused too.
    arr_err = failed_run(kw, items=np.arange(N, dtype=float), bad=7)
    with pytest.raises(sks.InvalidArgumentError, match="items differ"):
        sks.parallel_map(failing_at(-1), np.arange(N) + 0.25, resume=arr_err, **kw)
    with pytest.raises(sks.InvalidArgumentError, match="items differ"):
        sks.parallel_map(failing_at(-1), range(N), resume=arr_err, **kw)


def test_a_changed_function_warns_and_runs_only_the_rest(kw):
    err = failed_run(kw)

    def fixed(i):
        return i * 2.0 + 0.0

    with pytest.warns(sks.ResumeFunctionChangedWarning, match=err.run.id) as caught:
        full = sks.parallel_map(fixed, range(N), resume=err, **kw)
    changed = [w for w in caught if issubclass(w.category, sks.ResumeFunctionChangedWarning)]
    assert changed[0].filename == __file__  # points at this call, not the engine
    assert np.array_equal(full, np.arange(N) * 2.0)


def test_out_arrays_that_are_not_the_ones_written_are_refused(kw):
    y = np.zeros(N)

    def write(i):
        if i == 300:
            raise ValueError("bad")
        y[i] = i + 1.0

    with pytest.raises(sks.TaskError) as info:
        sks.parallel_map(write, range(N), out=[y], **kw)
    err = info.value
    assert np.array_equal(y[err.done], np.flatnonzero(err.done) + 1.0)
    written = y
    # Re-allocated, as `y = np.zeros(N)` in a notebook does: the function now
    # writes into the new array, which does not hold the completed writes.
    y = np.zeros(N)
    with pytest.raises(sks.InvalidArgumentError, match=r"another out\[0\] array") as refused:
        sks.parallel_map(write, range(N), out=[y], resume=err, **kw)
    assert f"0x{id(written):x}" in str(refused.value) and "(400,) float64" in str(refused.value)
    with pytest.raises(sks.InvalidArgumentError, match="wrote into 1 out= array"):
        sks.parallel_map(float, range(N), resume=err, **kw)
    assert not y.any()  # nothing ran
    y = written

    def write_all(i):
        y[i] = i + 1.0

    with pytest.warns(sks.ResumeFunctionChangedWarning):
        sks.parallel_map(write_all, range(N), out=[y], resume=err, **kw)
    assert np.array_equal(y, np.arange(N) + 1.0)


def test_what_is_not_a_run_to_resume_is_refused_with_its_reason(kw):
    sks.parallel_map(float, range(10), **kw)
    with pytest.raises(sks.InvalidArgumentError, match="the last run had no failures; nothing to"):
        sks.parallel_map(float, range(10), resume=sks.last_errors(), **kw)
    handmade = sks.FailedItems([], np.zeros(10, bool), [None] * 10)
    with pytest.raises(sks.InvalidArgumentError, match="records no run"):
        sks.parallel_map(float, range(10), resume=handmade, **kw)


def test_last_errors_resume_and_a_resumed_failure_resume_again(kw):
    def flaky(i):
        if i in (17, 250):
            raise KeyError(i)
        return float(i)

    with pytest.warns(sks.ItemsFailedWarning):
        sks.parallel_map(flaky, range(N), errors="continue", **kw)
    first = sks.last_errors()
    assert first.run is not None and [e.index for e in first] == [17, 250]

    def still_250(i):
        if i == 250:
            raise KeyError(i)
        return float(i)

    with pytest.warns(sks.ResumeFunctionChangedWarning), pytest.raises(sks.TaskError) as info:
        sks.parallel_map(still_250, range(N), resume=first, **kw)
    err = info.value
    assert err.index == 250 and not err.done[250]
    others = np.ones(N, bool)
    others[[17, 250]] = False
    assert err.done[others].all()  # merged: the prior's done (+ item 17 if it came back first)
    assert err.run.items == first.run.items
    with pytest.warns(sks.ResumeFunctionChangedWarning):
        full = sks.parallel_map(float, range(N), resume=err, **kw)
    assert np.array_equal(full, np.arange(N, dtype=float))


# -- the magic's --resume key, in a real kernel -------------------------------------
@pytest.mark.usefixtures("no_orphans")
def test_magic_resume_is_keyed_on_the_parsed_line():
    from ..kernels import evaluate, execute, kernel

    with kernel("ipykernel") as (_km, kc):
        execute(kc, "%load_ext shm_kernel_safe")
        execute(kc, "import numpy as np\ny = np.zeros(20)\nbad = {5}\n")
        cell = "y[nn] = nn + 1.0\nif nn in bad:\n    raise ValueError(nn)\nnn * 2\n"
        res = execute(
            kc, "%%shm_parallel nn in range(20) --out y -r r -n 2 --progress none\n" + cell
        )
        assert res["status"] == "error" and res["error"]["ename"] == "TaskError"
        execute(kc, "bad = set()")
        # --resume first, other options in another order and spacing, -n dropped
        res = execute(
            kc, "%%shm_parallel nn in range( 20 ) --resume   -r r --progress none --out y\n" + cell
        )
        assert res["status"] == "ok", res
        assert "ResumeFunctionChangedWarning" not in res["stderr"]  # the same cell's code
        assert evaluate(kc, "bool(np.array_equal(r, np.arange(20) * 2))") == "True"
        assert evaluate(kc, "bool(np.array_equal(y, np.arange(20) + 1.0))") == "True"
        # Another loop (other items) has no failed run to resume.
        res = execute(kc, "%%shm_parallel nn in range(21) --out y -r r --resume\n" + cell)
        assert res["status"] == "error" and "no failed" in res["stderr"] + str(res["error"])
        # A re-allocated --out array is refused, in the magic's words.
        execute(kc, "bad = {5}")
        res = execute(kc, "%%shm_parallel nn in range(20) --out y -r r --progress none\n" + cell)
        assert res["error"]["ename"] == "TaskError"
        execute(kc, "y = np.zeros(20)\nbad = set()")
        res = execute(kc, "%%shm_parallel nn in range(20) --out y -r r --resume\n" + cell)
        assert res["status"] == "error"
        text = res["stderr"] + str(res["error"])
        assert "--resume" in text and "out[0]" in text, text
        # ItemsFailedWarning points at the cell, not at the package's code.
        execute(kc, "bad = {3}")
        res = execute(
            kc,
            "%%shm_parallel nn in range(20) -r r --errors continue --progress none\n" + cell,
        )
        assert res["status"] == "ok", res
        assert "ItemsFailedWarning" in res["stderr"], res
        assert "shm_kernel_safe" not in res["stderr"].split("ItemsFailedWarning")[0], res["stderr"]
        # The cell fixed after a failure resumes, warning at the cell that its code changed.
        execute(kc, "bad = set()")
        res = execute(kc, "%%shm_parallel nn in range(20) -r r --resume\n" + cell + "nn * 2 + 0\n")
        assert res["status"] == "ok" and "ResumeFunctionChangedWarning" in res["stderr"], res
        warned = res["stderr"].split("ResumeFunctionChangedWarning")[0]
        assert warned and "shm_kernel_safe" not in warned, res["stderr"]
        assert evaluate(kc, "bool(np.array_equal(r, np.arange(20) * 2))") == "True"
