"""The engine's pieces, in milliseconds, on the serial transport: planning,
gathering, error mapping, cancel, deadlines; and the lifecycle registry."""

from __future__ import annotations

import time

import numpy as np
import pytest

import shm_kernel_safe as sks
from shm_kernel_safe import lifecycle
from shm_kernel_safe.engine.planning import Plan, guided_chunks
from shm_kernel_safe.engine.protocol import ChunkResult
from shm_kernel_safe.engine.results import gather
from shm_kernel_safe.engine.run import Run
from shm_kernel_safe.engine.transport import Inputs, WorkerLost
from shm_kernel_safe.transports.serial import SerialTransport

pytestmark = pytest.mark.timeout(30)


def serial_run(fn, items, **kwargs):
    transport = SerialTransport()
    try:
        return Run(fn, items, transport, inputs=Inputs(1 << 20), **kwargs).execute()
    finally:
        transport.release()


# -- planning -----------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100, 8760])
@pytest.mark.parametrize("workers", [1, 2, 16])
@pytest.mark.parametrize("chunksize", [None, 1, 37])
def test_plan_covers_every_item_once_within_its_bound(n, workers, chunksize):
    plan = Plan(n, workers, chunksize)
    bound = plan.max_chunks()
    if plan.probing:
        assert [(c.start, c.stop) for c in plan.chunks] == [(0, 1)]
        plan.cut_rest(probe_seconds=1e-4, min_chunk_seconds=0.004)
    covered = [i for c in plan.chunks for i in range(c.start, c.stop)]
    assert covered == list(range(n))
    assert [c.number for c in plan.chunks] == list(range(len(plan.chunks)))
    assert len(plan.chunks) <= max(bound, 1)


def test_few_items_go_one_per_chunk_and_many_are_probed():
    assert not Plan(8, 2, None).probing and len(Plan(8, 2, None).chunks) == 8
    assert Plan(9, 2, None).probing


def test_guided_chunks_shrink_and_respect_the_floor():
    chunks = guided_chunks(8760, 2, first=1, min_chunk=40)
    sizes = [b - a for a, b in chunks]
    assert sizes[0] == (8760 - 1) // 4 and sizes == sorted(sizes, reverse=True)
    assert min(sizes[:-1]) >= 40


def test_probe_time_sets_the_smallest_chunk():
    slow, fast = Plan(8760, 2, None), Plan(8760, 2, None)
    slow.cut_rest(probe_seconds=0.1, min_chunk_seconds=0.004)
    fast.cut_rest(probe_seconds=1e-6, min_chunk_seconds=0.004)
    assert len(slow.chunks) > len(fast.chunks)
    assert all(c.size >= 4000 for c in fast.chunks[1:-1])  # 4 ms of 1 us items
    assert slow.chunks[-1].size == 1  # 100 ms items: the tail goes one by one


# -- gathering --------------------------------------------------------------------
def test_gather_values_in_chunk_order_and_misfits_into_stacked():
    results = [ChunkResult(1, done=2, values=[2.0, 3.0]), ChunkResult(0, done=2, values=[0, 1])]
    out = gather(results, 4, None)
    assert isinstance(out, np.ndarray) and out.tolist() == [0, 1, 2, 3]
    stacked = np.arange(4.0)
    fit = gather([ChunkResult(0, done=4)], 4, stacked)
    assert fit.tolist() == [0, 1, 2, 3] and fit.base is None and fit is not stacked
    mixed = gather([ChunkResult(0, done=4, misfits={2: "two"})], 4, stacked, 0.0)
    assert mixed == [0.0, 1.0, "two", 3.0] and type(mixed[0]) is float


# -- errors -------------------------------------------------------------------------
def test_task_error_keeps_the_live_traceback_in_process():
    def bad(i):
        local_marker = i * 10  # noqa: F841 - read back from the frame below
        if i == 3:
            raise KeyError(i)
        return i

    with pytest.raises(sks.TaskError) as info:
        serial_run(bad, range(10))
    err = info.value
    assert err.index == 3 and err.exc_type == "KeyError" and isinstance(err.__cause__, KeyError)
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_name == "bad" and tb.tb_frame.f_locals["local_marker"] == 30


