"""Resuming a run: what makes two runs the same run, checked before merging.

A run that fails records on its error (``exc.run``, a :class:`RunRecord`)
what it ran: an XXH3-128 fingerprint of its items, one of its function's
code, and the identity of its ``out=`` arrays. ``parallel_map(...,
resume=exc)`` hands the error to the :class:`~shm_kernel_safe.engine.run.Run`,
which checks it here (:meth:`Prior.check`) before any process starts, runs
only the items not done, and merges once:

* other items (another count, or the same count with other values): refused;
  their results would be mixed into these;
* ``out=`` arrays that are not the objects the failed run wrote (another
  count, a re-allocated array, a changed shape or dtype): refused; the
  completed items' writes are not in them;
* another function (its code changed): a :class:`ResumeFunctionChangedWarning`;
  a fixed bug is the usual reason to resume, and the completed items keep
  the old code's results;
* an error that records no run (not raised by ``parallel_map``), or
  ``last_errors()`` of a run without failures: refused, with that reason.

Fingerprints are computed when a run fails and when one resumes, never on
the way of a run that succeeds.
"""

from __future__ import annotations

import functools
import types
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import numpy as np
import xxhash

from ..errors import FailedItems, InvalidArgumentError, ResumeFunctionChangedWarning
from ..memory.digest import digest
from .callsite import warn_at_caller
from .results import prior_values

_SIMPLE = (str, int, float, bool, complex, bytes, type(None))


