"""``%load_ext shm_kernel_safe`` / ``%unload_ext shm_kernel_safe``.

Loading installs, in this order: the safe close on the standard library's
``SharedMemory`` (class-level, so objects made before loading are covered),
the inspection hooks, the magics, and the kernel-shutdown hook of
:mod:`shm_kernel_safe.lifecycle`. Unloading removes exactly what loading
installed, and nothing it did not (a ``protect()`` the user made
themselves stays), and runs the lifecycle's ``unload`` closers: warm pools,
our dask cluster and the clients we opened stop; named segments the user
holds stay.
"""

from __future__ import annotations

import os
from typing import Any

from .. import lifecycle
from ..memory import stdlib_patch
from .inspection import InspectionHooks
from .magics import ShmMagics

_state: dict[int, dict[str, Any]] = {}


def load_ipython_extension(shell: Any) -> None:
    """Install the safe close, the inspection hooks and the magics in ``shell``."""
    if id(shell) in _state:
        return  # loading twice is harmless
    we_protected = not stdlib_patch.is_protected()
    stdlib_patch.protect()
    hooks = InspectionHooks(shell)
    hooks.install()
    shell.register_magics(ShmMagics)
    # Background runs' names are rebound by the kernel's thread, before a cell runs.
    shell.events.register("pre_run_cell", _magics(shell).settle)
    lifecycle.hook_kernel_shutdown()
    _state[id(shell)] = {"hooks": hooks, "we_protected": we_protected}
    if os.environ.get(PRESTART_ENV, "") == "1":
        _prestart_in_background()


#: ``SHM_KERNEL_SAFE_PRESTART=1``: ``%load_ext`` starts the default pool in
#: the background. Off by default: an idle pool costs a kernel 4 processes
#: and ~54 MiB PSS (~105 MiB RSS) whether or not it ever runs a cell, and
#: its workers exit after 10 idle minutes anyway; a cold call already starts
#: its pool while it copies its inputs.
PRESTART_ENV = "SHM_KERNEL_SAFE_PRESTART"


def _prestart_in_background() -> None:
    from ..transports.local.pool import start_in_background
    from ..transports.local.transport import LocalTransport

    default = LocalTransport()
    start_in_background(default.workers, default.start_method, default.threads)


def _magics(shell: Any) -> Any:
    """The ShmMagics instance registered in ``shell``."""
    return shell.magics_manager.registry.get("ShmMagics")


def unload_ipython_extension(shell: Any) -> None:
    """Undo exactly what :func:`load_ipython_extension` did."""
    state = _state.pop(id(shell), None)
    if state is None:
        return
    state["hooks"].uninstall()
    instance = _magics(shell)
    if instance is not None:
        shell.events.unregister("pre_run_cell", instance.settle)
    magics = shell.magics_manager.magics
    for kind, names in ShmMagics.magics.items():  # filled in by @magics_class
        for name in names:
            magics[kind].pop(name, None)
    shell.magics_manager.registry.pop("ShmMagics", None)
    if state["we_protected"]:
        stdlib_patch.unprotect()
    lifecycle.run(lifecycle.UNLOAD)
    lifecycle.unhook_kernel_shutdown()
