"""The local worker's chunk loop, run in this process on real shared memory.

What a dead worker leaves behind is read from its control-block row: the
count of items done must cover exactly the items whose results are stored,
on every path of the per-item callbacks (stacked scalars, results that do
not stack, failed items with and without ``errors="continue"``).
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from shm_kernel_safe.engine.protocol import Payload
from shm_kernel_safe.memory.arrays import empty, handle_of
from shm_kernel_safe.transports.local import control, sharing, worker
from shm_kernel_safe.transports.local.control import ControlBlock
from shm_kernel_safe.transports.local.worker import (
    FAILED,
    FLUSH_SECONDS,
    MISFIT,
    VALUES,
    ChunkTask,
    RowsTask,
    read_log,
    run_chunk,
    run_rows,
)


def item(i: int) -> float:
    if i == 13:
        raise ValueError("thirteen")
    if i == 7:
        return 7  # an int among floats: kept aside, not stacked
    return i * 0.5


@pytest.fixture
def chunk_of():
    held = []

    def make(
        start: int,
        stop: int,
        *,
        keep_going: bool = False,
        track_time: bool = False,
        ledger: str | None = None,
        fn=item,
        stacked: bool = True,
    ):
        data, report = sharing.dumps(Payload(fn, range(20)))
        buf = empty(len(data), dtype=np.uint8)
        buf[:] = np.frombuffer(data, dtype=np.uint8)
        ctrl = ControlBlock.create(4)
        out = empty(20)
        out[:] = -1.0
        held.append((buf, ctrl, out, report))
        task = ChunkTask(
            uuid.uuid4().hex,
            handle_of(buf),
            handle_of(ctrl.array),
            1,
            1,
            start,
            stop,
            handle_of(out) if stacked else None,
            float if stacked else None,
            keep_going,
            track_time,
            ledger,
        )
        return run_chunk(task), ctrl.table[1], out

    yield make
    for *_, report in held:
        sharing.release(report)
    held.clear()


@pytest.mark.parametrize("track_time", [False, True])
def test_done_count_covers_stored_results(chunk_of, track_time):
    result, row, out = chunk_of(2, 12, track_time=track_time)
    assert result.error is None and result.done == 10
    assert row[control.DONE] == 10 and row[control.STATE] == control.FINISHED
    assert result.misfits == {7: 7} and type(result.misfits[7]) is int
    assert out[2:12].tolist() == [i * 0.5 if i != 7 else -1.0 for i in range(2, 12)]
    assert out[12] == -1.0  # nothing written past the chunk


def test_a_result_that_does_not_stack_is_logged_before_it_is_counted(chunk_of, tmp_path):
    # The log is what the parent reads if the worker dies: every item the
    # control block counts as done must have its misfit there.
    ledger = str(tmp_path / "ledger-")
    result, row, _ = chunk_of(5, 9, ledger=ledger)
    assert result.done == 4 and row[control.DONE] == 4 and result.misfits == {7: 7}
    assert read_log(f"{ledger}1", int(row[control.LOG_END])) == [(7, MISFIT, 7)]


def test_a_failed_item_stops_the_chunk_after_the_done_ones(chunk_of):
    result, row, out = chunk_of(10, 16)
    assert result.error is not None and result.error.index == 13
    assert result.done == 3 and row[control.DONE] == 3
    assert out[10:13].tolist() == [5.0, 5.5, 6.0] and out[13] == -1.0


def test_keep_going_counts_failed_items_too(chunk_of):
    result, row, out = chunk_of(10, 16, keep_going=True)
    assert set(result.failed) == {13} and result.error is None
    assert result.done == 6 and row[control.DONE] == 6
    assert out[14:16].tolist() == [7.0, 7.5]


def test_a_chunk_times_its_items_not_the_warning_recorder(monkeypatch):
    # The one-item probe's ``seconds`` sizes the run's smallest chunk: set-up
    # around the items (here made slow on purpose) must not count.
    import contextlib
    import time

    from shm_kernel_safe.engine import chunk_loop, worker_warnings
    from shm_kernel_safe.engine.protocol import ChunkResult

    real = worker_warnings.recording

    @contextlib.contextmanager
    def slow_recording(items):
        time.sleep(1.0)
        with real(items) as seen:
            yield seen

    monkeypatch.setattr(chunk_loop.worker_warnings, "recording", slow_recording)
    t0 = time.perf_counter()
    result = chunk_loop.run_items(abs, [-1], 0, 1, ChunkResult(0))
    assert time.perf_counter() - t0 >= 1.0 and result.done == 1
    assert result.seconds < 1.0


def slow_pair(i: int) -> tuple[int, str]:
    """A result that does not stack, a third of FLUSH_SECONDS of work."""
    time.sleep(FLUSH_SECONDS / 3)
    if i == 13:
        raise ValueError("thirteen")
    return (i, "x" * i)


def logged_values(ledger: str, row, failed: set[int] | None = None) -> dict[int, object]:
    """Values logged in runs; the indices of logged failures go in ``failed``."""
    values = {}
    for index, kind, obj in read_log(f"{ledger}1", int(row[control.LOG_END])):
        if kind == FAILED and failed is not None:
            failed.add(index)
            continue
        assert kind == VALUES
        for k, value in enumerate(obj):
            values[index + k] = value
    return values


def test_results_that_do_not_stack_are_logged_in_runs_before_they_are_saved(chunk_of, tmp_path):
    # What the parent salvages from a dead worker's chunk is items
    # start .. start + SAVED - 1, read from the log: each must be there, with
    # its value, and the log holds runs of values, not a record per item.
    ledger = str(tmp_path / "ledger-")
    result, row, _ = chunk_of(0, 12, ledger=ledger, fn=slow_pair, stacked=False)
    assert result.done == 12 and row[control.DONE] == 12
    saved = int(row[control.SAVED])
    assert 0 < saved <= 12
    values = logged_values(ledger, row)
    assert sorted(values)[:saved] == list(range(saved))
    assert all(values[i] == (i, "x" * i) for i in range(saved))
    records = read_log(f"{ledger}1", int(row[control.LOG_END]))
    assert len(records) < saved  # runs, one per FLUSH_SECONDS of work
    # Each value is pickled once: the message carries only those not logged.
    assert result.logged == saved
    assert [values[i] for i in range(saved)] + result.values == [slow_pair(i) for i in range(12)]


def test_a_short_chunk_of_results_that_do_not_stack_writes_no_log(chunk_of, tmp_path):
    ledger = str(tmp_path / "ledger-")
    result, row, _ = chunk_of(0, 5, ledger=ledger, fn=lambda i: (i,), stacked=False)
    assert result.values == [(i,) for i in range(5)] and row[control.DONE] == 5
    assert row[control.SAVED] == 0 and row[control.LOG_END] == 0
    assert not list(tmp_path.iterdir())  # no file: the result message is enough


def test_a_failed_item_keeps_its_place_in_the_logged_runs(chunk_of, tmp_path):
    ledger = str(tmp_path / "ledger-")
    result, row, _ = chunk_of(10, 20, ledger=ledger, fn=slow_pair, stacked=False, keep_going=True)
    assert set(result.failed) == {13} and result.done == 10
    saved, failed = int(row[control.SAVED]), set()
    values = logged_values(ledger, row, failed)
    assert failed == {13}  # logged at once, whatever was saved
    for i in range(10, 10 + saved):
        assert values[i] == (None if i == 13 else (i, "x" * i))
    every = [values[i] for i in range(10, 10 + result.logged)] + result.values
    assert every == [None if i == 13 else (i, "x" * i) for i in range(10, 20)]


def test_a_value_that_cannot_be_logged_leaves_the_rest_of_its_run(chunk_of, tmp_path):
    def odd(i):
        time.sleep(FLUSH_SECONDS / 3)
        # a generator pickles with neither pickle nor cloudpickle
        return (j for j in range(i)) if i == 2 else (i,)

    ledger = str(tmp_path / "ledger-")
    result, row, _ = chunk_of(0, 12, ledger=ledger, fn=odd, stacked=False)
    saved = int(row[control.SAVED])
    values = logged_values(ledger, row)
    assert saved > 3 and 2 not in values
    assert all(values[i] == (i,) for i in range(saved) if i != 2)
    # the message carries every value (the bad one becomes its item's error there)
    assert result.logged == 0 and len(result.values) == 12


# -- a worker's task: chunks claimed one after another -------------------------------
@pytest.fixture
def rows_of(monkeypatch, tmp_path):
    """A control block with ``spans`` written as chunks 10, 11, ...; returns
    ``run(stop, stacked=True)``, one worker task's results, and the block."""
    import threading

    monkeypatch.setattr(worker, "_claim_lock", threading.Lock())
    held = []

    def make(spans, fn=item):
        data, report = sharing.dumps(Payload(fn, range(20)))
        buf = empty(len(data), dtype=np.uint8)
        buf[:] = np.frombuffer(data, dtype=np.uint8)
        ctrl = ControlBlock.create(len(spans))
        for row, (start, stop) in enumerate(spans):
            ctrl.publish(row, 10 + row, start, stop)
        out = empty(20)
        out[:] = -1.0
        held.append((buf, ctrl, out, report))
        call_id = uuid.uuid4().hex
        ledger = str(tmp_path / f"{call_id}-")

        def run(stop, stacked=True):
            return run_rows(
                RowsTask(
                    call_id,
                    handle_of(buf),
                    handle_of(ctrl.array),
                    stop,
                    handle_of(out) if stacked else None,
                    float if stacked else None,
                    ledger=ledger,
                )
            )

        return run, ctrl, out, ledger

    yield make
    for *_, report in held:
        sharing.release(report)
    held.clear()


