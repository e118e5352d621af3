"""One run of a function over items, on any transport: the engine.

It owns, once for every transport: validating the arguments, building the
payload, planning chunks (a probe, then guided chunks), the wait loop
(deadline, progress, interrupt), mapping failures to the errors users see,
and gathering the results. Whatever happens (an item that raises, a dead
worker, a timeout, Ctrl-C) the run cancels what is left, stops stuck
workers, and releases everything it holds before returning.

The wait loop and the ledger::

    submit(chunks) ──► transport ──► workers: items start..stop, each counted
         ▲                │             in shared memory (control block DONE)
         │                │ wait(<= POLL_INTERVAL)
         │                ▼
         │        ┌─ ChunkResult ──────────► _take ──┐
         │        ├─ WorkerLost(salvage,   ► _recover┤   the ledger (this Run):
         │        │    culprits)                     ├─► done[item], results,
         │        ├─ nothing: progress, item_timeout,│   failures, attempts
         │        │    deadline (timeout=)           │
         │        └─ stall: no chunk runs for        │
         │             STALL_SECONDS (local) ────────┘
         └── rest of a lost chunk (split around its culprit), retries

``done`` is the ledger: an item is done once a chunk's result or, when its
worker died, the transport's ``salvage`` (what the control block counted,
with the values and errors of the chunk's log) says so; a done item is never
submitted again. Culprits (the items dead workers were running) fail or go
again on a fresh worker (``retries``); ``exc.done`` and ``exc.partial`` of
any error are ``done`` and the values it marks.

A run may wait on another thread than its caller's (a background run,
``engine.background``): the ledger is then read by the caller while it is
fed, so every change to it and every read from outside (:meth:`Run.snapshot`,
:meth:`Run.new_values`) holds ``Run.lock``; the transport waits, and items
run (serial), without it. :meth:`Run.cancel` may be called from any thread:
the wait loop notices it within ``POLL_INTERVAL`` (the serial transport
between items) and ends with :class:`RunCancelled`.

Every wait is bounded and named: ``wait`` returns within ``POLL_INTERVAL``;
a run ends on ``timeout=`` (``ParallelTimeoutError``), a worker death
(``WorkerDiedError`` unless recovered), a stalled pool (``WorkerDiedError``
"... or hung"), an interrupt (``ParallelInterrupt``); cancelling waits
``CANCEL_GRACE`` for running chunks, then stops their workers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import numpy as np

from .._text import item_repr
from ..errors import (
    FailedItems,
    InvalidArgumentTypeError,
    ParallelInterrupt,
    ParallelTimeoutError,
    PartialResults,
    RunCancelled,
    ShmKernelSafeError,
    TaskError,
    WorkerDiedError,
)
from . import captured, hints, known_kinds, tracebacks, worker_warnings
from .journal import CHUNK_SECONDS, Journal
from .planning import Chunk, Plan
from .protocol import ChunkResult, Payload, RemoteError, Subset
from .reporting import ThrottledReport
from .results import assemble, gather, item_values, stored_value
from .resume import (
    OutputRecord,
    Prior,
    RunRecord,
    fingerprint_function,
    fingerprint_items,
    new_run_id,
)
from .transport import Inputs, Transport, WorkerLost

ProgressCallback = Callable[[int, int], None]

#: How long running chunks get to notice a cancel before their workers are stopped.
CANCEL_GRACE = 0.5
#: Pools lost with no item to blame (workers that die idle, or as they
#: start) after which the run stops instead of starting workers again.
MAX_BLAMELESS_LOSSES = 3
#: How often the wait loop wakes for progress and the deadline, in seconds.
POLL_INTERVAL = 0.05


# -- the run ----------------------------------------------------------------------


class Run:
    """One call: ``fn`` over ``items`` on ``transport``.

    Parameters
    ----------
    fn, items
        The function and its work items (a sequence).
    transport
        Where the chunks run; the caller releases it when the run ends.
    chunksize
        Fixed items per chunk, or None to plan from the probe.
    timeout
        Seconds after which the run stops with :class:`ParallelTimeoutError`.
    inputs
        How arrays travel (sharing threshold, forced and output arrays).
    progress
        ``progress(done, total)``, called from this thread, throttled.
    errors
        ``"raise"``: the first failed item stops the run. ``"continue"``:
        failed items are recorded (``self.failures``) and the run goes on.
    retries
        How many times an item whose worker died is run again, on a fresh
        worker, before it counts as failed.
    item_timeout
        Seconds an item may run before its worker is stopped and the item
        fails with ``TimeoutError`` (transports that can stop one worker).
    resume
        The error (or ``last_errors()``) of an earlier run of ``fn`` over
        ``items`` with the same ``out=`` arrays: checked before anything
        runs (:meth:`.resume.Prior.check`), then only the items it did not
        complete run, and its results are merged into this run's, once.
    journal
        The run's :class:`.journal.Journal`, opened (and checked) by the
        caller: what it recorded counts as done, like a ``resume=``; the
        ledger feeds it as chunks come back, and chunks are cut to at most
        ``journal.CHUNK_SECONDS`` of work.

    Whatever happens, the run ends with ``done`` (one bool per item) and
    what completed, which every error it raises carries (``exc.done``,
    ``exc.partial``, and ``exc.run``: what ran, for ``resume=``), with the
    writes of completed items into ``out=`` arrays landed. After a run with
    failed items (``errors="continue"``), ``failed_items`` lists them.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        items: Any,
        transport: Transport,
        *,
        chunksize: int | None = None,
        timeout: float | None = None,
        inputs: Inputs,
        progress: ProgressCallback | None = None,
        errors: str = "raise",
        retries: int = 0,
        item_timeout: float | None = None,
        resume: Any = None,
        journal: Journal | None = None,
    ) -> None:
        self.fn = fn
        self.id = new_run_id()
        self.all_items = items
        # Checked before anything runs: a resume that cannot be merged is refused.
        self.prior = None if resume is None else Prior.check(resume, fn, items, inputs.outputs)
        self.journal = journal
        if journal is not None:  # what it recorded is done, like a resume='s
            self.prior = journal.begin(self.prior)
        self.positions: np.ndarray | None = None  # the caller's index of each item run
        if self.prior is not None:
            self.positions = np.flatnonzero(~self.prior.done)
            items = Subset(items, self.positions)
        self.items = items
        self.n_items = len(items)
        self.transport = transport
        self.chunksize = chunksize
        self.timeout = timeout
        self.inputs = inputs
        self.keep_going = errors == "continue"
        self.retries = retries
        self.item_timeout = item_timeout
        self.failed_items: FailedItems | None = None
        self.first: Any = None  # the probe's result, the kind ``stacked`` holds
        self.deadline: float | None = None
        self.results: dict[int, ChunkResult] = {}
        self.done = np.zeros(self.n_items, dtype=bool)
        self.failures: dict[int, BaseException] = {}  # item -> its error (keep_going)
        self.attempts: dict[int, int] = {}  # item -> times its worker died under it
        self.recovered = False  # a worker died: chunks were salvaged and split
        self.blameless_losses = 0  # workers lost while running none of our items
        self.timed_out: set[int] = set()
        self.stacked: np.ndarray | None = None
        self.plan: Plan | None = None
        self.pending: set[int] = set()
        self.show_progress = ThrottledReport(progress, self.n_items, transport.items_done)
        # Guards the ledger against readers on other threads; notified when it grows.
        self.lock = threading.Condition()
        self.cancel_requested = False
        self.prepared = False
        # Most seconds of work per chunk, for runs read while they go on.
        self.chunk_seconds: float | None = None
        # When items began to run (for the time left, see background.eta).
        self.items_started: float | None = None

    # -- the happy path ------------------------------------------------------------
    def execute(self) -> np.ndarray | np.ma.MaskedArray | list:
        """Run every item; the results in item order (masked where items failed)."""
        started = time.monotonic()
        if self.timeout is not None:
            self.deadline = started + self.timeout
        transport = self.transport
        if self.n_items == 0:  # nothing (left) to run: no process starts
            return self._outcome()[1]
        self.prepare()
        try:
            transport.start(self._chunk_bound, self._heartbeat)
        except KeyboardInterrupt as exc:
            # While workers start or data is sent (a dask cluster takes
            # seconds): nothing ran yet, and the interrupt says so.
            raise self._stopped(exc) from None
        self.items_started = time.monotonic()  # inputs sent (a cold pool may still start)
        plan = self.plan = Plan(self.n_items, transport.workers, self.chunksize)
        cap = self.chunk_seconds or (CHUNK_SECONDS if self.journal is not None else 0.0)
        known = known_kinds.recall(self.fn) if plan.probing else None
        try:
            if known is not None:
                # Run before: no probe; its fixed costs are all paid by now.
                seconds = known.seconds_per_item
                fixed = time.monotonic() - started
                hints.warn_if_not_worth_it(self.fn, self.n_items, seconds, fixed, stacklevel=3)
                self._stack_like(known.prototype)
                with self.lock:
                    chunks = plan.cut_all(seconds, transport.min_chunk_seconds, cap)
                self._run_chunks(chunks)
            else:
                self._run_chunks(plan.chunks)
            if plan.probing:
                # Item 0 may have come back in chunk 0, or (its worker died
                # or was stopped) in a chunk run again, or failed.
                value, seconds = self._probe()
                if seconds > 0:
                    fixed = time.monotonic() - started - seconds
                    hints.warn_if_not_worth_it(self.fn, self.n_items, seconds, fixed, stacklevel=3)
                if self.done[0] and 0 not in self.failures:
                    self._stack_like(value)
                with self.lock:  # readers map results to chunks through the plan
                    rest = plan.cut_rest(seconds, transport.min_chunk_seconds, cap)
                self._run_chunks(rest)
        except BaseException as exc:
            raise self._stopped(exc) from _cause(exc)
        self.show_progress(force=True)
        transport.land_outputs()
        self._remember_kind()
        if not (self.failures or self.recovered) and self.prior is None:
            return gather(self.results.values(), self.n_items, self.stacked, self.first)
        done, result = self._outcome()
        if self.failures:
            errors = [self.failures[i] for i in sorted(self.failures)]
            self.failed_items = FailedItems(errors, done, result, self.record())
        return result

    def prepare(self) -> None:
        """Encode the payload (big inputs copied to shared memory); no process starts.

        Called by :meth:`execute`, or before it by a caller that starts the
        run on another thread: the inputs are then read as they are when
        the call returns, and a payload that cannot travel raises there.
        """
        if self.prepared or self.n_items == 0:
            return
        self.prepared = True
        try:
            self.transport.encode(
                Payload(self.fn, self.items),
                self.inputs,
                keep_going=self.keep_going,
                item_timeout=self.item_timeout,
            )
        except (ShmKernelSafeError, MemoryError):
            raise  # our own errors (no room in /dev/shm...) say what happened
        except Exception as exc:
            raise unpicklable_error(self.fn, exc) from exc

    def cancel(self) -> None:
        """Ask the run to stop (from any thread): it ends with :class:`RunCancelled`."""
        self.cancel_requested = True

    def snapshot(self) -> tuple[np.ndarray, np.ndarray | np.ma.MaskedArray | list, dict]:
        """(done, partial, failures) as they stand, safe from any thread.

        ``partial`` is built from copies (:func:`~.results.assemble`), never
        a view of the run's shared memory.
        """
        with self.lock:
            done, partial = self._outcome()
            return done, partial, dict(self.failures)

    def new_values(self, given: dict[int, int]) -> list[tuple[int, Any]]:
        """(index, value) of the items completed since the last call, safe
        from any thread; ``given`` (chunk -> items handed out) is the caller's
        state between calls. Failed items are left out (see ``failures``)."""
        out: list[tuple[int, Any]] = []
        with self.lock:
            if self.plan is None:
                return out
            for number, res in list(self.results.items()):
                start = self.plan.chunks[number].start
                begin = given.get(number, 0)
                for k in range(begin, res.done):
                    index = start + k
                    if index in res.failed or not self.done[index]:
                        continue
                    if index in res.misfits:
                        value = res.misfits[index]
                    elif res.values is not None and k < len(res.values):
                        value = res.values[k]
                    elif self.stacked is not None:
                        value = stored_value(self.stacked, index, self.first)
                    else:
                        continue
                    out.append((self._original(index), value))
                given[number] = res.done
        return out

    def _outcome(self) -> tuple[np.ndarray, np.ndarray | np.ma.MaskedArray | list]:
        """(done, result) over the caller's items: this run's values, merged
        with the resumed run's, assembled by the one rule of ``results``."""
        values, done = self.values(), self.done
        if self.prior is not None:
            values, done = self.prior.merge(values, done, self.positions)  # type: ignore[arg-type]
        return done.copy(), assemble(values, done)

    def record(self) -> RunRecord:
        """What this run ran, for its errors (``exc.run``) and ``resume=``.

        Fingerprints are computed here, when a run failed, never on the way
        of a run that succeeds; a resumed run's items were fingerprinted
        when they were checked.
        """
        if self.prior is not None:
            items = self.prior.record.items
        else:
            items = fingerprint_items(self.all_items)
        return RunRecord(
            self.id,
            items,
            fingerprint_function(self.fn),
            tuple(OutputRecord.of(arr) for arr in self.inputs.outputs),
        )

    def _stack_like(self, first: Any) -> None:
        """Let the transport store results like ``first`` in place (the
        probe's result, or one remembered from an earlier run)."""
        stacked = self.transport.stack_results(first, self.n_items)
        with self.lock:
            self.first, self.stacked = first, stacked

    def _remember_kind(self) -> None:
        """Let the next run of this function skip its probe (``known_kinds``):
        remember its first result's kind when every result was like it,
        else forget the function (a guess that missed is not made twice)."""
        results = list(self.results.values())
        done = sum(res.done for res in results)
        seconds = sum(res.seconds for res in results) / done if done else 0.0
        # Stacked with no misfit: item 0 was like ``first``. Not stacked
        # (other transports): item 0's value came back as it is.
        first = self._probe()[0] if self.stacked is None else self.first
        if first is None or any(res.misfits for res in results):
            known_kinds.forget(self.fn)
        else:
            known_kinds.remember(self.fn, first, seconds)

    def _probe(self) -> tuple[Any, float]:
        """Item 0's value and the seconds it took (0.0: unknown, e.g. salvaged)."""
        for res in self.results.values():
            chunk = self.plan.chunks[res.chunk]  # type: ignore[union-attr]
            if chunk.start == 0 and res.done >= 1:
                value = res.values[0] if res.values else res.misfits.get(0)
                return value, res.seconds / res.done
        return None, 0.0

    def _chunk_bound(self, workers: int) -> int:
        # The most chunks the plan sends to ``workers`` workers: asked by a
        # transport that sizes per-chunk state up front (local: its control block).
        return Plan(self.n_items, workers, self.chunksize).max_chunks()

    def values(self) -> list:
        """One value per item, None where it did not complete."""
        starts = {c.number: c.start for c in self.plan.chunks} if self.plan else {}
        return item_values(
            self.results.values(), starts, self.n_items, self.stacked, self.done, self.first
        )

    # -- waiting ---------------------------------------------------------------
    def _run_chunks(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            self._submit(chunk)
        while self.pending:
            try:
                finished = self.transport.wait(self._poll_timeout())
            except WorkerLost as lost:
                with self.lock:
                    self._recover(lost)
                continue
            errors = []
            with self.lock:
                for res in finished:  # every result of the batch is kept before one raises
                    try:
                        self._take(res)
                    except TaskError as exc:
                        errors.append(exc)
                self.lock.notify_all()
            if errors:
                raise min(errors, key=lambda e: e.index)
            if self.cancel_requested:
                raise RunCancelled()  # worded by _stopped, once what was running is kept
            self.show_progress()
            if self.journal is not None:
                self.journal.tick(self)
            if self.item_timeout is not None:
                self._stop_overdue_items()
            if self.pending and self._past_deadline():
                raise ParallelTimeoutError(
                    f"parallel_map did not finish within {self.timeout} s "
                    f"({int(self.done.sum())}/{self.n_items} items done); "
                    f"{self.transport.stopped_text}"
                )

    def _submit(self, chunk: Chunk) -> None:
        self.transport.submit(chunk)
        self.pending.add(chunk.number)

    def _take(self, res: ChunkResult) -> None:
        """Record a chunk's result in the ledger: what completed, what failed."""
        chunk = self.plan.chunks[res.chunk]  # type: ignore[union-attr]
        worker_warnings.reissue(res.warnings, self.fn)
        if not self.results and self.items_started is not None:
            # The first chunk began when its worker did: a cold pool starts
            # while the first chunks wait, and that wait is not items' time.
            self.items_started = max(self.items_started, time.monotonic() - res.seconds)
        self.results[res.chunk] = res
        if self.journal is not None:
            self.journal.took(res, chunk)
        self.done[chunk.start : chunk.start + res.done] = True
        for index, err in res.failed.items():
            self.done[index] = False
            self.failures[index] = task_error(
                err, self.fn, self._original(index), self.inputs.outputs
            )
        if res.error is not None:
            raise task_error(
                res.error, self.fn, self._original(res.error.index), self.inputs.outputs
            )
        if res.done == chunk.size:
            self.pending.discard(res.chunk)
        # else: stopped early (its deadline passed); the loop raises the timeout

    # -- dead and stuck workers ----------------------------------------------------
    def _recover(self, lost: WorkerLost) -> None:
        """Workers died: keep what their chunks completed, fail or retry the
        items they ran, and run the rest of those chunks again.

        What the lost chunks completed (``lost.salvage``) enters the ledger
        first and never runs again. The rest of each lost chunk goes again,
        split around its culprit; where no culprit is known, item by item,
        so that the next death names it. Raises when an item fails and
        ``errors="raise"``.
        """
        plan = self.plan
        assert plan is not None
        self.recovered = True
        for res in lost.salvage:
            if res.chunk in self.pending:
                self._take(res)  # a salvaged result carries no error to raise
        lost_chunks = [c for c in lost.chunks if c in self.pending]
        failed_now: list[int] = []
        retried: list[int] = []
        for culprit in lost.indices:
            self.attempts[culprit] = self.attempts.get(culprit, 0) + 1
            if culprit in self.timed_out or self.attempts[culprit] > self.retries:
                failed_now.append(culprit)
            else:
                retried.append(culprit)
        if failed_now and not self.keep_going:
            raise self._item_lost_error(failed_now[0], lost)
        if lost.blameless:
            self.blameless_losses += 1
        if (
            not lost.recoverable
            or (lost.blameless and self.blameless_losses > MAX_BLAMELESS_LOSSES)
            or (
                not lost.blameless
                and not lost.indices
                and not self.keep_going
                and self.retries == 0
            )
        ):
            raise self._worker_died(lost)
        self.transport.recover()
        for culprit in failed_now:
            self.failures[culprit] = self._item_lost_error(culprit, lost)
        for number in lost_chunks:
            self.pending.discard(number)
            chunk = plan.chunks[number]
            start = chunk.start + (self.results[number].done if number in self.results else 0)
            inside = [c for c in lost.indices if start <= c < chunk.stop]
            if inside:
                culprit = inside[0]
                spans = [(start, culprit), (culprit + 1, chunk.stop)]
                if culprit in retried:
                    spans.append((culprit, culprit + 1))
            elif not lost.indices and not lost.blameless:
                spans = [(i, i + 1) for i in range(start, chunk.stop)]
            else:
                spans = [(start, chunk.stop)]
            for a, b in spans:
                if a < b:
                    self._submit(plan.add(a, b))

    def _item_lost_error(self, index: int, lost: WorkerLost) -> BaseException:
        original = self._original(index)
        if index in self.timed_out:
            error = TaskError(
                original,
                item_repr(self.items, index),
                "TimeoutError",
                f"the item ran longer than item_timeout={self.item_timeout} s; "
                f"its worker was stopped and replaced",
                "",
            )
            error.__cause__ = TimeoutError(f"item {original} timed out")
            return error
        return self._worker_died(lost, index)

    def _stop_overdue_items(self) -> None:
        for index in self.transport.stop_overdue(self.item_timeout):  # type: ignore[arg-type]
            self.timed_out.add(index)

    # -- stopping ------------------------------------------------------------------
    def _stopped(self, exc: BaseException) -> BaseException:
        """Stop what runs, keep what completed, and give ``exc`` the partial results."""
        kill = isinstance(exc, WorkerDiedError)
        if self.plan is not None:  # else nothing was submitted, nothing to stop
            try:
                for res in self.transport.cancel(CANCEL_GRACE, kill=kill):
                    with self.lock, contextlib.suppress(TaskError):
                        self._take(res)
            finally:
                self.transport.land_outputs()
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, ParallelInterrupt):
            done = int(self.done.sum())
            exc = ParallelInterrupt(
                f"interrupted after {done} of {self.n_items} items; their results are kept "
                f"(exc.partial), parallel_map(..., resume=exc) runs the rest"
            )
        if isinstance(exc, RunCancelled) and not exc.args:
            exc.args = (
                f"cancelled after {int(self.done.sum())} of {self.n_items} items; their "
                f"results are kept (exc.partial), parallel_map(..., resume=exc) runs the rest",
            )
        if isinstance(exc, PartialResults):
            with self.lock:
                exc.done, exc.partial = self._outcome()
            exc.run = self.record()
        return exc

    def _poll_timeout(self) -> float:
        if self.deadline is None:
            return POLL_INTERVAL
        return max(0.001, min(POLL_INTERVAL, self.deadline - time.monotonic()))

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def _heartbeat(self) -> bool:
        self.show_progress()
        return self._past_deadline() or self.cancel_requested

    # -- errors ------------------------------------------------------------------
    def _original(self, index: int) -> int:
        return index if self.positions is None else int(self.positions[index])

    def _worker_died(self, lost: WorkerLost, index: int | None = None) -> WorkerDiedError:
        index = lost.index if index is None else index
        if index is not None:
            what = f"item {self._original(index)} ({item_repr(self.items, index)})"
        else:
            what = lost.span
        message = f"{lost.workers.get(index, lost.who)} died{lost.how}"
        if what:
            message += f" while running {what}"
        if lost.recovery:
            message += f"; {lost.recovery}"
        if index is not None and self.attempts.get(index, 0) > 1:
            message += f" (it ran {self.attempts[index]} times, each on a fresh worker)"
        return WorkerDiedError(
            message, None if index is None else self._original(index), lost.exitcodes
        )


