"""Render a worker's traceback with the parent's source lines.

cloudpickle ships functions defined in a notebook by value and renames
their code's file to ``<dynamic-code>``, so a worker cannot show the line
that failed. The worker sends frames as (file, line number, function name);
the parent, which still has the original code objects and, for notebook
cells, the cell sources in ``linecache``, maps each dynamic frame back to
its real file and prints the real line.
"""

from __future__ import annotations

import contextlib
import linecache
import traceback
import types
from typing import Any

Frame = tuple[str, int, str]
DYNAMIC = "<dynamic-code>"


def extract(exc: BaseException, skip: int = 0) -> tuple[list[Frame], list[str]]:
    """Frames and the exception lines of ``exc``, in a form that pickles."""
    tb = exc.__traceback__
    for _ in range(skip):
        if tb is not None:
            tb = tb.tb_next
    frames = [(f.filename, f.lineno or 0, f.name) for f in traceback.extract_tb(tb)]
    return frames, traceback.format_exception_only(type(exc), exc)


def code_files(root: Any, depth: int = 3) -> dict[str, str]:
    """Map function name -> source file for code reachable from ``root``."""
    found: dict[str, str] = {}
    seen: set[int] = set()

    def visit(obj: Any, level: int) -> None:
        if id(obj) in seen or level < 0:
            return
        seen.add(id(obj))
        if isinstance(obj, types.MethodType):
            obj = obj.__func__
        code = getattr(obj, "__code__", None)
        if isinstance(obj, types.CodeType):
            code = obj
        if isinstance(code, types.CodeType):
            found.setdefault(code.co_name, code.co_filename)
            for const in code.co_consts:
                if isinstance(const, types.CodeType):
                    visit(const, level)
            globs = getattr(obj, "__globals__", None)
            if globs is not None:
                for name in code.co_names:
                    if name in globs:
                        visit(globs[name], level - 1)
            for cell in getattr(obj, "__closure__", None) or ():
                with contextlib.suppress(ValueError):
                    visit(cell.cell_contents, level - 1)
        elif isinstance(obj, type):
            for attr in vars(obj).values():
                visit(attr, level - 1)

    visit(root, depth)
    return found


def render(frames: list[Frame], exc_lines: list[str], files: dict[str, str]) -> str:
    out = ["Traceback (most recent call last):\n"]
    for filename, lineno, name in frames:
        if filename == DYNAMIC and name in files:
            filename = files[name]
        out.append(f'  File "{filename}", line {lineno}, in {name}\n')
        line = linecache.getline(filename, lineno).strip()
        if line:
            out.append(f"    {line}\n")
    out.extend(exc_lines)
    return "".join(out)
