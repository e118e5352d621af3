"""What earlier runs of a function returned and took: a repeated run skips its probe.

A run first sends item 0 alone (the probe, see ``planning``): its result
tells the layout of the shared array results are stored in, and its time
the size of the smallest chunk. Every other worker waits for it: a round
trip, measured at 1.1-1.6 ms of a warm local call (a fifth of a call of
8,760 items that do nothing). Users call the same function again and again
(a cell re-run, a loop over years); its results then almost always look
the same.

So a run remembers, per function, one result (``prototype``: small, and of
a kind that stacks) and its items' mean time; the next run of a function
with the same code cuts all its chunks at once and stacks results like the
prototype from the start. A guess that turns out wrong costs speed, never
a value: a worker stores a result in the stacked array only when it is
exactly of the prototype's kind (``results.stack_layout``), every other one
travels as a value (a *misfit*), and the call's result is assembled from
the values by the one rule of ``results``, whatever was guessed. Such a
run forgets the guess, so the next one probes again. Prototypes are kept
small (:data:`MAX_PROTOTYPE_BYTES`): a misfit per item then costs about
what a result that does not stack costs anyway.
"""

from __future__ import annotations

import functools
import threading
import types
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .results import stack_layout

#: Results bigger than this are not remembered: such items cost far more
#: than the probe's round trip, and a wrong guess would send each as a value.
MAX_PROTOTYPE_BYTES = 4096

#: Functions remembered (least recently run forgotten first).
MAX_FUNCTIONS = 128


@dataclass(frozen=True)
class Kind:
    """One function's results as its last run found them."""

    prototype: Any  # one result, copied; results "like it" are stacked
    seconds_per_item: float  # the items' mean time, in the workers


_lock = threading.Lock()
_kinds: OrderedDict[Hashable, Kind] = OrderedDict()


def function_key(fn: Any) -> Hashable | None:
    """Equal for the same code run again (a cell re-run defines a new
    function object with the same code) and for the same builtin; None for
    other callables without code (an object with ``__call__``: its state,
    not its code, may decide what it returns)."""
    if isinstance(fn, functools.partial):
        inner = function_key(fn.func)
        if inner is None:
            return None
        return ("partial", inner, len(fn.args), tuple(sorted(fn.keywords)))
    if isinstance(fn, types.BuiltinFunctionType | type) and fn.__module__ == "builtins":
        return ("builtin", fn.__qualname__)  # ``int``, ``len``, ``abs``: the same every run
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    key = (getattr(fn, "__qualname__", None), code.co_code, code.co_consts, code.co_names)
    try:
        hash(key)
    except TypeError:  # a constant that cannot be hashed
        return None
    return key


def recall(fn: Any) -> Kind | None:
    """The kind remembered for ``fn``'s code, if any."""
    key = function_key(fn)
    if key is None:
        return None
    with _lock:
        kind = _kinds.get(key)
        if kind is not None:
            _kinds.move_to_end(key)
        return kind


def remember(fn: Any, prototype: Any, seconds_per_item: float) -> None:
    """Keep ``prototype`` (one of ``fn``'s results) when it is small and
    stacks, with the items' mean time; else forget ``fn``."""
    key = function_key(fn)
    if key is None:
        return
    if (
        seconds_per_item <= 0
        or stack_layout(prototype) is None
        or np.asarray(prototype).nbytes > MAX_PROTOTYPE_BYTES
    ):
        forget(fn)
        return
    if isinstance(prototype, np.ndarray):
        prototype = prototype.copy()  # never a view of the run's shared memory
    with _lock:
        _kinds[key] = Kind(prototype, seconds_per_item)
        _kinds.move_to_end(key)
        while len(_kinds) > MAX_FUNCTIONS:
            _kinds.popitem(last=False)


def forget(fn: Any) -> None:
    """The next run of ``fn``'s code probes again."""
    key = function_key(fn)
    if key is not None:
        with _lock:
            _kinds.pop(key, None)


def clear() -> None:
    """Forget every function (tests; a kernel restart does it anyway)."""
    with _lock:
        _kinds.clear()
