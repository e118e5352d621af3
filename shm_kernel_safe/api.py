"""``parallel_map``: the one call every front end (plain Python, the magic)
makes. It picks a transport by name and hands the run to the engine."""

from __future__ import annotations

import inspect
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from . import _checks
from .displays import TextProgress, make_progress
from .engine import background
from .engine.background import RunHandle
from .engine.callsite import warn_at_caller
from .engine.journal import Journal
from .engine.options import PEER_KEYWORDS, check_run
from .engine.pickling import DEFAULT_THRESHOLD
from .engine.run import ProgressCallback, Run
from .engine.transport import TransportOptions
from .errors import FailedItems, InvalidArgumentError, ItemsFailedWarning
from .transports import registry
from .transports.local.transport import prestart as _prestart_local

#: Names accepted by ``backend=`` / ``--backend``.
BACKENDS = tuple(registry.TRANSPORTS)

_last = threading.local()  # the failed items of this thread's last call


__all__ = ["BACKENDS", "RunHandle", "imap", "last_errors", "parallel_map", "prestart", "status"]


def last_errors() -> FailedItems:
    """The errors of the failed items of this thread's last :func:`parallel_map` call.

    With ``errors="continue"`` a run goes on past failing items and only
    warns; this returns one error per failed item (a ``TaskError`` with the
    item and the remote traceback, or a ``WorkerDiedError``), in item
    order. It also carries the run's ``done``, ``partial`` and ``run``, so
    ``parallel_map(fn, items, resume=sks.last_errors())`` re-runs just the
    failed items. Empty when the last call had no failed item (``resume=``
    then refuses it: there is nothing to resume).

    Returns
    -------
    FailedItems
        A list of exceptions with ``done`` and ``partial`` attributes.

    Examples
    --------
    >>> import warnings
    >>> import shm_kernel_safe as sks
    >>> def check(hour):
    ...     if hour == 2:
    ...         raise ValueError("bad hour")
    ...     return hour * 10
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", sks.ItemsFailedWarning)
    ...     y = sks.parallel_map(check, range(4), errors="continue", backend="serial")
    >>> y
    masked_array(data=[0, 10, --, 30],
                 mask=[False, False,  True, False],
           fill_value=999999)
    >>> failed = sks.last_errors()
    >>> [(e.index, e.exc_type) for e in failed]
    [(2, 'ValueError')]
    """
    return getattr(_last, "errors", None) or FailedItems([])


