"""Find the arrays a function writes into but does not own: ``y[nn] = ...``
where ``y`` is a global or a closure variable.

In worker processes such an array is a copy (pickled by value) or a
read-only view of shared memory, so the write is lost or refused, while in
the calling process (``backend="serial"``) it lands: the same code would
give different results per backend. The run refuses such a function before
it starts unless the array is one of its ``out=`` arrays (the magic makes it
one), so that the outcome is the same everywhere and the message names the
fix.

Detection reads the bytecode, so it works for functions, lambdas and cells
alike without their source: a ``STORE_SUBSCR`` whose target expression
starts with a ``LOAD_GLOBAL`` / ``LOAD_DEREF`` of a name bound to an
ndarray (``y[i] =``, ``y[i] +=``, ``y.T[i] =``, ``y[i][j] =``). Functions
defined inside ``fn`` and global functions ``fn`` calls are searched too, a
few levels deep. Writes it cannot see (``np.copyto(y, ...)``, a method that
writes) surface at run time as the read-only error of a shared array, which
:func:`read_only_hint` words the same way.
"""

from __future__ import annotations

import contextlib
import dis
import mmap
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..memory.arrays import handle_of

_CONTAINER_LOADS = {"LOAD_GLOBAL", "LOAD_DEREF", "LOAD_NAME", "LOAD_CLASSDEREF"}
_MAX_DEPTH = 3


@dataclass(frozen=True)
class CapturedWrite:
    """``function`` writes into ``array``, reached as ``name``, at ``line``."""

    name: str
    array: np.ndarray
    function: str
    filename: str
    line: int | None

    def where(self) -> str:
        line = f", line {self.line}" if self.line else ""
        return f"{self.function} ({self.filename}{line})"


def captured_writes(fn: Any) -> list[CapturedWrite]:
    """Subscript writes of ``fn`` into ndarrays it captures, first per array."""
    found: dict[int, CapturedWrite] = {}
    for write in _function_writes(fn, set(), 0):
        found.setdefault(id(write.array), write)
    return list(found.values())


def _function_writes(fn: Any, seen: set[int], depth: int) -> Iterator[CapturedWrite]:
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType) or id(code) in seen or depth > _MAX_DEPTH:
        return
    seen.add(id(code))
    globs = getattr(fn, "__globals__", None) or {}
    cells: dict[str, Any] = {}
    for var, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False):
        with contextlib.suppress(ValueError):  # an empty cell
            cells[var] = cell.cell_contents
    yield from _code_writes(code, globs, cells, fn, seen, depth)


def _code_writes(
    code: types.CodeType,
    globs: dict[str, Any],
    cells: dict[str, Any],
    fn: Any,
    seen: set[int],
    depth: int,
) -> Iterator[CapturedWrite]:
    instructions = list(dis.get_instructions(code))
    for k, ins in enumerate(instructions):
        if ins.opname == "STORE_SUBSCR":
            load = _container_load(instructions, k)
            if load is not None:
                value = _resolve(load, globs, cells)
                if isinstance(value, np.ndarray):
                    yield CapturedWrite(
                        load.argval,
                        value,
                        getattr(fn, "__qualname__", code.co_name),
                        code.co_filename,
                        _line(instructions, k),
                    )
        elif ins.opname == "LOAD_GLOBAL" and depth < _MAX_DEPTH:
            callee = globs.get(ins.argval)
            if _user_helper(callee, globs):
                yield from _function_writes(callee, seen, depth + 1)
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and id(const) not in seen:
            seen.add(id(const))
            # Free variables of a nested function that are the outer one's
            # own locals are not captured from outside: only pass-throughs.
            inner = {v: cells[v] for v in const.co_freevars if v in cells}
            yield from _code_writes(const, globs, inner, fn, seen, depth)


def _user_helper(value: Any, globs: dict[str, Any]) -> bool:
    """A function of the user's code that the function calls: defined in the
    same module, or in ``__main__`` (a notebook or console). Library
    functions are left alone: their module arrays are theirs."""
    if not isinstance(value, types.FunctionType):
        return False
    return value.__globals__ is globs or value.__module__ == "__main__"


def _container_load(instructions: list[dis.Instruction], k: int) -> dis.Instruction | None:
    """The instruction loading the name at the start of the target ``name[...]``."""
    store = instructions[k]
    pos = getattr(store, "positions", None)
    if pos is not None and pos.lineno is not None:
        for ins in reversed(instructions[:k]):
            p = ins.positions
            same_start = p is not None and (p.lineno, p.col_offset) == (pos.lineno, pos.col_offset)
            if same_start and ins.opname in _CONTAINER_LOADS:
                return ins
        return None
    # No column information (Python 3.10): ``name[index] = value`` and
    # ``name[index] += value`` with a simple index; other forms fail at run
    # time instead, on the read-only array (see freeze).
    if k >= 1 and instructions[k - 1].opname == "ROT_THREE":
        dups = [j for j in range(k - 1, -1, -1) if instructions[j].opname == "DUP_TOP_TWO"]
        k = dups[0] if dups else 0
    if k >= 2 and instructions[k - 1].opname.startswith("LOAD_"):
        ins = instructions[k - 2]
        return ins if ins.opname in _CONTAINER_LOADS else None
    return None


