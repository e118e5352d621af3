"""Background runs: a run whose wait loop is a helper thread, and its handle.

``parallel_map(..., wait=False)`` and ``%%shm_parallel ... --background``
return a :class:`RunHandle` at once; the run itself is the same
:class:`~shm_kernel_safe.engine.run.Run` as a blocking call's, on a thread::

    caller's thread                      the run's thread (daemon)
    ───────────────                      ─────────────────────────
    Run(...) checks the arguments
    RunHandle.start() ───────────────►   body(): run.execute(), release
    handle.progress / partial / errors       │ feeds the ledger under run.lock
      read the ledger under run.lock ◄───────┤
    handle.cancel() ── run.cancel() ─────►   wait loop ends: RunCancelled
    handle.wait() / result() ◄── finished ── result or error kept

Why it is safe to look at a run while it goes on:

* the ledger (``done``, results, failures) changes only under
  ``Run.lock``, and every read from outside takes it;
* ``partial`` is a copy built from the ledger (masked where not done),
  never a view of the run's shared memory, so it stays valid whatever
  happens to the run;
* the interrupt of a kernel (SIGINT) reaches only the main thread: it stops
  the foreground cell, never a background run; ``cancel()`` does that.

A run started while another holds the warm pool gets a private executor
(``transports.local.pool.Lease``): two background runs run side by side,
each on its own workers, and a failure in one never touches the other.
When the kernel shuts down, restarts, or the interpreter exits, every
running run is cancelled and joined first (a lifecycle closer that runs
before the pools are stopped), so no segment and no process is left.
"""

from __future__ import annotations

import copy
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import lifecycle
from ..errors import FailedItems, ItemsFailedWarning, RunCancelled
from .callsite import warn_at_caller
from .run import Run

#: Most seconds of work in one chunk of a background run: its results are
#: read while it goes on, so they arrive at least this often per worker
#: (a blocking run's first chunks hold a quarter of the items each).
CHUNK_SECONDS = 0.5

#: Seconds a shutdown waits for each cancelled run to stop its workers.
SHUTDOWN_WAIT = 15.0

_lock = threading.Lock()
_running: dict[str, RunHandle] = {}  # run id -> handle, while the run goes on


