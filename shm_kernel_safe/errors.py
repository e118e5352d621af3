"""Exceptions and warnings raised by shm_kernel_safe.

They live in one leaf module so every layer can raise them without importing
the layers above it, and so users can catch them from the top-level package.
Each error is also the builtin exception a user would catch for the same
trouble (a full ``/dev/shm`` is a ``MemoryError``, a bad argument a
``ValueError``), so code written without this package still works::

    Exception
    └── ShmKernelSafeError                 every error raised on purpose
        ├── SharedMemoryCapacityError      (MemoryError) /dev/shm cannot hold it
        ├── SegmentNotFoundError           (FileNotFoundError) no segment of that name
        ├── DanglingArrayError             (ValueError) its shared memory was unmapped
        │   └── DanglingAttributeError     (AttributeError)
        ├── CellSyntaxError                (ValueError) a %%shm_parallel line
        ├── InvalidArgumentError           (ValueError) checked before any process starts
        │   └── InvalidArgumentTypeError   (TypeError)
        ├── DaskBackendError               the dask backend cannot run
        ├── JournalError                   a journal= that does not match or is damaged
        └── RunFailed                      a run stopped; with done/partial (PartialResults)
            ├── TaskError                  an item raised
            ├── WorkerDiedError            a worker died (segfault, OOM kill, os._exit)
            ├── ParallelTimeoutError       (TimeoutError) timeout= passed
            └── RunCancelled               cancel() of a run handle, %shm_cancel
    KeyboardInterrupt
    └── ParallelInterrupt                  Ctrl-C / kernel interrupt, with done/partial
    UserWarning
    ├── ItemsFailedWarning                 errors="continue": some items failed
    ├── PerformanceHint                    parallel cannot pay for its fixed costs
    ├── JournalWarning                     a journal cannot be written: the run goes on
    └── ResumeFunctionChangedWarning       resume= with another function

``PartialResults`` is a mix-in, not an exception: ``exc.done`` (one bool per
item) and ``exc.partial`` (what completed), and ``resume=exc`` runs the rest.
"""

from __future__ import annotations

from ._text import human_bytes, shorten


class ShmKernelSafeError(Exception):
    """Base class of every error this package raises on purpose.

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> issubclass(sks.TaskError, sks.ShmKernelSafeError)
    True
    """


class SharedMemoryCapacityError(ShmKernelSafeError, MemoryError):
    """The shared-memory filesystem cannot hold the segment asked for.

    Raised *before* any byte is written: on Linux a segment larger than the
    free space of ``/dev/shm`` is created happily and the process dies of
    SIGBUS on first touch, which in a kernel looks like a crash with no cause.
    Also a ``MemoryError``. The message says how to make room (Docker's
    ``--shm-size``, remounting ``/dev/shm``, :func:`cleanup_stale`).

    Attributes
    ----------
    needed : int
        Bytes asked for.
    free : int
        Bytes free there.
    where : str
        The shared-memory filesystem (``/dev/shm``).
    """

    def __init__(self, needed: int, free: int, where: str) -> None:
        self.needed = needed
        self.free = free
        self.where = where
        super().__init__(
            f"cannot allocate {human_bytes(needed)} of shared memory: {where} has only "
            f"{human_bytes(free)} free. Free space there (see %shm_status / "
            f"shm_kernel_safe.cleanup_stale()), share a smaller array, or give the "
            f"machine more shared memory (Docker: `docker run --shm-size=4g ...`; "
            f"Linux: `mount -o remount,size=8G /dev/shm`)."
        )


class SegmentNotFoundError(ShmKernelSafeError, FileNotFoundError):
    """A segment name does not exist (already unlinked, or never created).

    Also a ``FileNotFoundError``.
    """


class DanglingArrayError(ShmKernelSafeError, ValueError):
    """An operation was attempted on an array whose memory was unmapped.

    Raised by the placeholder that the inspection hooks put in place of such
    an array (see "Safety guarantees"): it refuses every use as data instead
    of crashing the kernel. Also a ``ValueError``.
    """


class DanglingAttributeError(DanglingArrayError, AttributeError):
    """An attribute of a placeholder for an array whose memory is gone.

    Also an ``AttributeError``, so ``hasattr`` and ``getattr(obj, name,
    default)`` (which variable explorers use to probe objects) answer
    normally instead of failing.
    """


class CellSyntaxError(ShmKernelSafeError, ValueError):
    """A ``%%shm_parallel`` line or cell cannot be understood (a one-line usage error)."""


class InvalidArgumentError(ShmKernelSafeError, ValueError):
    """An argument of :func:`~shm_kernel_safe.parallel_map` is invalid.

    Raised before any process starts. ``argument`` names the parameter
    (``"out"``, ``"processes"`` ...), ``index`` the position within it for
    sequences (``out[1]``) and ``problem`` says what is wrong, so a front end
    (the magic) can restate it in its own terms (``--out y: ...``).

    Attributes
    ----------
    argument : str
        The parameter at fault.
    index : int or None
        The position within it, for sequences.
    problem : str
        What is wrong with it.

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> try:
    ...     sks.parallel_map(abs, range(3), processes=0)
    ... except sks.InvalidArgumentError as exc:
    ...     print(exc.argument, "|", exc.problem)
    processes | must be an integer >= 1, got 0
    """

    def __init__(
        self,
        argument: str,
        problem: str,
        *,
        index: int | None = None,
        message: str | None = None,
    ) -> None:
        self.argument = argument
        self.index = index
        self.problem = problem
        where = argument if index is None else f"{argument}[{index}]"
        super().__init__(message or f"{where} {problem}")


