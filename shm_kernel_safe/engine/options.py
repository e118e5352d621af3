"""The run's arguments, checked once, before any process starts.

``parallel_map`` (and through it the magic) hands every argument of a run
here; the options of where it runs are each transport's own
(:meth:`~shm_kernel_safe.engine.transport.Transport.check_options`). Each
kind of value has one helper in :mod:`shm_kernel_safe._checks`, so every
argument is refused in the same words, naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _checks
from ..errors import InvalidArgumentError, InvalidArgumentTypeError
from .captured import fix_text, unowned_writes
from .reporting import PROGRESS_MODES
from .transport import Inputs, Transport, TransportOptions

#: What a failed item does to the run: stop it, or be recorded while it goes on.
ERROR_MODES = ("raise", "continue")

#: Keyword arguments of peers (joblib, concurrent.futures, dask, tqdm) and ours.
PEER_KEYWORDS = {
    "n_jobs": "processes=",
    "n_workers": "processes=",
    "max_workers": "processes=",
    "workers": "processes=",
    "verbose": "progress='text'",
    "chunk_size": "chunksize=",
    "batch_size": "chunksize=",
    "mp_context": "start_method=",
    "context": "start_method=",
    "prefer": "backend=",
    "scheduler": "client=",
    "on_error": "errors=",
}


@dataclass(frozen=True)
class RunArguments:
    """What ``parallel_map`` was asked to do, checked and normalised."""

    fn: Callable[[Any], Any]
    items: Any  # a sequence: len() and []
    chunksize: int | None
    timeout: float | None
    inputs: Inputs
    progress: Callable[[int, int], None] | str | None
    errors: str
    retries: int
    item_timeout: float | None


def check_run(
    fn: Any,
    items: Any,
    *,
    chunksize: Any = None,
    timeout: Any = None,
    share_threshold: Any,
    share: Any = (),
    out: Any = (),
    progress: Any = None,
    errors: Any = "raise",
    retries: Any = 0,
    item_timeout: Any = None,
    journal: Any = None,
    keep_journal: Any = False,
    wait: Any = True,
    unknown: dict[str, Any] | None = None,
    known: Iterable[str] = (),
    transport: type[Transport],
    transport_options: TransportOptions | None = None,
) -> RunArguments:
    """Every argument of a run, checked; raises the first invalid one by name.

    ``transport`` is the class the run will use: what it can do decides
    some arguments (``item_timeout``, writes into shared arrays).
    ``unknown`` are keyword arguments the caller does not take, ``known``
    those it does (for a "did you mean").
    """
    _checks.unknown_keywords("parallel_map", unknown or {}, PEER_KEYWORDS, known)
    fn = _checks.callable_("fn", fn)
    seq = as_sequence(items)
    outputs = _checks.arrays("out", out, writable=True)
    inputs = Inputs(
        int(_checks.count("share_threshold", share_threshold, minimum=0, optional=False) or 0),
        _checks.arrays("share", share),
        outputs,
    )
    check_progress(progress)
    _checks.path_or_flag("journal", journal)
    _checks.flag("keep_journal", keep_journal)
    _checks.flag("wait", wait)
    check_captured_writes(fn, outputs, transport.writes_shared_in_place)
    item_timeout = _checks.seconds("item_timeout", item_timeout)
    options = transport_options or TransportOptions()
    if item_timeout is not None and not transport.stops_items_with(options):
        raise InvalidArgumentError(
            "item_timeout",
            f"is not supported by backend={transport.name!r}: it cannot stop one item "
            f"from outside (timeout= stops the whole run)",
        )
    return RunArguments(
        fn,
        seq,
        _checks.count("chunksize", chunksize),
        _checks.seconds("timeout", timeout),
        inputs,
        progress,
        _checks.choice("errors", errors, ERROR_MODES),
        int(_checks.count("retries", retries, minimum=0, optional=False) or 0),
        item_timeout,
    )


def check_progress(progress: Any) -> None:
    """``progress`` names a display or is ``progress(done, total)``."""
    if (
        progress is None
        or isinstance(progress, str)
        or (callable(progress) and not isinstance(progress, type))
    ):
        if isinstance(progress, str):
            _checks.choice("progress", progress, PROGRESS_MODES)
        elif progress is not None:
            _checks.callable_with("progress", progress, "progress(done, total)", 0, 0)
        return
    raise InvalidArgumentTypeError(
        "progress",
        f"must be one of {', '.join(map(repr, PROGRESS_MODES))} or a callable "
        f"progress(done, total), got {type(progress).__name__} {progress!r}",
    )


def as_sequence(items: Any) -> Any:
    """``items`` as something with ``len()`` and ``[]`` (lists only what must be listed)."""
    if isinstance(items, np.ndarray) and items.ndim == 0:
        raise InvalidArgumentTypeError(
            "items",
            f"is a 0-d ndarray ({items!r}), not an iterable of work items; "
            f"for that many items use range({items.item()!r})",
        )
    if isinstance(items, (range, list, tuple, np.ndarray)):
        return items
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise InvalidArgumentTypeError(
            "items",
            f"is a {type(items).__name__}, not an iterable of work items (a range, list, array...)",
        )
    return list(items)


def check_captured_writes(
    fn: Any, outputs: tuple[np.ndarray, ...], shared_in_place: bool = True
) -> None:
    """Refuse a function that writes into captured arrays not in ``out=``.

    In workers such writes would be lost (a pickled copy) or refused (a
    read-only shared view), while ``backend="serial"`` would keep them: one
    outcome on every backend, named before the run starts. Writes into an
    array over writable shared memory land where workers share this
    machine's memory (``shared_in_place``), so those pass there.
    """
    writes = unowned_writes(fn, outputs, shared_in_place)
    if not writes:
        return
    names = [w.name for w in writes]
    first = writes[0]
    arrays = ", ".join(names)
    raise InvalidArgumentError(
        "out",
        f"misses {arrays}, which {first.function} writes into",
        message=(
            f"{first.where()} writes into {arrays}, which it captures from outside "
            f"(not passed as out=): in worker processes those writes would be lost. "
            f"To keep them, {fix_text(names)}; if {names[0]} is scratch space, "
            f"create it inside the function"
        ),
    )
