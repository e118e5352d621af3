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
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

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
                        _line(ins),
                    )
        elif ins.opname == "LOAD_GLOBAL" and depth < _MAX_DEPTH:
            callee = globs.get(ins.argval)
            if isinstance(callee, types.FunctionType):  # a helper the function calls
                yield from _function_writes(callee, seen, depth + 1)
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and id(const) not in seen:
            seen.add(id(const))
            # Free variables of a nested function that are the outer one's
            # own locals are not captured from outside: only pass-throughs.
            inner = {v: cells[v] for v in const.co_freevars if v in cells}
            yield from _code_writes(const, globs, inner, fn, seen, depth)


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
    # No column information (Python 3.10): ``name[index] = value`` with a simple index.
    if k >= 2 and instructions[k - 1].opname.startswith("LOAD_"):
        ins = instructions[k - 2]
        return ins if ins.opname in _CONTAINER_LOADS else None
    return None


def _resolve(load: dis.Instruction, globs: dict[str, Any], cells: dict[str, Any]) -> Any:
    name = load.argval
    if load.opname in ("LOAD_DEREF", "LOAD_CLASSDEREF"):
        return cells.get(name)
    return globs.get(name)


def _line(ins: dis.Instruction) -> int | None:
    pos = getattr(ins, "positions", None)
    if pos is not None and pos.lineno is not None:
        return pos.lineno
    return getattr(ins, "starts_line", None) or None


def unowned_writes(fn: Any, outputs: tuple[np.ndarray, ...]) -> list[CapturedWrite]:
    """Writes of ``fn`` into captured arrays that are not (views of) ``outputs``."""
    return [w for w in captured_writes(fn) if not any(_same(w.array, o) for o in outputs)]


def _same(arr: np.ndarray, out: np.ndarray) -> bool:
    return arr is out or (arr.base is not None and arr.base is out)


def fix_text(names: list[str]) -> str:
    """How to keep the writes, for the API and the magic at once."""
    listed = ", ".join(names)
    flags = " ".join(f"--out {n}" for n in names)
    return f"pass out=[{listed}] (%%shm_parallel: {flags})"


def read_only_hint(message: str, fn: Any, outputs: tuple[np.ndarray, ...]) -> str:
    """For an item's ``assignment destination is read-only``: which captured
    arrays it may have meant to write and how to make the writes land; ``""``
    when the error is about something else."""
    if "read-only" not in message:
        return ""
    names = []
    for label, value in _captured_arrays(fn):
        if not value.flags.writeable or any(_same(value, o) for o in outputs):
            continue
        names.append(label)
    if not names:
        return ""
    return (
        f"; arrays the function captures reach workers read-only: to write into "
        f"{' or '.join(names)}, {fix_text(names[:1])}"
    )


def _captured_arrays(fn: Any) -> Iterator[tuple[str, np.ndarray]]:
    code = getattr(fn, "__code__", None)
    if code is None:
        return
    globs = getattr(fn, "__globals__", None) or {}
    for name in code.co_names:
        if isinstance(globs.get(name), np.ndarray):
            yield name, globs[name]
    for var, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False):
        with contextlib.suppress(ValueError):
            if isinstance(cell.cell_contents, np.ndarray):
                yield var, cell.cell_contents
