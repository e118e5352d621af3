"""Background runs and streaming, on every transport: ``parallel_map(...,
wait=False)`` returns a handle at once; its ``partial`` grows with copies of
what completed; ``cancel()`` keeps what completed and ``resume=`` runs the
rest; failures come out of ``result()`` as a blocking call raises them;
``imap`` yields results as they come and cancels the rest when left early.
Real processes; nothing may be left in /dev/shm or the process table."""

from __future__ import annotations

import re
import time
import warnings

import numpy as np
import pytest

import shm_kernel_safe as sks

from ..backends import backend, kw  # noqa: F401 - fixtures
from ..helpers import run_python, shm_entries

pytestmark = pytest.mark.timeout(240)

#: Hang guard for waits in these tests (never a timing assertion).
GUARD = 120


def slow_square(i):
    time.sleep(0.01)
    return float(i * i)


def until(predicate, what: str, guard: float = GUARD):
    deadline = time.monotonic() + guard
    while not predicate():
        assert time.monotonic() < deadline, f"hang guard: {what}"
        time.sleep(0.01)


def test_a_handle_comes_back_at_once_and_its_partial_grows(kw):
    n = 400
    handle = sks.parallel_map(slow_square, range(n), wait=False, **kw)
    assert isinstance(handle, sks.RunHandle)
    assert re.fullmatch(r"<run \d+/400 items, .+>", repr(handle))
    seen = []
    listed = False
    while not handle.done():
        partial = handle.partial
        if isinstance(partial, list):  # nothing completed yet: no kind to stack
            assert partial == [None] * n
            seen.append(0)
        else:
            done = ~np.ma.getmaskarray(partial)
            # every completed value is right, in memory of its own
            assert np.array_equal(np.ma.getdata(partial)[done], np.arange(n)[done] ** 2.0)
            assert sks.handle_of(np.ma.getdata(partial)) is None
            seen.append(int(done.sum()))
        finished, total = handle.progress
        assert total == n and 0 <= finished <= n
        listed = listed or any(r["total"] == n for r in sks.status()["runs"])
        time.sleep(0.05)
    assert handle.wait(GUARD)
    assert listed, "status() never listed the running run"
    assert seen == sorted(seen), "partial went back"
    assert any(0 < k < n for k in seen), f"no intermediate snapshot in {seen}"
    assert np.array_equal(handle.result(), np.arange(n) ** 2.0)
    assert handle.state == "done" and handle.progress == (n, n)
    assert re.fullmatch(r"<run 400/400 items, done in \S+>", repr(handle))
    assert not any(r["id"] == handle.status()["id"] for r in sks.status()["runs"])
    assert np.array_equal(handle.partial, np.arange(n) ** 2.0)
    assert not handle.errors


def test_time_left_counts_from_when_items_began(no_orphans):
    # A cold pool under spawn takes a second or more to start; the first
    # items then take ~0.1 s. Counted from the call, the time left came out
    # several times too long; counted from when items began, it does not.
    sks.shutdown_pools()
    n = 400
    handle = sks.parallel_map(slow_square, range(n), wait=False, processes=2, start_method="spawn")
    until(lambda: handle.progress[0] >= 10 or handle.done(), "the first items")
    finished, total = handle.progress
    eta, elapsed = handle.eta(), handle.elapsed
    if finished < n // 2:  # else the machine was too slow to look mid-run
        from_the_call = (total - finished) * elapsed / finished
        assert eta is not None and eta < from_the_call / 2, (eta, from_the_call)
    assert handle.wait(GUARD)
    assert handle.eta() == 0.0


def writes_square(y):
    def cell(i):
        time.sleep(0.01)
        y[i] = i * i
        return float(i)

    return cell


def test_cancel_keeps_what_completed_and_resume_runs_the_rest(kw):
    n = 600
    y = np.zeros(n)
    fn = writes_square(y)
    handle = sks.parallel_map(fn, range(n), out=y, wait=False, **kw)
    until(lambda: handle.progress[0] >= 40 or handle.done(), "40 items")
    assert handle.cancel() is True
    assert handle.done() and handle.state == "cancelled"
    assert "cancelled" in repr(handle)
    with pytest.raises(sks.RunCancelled) as info:
        handle.result()
    err = info.value
    assert isinstance(err, sks.RunFailed)
    kept = int(err.done.sum())
    assert 0 < kept < n
    assert np.array_equal(np.ma.getdata(err.partial)[err.done], np.arange(n)[err.done] * 1.0)
    assert np.array_equal(y[err.done], np.arange(n)[err.done] ** 2.0)  # their writes landed
    partial = handle.partial
    assert int((~np.ma.getmaskarray(partial)).sum()) == kept
    assert handle.cancel() is False  # ended already
    full = sks.parallel_map(fn, range(n), out=y, resume=err, **kw)
    assert np.array_equal(full, np.arange(n) * 1.0)
    assert np.array_equal(y, np.arange(n) ** 2.0)