def test_a_worker_claims_rows_in_order_below_its_stop(rows_of):
    run, ctrl, out, _ = rows_of([(0, 3), (3, 7), (8, 12), (14, 20)])
    first = run(stop=3)
    assert [r.chunk for r in first] == [10, 11, 12] and ctrl.claimed() == 3
    assert [r.done for r in first] == [3, 4, 4]
    assert (ctrl.table[:3, control.STATE] == control.FINISHED).all()
    assert ctrl.table[3, control.STATE] == control.PENDING  # past its stop: left
    second = run(stop=4)
    assert [r.chunk for r in second] == [13] and ctrl.claimed() == 4
    assert run(stop=4) == [] and ctrl.claimed() == 4  # nothing left: no claim
    ran = [i for span in [(0, 3), (3, 7), (8, 12), (14, 20)] for i in range(*span)]
    assert out[ran].tolist() == [i * 0.5 if i != 7 else -1.0 for i in ran]  # 7 is a misfit


def test_a_worker_returns_at_an_error_and_claims_nothing_once_cancelled(rows_of):
    run, ctrl, _, _ = rows_of([(10, 16), (16, 18), (18, 20)])
    results = run(stop=3)
    assert len(results) == 1 and results[0].error.index == 13  # the parent stops the call
    assert ctrl.claimed() == 1
    ctrl.cancel()
    assert run(stop=3) == [] and ctrl.claimed() == 1


