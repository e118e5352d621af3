"""The engine's behaviour on every transport: the same call, the same
results, the same errors. A new transport is tested by adding one line to
``BACKENDS``."""

from __future__ import annotations

import time

import numpy as np
import pytest

import shm_kernel_safe as sks
from shm_kernel_safe.memory import arrays

from ..backends import backend, kw  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(180)

X = np.random.default_rng(3).standard_normal((40_000, 16))  # 5 MB: shared / scattered


def hourly(nn: int) -> float:
    return float(X[nn::100].sum())


def test_results_in_order_and_types(kw):
    y = sks.parallel_map(hourly, range(300), **kw)
    assert isinstance(y, np.ndarray) and y.dtype == np.float64 and y.shape == (300,)
    assert np.allclose(y, [hourly(i) for i in range(300)])
    assert sks.parallel_map(str.upper, ["a", "b", "c"], **kw) == ["A", "B", "C"]
    rows = sks.parallel_map(lambda i: np.full(3, i, dtype=np.int32), range(50), **kw)
    assert rows.shape == (50, 3) and rows.dtype == np.int32 and rows[49, 2] == 49
    assert arrays.handle_of(rows) is None and rows.base is None  # owned, not shared


def test_ragged_and_mixed_results_fall_back_to_list(kw):
    ragged = sks.parallel_map(lambda i: np.zeros(i % 3), range(40), **kw)
    assert isinstance(ragged, list) and [len(r) for r in ragged[:4]] == [0, 1, 2, 0]
    mixed = sks.parallel_map(lambda i: i if i else 0.5, range(40), **kw)
    assert isinstance(mixed, np.ndarray) and mixed[0] == 0.5 and mixed[39] == 39
    objs = sks.parallel_map(lambda i: {"i": i}, range(30), **kw)
    assert objs[29] == {"i": 29}
    assert sks.parallel_map(hourly, [], **kw) == []


def test_items_can_be_any_iterable_and_arrays(kw):
    gen = (i * 2 for i in range(25))
    assert sks.parallel_map(lambda v: v + 1, gen, **kw).tolist() == list(range(1, 50, 2))
    big_items = np.arange(300_000, dtype=np.float64).reshape(1000, 300)
    sums = sks.parallel_map(np.sum, big_items, **kw)
    assert np.allclose(sums, big_items.sum(axis=1))


def test_returned_views_are_copies(kw):
    rows = sks.parallel_map(lambda i: X[i], range(40), **kw)
    assert rows.base is None and np.array_equal(rows, X[:40])
    ragged = sks.parallel_map(lambda i: X[i, : 1 + i % 3], range(40), **kw)
    assert not any(np.shares_memory(r, X) for r in ragged)
    ragged[0][0] = 99.0
    assert X[0, 0] != 99.0


def test_outputs_are_written_into_the_callers_arrays(kw):
    y = np.zeros(300)
    two = np.zeros((300, 2), dtype=np.float32)

    def fill(nn):
        y[nn] = hourly(nn)
        two[nn] = (nn, -nn)

    sks.parallel_map(fill, range(300), out=[y, two], **kw)
    assert np.allclose(y, [hourly(i) for i in range(300)])
    assert two[299, 0] == 299 and two[299, 1] == -299


def test_task_error_names_item_and_cell_traceback(kw):
    def fails_on_7(i):
        if i == 7:
            raise ValueError(f"bad hour {i}")
        return i

    with pytest.raises(sks.TaskError) as info:
        sks.parallel_map(fails_on_7, range(100), **kw)
    err = info.value
    assert err.index == 7 and err.exc_type == "ValueError" and "bad hour 7" in str(err)
    assert err.item_repr == "7"
    assert "fails_on_7" in err.remote_traceback and "raise ValueError" in err.remote_traceback
    assert "run_items" not in err.remote_traceback and "run_chunk" not in err.remote_traceback
    assert isinstance(err.__cause__, ValueError)
    assert sks.parallel_map(lambda i: i, range(10), **kw).sum() == 45  # still usable


def test_timeout_stops_the_run(kw):
    t0 = time.monotonic()
    with pytest.raises(sks.ParallelTimeoutError, match="within 1"):
        sks.parallel_map(lambda i: time.sleep(0.3), range(40), timeout=1, **kw)
    assert time.monotonic() - t0 < 8
    assert sks.parallel_map(lambda i: i, range(10), **kw).sum() == 45


def test_progress_reaches_total(kw):
    seen: list[tuple[int, int]] = []
    sks.parallel_map(
        lambda i: time.sleep(0.002), range(200), progress=lambda d, t: seen.append((d, t)), **kw
    )
    assert seen[-1] == (200, 200)
    assert all(t == 200 for _, t in seen) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_bad_arguments_are_refused_before_anything_runs(kw):
    calls = []
    with pytest.raises(sks.InvalidArgumentTypeError, match="iterable"):
        sks.parallel_map(calls.append, 5, **kw)
    with pytest.raises(TypeError, match="callable"):
        sks.parallel_map(3, range(3), **kw)
    with pytest.raises(ValueError, match="chunksize"):
        sks.parallel_map(calls.append, range(3), chunksize=0, **kw)
    with pytest.raises(ValueError, match="timeout"):
        sks.parallel_map(calls.append, range(3), timeout=-1, **kw)
    with pytest.raises(TypeError, match=r"out\[0\] is a list"):
        sks.parallel_map(calls.append, range(3), out=[[1, 2]], **kw)
    read_only = np.zeros(3)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match=r"out\[0\] is read-only"):
        sks.parallel_map(calls.append, range(3), out=[read_only], **kw)
    assert calls == []