def parallel_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    processes: int | None = None,
    start_method: str | None = None,
    chunksize: int | None = None,
    timeout: float | None = None,
    share_threshold: int = DEFAULT_THRESHOLD,
    share: Iterable[Any] = (),
    out: np.ndarray | Iterable[np.ndarray] = (),
    progress: ProgressCallback | str | None = None,
    backend: str = "local",
    client: Any = None,
    errors: str = "raise",
    retries: int = 0,
    item_timeout: float | None = None,
    resume: Any = None,
    threads_per_worker: int | None = None,
    journal: str | os.PathLike | bool | None = None,
    keep_journal: bool = False,
    wait: bool = True,
    **unknown: Any,
) -> np.ndarray | np.ma.MaskedArray | list | RunHandle:
    """Apply ``fn`` to every item in worker processes; results in item order.

    Big arrays that ``fn`` reaches (closure, globals, defaults) or that are
    found in ``items`` reach the workers without pickling: read-only copies
    in shared memory made once per call, or zero copies when they already
    live in shared memory (:func:`~shm_kernel_safe.empty`,
    :func:`~shm_kernel_safe.zeros`, :func:`~shm_kernel_safe.share`). A copy
    is kept for the next call while the same array object holds the same
    bytes (checked with a fast hash each call), so running a cell again
    copies nothing; ``del x`` or any change to ``x`` releases it. Items
    go out in chunks planned from the time of the first item, so that tiny
    items cost microseconds, not a message each.

    Parameters
    ----------
    fn : callable
        Called as ``fn(item)``. Functions and classes defined in a notebook
        or console travel by value (cloudpickle), so they work under spawn.
    items : iterable
        The work items; a range, list, tuple or ndarray is used as is, any
        other iterable is listed first.
    processes : int, optional
        Worker processes (default: the CPUs this process may use). With
        ``backend="dask"`` and no ``client``: the workers of our local cluster.
    start_method : {"forkserver", "spawn", "fork"}, optional
        How local workers start (default: forkserver on Linux, spawn elsewhere).
    chunksize : int, optional
        Items per chunk (default: adaptive, from the time of the first item).
    timeout : float, optional
        Seconds after which the call stops its workers and raises.
    share_threshold : int
        Arrays at least this many bytes are shared rather than pickled.
    share : iterable of ndarray
        Arrays to share whatever their size.
    out : ndarray or iterable of ndarray
        Arrays ``fn`` writes into (``y[i] = ...``): the caller's own array
        objects hold the writes (in place when they already live in shared
        memory, else copied back when the call ends). On error too: the
        writes of the items that completed have landed, and those a failing
        item made before it failed may have. A function that writes into an
        array it captures (a global or closure variable) that is not listed
        here is refused before the run starts, on every backend: in workers
        the writes would be lost.
    progress : {"auto", "widget", "text", "none"} or callable, optional
        A widget bar in Jupyter and a text bar elsewhere (``"auto"``), or
        ``progress(done, total)`` called from this thread at most ten times
        a second.
    backend : {"local", "dask", "serial"}
        ``"local"``: this machine's warm process pool over shared memory.
        ``"dask"``: a ``dask.distributed`` cluster (the ``dask`` extra); big
        arrays are sent to each worker once per call. ``"serial"``: every
        item in this process, for debugging (breakpoints, ``%debug``), with
        the same results and errors.
    client : distributed.Client or str, optional
        With ``backend="dask"``: the client to use, or a scheduler address;
        None starts a loopback ``LocalCluster`` once and reuses it.
    errors : {"raise", "continue"}
        ``"raise"``: the first failed item stops the run (raising what
        completed along). ``"continue"``: failed items are skipped, their
        results masked (or None in a list), one :class:`ItemsFailedWarning`
        sums them up, and :func:`last_errors` lists them.
    retries : int
        Times an item whose worker died (segfault, OOM kill) is run again on
        a fresh worker before it fails. Default 0: the crashes this field
        sees most (a C extension's segfault) recur on every try, and each
        try costs a fresh worker; raise it for transient kills (OOM under
        memory pressure). On a dask cluster given as ``client``, this comes
        on top of dask's own retries (our own cluster leaves them to this).
    item_timeout : float, optional
        Seconds one item may run; a longer one has its worker stopped and
        replaced and fails with ``TimeoutError`` (local backend, and dask on
        our own cluster: a cluster given as ``client`` is never touched).
    resume : exception or FailedItems, optional
        What an earlier call of the same ``fn`` over the same ``items``
        completed (an error it raised, or :func:`last_errors`): only the
        items not done run, and the complete result is returned. Refused
        (``InvalidArgumentError``) when it cannot be merged safely: other
        items (checked by an XXH3 fingerprint), ``out=`` arrays that are
        not the objects that run wrote, an error that records no run, or
        ``last_errors()`` of a run without failures. A function whose code
        changed only warns (:class:`ResumeFunctionChangedWarning`).
    threads_per_worker : int, optional
        BLAS/OpenMP threads each worker may use (OpenBLAS, MKL, OpenMP...).
        Default: the usable CPUs divided by the workers, at least 1, so that
        workers x threads <= CPUs. Applies to workers we start (the local
        pool, our dask ``LocalCluster``); this process's own BLAS is never
        changed, so ``backend="serial"`` ignores it.
    journal : str, path or bool, optional
        Record completed items (their results and the ``out=`` state) in a
        file, so that the same call in a new process, after a crash or a
        restart, runs only the items not recorded: it prints one line
        (``resuming: 4380 of 8760 items recorded 12 min ago``) and returns
        what an uninterrupted run returns. ``True`` keeps the file in the
        per-user cache folder, named after the run; a path names it. The
        journal must record this very run (the function's code, the items,
        the values the function reads, the ``out=`` arrays' shapes and
        starting contents), else :class:`JournalError`; a finished run's
        journal is removed. A kill at any instant re-runs at most the
        items of the last few seconds (see "Runs that outlive the kernel"
        in ``docs/engine.md``). A disk
        that fills turns journaling off with one :class:`JournalWarning`.
    keep_journal : bool
        Keep the journal of a finished run (a later identical call then
        returns its results at once).
    wait : bool
        False: return a :class:`RunHandle` at once and run in the
        background (a thread of this process waits for the workers), so
        that the kernel stays free; see "Long runs" in the docs. The
        arguments are checked and big inputs copied before it returns; a
        progress widget is shown at once (Jupyter), a text bar never (it
        would interleave with other cells' output): the handle's repr says
        how far it got. On the serial backend the items run on that thread
        and the arrays the function captures stay read-only until it ends.
    **unknown
        Not accepted: names other libraries use (``n_jobs``, ``verbose``...)
        raise an :class:`InvalidArgumentTypeError` saying which of ours to use.

    Returns
    -------
    numpy.ndarray, numpy.ma.MaskedArray, list or RunHandle
        A :class:`RunHandle` with ``wait=False``. Otherwise one rule on
        every backend, always memory the caller owns:

        =====================================  ==============================
        per-item results                       returned
        =====================================  ==============================
        numbers (scalars, 0-d arrays)          1-d ndarray (common dtype)
        non-object arrays of one shape         ndarray ``(n, *shape)``
        either, some items not done            MaskedArray, masked there
        either, some masked elements           MaskedArray keeping them
        anything else                          list (None where not done)
        no items                               ``[]``
        =====================================  ==============================

    Raises
    ------
    TaskError
        An item raised, or returned a result that cannot be pickled; names
        the item and carries its traceback (``__cause__`` is the original
        exception, with its arguments, when it could be pickled).
    WorkerDiedError
        A worker died (segfault, ``os._exit``, OOM kill); names its item.
    ParallelTimeoutError
        The call ran past ``timeout``.
    ParallelInterrupt
        The call was interrupted (a ``KeyboardInterrupt``); workers stop
        within a second.

        Each of these four carries what completed: ``exc.done`` (one bool
        per item) and ``exc.partial`` (the results of those items); the
        writes of completed items into ``out=`` arrays have landed. Pass
        ``resume=exc`` to run the rest.
    InvalidArgumentError
        An argument is invalid (also a ``ValueError``; the ``TypeError``
        subclass :class:`InvalidArgumentTypeError` for wrong types), raised
        before any process starts.
    SharedMemoryCapacityError
        An input, ``out=`` array or the results do not fit in the free
        space of ``/dev/shm`` (also a ``MemoryError``).
    DaskBackendError
        The dask backend cannot run (``distributed`` missing, scheduler
        unreachable).

    Notes
    -----
    In every case remaining work stops, stuck workers are replaced and no
    segment is left in ``/dev/shm``. The writes an item made into an
    ``out=`` array before it failed may land too.

    Examples
    --------
    >>> import numpy as np
    >>> import shm_kernel_safe as sks
    >>> x = np.arange(12.0).reshape(4, 3)
    >>> sks.parallel_map(lambda i: float(x[i].sum()), range(4), backend="serial")
    array([ 3., 12., 21., 30.])
    """
    transport_type, transport_options = registry.checked(
        backend, TransportOptions(processes, start_method, client, threads_per_worker)
    )
    args = check_run(
        fn,
        items,
        chunksize=chunksize,
        timeout=timeout,
        share_threshold=share_threshold,
        share=share,
        out=out,
        progress=progress,
        errors=errors,
        retries=retries,
        item_timeout=item_timeout,
        journal=journal,
        keep_journal=keep_journal,
        wait=wait,
        unknown=unknown,
        known=_PARAMETERS,
        transport=transport_type,
        transport_options=transport_options,
    )
    seq = args.items
    opened = None
    if journal is not None and journal is not False:
        # Before the transport copies out= arrays: the recorded out= state
        # is replayed into the caller's arrays here.
        opened = Journal.open(journal, fn, seq, args.inputs.outputs, keep=bool(keep_journal))
    transport = transport_type.from_options(transport_options)
    if wait:
        _last.errors = None
    # A display made here (progress given as a mode) is ours to close, also
    # when the call fails before it runs (a cluster that cannot start).
    display = make_progress(progress) if isinstance(progress, str) else None
    if not wait and isinstance(display, TextProgress):
        display = None  # a text bar from a thread would land in other cells' output
    callback = display if isinstance(progress, str) else progress
    try:
        run = Run(
            fn,
            seq,
            transport,
            chunksize=args.chunksize,
            timeout=args.timeout,
            inputs=args.inputs,
            progress=callback,
            errors=args.errors,
            retries=args.retries,
            item_timeout=args.item_timeout,
            resume=resume,  # checked, and merged once, by the run
            journal=opened,
        )
        if not wait:
            run.prepare()  # the inputs as they are now; what cannot travel raises here
            return _in_background(run, transport, display, opened)
        result = run.execute()
    except BaseException as exc:
        if opened is not None:  # what the run completed stays recorded
            opened.finish(run if "run" in locals() else None, ok=False)
        if display is not None:
            display.close(error=exc)
        if not wait:
            transport.release()  # else released below
        raise
    finally:
        if wait:
            transport.release()
    if opened is not None:
        opened.finish(run, ok=True)
    if display is not None:
        display.close()
    if run.failed_items:
        _last.errors = run.failed_items
        warn_at_caller(ItemsFailedWarning(run.failed_items.summary(), run.failed_items))
    return result