class InvalidArgumentTypeError(InvalidArgumentError, TypeError):
    """An argument of the wrong type (also a ``TypeError``)."""


class PartialResults:
    """What a run that did not finish had completed (mixed into its errors).

    Attributes
    ----------
    done : numpy.ndarray of bool or None
        One entry per item: True where the item completed and its result is
        in ``partial`` (and its writes into ``out=`` arrays have landed).
    partial : numpy.ma.MaskedArray, list or None
        What the call would have returned, for the completed items: a masked
        array (masked where not done) when the results stack, else a list
        with None there.

    run : RunRecord or None
        Which run this is (its id) and what it ran: fingerprints of its
        items and function, and its ``out=`` arrays, so that ``resume=``
        refuses to merge it into a run of other items or arrays.

    Pass the exception to ``parallel_map(..., resume=exc)`` to run only the
    items not done and get the complete result.
    """

    done = None
    partial = None
    run = None


class RunFailed(PartialResults, ShmKernelSafeError):
    """A run stopped before completing every item; the base of its errors.

    Catch this to handle every way a run can fail on purpose (an item that
    raised, a dead worker, a timeout, a cancel) in one place; each carries
    what completed (``done``, ``partial``, see :class:`PartialResults`), and
    ``resume=exc`` runs the rest. An interrupt is a ``KeyboardInterrupt``
    instead (:class:`ParallelInterrupt`).

    IPython calls ``_render_traceback_`` (as for ipyparallel's RemoteError)
    and shows its lines instead of the local stack, which would only show
    engine internals: the user sees the item and the remote traceback.

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> issubclass(sks.TaskError, sks.RunFailed)
    True
    """

    #: Set by the front end (the magic) to say how to resume in its own terms.
    resume_hint: str | None = None

    def _render_traceback_(self) -> list[str]:
        lines = str(self).splitlines()
        head = (
            [f"{type(self).__name__}: {lines[0]}", *lines[1:]] if lines else [type(self).__name__]
        )
        if self.done is not None:
            completed = int(self.done.sum())
            hint = self.resume_hint or "parallel_map(..., resume=exc) runs only the rest"
            head.append(f"\n{completed} of {len(self.done)} items completed and were kept; {hint}")
        return head


class TaskError(RunFailed):
    """A task raised: names the item and carries the remote traceback.

    ``__cause__`` is the original exception when it could be pickled back.
    Carries what completed (``done``, ``partial``; see
    :class:`PartialResults`); in IPython its traceback shows the item and
    the remote traceback, with your cell's line, not the engine's frames.

    Attributes
    ----------
    index : int
        Position of the failing item.
    item_repr : str
        ``repr`` of the item (shortened).
    exc_type : str
        Name of the original exception's type.
    remote_message : str
        The original exception's message.
    remote_traceback : str
        The traceback in the worker.

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> def hourly(nn):
    ...     if nn == 2:
    ...         raise ValueError(f"bad hour {nn}")
    ...     return nn
    >>> try:
    ...     sks.parallel_map(hourly, range(4), backend="serial")
    ... except sks.TaskError as exc:
    ...     print(exc.index, exc.exc_type, exc.remote_message)
    ...     print(exc.done, exc.partial)
    2 ValueError bad hour 2
    [ True  True False False] [0 1 -- --]
    """

    def __init__(
        self,
        index: int,
        item_repr: str,
        exc_type: str,
        message: str,
        remote_tb: str,
        *,
        remote: bool = True,
    ):
        self.index = index
        self.item_repr = item_repr
        self.exc_type = exc_type
        self.remote_message = message
        self.remote_traceback = remote_tb
        # "Remote" only when the item ran in another process (not serial).
        head = "Remote traceback" if remote else "Traceback (the item ran in this process)"
        text = f"item {index} ({item_repr}) raised {exc_type}: {message}"
        if remote_tb:  # none when no frame of the user's code failed
            text += f"\n\n{head}:\n{remote_tb.rstrip()}"
        super().__init__(text)


class WorkerDiedError(RunFailed):
    """A worker process died (segfault, os._exit, OOM kill) during a call.

    The pool is replaced; carries what completed (``done``, ``partial``).

    Attributes
    ----------
    index : int or None
        The item the worker was running, when known.
    exitcodes : str
        The exit codes or signals of the dead workers.
    """

    def __init__(self, message: str, index: int | None = None, exitcodes: str = ""):
        self.index = index
        self.exitcodes = exitcodes
        super().__init__(message)


class ParallelTimeoutError(RunFailed, TimeoutError):
    """A call ran past its ``timeout=``; its workers were stopped.

    Also a ``TimeoutError``; carries what completed (``done``, ``partial``).
    """


