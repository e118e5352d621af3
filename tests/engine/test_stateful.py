"""Random sequences of everything a user, a pool and a variable explorer do
to shared memory: never a crash, never a wrong value, and /dev/shm back to
where it started. And random sequences of runs that fail in every way
(workers killed, items timed out, interrupts, concurrent runs): the ledger
always equals what the items wrote."""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import gc
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from multiprocessing import shared_memory

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

import shm_kernel_safe as sks
from shm_kernel_safe.memory.segments import Segment, unlink_name
from shm_kernel_safe.transports.local import pool

from ..helpers import shm_entries


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


# -- runs under failure: the ledger equals what the items wrote -------------------


def _write_row(i, rows, stuck_at, die_at, marker):
    """An item: dies at ``die_at`` (once, ``marker``), hangs at ``stuck_at``,
    else writes ``i + 1`` into its row, as its last act."""
    if i == die_at and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    if i == stuck_at:
        time.sleep(3600)
    time.sleep(0.001)
    rows[i] = i + 1
    return i


class RunsMachine(RuleBasedStateMachine):
    """Runs with worker kills (from inside and from outside), item timeouts,
    interrupts and concurrent runs; after every step, the run's ledger equals
    what its items wrote into an ``out=`` array."""

    def __init__(self) -> None:
        super().__init__()
        self.start = shm_entries()
        self.tmp = tempfile.mkdtemp(prefix="sks-stateful-")
        self.steps = 0
        self.checked = 0

    def _marker(self) -> str:
        self.steps += 1
        return os.path.join(self.tmp, f"died-{self.steps}")

    def _check(self, done, rows, slack: int = 0) -> None:
        """The ledger claims nothing not written; it misses at most ``slack``
        items (stopped from outside between their write and being counted)."""
        wrote = rows != 0
        assert not (done & ~wrote).any(), np.flatnonzero(done & ~wrote)[:10]
        assert (wrote & ~done).sum() <= slack, np.flatnonzero(wrote & ~done)[:10]
        self.checked += 1

    def _run(self, n, rows, *, stuck_at=-1, die_at=-1, **options):
        marker = self._marker()
        return sks.parallel_map(
            functools.partial(
                _write_row, rows=rows, stuck_at=stuck_at, die_at=die_at, marker=marker
            ),
            range(n),
            processes=2,
            out=[rows],
            **options,
        )

    @rule(n=st.integers(1, 300), mode=st.sampled_from(["raise", "continue", "retries"]))
    def worker_dies_inside(self, n, mode):
        die_at = n // 2
        rows = sks.zeros(n)
        options = {"raise": {}, "continue": {"errors": "continue"}, "retries": {"retries": 1}}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", sks.ItemsFailedWarning)
                out = self._run(n, rows, die_at=die_at, **options[mode])
        except sks.WorkerDiedError as exc:
            assert mode == "raise" and exc.index == die_at
            # loky kills the other worker at any instant, possibly after its
            # item wrote its row and before it was counted (likelier than the
            # microseconds suggest: the waking manager thread preempts it).
            # Only the run that goes on (continue, retries) re-runs that item.
            self._check(exc.done, rows, slack=1)
            return
        done = ~np.ma.getmaskarray(out)
        # [die_at]; or [] when a worker killed by an earlier step died in the
        # same instant and loky's report took this death for collateral: the
        # item then ran again (its marker lets it live). The ledger holds either way.
        failed = np.flatnonzero(~done).tolist()
        assert failed == ([die_at] if mode == "continue" else []) or failed == []
        self._check(done, rows)

    @rule(n=st.integers(200, 600), after=st.floats(0.05, 0.4), errors=st.booleans())
    def worker_killed_from_outside(self, n, after, errors):
        rows = sks.zeros(n)
        sks.prestart(processes=2)
        pids = [p for info in pool.pool_info() for p in info["pids"]]
        timer = threading.Timer(after, _kill_quietly, args=(pids[:1],))
        timer.start()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", sks.ItemsFailedWarning)
                out = self._run(n, rows, errors="continue" if errors else "raise")
            done = ~np.ma.getmaskarray(out)
        except sks.WorkerDiedError as exc:
            done = exc.done
        finally:
            timer.cancel()
            timer.join()
        self._check(done, rows, slack=2)

    @rule(n=st.integers(20, 200))
    def item_timeout(self, n):
        rows = sks.zeros(n)
        stuck = n // 3
        with pytest.warns(sks.ItemsFailedWarning):
            out = self._run(n, rows, stuck_at=stuck, errors="continue", item_timeout=0.5)
        assert np.flatnonzero(np.ma.getmaskarray(out)).tolist() == [stuck]
        self._check(~np.ma.getmaskarray(out), rows)

    @rule(n=st.integers(100, 2000), after=st.floats(0.05, 0.6))
    def interrupt(self, n, after):
        rows = sks.zeros(n)
        inside = threading.Event()

        def handler(signum, frame):
            if inside.is_set():
                raise KeyboardInterrupt

        previous = signal.signal(signal.SIGINT, handler)
        timer = threading.Timer(after, os.kill, args=(os.getpid(), signal.SIGINT))
        try:
            timer.start()
            inside.set()
            try:
                out = self._run(n, rows)
                done = np.ones(n, dtype=bool)
                assert out.tolist() == list(range(n))
            except KeyboardInterrupt as exc:
                done = getattr(exc, "done", None)
                if done is None:  # landed before the run began
                    done = np.zeros(n, dtype=bool)
            finally:
                inside.clear()
                timer.cancel()
                timer.join()
        finally:
            signal.signal(signal.SIGINT, previous)
        self._check(done, rows, slack=2)

    @rule(n=st.integers(50, 400))
    def concurrent_runs(self, n):
        rows_a, rows_b = sks.zeros(n), sks.zeros(n)
        outcome = {}

        def other():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", sks.ItemsFailedWarning)
                    outcome["b"] = self._run(n, rows_b, die_at=n // 2, errors="continue")
            except BaseException as exc:  # checked below
                outcome["b"] = exc

        thread = threading.Thread(target=other)
        thread.start()
        out_a = self._run(n, rows_a)
        thread.join(300)  # a hang guard: a lost worker ends a run within ~60 s
        if thread.is_alive():
            faulthandler.dump_traceback(all_threads=True)  # where it waits, for the log
        assert out_a.tolist() == list(range(n))
        self._check(np.ones(n, dtype=bool), rows_a)
        out_b = outcome.get("b", "still running after 300 s")
        assert isinstance(out_b, np.ma.MaskedArray), out_b
        assert np.flatnonzero(out_b.mask).tolist() == [n // 2]
        self._check(~out_b.mask, rows_b)

    @invariant()
    def no_private_pool_outlives_its_run(self):
        assert not [p for p in pool.pool_info() if p["private"]]

    def teardown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)
        pool.shutdown_all()
        gc.collect()
        deadline = time.monotonic() + 5
        while (left := {e for e in shm_entries() - self.start if e.startswith("sks")}) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
            gc.collect()
        assert not left, left


def _kill_quietly(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


#: Steps of the runs machine (each a real run or two); soak runs more.
RUN_STEPS = int(os.environ.get("SHM_KERNEL_SAFE_RUN_STEPS", "12"))

RunsMachine.TestCase.settings = settings(
    max_examples=max(1, RUN_STEPS // 6),
    stateful_step_count=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_runs_machine = pytest.mark.slow(
    pytest.mark.timeout(600)(pytest.mark.usefixtures("no_orphans")(RunsMachine.TestCase))
)