def _in_background(run: Run, transport: Any, display: Any, opened: Any = None) -> RunHandle:
    """Start ``run`` on a thread of its own; its handle."""

    def body() -> Any:
        try:
            result = run.execute()
        except BaseException as exc:
            if opened is not None:  # what the run completed stays recorded
                opened.finish(run, ok=False)
            if display is not None:
                display.close(error=exc)
            raise
        finally:
            transport.release()
        if opened is not None:
            opened.finish(run, ok=True)
        if display is not None:
            display.close(note=handle.end_note)
        return result

    handle = RunHandle(run, body)
    run.chunk_seconds = background.CHUNK_SECONDS
    callback = run.show_progress.callback

    def report(done: int, total: int) -> None:
        handle.report(done, total)
        if callback is not None:
            callback(done, total)

    run.show_progress.callback = report
    if display is not None:  # shown now, under the cell that started the run
        display.delay = 0.0
        display(0, run.n_items)
    return handle.start()


def imap(
    fn: Callable[[Any], Any], items: Iterable[Any], ordered: bool = True, **options: Any
) -> Iterator[Any]:
    """Apply ``fn`` to every item in worker processes, yielding results as they come.

    The same run as :func:`parallel_map` (zero-copy inputs, chunks,
    progress, ``errors=``, every backend), consumed as it goes: a result is
    yielded when its chunk is back, so that a long run can be plotted,
    saved or stopped early without waiting for its end.

    Parameters
    ----------
    fn, items
        As for :func:`parallel_map`.
    ordered : bool
        True: the results in item order (a result waits for those before
        it). False: ``(index, result)`` pairs as soon as any completes.
    **options
        Any keyword argument of :func:`parallel_map` but ``wait``,
        ``resume`` and ``journal``.

    Yields
    ------
    object or (int, object)
        Each item's result; with ``ordered=False``, with its index.

    Raises
    ------
    RunFailed
        When the run fails (``errors="raise"``), once the results that
        completed before it stopped are out (in order: those up to the
        first item not done). With
        ``errors="continue"``, failed items are skipped and one
        :class:`ItemsFailedWarning` lists them at the end.

    Notes
    -----
    Leaving the loop early (``break``, an exception, the generator closed
    or garbage-collected) cancels the items still to run and stops their
    workers. Results come a chunk at a time; ``chunksize=1`` hands out
    each one as soon as it completes, at the cost of a message per item.

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> list(sks.imap(abs, [-2, -1, 0, 1], backend="serial"))
    [2, 1, 0, 1]
    >>> sorted(sks.imap(abs, [-2, 3], ordered=False, backend="serial"))
    [(0, 2), (1, 3)]
    """
    for name in ("wait", "resume", "journal"):
        if name in options:
            raise InvalidArgumentError(name, "is not an argument of imap")
    _checks.flag("ordered", ordered)
    handle = parallel_map(fn, items, wait=False, **options)
    return _stream(handle, ordered)


