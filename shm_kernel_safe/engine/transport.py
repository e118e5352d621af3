"""The interface between the one engine and the ways of running chunks.

A transport moves a run's payload to its workers, runs chunks there and
hands back their results; everything else (validation, planning, waiting,
deadlines, progress, error mapping, gathering) is the engine's, written
once. The call sequence of one run is::

    encode(payload, inputs)      # pickle / prepare, no process started yet
    start(chunk_bound, heartbeat)  # start or reuse workers, send the payload
    submit(chunk) ...            # any number of times
    wait(timeout) -> results     # repeatedly, until every chunk is back
    items_done()                 # any time, for progress
    cancel(grace, kill)          # on error, timeout or interrupt
    land_outputs()               # make out= writes visible in the caller's arrays
    release()                    # always, last

Three implementations: ``local`` (a warm loky pool over shared memory),
``dask`` (a dask.distributed cluster) and ``serial`` (the calling process,
for debugging). A new one is a subclass of :class:`Transport` and one line
in :mod:`shm_kernel_safe.transports.registry`. Each checks its own options
(:meth:`Transport.check_options`) before any process starts, and is built
from them (:meth:`Transport.from_options`).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from .. import _checks
from .._platform import available_start_methods, usable_cpus
from ..errors import InvalidArgumentError
from .planning import Chunk
from .protocol import ChunkResult, Payload


@dataclass
class Inputs:
    """How a run's arrays travel (see :mod:`.sharing`)."""

    threshold: int  # arrays at least this big are shared, not pickled
    force: tuple[Any, ...] = ()  # arrays shared whatever their size
    outputs: tuple[np.ndarray, ...] = ()  # arrays the function writes into


@dataclass(frozen=True)
class TransportOptions:
    """Where and how to run, as given to ``parallel_map``; each transport
    checks the ones it uses and refuses those that do not apply to it."""

    processes: int | None = None
    start_method: str | None = None
    client: Any = None
    threads_per_worker: int | None = None


#: ``processes`` values already warned about (once per value and process).
_warned_processes: set[int] = set()


def warn_if_more_than_cpus(processes: int | None, stacklevel: int) -> None:
    """Warn, once per value, when a transport is asked for more worker
    processes on this machine than the CPUs this process may use: the extra
    workers only add start-up time and memory (each maps the inputs and
    keeps a heap). ``stacklevel`` counts from the caller of this function."""
    cpus = usable_cpus()
    if processes is None or processes <= cpus or processes in _warned_processes:
        return
    _warned_processes.add(processes)
    warnings.warn(
        f"processes={processes} is more than the {cpus} CPUs this process may "
        f"use; the extra workers only wait for a CPU. At most one worker per "
        f"item is started.",
        UserWarning,
        stacklevel=stacklevel + 1,
    )


class WorkerLost(Exception):
    """A transport's report that a worker died; the engine words the error.

    ``chunks`` are the chunks whose result messages are lost (the transport
    can run them again after :meth:`Transport.recover`); ``salvage`` holds,
    for each of them that the transport can tell, what it completed before
    (a :class:`ChunkResult` with ``done`` items from its start, their values
    or failures), which the run keeps and never runs again. ``indices`` are
    the items dead workers were running, when known exactly (``index`` is
    the first of them); ``blameless`` says the workers died while running
    none of the run's items (idle), so the run goes on whatever its options,
    ``span`` describes what it may have been running otherwise (``"one of
    items 0-99"``), ``how`` says how it died and ``recovery`` what was done
    about it.
    """

    def __init__(
        self,
        *,
        chunks: list[int],
        recoverable: bool = True,
        index: int | None = None,
        indices: list[int] | None = None,
        salvage: list[ChunkResult] | None = None,
        blameless: bool = False,
        workers: dict[int, str] | None = None,
        span: str = "",
        who: str = "a worker process",
        how: str = "",
        recovery: str = "",
        exitcodes: str = "",
    ) -> None:
        super().__init__(who, how)
        self.chunks = chunks  # chunks whose results are lost with the worker
        self.recoverable = recoverable  # False: the run cannot go on (its data is gone)
        if indices is None:
            indices = [] if index is None else [index]
        self.indices = sorted(indices)
        self.index = self.indices[0] if self.indices else None
        self.salvage = salvage or []
        self.blameless = blameless  # workers died running no item: run it all again
        self.workers = workers or {}  # item in ``indices`` -> the worker that died on it
        self.span = span
        self.who = who
        self.how = how
        self.recovery = recovery
        self.exitcodes = exitcodes


#: Called by a transport that runs items in the engine's own thread (serial):
#: updates progress, and returns True once the run must stop (its deadline passed).
Heartbeat = Callable[[], bool]


