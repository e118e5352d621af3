"""One result contract on every transport: the same per-item results come
back in the same container, with the same dtype and masks, whatever ran
them (the table in engine/results.py and parallel_map's docstring). Real
processes; enough items that the local transport stacks results in shared
memory after its probe."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import shm_kernel_safe as sks
from shm_kernel_safe.engine.results import assemble

from ..backends import backend, kw  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(240)

N = 300

# name -> (function of the item, what the call returns on every transport)
CASES = {
    "ints then floats": (
        lambda i: float(i) if i % 2 else i,
        np.arange(N, dtype=float),
    ),
    "0-d arrays, mixed dtypes": (
        lambda i: np.array(i) if i % 2 else np.array(float(i)),
        np.arange(N, dtype=float),
    ),
    "0-d arrays after a scalar": (
        lambda i: np.array(float(i)) if i else 0.0,
        np.arange(N, dtype=float),
    ),
    "float32 then a Python int": (
        lambda i: 7 if i == 200 else np.float32(i),
        np.where(np.arange(N) == 200, 7.0, np.arange(N)).astype(np.float64),
    ),
    "rows of one shape": (
        lambda i: np.full(3, i, dtype=np.int32),
        np.repeat(np.arange(N, dtype=np.int32)[:, None], 3, axis=1),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_results_same_container_on_every_transport(kw, case):
    fn, expected = CASES[case]
    out = sks.parallel_map(fn, range(N), **kw)
    assert type(out) is np.ndarray, type(out)
    assert out.dtype == expected.dtype and np.array_equal(out, expected)


def test_masked_array_results_keep_their_masks(kw):
    def masked_row(i):
        return np.ma.masked_array([i, 2 * i], mask=[False, i % 7 == 0])

    out = sks.parallel_map(masked_row, range(N), **kw)
    assert isinstance(out, np.ma.MaskedArray) and out.shape == (N, 2)
    assert np.array_equal(np.flatnonzero(out.mask[:, 1]), np.arange(0, N, 7))
    assert not out.mask[:, 0].any()
    assert np.array_equal(out.data[:, 1], 2 * np.arange(N))

    def masked_scalar(i):
        return np.ma.masked if i == 150 else i

    out = sks.parallel_map(masked_scalar, range(N), **kw)
    assert isinstance(out, np.ma.MaskedArray) and np.flatnonzero(out.mask).tolist() == [150]


def test_failed_items_are_masked_and_lists_keep_none(kw):
    def cell(i):
        if i == 123:
            raise ValueError("bad")
        return np.array(float(i))  # 0-d: stacks like a scalar

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sks.ItemsFailedWarning)
        out = sks.parallel_map(cell, range(N), errors="continue", **kw)
        words = sks.parallel_map(
            lambda i: str(i) if i != 9 else {}["x"], range(N), errors="continue", **kw
        )
    assert isinstance(out, np.ma.MaskedArray) and out.dtype == float
    assert np.flatnonzero(out.mask).tolist() == [123]
    assert type(words) is list and words[9] is None and words[10] == "10"


def test_anything_else_is_a_list_in_item_order(kw):
    out = sks.parallel_map(lambda i: np.zeros(1 + i % 2), range(N), **kw)
    assert type(out) is list and [len(v) for v in out[:3]] == [1, 2, 1]
    assert sks.parallel_map(float, [], **kw) == []


def test_partial_results_follow_the_same_rule(kw):
    def cell(i):
        if i == 250:
            raise ValueError("bad")
        return np.ma.masked_array([i], mask=[i == 3])

    with pytest.raises(sks.TaskError) as info:
        sks.parallel_map(cell, range(N), **kw)
    partial, done = info.value.partial, info.value.done
    assert isinstance(partial, np.ma.MaskedArray)
    assert partial.mask[3, 0] and partial.mask[~done].all()
    kept = done.copy()
    kept[3] = False
    assert not partial.mask[kept].any()


def test_the_rule_itself():
    assert assemble([]) == []
    assert type(assemble([1, 2.5])) is np.ndarray
    assert assemble([np.array(1), 2]).tolist() == [1, 2]
    assert type(assemble(["a", 1])) is list
    half = assemble([1.0, None], np.array([True, False]))
    assert isinstance(half, np.ma.MaskedArray) and half.mask.tolist() == [False, True]
    plain_rows = assemble([np.ma.masked_array([1, 2]), np.array([3, 4])])
    assert type(plain_rows) is np.ndarray  # nothing masked: a plain array
    assert assemble([None, None], np.array([False, False])) == [None, None]