def failing_at(bad):
    def cell(i):
        time.sleep(0.002)
        if i == bad:
            raise ValueError(f"bad item {i}")
        return i * 2.0

    return cell


def test_a_failure_comes_out_of_result_as_a_blocking_call_raises_it(kw):
    handle = sks.parallel_map(failing_at(150), range(300), wait=False, **kw)
    assert handle.wait(GUARD)
    assert handle.state == "failed" and "failed: TaskError" in repr(handle)
    with pytest.raises(sks.TaskError, match="bad item 150") as info:
        handle.result()
    assert info.value.index == 150 and not info.value.done[150]
    assert [e.index for e in handle.errors] == [150]
    rest = sks.parallel_map(failing_at(-1), range(300), resume=info.value, **kw)
    assert np.array_equal(rest, np.arange(300) * 2.0)


def test_errors_continue_lists_the_failures_and_warns_once_at_the_result(kw):
    handle = sks.parallel_map(failing_at(7), range(100), errors="continue", wait=False, **kw)
    assert handle.wait(GUARD)
    assert [e.index for e in handle.errors] == [7]
    assert "1 failed" in repr(handle)
    with pytest.warns(sks.ItemsFailedWarning):
        result = handle.result()
    assert result.mask[7] and result[8] == 16.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle.result()  # warned once


def test_arguments_are_checked_before_it_returns():
    with pytest.raises(sks.InvalidArgumentError, match="processes"):
        sks.parallel_map(abs, range(3), processes=0, wait=False)
    with pytest.raises(sks.InvalidArgumentError, match="wait"):
        sks.imap(abs, range(3), wait=False)


def test_two_background_runs_at_once(no_orphans):
    first = sks.parallel_map(slow_square, range(200), processes=2, wait=False)
    second = sks.parallel_map(slow_square, range(150), processes=1, wait=False)
    assert len(sks.status()["runs"]) >= 1
    assert np.array_equal(second.result(GUARD), np.arange(150) ** 2.0)
    assert np.array_equal(first.result(GUARD), np.arange(200) ** 2.0)


# -- imap ---------------------------------------------------------------------------------


def test_imap_ordered_and_unordered(kw):
    assert list(sks.imap(slow_square, range(120), **kw)) == [float(i * i) for i in range(120)]
    pairs = list(sks.imap(slow_square, range(120), ordered=False, **kw))
    assert sorted(pairs) == [(i, float(i * i)) for i in range(120)]
    assert not sks.status()["runs"]


def test_breaking_out_of_imap_cancels_the_rest(kw):
    got = []
    for value in sks.imap(slow_square, range(2000), **kw):
        got.append(value)
        if len(got) == 5:
            break
    assert got == [float(i * i) for i in range(5)]
    until(lambda: not sks.status()["runs"], "the cancelled run to end")


def test_imap_raises_the_failure_after_what_came_before(kw):
    got = []
    with pytest.raises(sks.TaskError, match="bad item 60"):
        for value in sks.imap(failing_at(60), range(200), **kw):
            got.append(value)
    assert got == [i * 2.0 for i in range(len(got))] and len(got) <= 60
    with pytest.warns(sks.ItemsFailedWarning):
        pairs = list(sks.imap(failing_at(60), range(200), ordered=False, errors="continue", **kw))
    assert sorted(i for i, _ in pairs) == [i for i in range(200) if i != 60]
    with pytest.warns(sks.ItemsFailedWarning):
        values = list(sks.imap(failing_at(60), range(200), errors="continue", **kw))
    assert values == [i * 2.0 for i in range(200) if i != 60]


# -- the end of the process ---------------------------------------------------------------

EXIT_MID_RUN = """
import time
import numpy as np
import shm_kernel_safe as sks

def cell(i):
    time.sleep(0.05)
    return np.full(4, float(i))

x = np.ones((400_000,))  # 3.2 MB: shared
run = sks.parallel_map(lambda i: cell(i) + x[:4], range(5000), processes=2, wait=False)
while run.progress[0] < 10:
    time.sleep(0.02)
print("running", run.progress, flush=True)
"""


def test_a_script_that_exits_mid_run_leaves_nothing():
    before = shm_entries()
    proc = run_python(EXIT_MID_RUN, timeout=GUARD)
    assert proc.returncode == 0, proc.stderr
    assert "running" in proc.stdout
    until(lambda: not (shm_entries() - before), "segments of the script", guard=10)