def test_a_worker_returns_what_it_ran_after_its_time(rows_of, monkeypatch):
    # So the parent takes results (and a journal records them) during a call.
    monkeypatch.setattr(worker, "RETURN_SECONDS", 0.0)
    run, _, _, _ = rows_of([(0, 2), (2, 4), (4, 6)])
    assert [len(run(stop=3)) for _ in range(4)] == [1, 1, 1, 0]


def test_values_that_do_not_stack_are_logged_whole_before_the_next_claim(rows_of):
    # Its chunks' message leaves only with the worker's last chunk: until
    # then, the log is where the parent finds a dead worker's results.
    run, ctrl, _, ledger = rows_of([(0, 3), (3, 5)], fn=lambda i: (i,))
    results = run(stop=2, stacked=False)
    for row, res in enumerate(results):
        start, stop = ctrl.table[row, [control.START, control.STOP]]
        assert ctrl.table[row, control.SAVED] == stop - start == res.done
        assert res.logged == res.done and res.values == []  # each value pickled once
        logged = read_log(f"{ledger}{res.chunk}", int(ctrl.table[row, control.LOG_END]))
        assert logged == [(start, VALUES, [(i,) for i in range(start, stop)])]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
@pytest.mark.parametrize("stacked", [True, False])
def test_a_call_sends_each_worker_one_task_not_one_per_chunk(method, stacked, monkeypatch):
    # A loky message costs its worker 0.3-0.9 ms of idling: workers claim
    # chunks from the control block instead of waiting for one each.
    import math

    import shm_kernel_safe as sks
    from shm_kernel_safe.transports.local import pool
    from shm_kernel_safe.transports.local.transport import LocalTransport

    tasks, chunks = [], []
    send, submit = pool._Executor.submit, LocalTransport.submit

    def counted_send(self, fn, *args, **kwargs):
        tasks.append(fn.__name__)
        return send(self, fn, *args, **kwargs)

    def counted_submit(self, chunk):
        chunks.append(chunk)
        return submit(self, chunk)

    sks.prestart(2, method)
    monkeypatch.setattr(pool._Executor, "submit", counted_send)
    monkeypatch.setattr(LocalTransport, "submit", counted_submit)

    def tiny(i):
        return i * 0.5 if stacked else (i,)

    t0 = time.monotonic()
    out = sks.parallel_map(tiny, range(8760), processes=2, start_method=method)
    elapsed = time.monotonic() - t0
    assert list(out) == [tiny(i) for i in range(8760)]
    # the probe's task, one per worker for the rest, and one more per worker
    # each time a worker hands back what it ran (RETURN_SECONDS)
    bound = 1 + 2 * (1 + math.ceil(elapsed / worker.RETURN_SECONDS))
    assert set(tasks) == {"run_rows"} and len(tasks) <= bound
    covered = sorted(i for c in chunks for i in range(c.start, c.stop))
    assert covered == list(range(8760))


@pytest.mark.timeout(120)
def test_chunks_run_in_the_order_they_were_cut_across_control_blocks():
    # Capped chunks (journaled and background runs cap theirs) fill several
    # control blocks, each more than a task's RETURN_SECONDS of work: one
    # worker must still run them in order, a block's chunks before the
    # next block's, not a task per block queued at once and each run for a
    # quarter second in turn.
    from shm_kernel_safe.engine.run import Run
    from shm_kernel_safe.engine.transport import Inputs
    from shm_kernel_safe.transports.local.transport import LocalTransport

    def stamp(i):
        time.sleep(0.0015)
        return time.monotonic()

    transport = LocalTransport(processes=1)
    try:
        run = Run(stamp, range(800), transport, inputs=Inputs(1 << 20))
        run.chunk_seconds = 0.02
        stamps = run.execute()
        assert len(transport.blocks) > 2  # the case: chunks in several blocks
    finally:
        transport.release()
    assert (np.diff(stamps) > 0).all()
