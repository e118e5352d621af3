"""Random sequences of everything a user, a pool and a variable explorer do
to shared memory: never a crash, never a wrong value, and /dev/shm back to
where it started."""

from __future__ import annotations

import gc
import os
from multiprocessing import shared_memory

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

import shm_kernel_safe as sks
from shm_kernel_safe.memory.segments import Segment, unlink_name

from .helpers import shm_entries


@pytest.fixture(autouse=True)
def _frozen_heap():
    """Objects from before the test (a whole dask cluster's client side, if
    test_dask ran first) are moved out of the collector's way: the machine's
    many gc.collect() calls then cost what the test's own objects cost."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


class Seg:
    """A segment under test, made through the stdlib (protected) or ours."""

    def __init__(self, kind: str, n: int, value: float) -> None:
        self.kind, self.n, self.value = kind, n, value
        self.closed = self.unlinked = False
        if kind == "stdlib":
            self.obj = shared_memory.SharedMemory(create=True, size=n * 8)
            self.name = self.obj.name
            np.ndarray((n,), np.float64, buffer=self.obj.buf)[:] = value
        else:
            arr = sks.empty(n)
            arr[:] = value
            self.obj = arr
            self.name = sks.handle_of(arr).name

    def new_view(self, frombuffer: bool) -> np.ndarray:
        if self.kind == "stdlib":
            if frombuffer:
                return np.frombuffer(self.obj.buf, dtype=np.float64)
            return np.ndarray((self.n,), np.float64, buffer=self.obj.buf)
        return self.obj[:]

    def close(self) -> None:
        if self.kind == "stdlib":
            self.obj.close()
        else:
            self.obj = None  # dropping our reference is how ours is "closed"
        self.closed = True

    def unlink(self) -> None:
        if self.kind == "stdlib":
            self.obj.unlink()
        else:
            unlink_name(self.name)
        self.unlinked = True


class SharedMemoryMachine(RuleBasedStateMachine):
    segments = Bundle("segments")
    views = Bundle("views")

    def __init__(self) -> None:
        super().__init__()
        sks.protect()
        self.start = shm_entries()
        self.all_segs: list[Seg] = []
        self.live_views: dict[int, tuple[np.ndarray, float]] = {}
        self.attached: list[Segment] = []

    @rule(
        target=segments,
        kind=st.sampled_from(["stdlib", "ours"]),
        n=st.integers(1, 4096),
        value=st.floats(-1e6, 1e6, allow_nan=False),
    )
    def create(self, kind, n, value):
        seg = Seg(kind, n, value)
        self.all_segs.append(seg)
        return seg

    @rule(target=views, seg=segments, frombuffer=st.booleans())
    def view(self, seg, frombuffer):
        if seg.closed:
            return None
        v = seg.new_view(frombuffer)
        self.live_views[id(v)] = (v, seg.value)
        return v

    @rule(target=views, seg=segments)
    def attach(self, seg):
        # Ours: dropping the owner's array may have been the last reference,
        # which unlinks the name by design; the model cannot attach then.
        if seg.unlinked or (seg.kind == "ours" and seg.closed):
            return None
        attached = Segment.attach(seg.name, seg.n * 8)
        v = np.ndarray((seg.n,), np.float64, buffer=attached.root)
        attached.close()  # the view alone keeps the mapping
        self.live_views[id(v)] = (v, seg.value)
        return v

    @rule(target=views, v=views, data=st.data())
    def slice(self, v, data):
        if v is None:
            return None
        start = data.draw(st.integers(0, max(0, v.size - 1)))
        step = data.draw(st.sampled_from([1, 2, -1]))
        s = v[start::step] if step > 0 else v[start::-1]
        expected = self.live_views[id(v)][1] if id(v) in self.live_views else None
        if expected is None:
            return None
        self.live_views[id(s)] = (s, expected)
        return s

    @rule(seg=segments)
    def close(self, seg):
        seg.close()

    @rule(seg=segments)
    def unlink(self, seg):
        if not seg.unlinked:
            seg.unlink()

    @rule(v=views)
    def drop(self, v):
        if v is not None:
            self.live_views.pop(id(v), None)

    @rule()
    def collect(self):
        gc.collect()

    @rule(v=views)
    def read(self, v):
        if v is None or id(v) not in self.live_views:
            return
        arr, expected = self.live_views[id(v)]
        assert not sks.is_dangling(arr)
        if arr.size:
            assert arr[0] == expected and arr[-1] == expected

    @invariant()
    def nothing_dangles(self):
        for arr, _ in self.live_views.values():
            assert not sks.is_dangling(arr)

    def teardown(self):
        for seg in self.all_segs:
            if not seg.closed:
                seg.close()
            if not seg.unlinked:
                seg.unlink()
        self.live_views.clear()
        self.all_segs.clear()
        gc.collect()
        sks.unprotect()
        assert shm_entries() - self.start == set()


#: Steps in all (examples x 25 steps); ``benchmarks/soak.py`` runs 10,000.
FUZZ_STEPS = int(os.environ.get("SHM_KERNEL_SAFE_FUZZ_STEPS", "1000"))

SharedMemoryMachine.TestCase.settings = settings(
    max_examples=max(1, FUZZ_STEPS // 25),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_shared_memory_machine = SharedMemoryMachine.TestCase