def _resolve(load: dis.Instruction, globs: dict[str, Any], cells: dict[str, Any]) -> Any:
    name = load.argval
    if load.opname in ("LOAD_DEREF", "LOAD_CLASSDEREF"):
        return cells.get(name)
    return globs.get(name)


def _line(instructions: list[dis.Instruction], k: int) -> int | None:
    pos = getattr(instructions[k], "positions", None)
    if pos is not None and pos.lineno is not None:
        return pos.lineno
    for ins in reversed(instructions[: k + 1]):  # Python 3.10: the line's first instruction
        if isinstance(ins.starts_line, int) and not isinstance(ins.starts_line, bool):
            return ins.starts_line
    return None


def unowned_writes(
    fn: Any, outputs: tuple[np.ndarray, ...], shared_in_place: bool
) -> list[CapturedWrite]:
    """Writes of ``fn`` into captured arrays that will not land.

    Those into (views of) ``outputs`` land; so do those into an array that
    lives writable in shared memory when the transport runs in this
    machine's memory (``shared_in_place``: workers write the same pages).
    """
    return [
        w
        for w in captured_writes(fn)
        if not any(_same(w.array, o) for o in outputs)
        and not (shared_in_place and _shared_writable(w.array))
    ]


def _same(arr: np.ndarray, out: np.ndarray) -> bool:
    return arr is out or (arr.base is not None and arr.base is out)


def _shared_writable(arr: np.ndarray) -> bool:
    handle = handle_of(arr)
    return handle is not None and bool(handle.writable) and arr.flags.writeable


def fix_text(names: list[str]) -> str:
    """How to keep the writes, for the API and the magic at once."""
    listed = ", ".join(names)
    flags = " ".join(f"--out {n}" for n in names)
    return f"pass out=[{listed}] (%%shm_parallel: {flags})"


def read_only_hint(message: str, fn: Any, outputs: tuple[np.ndarray, ...]) -> str:
    """For an item's ``... is read-only`` error: which captured arrays it may
    have meant to write and how to make the writes land; ``""`` when the
    error is about something else or no captured array fits."""
    if "read-only" not in message:
        return ""
    names = [
        name for name, value in captured_arrays(fn) if not any(_same(value, o) for o in outputs)
    ]
    if not names:
        return ""
    return (
        f" (arrays the function captures are read-only in the run: to write into "
        f"{' or '.join(names)}, {fix_text(names[:1])})"
    )


def captured_arrays(fn: Any) -> list[tuple[str, np.ndarray]]:
    """Every ndarray ``fn`` reaches by name: its globals and closure
    variables, those of functions defined in it and of global functions it
    calls (a few levels deep), first name per array."""
    found: dict[int, tuple[str, np.ndarray]] = {}
    _collect(fn, set(), 0, found)
    return list(found.values())


def _collect(fn: Any, seen: set[int], depth: int, found: dict) -> None:
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType) or id(code) in seen or depth > _MAX_DEPTH:
        return
    seen.add(id(code))
    globs = getattr(fn, "__globals__", None) or {}
    for var, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False):
        with contextlib.suppress(ValueError):
            if isinstance(cell.cell_contents, np.ndarray):
                found.setdefault(id(cell.cell_contents), (var, cell.cell_contents))
    codes = [code]
    while codes:
        co = codes.pop()
        for name in co.co_names:
            value = globs.get(name)
            if isinstance(value, np.ndarray):
                found.setdefault(id(value), (name, value))
            elif _user_helper(value, globs):
                _collect(value, seen, depth + 1, found)
        codes += [c for c in co.co_consts if isinstance(c, types.CodeType)]


def freeze(fn: Any, keep: Callable[[np.ndarray], bool]) -> list[np.ndarray]:
    """Make the arrays ``fn`` captures read-only, except where ``keep``.

    Writes :func:`captured_writes` cannot see (``np.copyto(y, ...)``,
    ``y.fill(0)``) then fail the same way on every transport, with the
    read-only error :func:`read_only_hint` explains, instead of landing in
    this process and vanishing in a worker's copy. Returns the arrays
    frozen, for :func:`thaw`.
    """
    frozen = []
    for _, arr in captured_arrays(fn):
        if arr.flags.writeable and not keep(arr):
            arr.flags.writeable = False
            frozen.append(arr)
    return frozen


def thaw(frozen: list[np.ndarray]) -> None:
    """Undo :func:`freeze` (the caller's own arrays, after an in-process run)."""
    for arr in frozen:
        arr.flags.writeable = True
    frozen.clear()


def keep_in_worker(arr: np.ndarray) -> bool:
    """Arrays that stay writable: those over shared memory (in a worker,
    ``out=`` arrays and the caller's writable shared arrays, written in
    place; read-only shared inputs are read-only already)."""
    base: Any = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, mmap.mmap)