class Transport(ABC):
    """Runs a call's chunks somewhere; see the module docstring for the sequence."""

    #: Name users pass as ``backend=``.
    name: ClassVar[str]
    #: Work per chunk that hides the cost of one message on this transport.
    min_chunk_seconds: ClassVar[float] = 0.004
    #: Text for timeouts: what happened to the workers.
    stopped_text: ClassVar[str] = "its workers were stopped"
    #: Whether :meth:`stop_overdue` can stop one item (``item_timeout=``).
    stops_single_items: ClassVar[bool] = False
    #: Whether items write the caller's writable shared arrays in place
    #: (workers on this machine, or this process), so such writes land
    #: without ``out=``.
    writes_shared_in_place: ClassVar[bool] = False

    #: Workers that run chunks at the same time (known after :meth:`start`).
    workers: int = 1

    @classmethod
    def check_options(cls, options: TransportOptions) -> TransportOptions:
        """The options, checked and normalised; raises before any process starts.

        The base checks what every transport takes (worker and thread
        counts, the start method, so that switching backends never hides a
        mistake) and refuses ``client``; a transport that takes more, or
        less, extends it.
        """
        if options.client is not None:
            raise InvalidArgumentError(
                "client",
                "is for backend='dask'",
                message=f"client= is for backend='dask'; the {cls.name} backend has no client",
            )
        if options.start_method is not None:
            _checks.choice("start_method", options.start_method, available_start_methods())
        return replace(
            options,
            processes=_checks.count("processes", options.processes),
            threads_per_worker=_checks.count("threads_per_worker", options.threads_per_worker),
        )

    @classmethod
    def stops_items_with(cls, options: TransportOptions) -> bool:
        """Whether a transport built from ``options`` can stop one item
        (``item_timeout=``), known before it is built."""
        return cls.stops_single_items

    @classmethod
    @abstractmethod
    def from_options(cls, options: TransportOptions) -> Transport:
        """A transport for one run, from options :meth:`check_options` returned."""

    @abstractmethod
    def encode(
        self,
        payload: Payload,
        inputs: Inputs,
        *,
        keep_going: bool = False,
        item_timeout: float | None = None,
    ) -> None:
        """Prepare the payload (pickling, sharing big arrays); starts no process.

        ``keep_going``: chunks go on past an item that raises (recording it
        in ``ChunkResult.failed``). ``item_timeout``: the run will ask
        :meth:`stop_overdue` (only of a transport that ``stops_single_items``).
        Any exception means the payload cannot travel; the engine reports
        it as such.
        """

    @abstractmethod
    def start(self, chunk_bound: Callable[[int], int], heartbeat: Heartbeat) -> None:
        """Start or reuse workers and send them the payload.

        ``chunk_bound(workers)`` is the most chunks the run will submit to
        that many workers; ``heartbeat`` is for transports that run items
        in the engine's thread.
        """

    def stack_results(self, first: Any, n_items: int) -> np.ndarray | None:
        """Offer a shared array where workers store results in place.

        Called once with the probe's result; return the array (with
        ``first`` stored at 0) or None to receive results as values.
        """
        return None

    @abstractmethod
    def submit(self, chunk: Chunk) -> None:
        """Queue one chunk."""

    @abstractmethod
    def wait(self, timeout: float) -> list[ChunkResult]:
        """Results of chunks that finished, waiting at most ``timeout`` s.

        Raises :class:`WorkerLost` when a worker died.
        """

    @abstractmethod
    def items_done(self) -> int:
        """Items completed so far, running chunks included."""

    @abstractmethod
    def cancel(self, grace: float, kill: bool) -> list[ChunkResult]:
        """Stop queued chunks now and running ones at their next item;
        stop workers still busy after ``grace`` s (at once with ``kill``).

        Returns the results of chunks that came back meanwhile (complete or
        stopped early), so that what they completed is kept.
        """

    def recover(self) -> None:
        """Make the transport usable again after :class:`WorkerLost`
        (replace a broken pool); lost chunks are then submitted anew."""
        raise WorkerLost(chunks=[], recovery="this transport cannot recover")

    def stop_overdue(self, seconds: float) -> list[int]:
        """Stop workers whose current item has run longer than ``seconds``;
        their items (they then surface as :class:`WorkerLost`)."""
        raise NotImplementedError(f"the {self.name} backend cannot stop a single item")

    def output_state(self) -> tuple[np.ndarray, ...] | None:
        """Arrays holding, now, the ``out=`` writes of every item whose
        chunk came back, in the order of ``inputs.outputs``: what a journal
        records mid-run. None when the writes reach the caller only when
        the run lands them (the journal then records them at the end)."""
        return None

    def land_outputs(self) -> None:  # noqa: B027 - optional hook
        """Make the writes of completed items into ``inputs.outputs``
        visible in the caller's arrays; called once, whether the run
        succeeded or not."""

    @abstractmethod
    def release(self) -> None:
        """Free what the run holds (segments, futures); idempotent."""
