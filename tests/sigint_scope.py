"""Which tests can notice how the test runner was started with respect to
SIGINT, for CI's stage 2 (the tests run again with SIGINT ignored, as
``cmd &`` from a non-interactive shell and some job runners start them).

The disposition a process inherits shows only where a SIGINT is delivered
(it becomes a ``KeyboardInterrupt``, or nothing) or where code reads it
(``_platform.interrupt_deferred``, which also only matters when a SIGINT
arrives). Our pool workers (``pool._init_worker``) and dask workers (their
plugin) set SIGINT ignored themselves, and so do the forkserver and the
resource trackers, so a pool started by a test that sends no signal behaves
the same however the runner was started. What remains, and what the
``sigint`` marker selects, are the tests whose code:

1. sends a signal or an interrupt, to itself, a child, a worker or a
   kernel (``os.kill``, ``killpg``, ``signal.*``, ``interrupt_kernel``,
   ``interrupt_main``, psutil's ``kill``/``terminate``/``send_signal``), or
   raises or expects ``KeyboardInterrupt``/``ParallelInterrupt``;
2. starts a kernel (the drivers of ``tests/kernels.py`` and
   ``tests/spyder_gui_driver.py``, nbclient, jupyter_client): jupyter_client
   interrupts a kernel's whole process group, its workers included, and
   sends SIGINT before shutting it down;
3. starts a script with SIGINT ignored (``run_python(sigint_ignored=True)``).

"The code" is read from the source: the test function, the fixtures it
uses (those of tests/), the functions, classes and strings of its own
module it names (followed transitively), the names it takes from
``tests/kernels.py`` and ``tests/spyder_gui_driver.py``, and its
parameters. Comments and docstrings count: a test that talks about
signals is kept rather than missed. What reading cannot see (a signal sent
from a helper of the package, a kernel started under another name) the
runtime guard in ``conftest.py`` catches: a SIGINT sent or a kernel started
in the pytest process by a test without the marker fails that test.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import textwrap
import types
from typing import Any

import pytest

#: Category 1 and 3: signals and interrupts. Category 2: kernel starts
#: (``KernelManager``, ``NotebookClient``, ``spyder_kernels``).
TOKENS = re.compile(
    r"SIGINT|\bsignal\.\w|\bos\.kill\b|killpg|interrupt_kernel|interrupt_main"
    r"|\.kill\(|\.terminate\(|send_signal|KeyboardInterrupt|ParallelInterrupt"
    r"|sigint_ignored|KernelManager|NotebookClient|nbclient|spyder_kernels|start_kernel"
    # the kernel drivers imported inside a test function
    r"|from\s+[.\w]*\b(?:kernels|spyder_gui_driver)\s+import"
)

#: The runtime guard's fixture (conftest.py), used by every test: it names
#: SIGINT to watch for it, and sends none.
GUARD = "_sigint_guard"

#: Modules whose every name is a way into a kernel: a test that uses any
#: of them starts one (the kernel drivers, the real-Spyder driver).
KERNEL_MODULES = ("tests.kernels", "tests.spyder_gui_driver")


def reason(item: pytest.Item) -> str | None:
    """Why ``item`` belongs to stage 2 (the first token found, and where),
    or None."""
    func = getattr(item, "function", None)
    if func is None:
        return None
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [(item.name, func)]
    if not getattr(inspect.unwrap(func), "__module__", "").startswith("tests"):
        # A test made by a library (hypothesis' state machines, unittest):
        # its code is its module's, read whole.
        todo.append((f"module {item.module.__name__}", inspect.getsource(item.module)))
    if getattr(item, "cls", None) is not None:
        todo.append((f"class {item.cls.__name__}", item.cls))
    for name, fixturedefs in getattr(item._fixtureinfo, "name2fixturedefs", {}).items():
        for fixturedef in fixturedefs:
            if name != GUARD and getattr(fixturedef.func, "__module__", "").startswith("tests"):
                todo.append((f"fixture {name}", fixturedef.func))
    callspec = getattr(item, "callspec", None)
    for key, value in callspec.params.items() if callspec else ():
        todo.append((f"parameter {key}", value))
    while todo:
        where, obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if getattr(obj, "__module__", None) in KERNEL_MODULES:
            return f"uses {where} from {obj.__module__} (starts a kernel)"
        text = _text(obj)
        if text is None:
            continue
        if found := TOKENS.search(text):
            return f"{found.group(0)!r} in {where}"
        module = _module_of(obj)
        if module is None:
            continue
        for ref in _names(text):
            value = getattr(module, ref, None)
            if value is None:
                continue
            if getattr(value, "__module__", None) in KERNEL_MODULES or (
                isinstance(value, types.ModuleType) and value.__name__ in KERNEL_MODULES
            ):
                return f"uses {ref} from {KERNEL_MODULES} (starts a kernel)"
            if isinstance(value, (str, list, tuple, dict)) or _defined_in(value, module):
                todo.append((f"{ref} (from {where})", value))
    return None


def _text(obj: Any) -> str | None:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, (list, tuple)):
        return "\n".join(t for o in obj if (t := _text(o)) is not None) or None
    if isinstance(obj, dict):
        return _text(list(obj.values()))
    target = inspect.unwrap(obj) if callable(obj) else obj
    if not (inspect.isfunction(target) or inspect.isclass(target)):
        return None
    try:
        return textwrap.dedent(inspect.getsource(target))
    except (OSError, TypeError):
        return None


def _module_of(obj: Any) -> types.ModuleType | None:
    if isinstance(obj, str):
        return None
    target = inspect.unwrap(obj) if callable(obj) else obj
    return sys.modules.get(getattr(target, "__module__", "") or "")


def _defined_in(value: Any, module: types.ModuleType) -> bool:
    """A function or class of ``module`` itself (helpers of other modules
    are generic: they are judged by what the test passes them)."""
    target = inspect.unwrap(value) if callable(value) else value
    return (inspect.isfunction(target) or inspect.isclass(target)) and getattr(
        target, "__module__", None
    ) == module.__name__


def _names(text: str) -> set[str]:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return set(re.findall(r"\b[A-Za-z_]\w*\b", text))
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