def _stream(handle: RunHandle, ordered: bool) -> Iterator[Any]:
    try:
        for index, value in handle.stream(ordered):
            yield value if ordered else (index, value)
    finally:
        handle.cancel()  # a no-op once the run ended


def status() -> dict[str, Any]:
    """What this process runs and holds, as data (``%shm_status`` prints it).

    Returns
    -------
    dict
        ``"runs"``: one dict per background run still going (``name``,
        ``id``, ``state``, ``completed``, ``total``, ``failed``,
        ``elapsed`` and ``eta`` in seconds, ``summary``), oldest first.

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> sks.status()["runs"]
    []
    """
    return {"runs": background.status()}


#: parallel_map's own keyword arguments, for the "did you mean" of a typo.
_PARAMETERS = tuple(inspect.signature(parallel_map).parameters)[2:-1]


def prestart(
    processes: int | None = None,
    start_method: str | None = None,
    threads_per_worker: int | None = None,
    **unknown: Any,
) -> list[int]:
    """Start the local pool's workers now, so that the first call is warm.

    Parameters
    ----------
    processes, start_method, threads_per_worker
        As for :func:`parallel_map`; the pool started is the one a call
        with the same arguments uses.
    **unknown
        Refused, with the name to use for a peer's (``n_jobs`` means
        ``processes``).

    Returns
    -------
    list of int
        The workers' process ids.

    Raises
    ------
    InvalidArgumentError
        ``processes`` below 1, an unknown ``start_method`` or an unknown
        keyword argument, named.

    See Also
    --------
    shutdown_pools

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> pids = sks.prestart(processes=2)  # doctest: +SKIP
    >>> len(pids)  # doctest: +SKIP
    2
    """
    known = ("processes", "start_method", "threads_per_worker")
    peers = {k: v for k, v in PEER_KEYWORDS.items() if v.rstrip("=") in known}
    _checks.unknown_keywords("prestart", unknown, peers, known)
    return _prestart_local(processes, start_method, threads_per_worker)