class RunCancelled(RunFailed):
    """A run was cancelled (``handle.cancel()``, ``%shm_cancel``, breaking
    out of :func:`~shm_kernel_safe.imap`); its workers stopped.

    Raised by the handle's ``result()``; carries what completed (``done``,
    ``partial``), so ``parallel_map(..., resume=exc)`` runs the rest.
    """


#: The name this base had while it was private; kept for code that caught it.
_RemoteFailure = RunFailed


class ParallelInterrupt(PartialResults, KeyboardInterrupt):
    """A run was interrupted (Ctrl-C, a kernel interrupt); its workers stopped.

    A ``KeyboardInterrupt``, so ``except KeyboardInterrupt`` still catches
    it; carries what completed (``done``, ``partial``) like the other errors.
    """

    #: Set by the front end (the magic) to say how to resume in its own terms.
    resume_hint: str | None = None

    def __str__(self) -> str:
        if self.resume_hint is None or self.done is None:
            return super().__str__()
        completed = int(self.done.sum())
        return (
            f"interrupted after {completed} of {len(self.done)} items, which were kept; "
            f"{self.resume_hint}"
        )


class ItemsFailedWarning(UserWarning):
    """Some items failed in a run with ``errors="continue"``.

    Attributes
    ----------
    errors : FailedItems
        One error per failed item (``TaskError``, or ``WorkerDiedError`` for
        an item whose worker died), also returned by
        :func:`shm_kernel_safe.last_errors`.
    """

    def __init__(self, message: str, errors: FailedItems) -> None:
        super().__init__(message)
        self.errors = errors


class PerformanceHint(UserWarning):
    """A run would have finished sooner in this process than its workers
    took to start and receive their inputs.

    Issued at most once per run, in one line with the numbers and what to
    do (bigger items, sharing big inputs once, starting the pool early).
    The run itself is never switched to this process: an item that crashes
    must not take the kernel down. Filter it like any warning::

        warnings.filterwarnings("ignore", category=shm_kernel_safe.PerformanceHint)
    """


class ResumeFunctionChangedWarning(UserWarning):
    """``resume=`` merges a run whose function's code differs from this call's.

    The items the earlier run completed keep the results of its code; the
    others run the new code. Usually what is wanted (the bug that failed
    the items is fixed); an error when it is not:
    ``warnings.simplefilter("error", ResumeFunctionChangedWarning)``.
    """


class FailedItems(list):
    """The errors of the failed items of a run with ``errors="continue"``,
    in item order, with the run's ``done`` and ``partial`` (its results)
    and ``run`` (see :class:`PartialResults`), so that
    ``parallel_map(..., resume=failed)`` re-runs just those items."""

    def __init__(
        self, errors: list, done: object = None, partial: object = None, run: object = None
    ) -> None:
        super().__init__(errors)
        self.done = done
        self.partial = partial
        self.run = run

    def summary(self, limit: int = 3) -> str:
        """One line: how many failed, and the first few items with their errors."""
        total = 0 if self.done is None else len(self.done)  # type: ignore[arg-type]
        shown = ", ".join(f"{e.index} {_short_error(e)}" for e in self[:limit])
        more = f", and {len(self) - limit} more" if len(self) > limit else ""
        return f"{len(self)} of {total} items failed: {shown}{more}"


def _short_error(error: BaseException) -> str:
    original = error.__cause__
    if original is not None and type(original).__qualname__ == getattr(error, "exc_type", None):
        text = repr(original)  # the item's own exception, its arguments as they were
    else:
        exc_type = getattr(error, "exc_type", type(error).__name__)
        message = getattr(error, "remote_message", None)
        if message is None:
            message = str(error).split(";")[0]
        text = f"{exc_type}({message!r})"
    return shorten(text, 80)


class DaskBackendError(ShmKernelSafeError):
    """The dask backend cannot run: ``distributed`` missing, a scheduler that
    does not answer, workers without this package. Always one line."""


class JournalError(ShmKernelSafeError):
    """A run's journal on disk cannot be used: it records another run (other
    items, another function or cell, other inputs), or it is damaged, or
    another process is writing it.

    Never merged into the run: what it records would mix other results, or
    wrong ones, into this run's. The message names the journal and how to
    discard it (:func:`~shm_kernel_safe.discard_journal`, or
    ``%%shm_parallel ... --journal-reset``).

    Attributes
    ----------
    path : str
        The journal's file.
    problem : str
        What is wrong with it, in a few words.
    """

    def __init__(self, path: str, problem: str, message: str | None = None) -> None:
        self.path = path
        self.problem = problem
        super().__init__(
            message
            or f"journal {path} {problem}; it is never merged: discard it with "
            f"shm_kernel_safe.discard_journal({path!r}) (or %%shm_parallel ... --journal-reset)"
        )


class JournalWarning(UserWarning):
    """A journal cannot be written (the disk is full, the folder is not
    writable): journaling is off for the rest of the run, which goes on.

    What the journal recorded before stays valid and resumes.
    """
