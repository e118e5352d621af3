"""``%load_ext shm_kernel_safe`` / ``%unload_ext shm_kernel_safe``.

Loading installs, in this order: the safe close on the standard library's
``SharedMemory`` (class-level, so objects made before loading are covered),
the inspection hooks, and the magics. Unloading removes exactly what loading
installed, and nothing it did not (a ``protect()`` the user made themselves
stays).
"""

from __future__ import annotations

import sys
from typing import Any

from . import pool, stdlib_patch
from .helpers import unhook_kernel_shutdown
from .inspection import InspectionHooks
from .magics import ShmMagics

_state: dict[int, dict[str, Any]] = {}


def load_ipython_extension(shell: Any) -> None:
    if id(shell) in _state:
        return  # loading twice is harmless
    we_protected = not stdlib_patch.is_protected()
    stdlib_patch.protect()
    hooks = InspectionHooks(shell)
    hooks.install()
    shell.register_magics(ShmMagics)
    _state[id(shell)] = {"hooks": hooks, "we_protected": we_protected}


def unload_ipython_extension(shell: Any) -> None:
    state = _state.pop(id(shell), None)
    if state is None:
        return
    state["hooks"].uninstall()
    magics = shell.magics_manager.magics
    for kind, names in ShmMagics.magics.items():  # filled in by @magics_class
        for name in names:
            magics[kind].pop(name, None)
    shell.magics_manager.registry.pop("ShmMagics", None)
    if state["we_protected"]:
        stdlib_patch.unprotect()
    pool.shutdown_all()
    dask = sys.modules.get("shm_kernel_safe.dask_cluster")
    if dask is not None:  # our LocalCluster, clients we opened, arrays kept on clusters
        dask.close_all()
    unhook_kernel_shutdown()


def is_loaded(shell: Any) -> bool:
    return id(shell) in _state
