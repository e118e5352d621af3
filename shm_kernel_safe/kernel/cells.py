"""Turn a ``%%shm_parallel`` line and cell into a function for the engine.

``nn in range(8760) -n 4 --out y`` splits into a loop target (``nn``), an
iterable expression (``range(8760)``) and options, at the first top-level
`` -x`` / `` --x`` (so ``range(-5, 5)`` stays whole). The cell body becomes
the body of a function of the loop target, compiled from the cell's own AST
so that line numbers, and hence tracebacks, point at the cell's lines. Its
free names are found with ``symtable`` (names the body reads but never
binds), and resolved in the user's namespace when the cell starts.
"""

from __future__ import annotations

import ast
import builtins
import itertools
import linecache
import symtable
from dataclasses import dataclass, field
from typing import Any

from ..engine.worker_warnings import CELL_FILE_PREFIX
from ..errors import CellSyntaxError

FUNC_NAME = "__shm_parallel_cell__"
ITEM_NAME = "__shm_parallel_item__"
_counter = itertools.count(1)


@dataclass
class LoopSpec:
    target: str
    iterable: str
    options: str


def split_line(line: str) -> LoopSpec:
    """``TARGET in ITERABLE [options]`` -> its three parts."""
    depth, quote, cut = 0, "", len(line)
    for i, ch in enumerate(line):
        if quote:
            if ch == quote and line[i - 1] != "\\":
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif (
            depth == 0
            and ch == "-"
            and i > 0
            and line[i - 1].isspace()
            and i + 1 < len(line)
            and (line[i + 1].isalpha() or line[i + 1] == "-")
        ):
            cut = i
            break
    loop, options = line[:cut].strip(), line[cut:].strip()
    head, sep, tail = loop.partition(" in ")
    if not sep or not head.strip() or not tail.strip():
        raise CellSyntaxError(
            f"expected 'VAR in ITERABLE [options]', got {line.strip()!r} "
            "(for example: %%shm_parallel nn in range(8760) --out y)"
        )
    target = head.strip()
    try:
        tree = ast.parse(f"for {target} in ():\n    pass")
        ast.parse(tail.strip(), mode="eval")
    except SyntaxError as exc:
        raise CellSyntaxError(f"cannot parse {loop!r}: {exc.msg}") from None
    if not isinstance(tree.body[0], ast.For):
        raise CellSyntaxError(f"bad loop variable {target!r}")
    return LoopSpec(target, tail.strip(), options)


@dataclass
class CellFunction:
    code: Any  # module code object defining FUNC_NAME
    filename: str
    free_names: list[str] = field(default_factory=list)
    returns_last_value: bool = False


def compile_cell(target: str, cell: str, want_result: bool) -> CellFunction:
    """Compile the cell as ``def f(item): TARGET = item; <cell>``.

    With ``want_result``, a final expression statement becomes ``return``.
    """
    filename = f"{CELL_FILE_PREFIX}{next(_counter)}>"
    try:
        body = ast.parse(cell, filename).body
    except SyntaxError as exc:
        raise CellSyntaxError(f"syntax error in the cell, line {exc.lineno}: {exc.msg}") from None
    returns = False
    if want_result and body and isinstance(body[-1], ast.Expr):
        last = body[-1]
        body[-1] = ast.copy_location(ast.Return(value=last.value), last)
        returns = True
    module = ast.parse(f"def {FUNC_NAME}({ITEM_NAME}):\n    {target} = {ITEM_NAME}\n")
    func = module.body[0]
    assert isinstance(func, ast.FunctionDef)
    for node in ast.walk(func):  # the header sits on line 1, like the cell's first line
        if hasattr(node, "lineno"):
            node.lineno = node.end_lineno = 1
    func.body = func.body + body if body else [*func.body, ast.Pass()]
    ast.fix_missing_locations(module)
    code = compile(module, filename, "exec")
    # Tracebacks (local and rendered from workers) show the cell's lines.
    lines = cell.splitlines(True)
    linecache.cache[filename] = (len(cell), None, lines, filename)
    return CellFunction(code, filename, _free_names(module), returns)


def _free_names(module: ast.Module) -> list[str]:
    table = symtable.symtable(ast.unparse(module), "<cell>", "exec")
    names: set[str] = set()

    def visit(tab: symtable.SymbolTable) -> None:
        for sym in tab.get_symbols():
            if sym.is_global() and sym.is_referenced():
                names.add(sym.get_name())
        for child in tab.get_children():
            visit(child)

    for child in table.get_children():
        visit(child)
    return sorted(names - {FUNC_NAME, ITEM_NAME})


def resolve(cell_fn: CellFunction, user_ns: dict[str, Any]) -> Any:
    """Build the function, its globals taken from ``user_ns``.

    Only the names the cell uses are captured, so cloudpickle sends just
    those; anything not found is a usage error before any process starts.
    """
    namespace: dict[str, Any] = {"__builtins__": builtins, "__name__": "__shm_parallel__"}
    missing = []
    for name in cell_fn.free_names:
        if name in user_ns:
            namespace[name] = user_ns[name]
        elif not hasattr(builtins, name):
            missing.append(name)
    if missing:
        raise CellSyntaxError(
            f"name{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} used in the "
            f"cell {'are' if len(missing) > 1 else 'is'} not defined in the namespace"
        )
    exec(cell_fn.code, namespace)  # defines FUNC_NAME only; runs no cell code
    return namespace[FUNC_NAME]