def _fmt_span(seconds: float) -> str:
    """``1m12s``, ``45s``, ``2h03m``: short enough for a variable viewer's row."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class RunHandle:
    """A run that goes on in the background, as ``parallel_map(fn, items,
    wait=False)`` returns it and ``%%shm_parallel --background -r NAME`` binds it.

    The kernel stays free while the workers fill the results: look at
    :attr:`partial` (a safe copy of what completed), :attr:`progress` and
    :attr:`errors` at any time, :meth:`wait` or :meth:`result` for the end,
    :meth:`cancel` to stop it keeping what completed. Its ``repr`` is one
    line, for variable viewers: ``<run 5230/8760 items, 3 failed, 1m12s left>``.

    Attributes
    ----------
    name : str or None
        The variable the magic bound it to (``-r NAME``), for ``%shm_status``.
    end_note : str or None
        Set by a front end: what its progress widget's last line adds when
        the run completes (where the results go).

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> run = sks.parallel_map(abs, range(-3, 3), backend="serial", wait=False)
    >>> run.wait(timeout=60)
    True
    >>> run.result()
    array([3, 2, 1, 0, 1, 2])
    """

    #: Spyder's Variable Explorer shows the repr as this value's row
    #: (``kernel.placeholder_display``); it shows no repr of unknown types.
    _shm_kernel_safe_row_ = True

    def __init__(self, run: Run, body: Callable[[], Any], name: str | None = None) -> None:
        self.name = name
        self.end_note: str | None = None
        self._run = run
        self._body = body
        self._total = len(run.all_items)
        self._before = 0 if run.prior is None else int(run.prior.done.sum())
        self._seen = 0  # items finished per the last progress report
        self._outcome: Any = None
        self._error: BaseException | None = None
        self._finished = threading.Event()
        self._warned = False
        self._warnings: list[tuple] = []  # warnings issued on the run's thread, held back
        self._started = time.monotonic()
        self._ended: float | None = None
        self._thread = threading.Thread(
            target=self._main, name=f"shm_kernel_safe run {run.id}", daemon=True
        )

    # -- the run's thread ------------------------------------------------------------
    def start(self) -> RunHandle:
        """Start the run's thread (once); the handle, for chaining."""
        with _lock:
            _running[self._run.id] = self
        _hold_back_warnings()
        self._thread.start()
        return self

    def report(self, done: int, total: int) -> None:
        """The run's progress callback (its thread, about ten times a second):
        remember how far it got, and stop when the interpreter exits.

        At exit, executors' hooks (loky's, like concurrent.futures') run
        before ``atexit`` and wait for every queued chunk; ``threading``
        flags its shutdown before they run, so the run sees it here and
        cancels, and those hooks find nothing left to wait for.
        """
        self._seen = done
        if _exiting():
            self._run.cancel()

    def _main(self) -> None:
        try:
            self._outcome = self._body()
        except BaseException as exc:  # kept for result(); the thread ends quietly
            self._error = exc
        finally:
            self._ended = time.monotonic()
            self._body = None  # type: ignore[assignment]  # the closure holds the inputs
            with _lock:
                _running.pop(self._run.id, None)
            self._finished.set()
            with self._run.lock:
                self._run.lock.notify_all()

    # -- the caller's view -------------------------------------------------------------
    def done(self) -> bool:
        """Whether the run has ended (completed, failed or cancelled)."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the end of the run, at most ``timeout`` seconds.

        An interrupt (Ctrl-C) stops the waiting, not the run.

        Returns
        -------
        bool
            True when the run has ended.
        """
        return self._finished.wait(timeout)

    def result(self, timeout: float | None = None) -> Any:
        """The run's results, once it ended: what a blocking call returns.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait at most; ``TimeoutError`` after that (the run
            goes on).

        Raises
        ------
        RunFailed
            What a blocking call would raise (``TaskError``,
            ``WorkerDiedError``, ``ParallelTimeoutError``, or
            ``RunCancelled`` after :meth:`cancel`), with ``done``,
            ``partial`` and ``run``, so ``resume=exc`` runs the rest.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"the run did not end within {timeout} s: {self!r}")
        self.show_warnings()
        if self._error is not None:
            raise self._error
        failed = self._run.failed_items
        if failed and not self._warned:
            self._warned = True
            warn_at_caller(ItemsFailedWarning(failed.summary(), failed))
        return self._outcome

    def show_warnings(self) -> None:
        """Show, once, the warnings the run issued on its thread (a
        ``PerformanceHint``, a worker's warning): held back while it ran so
        that they never land in the output of another cell."""
        held, self._warnings = self._warnings, []
        for args in held:
            warnings.showwarning(*args)

    def cancel(self) -> bool:
        """Stop the run, keeping what completed; returns once its workers stopped.

        Running items get half a second to end (their chunk is cut at the
        next item), then their workers are stopped. The completed items'
        results stay in :attr:`partial`, their writes in ``out=`` arrays,
        and :meth:`result` raises :class:`RunCancelled` (pass it as
        ``resume=`` to run the rest). On the serial backend the item that
        runs finishes first.

        Returns
        -------
        bool
            True when this call stopped the run, False when it had ended.
        """
        if self._finished.is_set():
            return False
        self._run.cancel()
        self._finished.wait()
        return isinstance(self._error, RunCancelled)

    @property
    def progress(self) -> tuple[int, int]:
        """(items finished, failed ones included; items in all)."""
        run = self._run
        finished = int(run.done.sum()) + len(run.failures) + self._before
        if not self._finished.is_set():  # the workers' counters run ahead of the ledger
            finished = max(finished, self._seen + self._before)
        return finished, self._total

    @property
    def partial(self) -> np.ndarray | np.ma.MaskedArray | list:
        """A copy of the results of the items completed so far.

        What the call returns, masked where items are not done (a list with
        None there when results do not stack). Each access makes a new copy,
        which nothing the run does can change or unmap; once the run ended,
        its result (or the ``partial`` of its error).
        """
        if self._finished.is_set():
            if self._error is None:
                return copy.copy(self._outcome)
            partial = getattr(self._error, "partial", None)
            if partial is not None:
                return copy.copy(partial)
        return self._run.snapshot()[1]

    @property
    def errors(self) -> FailedItems:
        """The errors of the items that failed so far (``errors="continue"``),
        in item order; after a run that failed, its error."""
        run = self._run
        if self._finished.is_set():
            if run.failed_items is not None:
                return run.failed_items
            if self._error is not None and not isinstance(self._error, RunCancelled):
                with run.lock:
                    kept = [run.failures[i] for i in sorted(run.failures)]
                if self._error not in kept:
                    kept.append(self._error)
                return FailedItems(kept)
        with run.lock:
            return FailedItems([run.failures[i] for i in sorted(run.failures)])

    @property
    def state(self) -> str:
        """``"running"``, ``"done"``, ``"failed"`` or ``"cancelled"``."""
        if not self._finished.is_set():
            return "running"
        if self._error is None:
            return "done"
        return "cancelled" if isinstance(self._error, RunCancelled) else "failed"

    @property
    def elapsed(self) -> float:
        """Seconds the run has run (until its end)."""
        end = self._ended if self._ended is not None else time.monotonic()
        return end - self._started

    def eta(self) -> float | None:
        """Seconds left at the rate so far; None before a rate is known.

        The rate counts from when items began to run, not from the call:
        starting workers and copying big inputs happen once, and counted
        in, they made the first estimates many times too long.
        """
        finished, total = self.progress
        done_here = finished - self._before
        if self._finished.is_set():
            return 0.0
        if done_here <= 0:
            return None
        began = self._run.items_started or self._started
        return (total - finished) * (time.monotonic() - began) / done_here

    def summary(self) -> str:
        """The repr's text: progress, failures, time left or how it ended."""
        finished, total = self.progress
        parts = [f"{finished}/{total} items"]
        failed = len(self._run.failures)
        if failed:
            parts.append(f"{failed} failed")
        state = self.state
        if state == "running":
            eta = self.eta()
            parts.append("starting" if eta is None else f"{_fmt_span(eta)} left")
        elif state == "done":
            parts.append(f"done in {_fmt_span(self.elapsed)}")
        elif state == "cancelled":
            parts.append("cancelled")
        else:
            parts.append(f"failed: {type(self._error).__name__}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"<run {self.summary()}>"

    def status(self) -> dict[str, Any]:
        """This run as data, for ``status()`` and ``%shm_status``."""
        finished, total = self.progress
        return {
            "name": self.name,
            "id": self._run.id,
            "state": self.state,
            "completed": finished,
            "total": total,
            "failed": len(self._run.failures),
            "elapsed": self.elapsed,
            "eta": self.eta(),
            "summary": self.summary(),
        }

    def stream(self, ordered: bool, poll: float = 0.1) -> Any:
        """(index, value) of completed items as they come, in item order
        when ``ordered``; raises the run's error at the end (failed items
        of ``errors="continue"`` are skipped). Used by ``imap``."""
        given: dict[int, int] = {}
        waiting: dict[int, Any] = {}
        following = 0  # ordered: the next index to hand out
        failed: set[int] = set()
        while True:
            ended = self._finished.is_set()
            fresh = self._run.new_values(given)
            if ordered:
                waiting.update(fresh)
                with self._run.lock:
                    failed.update(self._run.failures)
                while following in waiting or following in failed:
                    if following in waiting:
                        yield following, waiting.pop(following)
                    following += 1
            else:
                yield from fresh
            if ended:
                break
            with self._run.lock:
                if not self._finished.is_set():
                    self._run.lock.wait(poll)
        self.result()  # the run's error, or the warning for failed items


def _hold_back_warnings() -> None:
    """Route warnings issued on a run's thread to its handle (see
    :meth:`RunHandle.show_warnings`); other threads' go on as before. The
    filters have run when ``showwarning`` is called, so what is held back
    is what would have been shown. Installed again when someone replaced
    it since (``warnings.catch_warnings`` restores what it found)."""
    with _lock:
        current = warnings.showwarning
        if getattr(current, "_shm_kernel_safe_", False):
            return

        def showwarning(*args: Any, **kwargs: Any) -> None:
            thread = threading.current_thread()
            handle = next((h for h in running() if h._thread is thread), None)
            if handle is None:
                current(*args, **kwargs)
            else:
                handle._warnings.append(args[:4])

        showwarning._shm_kernel_safe_ = True  # type: ignore[attr-defined]
        warnings.showwarning = showwarning


def _exiting() -> bool:
    """Whether the interpreter has begun to exit (``threading``'s own flag,
    set before its exit hooks run; the main thread stops only after them)."""
    return bool(getattr(threading, "_SHUTTING_DOWN", False)) or (
        not threading.main_thread().is_alive()
    )


def running() -> list[RunHandle]:
    """The runs going on in the background, oldest first."""
    with _lock:
        return list(_running.values())


def status() -> list[dict[str, Any]]:
    """Each running run as data (:meth:`RunHandle.status`), oldest first."""
    return [handle.status() for handle in running()]


def cancel_all(event: str = "") -> None:
    """Cancel every running run and wait (bounded) until each stopped."""
    handles = running()
    for handle in handles:
        handle._run.cancel()
    deadline = time.monotonic() + SHUTDOWN_WAIT
    for handle in handles:
        handle.wait(max(0.0, deadline - time.monotonic()))


# Before anything else closes: a run still going would meet its pool killed
# under it and start another.
lifecycle.register("background-runs", cancel_all, order=1)
