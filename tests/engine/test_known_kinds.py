"""A function run before skips its probe: the kind of its results and its
item time are remembered (``engine.known_kinds``). A guess that misses costs
speed, never a value: every call returns what a first call would."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import shm_kernel_safe as sks
from shm_kernel_safe.engine import known_kinds, planning

from ..backends import backend, kw  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(300)

N = 60  # enough items per worker for a probe (planning.FEW_ITEMS_PER_WORKER)


def shaped(i: int, kind: str):
    """One result of ``kind`` for item ``i``: same code whatever the kind."""
    if kind == "float":
        return float(i)
    if kind == "int":
        return i
    if kind == "huge int":
        return 2**70 if i == 7 else i
    if kind == "float32":
        return np.float32(i)
    if kind == "tuple":
        return (i, i)
    if kind == "vec3":
        return np.full(3, i, dtype=float)
    if kind == "vec4":
        return np.full(4, i, dtype=float)
    if kind == "masked":
        return np.ma.masked_array([i, i], mask=[False, i % 2 == 0])
    if kind == "float or str":
        return "x" if i == 40 else float(i)
    assert kind == "none"
    return None


def fails_at(i: int, at: int) -> float:
    if i == at:
        raise ValueError(f"item {i}")
    return float(i)


def same(a, b) -> None:
    """``a`` is ``b``: type, dtype, shape, values and mask."""
    assert type(a) is type(b)
    if isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            if isinstance(x, np.ndarray):
                same(x, y)
            else:
                assert type(x) is type(y) and x == y
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.ma.getdata(a), np.ma.getdata(b))
    np.testing.assert_array_equal(np.ma.getmaskarray(a), np.ma.getmaskarray(b))


@pytest.fixture
def cuts(monkeypatch):
    """Which way each run cut its chunks: after a probe, or all at once."""
    seen: list[str] = []
    for name in ("cut_rest", "cut_all"):
        real = getattr(planning.Plan, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            seen.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(planning.Plan, name, spy)
    return seen


def test_a_second_run_of_a_function_sends_every_chunk_at_once(kw, cuts):
    fn = functools.partial(shaped, kind="float")
    first = sks.parallel_map(fn, range(N), **kw)
    second = sks.parallel_map(fn, range(N), **kw)
    assert cuts == ["cut_rest", "cut_all"]
    same(second, first)
    assert first.tolist() == [float(i) for i in range(N)]


@pytest.mark.parametrize("before", ["float", "vec3", "int"])
@pytest.mark.parametrize(
    "now",
    [
        "float",
        "int",
        "huge int",
        "float32",
        "tuple",
        "vec3",
        "vec4",
        "masked",
        "float or str",
        "none",
    ],
)
def test_a_wrong_guess_returns_what_a_first_run_returns(before, now, cuts, no_orphans):
    sks.parallel_map(functools.partial(shaped, kind=before), range(N), processes=2)
    guessed = sks.parallel_map(functools.partial(shaped, kind=now), range(N), processes=2)
    assert cuts[-1] == "cut_all"  # the guess was made
    known_kinds.clear()
    fresh = sks.parallel_map(functools.partial(shaped, kind=now), range(N), processes=2)
    assert cuts[-1] == "cut_rest"
    same(guessed, fresh)


@pytest.mark.parametrize(
    ("before", "now"), [("float", "tuple"), ("vec3", "vec4"), ("float", "int")]
)
def test_a_wrong_guess_is_right_on_every_transport_and_not_made_twice(kw, cuts, before, now):
    sks.parallel_map(functools.partial(shaped, kind=before), range(N), **kw)
    guessed = sks.parallel_map(functools.partial(shaped, kind=now), range(N), **kw)
    again = sks.parallel_map(functools.partial(shaped, kind=now), range(N), **kw)
    # The local transport stacked results like the guess: one that did not
    # fit makes it forget the function. The others keep item 0's kind
    # when it stacks (a tuple does not), for the next run's chunk sizes.
    forgot = kw["backend"] == "local" or now == "tuple"
    assert cuts == ["cut_rest", "cut_all", "cut_rest" if forgot else "cut_all"]
    expected = [shaped(i, now) for i in range(N)]
    same(guessed, again)
    if now == "tuple":
        assert guessed == expected
    else:
        same(guessed, np.array(expected))


def test_a_guess_that_missed_on_the_local_transport_is_forgotten(cuts, no_orphans):
    sks.parallel_map(functools.partial(shaped, kind="float"), range(N), processes=2)
    sks.parallel_map(functools.partial(shaped, kind="tuple"), range(N), processes=2)
    assert known_kinds.recall(functools.partial(shaped, kind="tuple")) is None
    sks.parallel_map(functools.partial(shaped, kind="tuple"), range(N), processes=2)
    assert cuts == ["cut_rest", "cut_all", "cut_rest"]


def test_item_0_failing_in_a_run_without_probe(kw, cuts):
    sks.parallel_map(functools.partial(fails_at, at=-1), range(N), **kw)
    with pytest.raises(sks.TaskError) as info:
        sks.parallel_map(functools.partial(fails_at, at=0), range(N), **kw)
    assert info.value.index == 0
    assert not info.value.done[0]
    with pytest.warns(sks.ItemsFailedWarning):
        out = sks.parallel_map(functools.partial(fails_at, at=0), range(N), errors="continue", **kw)
    assert "cut_all" in cuts
    assert np.flatnonzero(np.ma.getmaskarray(out)).tolist() == [0]
    assert out[1:].tolist() == [float(i) for i in range(1, N)]


def test_a_cell_run_again_is_the_same_function():
    source = "def hour(nn):\n    return nn * 0.5\n"
    first, again, other = {}, {}, {}
    exec(compile(source, "<cell-1>", "exec"), first)
    exec(compile(source, "<cell-2>", "exec"), again)
    exec(compile(source.replace("0.5", "2.0"), "<cell-3>", "exec"), other)
    key = known_kinds.function_key(first["hour"])
    assert key is not None and key == known_kinds.function_key(again["hour"])
    assert key != known_kinds.function_key(other["hour"])
    assert known_kinds.function_key(abs) == known_kinds.function_key(abs)
    assert known_kinds.function_key(abs) != known_kinds.function_key(int)
    assert known_kinds.function_key(np.sqrt) is None  # no code: never guessed


def test_only_small_stacking_results_are_remembered(no_orphans):
    def vector(i, size):
        return np.full(size, i, dtype=float)

    sks.parallel_map(functools.partial(vector, size=4), range(N), processes=2)
    kind = known_kinds.recall(functools.partial(vector, size=4))
    assert kind is not None and kind.seconds_per_item > 0
    # A copy, never a view of the run's shared memory (gone after the run).
    assert kind.prototype.base is None and kind.prototype.tolist() == [0.0] * 4
    big = known_kinds.MAX_PROTOTYPE_BYTES // 8 + 1
    sks.parallel_map(functools.partial(vector, size=big), range(N), processes=2)
    assert known_kinds.recall(functools.partial(vector, size=big)) is None
    sks.parallel_map(functools.partial(shaped, kind="tuple"), range(N), processes=2)
    assert known_kinds.recall(functools.partial(shaped, kind="tuple")) is None