@dataclass(frozen=True)
class OutputRecord:
    """One ``out=`` array of a run: which object, which memory, what shape."""

    identity: int  # id() of the array object
    address: int  # its data pointer
    shape: tuple[int, ...]
    dtype: str
    # The object itself while it lives (not pickled): an id can be reused.
    ref: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, arr: np.ndarray) -> OutputRecord:
        return cls(
            id(arr),
            arr.__array_interface__["data"][0],
            tuple(arr.shape),
            arr.dtype.str,
            weakref.ref(arr),
        )

    def is_(self, arr: np.ndarray) -> bool:
        """Whether ``arr`` is the very array this records."""
        if self.ref is not None and self.ref() is not arr:
            return False
        return self == OutputRecord.of(arr)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["ref"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def describe(self) -> str:
        return f"{self.shape} {np.dtype(self.dtype)} at 0x{self.address:x}"


@dataclass(frozen=True)
class RunRecord:
    """What made a run the run it was, carried by its errors as ``exc.run``.

    Attributes
    ----------
    id : str
        This run's id (a new one per call).
    items : str
        XXH3-128 fingerprint of the items.
    function : str
        XXH3-128 fingerprint of the function's code.
    outputs : tuple of OutputRecord
        The ``out=`` arrays it wrote into.
    """

    id: str
    items: str
    function: str
    outputs: tuple[OutputRecord, ...] = ()


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def fingerprint_items(items: Any) -> str:
    """XXH3-128 of what the items are (as 32 hex digits).

    A range by its bounds, a numeric ndarray by shape, dtype and bytes, a
    list or tuple of plain scalars and strings by its repr, anything else by
    its pickle (arrays inside hashed out of band, without a copy).
    """
    h = xxhash.xxh3_128()
    h.update(type(items).__qualname__.encode())
    if isinstance(items, range):
        h.update(repr(items).encode())
    elif isinstance(items, np.ndarray) and not items.dtype.hasobject:
        h.update(f"{items.shape} {items.dtype.str}".encode())
        h.update(digest(items))
    elif isinstance(items, (list, tuple)) and all(type(v) in _SIMPLE for v in items):
        h.update(repr(items).encode())
    else:
        try:
            h.update(cloudpickle.dumps(items, protocol=5, buffer_callback=_hashing(h)))
        except Exception:  # items that do not pickle (a serial run): their repr and identity
            try:
                h.update(f"{id(items)} {items!r}".encode())
            except Exception:  # not even a repr: only the same object matches
                h.update(f"{id(items)}".encode())
    return h.hexdigest()


def _hashing(h: Any) -> Any:
    def out_of_band(buffer: Any) -> bool:
        try:
            h.update(buffer.raw())
        except Exception:
            h.update(bytes(buffer))
        return False  # keep it out of the pickle: it is hashed already

    return out_of_band


def fingerprint_function(fn: Any) -> str:
    """XXH3-128 of the code ``fn`` runs (not of the values it reads).

    A cell compiled anew each run has the same fingerprint as long as its
    text is the same; file names and line numbers are left out.
    """
    h = xxhash.xxh3_128()
    _feed_callable(h, fn, 3)
    return h.hexdigest()


def _feed_callable(h: Any, fn: Any, depth: int) -> None:
    if isinstance(fn, functools.partial):
        h.update(b"partial")
        _feed_callable(h, fn.func, depth)
        h.update(repr((fn.args, sorted(fn.keywords.items()))).encode())
        return
    target = getattr(fn, "__func__", fn)
    code = getattr(target, "__code__", None)
    if isinstance(code, types.CodeType):
        _feed_code(h, code)
        return
    if not isinstance(fn, type) and depth > 0:
        call = next((vars(c)["__call__"] for c in type(fn).__mro__ if "__call__" in vars(c)), None)
        if isinstance(getattr(call, "__code__", None), types.CodeType):
            h.update(type(fn).__qualname__.encode())
            _feed_callable(h, call, depth - 1)
            return
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    h.update(name.encode())


def _feed_code(h: Any, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(h, const)
        else:
            h.update(repr(const).encode())


@dataclass
class Prior:
    """What the run to resume completed, checked against this call."""

    done: np.ndarray
    values: list
    record: RunRecord

    @classmethod
    def check(cls, resume: Any, fn: Any, items: Any, outputs: tuple[np.ndarray, ...]) -> Prior:
        """The prior run's ``done`` and values, or an :class:`InvalidArgumentError`
        saying why ``resume`` cannot be merged into a run of ``fn`` over ``items``."""
        done = getattr(resume, "done", None)
        if isinstance(resume, FailedItems) and done is None:
            raise InvalidArgumentError(
                "resume",
                "is last_errors() of a run without failures: the last run had no "
                "failures; nothing to resume",
            )
        if done is None or not hasattr(resume, "partial"):
            raise InvalidArgumentError(
                "resume",
                "must be an error raised by parallel_map (with .done and .partial) or "
                f"shm_kernel_safe.last_errors(), got {type(resume).__name__}",
            )
        done = np.asarray(done, dtype=bool)
        if done.shape != (len(items),):
            raise InvalidArgumentError(
                "resume",
                f"is from a run of {done.size} items; these are {len(items)} "
                f"(resume the same items the failed run had)",
            )
        record = getattr(resume, "run", None)
        if not isinstance(record, RunRecord):
            raise InvalidArgumentError(
                "resume",
                "records no run (it was not raised by parallel_map): what it completed "
                "cannot be checked against these items, function and out= arrays",
            )
        if record.items != fingerprint_items(items):
            raise InvalidArgumentError(
                "resume",
                f"is from another run (run {record.id}): its items differ from these "
                f"(the same count, other values); resume with the items it ran, or run "
                f"without resume=",
            )
        _check_outputs(record, outputs)
        if record.function != fingerprint_function(fn):
            warn_at_caller(
                ResumeFunctionChangedWarning(
                    f"resume=: the function is not the one run {record.id} ran (its code "
                    f"changed); the {int(done.sum())} items it completed keep the results "
                    f"of the old code, the {int((~done).sum())} others run the new one"
                )
            )
        return cls(done, prior_values(resume.partial, done), record)

    def merge(
        self, values: list, done: np.ndarray, positions: np.ndarray
    ) -> tuple[list, np.ndarray]:
        """(values, done) over all items: this run's (of ``positions``) over the prior's."""
        merged = list(self.values)
        all_done = self.done.copy()
        for k in np.flatnonzero(done):
            merged[positions[k]] = values[k]
        all_done[positions] = done
        return merged, all_done


def _check_outputs(record: RunRecord, outputs: tuple[np.ndarray, ...]) -> None:
    was = record.outputs
    if len(was) != len(outputs):
        raise InvalidArgumentError(
            "resume",
            f"is from a run that wrote into {len(was)} out= array(s); this call gives "
            f"{len(outputs)}: pass the arrays the failed run wrote (they hold its "
            f"completed items' writes)",
        )
    for i, (rec, arr) in enumerate(zip(was, outputs, strict=True)):
        if not rec.is_(arr):
            now = OutputRecord.of(arr)
            raise InvalidArgumentError(
                "resume",
                f"is from a run that wrote into another out[{i}] array ({rec.describe()}, "
                f"object 0x{rec.identity:x}); this one is {now.describe()}, object "
                f"0x{now.identity:x}: the completed items' writes are not in it. Pass the "
                f"array the failed run wrote, or run without resume=",
            )