class DyingTransport(SerialTransport):
    """A transport whose 'worker' dies on one item: the engine's mapping of
    lost workers, without killing a process."""

    name = "dying"

    def __init__(self, dies_on: int) -> None:
        super().__init__()
        self.dies_on = dies_on

    def wait(self, timeout: float) -> list[ChunkResult]:
        chunk = self.queue[0] if self.queue else None
        if chunk is not None and chunk.start <= self.dies_on < chunk.stop:
            raise WorkerLost(
                chunks=[chunk.number],
                index=self.dies_on,
                who="worker 7",
                how=" (signal 9)",
                recovery="it was replaced",
            )
        return super().wait(timeout)


def test_lost_worker_becomes_worker_died_error_naming_the_item():
    transport = DyingTransport(dies_on=5)
    with pytest.raises(sks.WorkerDiedError) as info:
        Run(lambda i: i, list("abcdefgh"), transport, inputs=Inputs(1)).execute()
    assert info.value.index == 5
    assert str(info.value) == "worker 7 died (signal 9) while running item 5 ('f'); it was replaced"
    assert transport.stopped  # the engine cancelled the rest
    done, partial = info.value.done, info.value.partial
    assert done[0] and not done[5]  # the chunks before the dead one were kept
    assert partial == [c if d else None for c, d in zip("abcdefgh", done, strict=True)]


def test_deadline_stops_between_items_with_progress_so_far():
    seen = []
    t0 = time.monotonic()
    with pytest.raises(sks.ParallelTimeoutError, match=r"within 0.3 s \((\d+)/100 items"):
        serial_run(
            lambda i: time.sleep(0.02),
            range(100),
            timeout=0.3,
            progress=lambda d, t: seen.append(d),
        )
    assert time.monotonic() - t0 < 1.0
    assert 0 < seen[-1] < 100 and seen == sorted(seen)


def test_a_failing_progress_callback_is_not_blamed_on_an_item():
    def broken(done, total):
        raise RuntimeError("display broke")

    with pytest.raises(RuntimeError, match="display broke"):
        serial_run(lambda i: time.sleep(0.001), range(500), progress=broken)


def test_interrupt_inside_an_item_propagates_as_keyboard_interrupt():
    ran = []

    def item(i):
        ran.append(i)
        if i == 20:
            raise KeyboardInterrupt
        return i

    with pytest.raises(KeyboardInterrupt):
        serial_run(item, range(100))
    assert ran == list(range(21))


def test_serial_writes_outputs_in_place_and_sees_the_callers_objects():
    y = np.zeros(50)
    seen_ids = set()

    def fill(i):
        seen_ids.add(id(y))
        y[i] = i

    sks.parallel_map(fill, range(50), out=[y], backend="serial")
    assert y.tolist() == list(range(50)) and seen_ids == {id(y)}


def test_serial_ignores_pool_options_but_refuses_a_client():
    assert sks.parallel_map(abs, [-1, -2], backend="serial", processes=8).tolist() == [1, 2]
    with pytest.raises(ValueError, match="client= is for backend='dask'"):
        sks.parallel_map(abs, [-1], backend="serial", client="tcp://127.0.0.1:1")


# -- lifecycle --------------------------------------------------------------------
def test_closers_run_in_order_on_their_events_and_survive_failures(monkeypatch):
    monkeypatch.setattr(lifecycle, "_closers", {})
    calls = []

    def failing(event):
        calls.append(("failing", event))
        raise RuntimeError("boom")

    lifecycle.register("late", lambda e: calls.append(("late", e)), order=50)
    lifecycle.register("early", failing, order=10, events={lifecycle.EXIT})
    lifecycle.register("middle", lambda e: calls.append(("middle", e)), order=20)
    lifecycle.run(lifecycle.EXIT)
    assert calls == [("failing", "exit"), ("middle", "exit"), ("late", "exit")]
    calls.clear()
    lifecycle.run(lifecycle.UNLOAD)
    assert calls == [("middle", "unload"), ("late", "unload")]
    with pytest.raises(ValueError, match="unknown"):
        lifecycle.register("x", print, order=1, events={"reboot"})


def test_package_registers_its_closers_once():
    names = [name for name, _, _ in lifecycle.registered()]
    assert len(names) == len(set(names))
    assert {"segment-names", "local-pools", "mp-helpers"} <= set(names)
    order = {name: o for name, o, _ in lifecycle.registered()}
    assert order["segment-names"] < order["local-pools"] < order["mp-helpers"]
    events = {name: e for name, _, e in lifecycle.registered()}
    assert lifecycle.UNLOAD not in events["segment-names"]  # the user's arrays stay named
    # cached copies of the user's ordinary arrays are ours: dropped on every event, first
    assert order["share-cache"] < order["segment-names"]
    assert events["share-cache"] == lifecycle.EVENTS