def _cause(exc: BaseException) -> BaseException | None:
    return exc.__cause__


def task_error(
    err: RemoteError, fn: Any, index: int | None = None, outputs: tuple[np.ndarray, ...] = ()
) -> TaskError:
    """The error a user sees for a failed item, with their own source lines.

    ``index`` is the item's index in the caller's items (a resumed run
    numbers a subset). A write refused because a captured array is
    read-only in the run says which ``out=`` would make it land.
    """
    text = (
        tracebacks.render(err.frames, err.exc_lines, tracebacks.code_files(fn))
        if err.frames
        else ""
    )
    index = err.index if index is None else index
    message = err.message
    if err.exc_type == "ValueError":
        message += captured.read_only_hint(message, fn, outputs)
    error = TaskError(index, err.item_repr, err.exc_type, message, text, remote=not err.in_process)
    error.__cause__ = err.original
    error.__suppress_context__ = True
    if err.traceback is not None:
        # In-process (serial): the error's traceback leads into the user's
        # frame, so %debug and pdb.post_mortem stop where the item failed.
        error = error.with_traceback(err.traceback)
    return error


def unpicklable_error(fn: Any, exc: Exception) -> InvalidArgumentTypeError:
    """The error for a function that cannot travel, naming the global at fault.

    Raised from the payload pickling itself (which shares big arrays instead
    of serialising them), before any process starts: a separate trial
    ``cloudpickle.dumps(fn)`` would serialise a closed-over 1.28 GB array.
    """
    culprit = _find_unpicklable_name(fn)
    where = f" (it uses {culprit})" if culprit else ""
    name = getattr(fn, "__qualname__", repr(fn))
    return InvalidArgumentTypeError(
        "fn",
        f"cannot be sent to worker processes{where}: {exc}",
        message=f"cannot send {name} to worker processes{where}: {exc}",
    )


def _find_unpicklable_name(fn: Any) -> str | None:
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    candidates: list[tuple[str, Any]] = []
    globs = getattr(fn, "__globals__", {})
    candidates += [(f"global {n!r}", globs[n]) for n in code.co_names if n in globs]
    cells = getattr(fn, "__closure__", None) or ()
    for var, cell in zip(code.co_freevars, cells, strict=False):
        with contextlib.suppress(ValueError):
            candidates.append((f"closure variable {var!r}", cell.cell_contents))
    for label, value in candidates:
        if isinstance(value, np.ndarray):
            continue
        try:
            cloudpickle.dumps(value)
        except Exception:
            return f"{label} of type {type(value).__name__}"
    return None
