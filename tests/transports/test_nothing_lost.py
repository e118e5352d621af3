"""Nothing lost: a failed, interrupted or timed-out run keeps every completed
result and write; runs go on past bad items and resume where they stopped.
Real processes on every transport."""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest

import shm_kernel_safe as sks

from ..backends import backend, kw  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(240)

N = 1000


def expected(i: int) -> float:
    return i * 0.5 + 1.0


def test_a_failed_item_keeps_every_completed_result_and_write(kw):
    plain = np.zeros(N)
    shared = sks.zeros(N)
    calls = np.zeros(N, dtype=np.int64)  # a per-item counter the workers write back
    broken = {"on": True}

    def fill(i):
        calls[i] += 1
        if broken["on"] and i == 900:
            raise ValueError(f"bad hour {i}")
        plain[i] = expected(i)
        shared[i] = expected(i)
        return expected(i)

    with pytest.raises(sks.TaskError) as info:
        sks.parallel_map(fill, range(N), out=[plain, shared, calls], **kw)
    err = info.value
    done, partial = err.done, err.partial
    assert err.index == 900 and not done[900] and done[:1].all()
    assert isinstance(partial, np.ma.MaskedArray)
    assert np.array_equal(partial.mask, ~done)
    assert np.array_equal(partial.compressed(), [expected(i) for i in np.flatnonzero(done)])
    for arr in (plain, shared):  # every write of every completed item landed
        assert np.array_equal(arr[done], [expected(i) for i in np.flatnonzero(done)])
    ran_before = calls.copy()

    broken["on"] = False  # the cause is fixed; run only what is missing
    full = sks.parallel_map(fill, range(N), out=[plain, shared, calls], resume=err, **kw)
    assert isinstance(full, np.ndarray) and not isinstance(full, np.ma.MaskedArray)
    assert np.array_equal(full, [expected(i) for i in range(N)])
    assert np.array_equal(plain, full) and np.array_equal(shared, full)
    again = calls - ran_before
    assert np.array_equal(again, (~done).astype(np.int64))  # each missing item ran once


def test_keep_going_masks_exactly_the_failed_items_and_names_them(kw):
    # A worker that dies: its item fails and the run goes on. (Serial: it
    # would end the test process.)
    deadly = kw["backend"] != "serial"

    def cell(i):
        if i in (17, 612):
            raise KeyError(f"hour {i}")
        if deadly and i == 301:
            os._exit(7)
        return float(i)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sks.parallel_map(cell, range(N), errors="continue", **kw)
    bad = [17, 301, 612] if deadly else [17, 612]
    assert isinstance(result, np.ma.MaskedArray)
    assert np.flatnonzero(result.mask).tolist() == bad
    assert np.array_equal(result.compressed(), [float(i) for i in range(N) if i not in bad])
    summaries = [w for w in caught if issubclass(w.category, sks.ItemsFailedWarning)]
    assert len(summaries) == 1
    text = str(summaries[0].message)
    assert text.startswith(f"{len(bad)} of {N} items failed: 17 KeyError")
    assert all(str(i) in text for i in bad)
    errors = sks.last_errors()
    assert [e.index for e in errors] == bad
    assert isinstance(errors[0], sks.TaskError) and "raise KeyError" in errors[0].remote_traceback
    if deadly:
        assert isinstance(errors[1], sks.WorkerDiedError)
    with pytest.warns(sks.ResumeFunctionChangedWarning, match="its code changed"):
        fixed = sks.parallel_map(float, range(N), resume=errors, **kw)
    assert np.array_equal(fixed, np.arange(N, dtype=float))


def test_list_results_keep_none_where_not_done(kw):
    def words(i):
        if i == 5:
            raise RuntimeError("no word")
        return f"w{i}"

    with pytest.warns(sks.ItemsFailedWarning):
        out = sks.parallel_map(words, range(40), errors="continue", **kw)
    assert out[5] is None and out[4] == "w4" and out[39] == "w39"


def test_timeout_keeps_what_completed(kw):
    def slow(i):
        time.sleep(0.05)
        return i

    sks.parallel_map(abs, range(4), **kw)  # workers up: the timeout is for the items alone
    with pytest.raises(sks.ParallelTimeoutError) as info:
        sks.parallel_map(slow, range(200), timeout=2.0, **kw)
    done = info.value.done
    assert 0 < done.sum() < 200
    partial = info.value.partial
    assert all(partial[i] == i for i in np.flatnonzero(done))
    rest = sks.parallel_map(slow, range(200), resume=info.value, **kw)
    assert np.array_equal(rest, np.arange(200))


def test_bad_recovery_arguments_are_refused(kw):
    with pytest.raises(ValueError, match="errors must be one of"):
        sks.parallel_map(abs, range(3), errors="ignore", **kw)
    with pytest.raises(ValueError, match="retries must be an integer"):
        sks.parallel_map(abs, range(3), retries=-1, **kw)
    with pytest.raises(ValueError, match="resume is from a run of 3 items; these are 4"):
        sks.parallel_map(abs, range(4), resume=sks.FailedItems([], np.zeros(3, bool), []), **kw)
    with pytest.raises(ValueError, match="resume must be an error"):
        sks.parallel_map(abs, range(4), resume=object(), **kw)
