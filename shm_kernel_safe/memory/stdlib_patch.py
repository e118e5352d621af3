"""Make the standard library's ``SharedMemory.close`` unable to crash a kernel.

``SharedMemory.close()`` calls ``mmap.close()``, which unmaps the memory even
while ndarrays made with ``np.ndarray(buffer=shm.buf)`` still point into it
(they hold a reference to the mmap but no buffer export). The next read of
such an array, often by a variable explorer computing min/max on its own, is
a segfault that kills the kernel. And when a view made with
``np.frombuffer(shm.buf)`` is alive, ``close()`` raises ``BufferError``
instead, including from ``__del__`` at exit.

``protect()`` swaps the class's ``close`` for one that drops the object's
references and closes the file descriptor, leaving unmapping to reference
counting. It patches the class, so it also covers objects created before
it ran. ``unlink()`` is untouched: freeing the name early stays legal.
"""

from __future__ import annotations

import contextlib
import os
import threading
from multiprocessing import shared_memory

_lock = threading.Lock()
_original_close = None


def safe_close(self: shared_memory.SharedMemory) -> None:
    """Close without unmapping: the memory lives exactly as long as its views.

    As the standard library's close: ``shm.buf`` itself is released (a
    reference to it taken before ``close()`` raises ``ValueError`` on use
    afterwards), and an error closing the descriptor (``EBADF`` when it was
    already closed elsewhere) is raised. Unlike it, nothing is unmapped:
    arrays and memoryviews derived from ``shm.buf`` hold the memory by
    reference and stay valid. Releasing ``shm.buf`` cannot unmap anything:
    every array or slice made from it holds the mmap or a memoryview of its
    own; if something still exports from ``shm.buf`` itself, it is left as is.
    """
    buf, self._buf = getattr(self, "_buf", None), None
    if buf is not None:
        with contextlib.suppress(BufferError):  # exported: it must stay valid
            buf.release()
    self._mmap = None
    fd = getattr(self, "_fd", -1)
    if isinstance(fd, int) and fd >= 0:
        self._fd = -1  # first: a failed close is reported once, not again at __del__
        os.close(fd)


def protect() -> None:
    """Install the safe close on ``multiprocessing.shared_memory.SharedMemory``.

    Patches the class, so objects made before the call are covered too:
    ``shm.close()`` no longer unmaps memory that numpy views still use (the
    original crash); the memory lives exactly as long as its views.
    ``%load_ext shm_kernel_safe`` calls it. Idempotent; undone exactly by
    :func:`unprotect`.

    See Also
    --------
    unprotect, is_protected

    Examples
    --------
    >>> from multiprocessing import shared_memory
    >>> import numpy as np
    >>> import shm_kernel_safe as sks
    >>> sks.protect()
    >>> shm = shared_memory.SharedMemory(create=True, size=80)
    >>> view = np.ndarray((10,), np.float64, buffer=shm.buf)
    >>> view[:] = 1.5
    >>> shm.close(); shm.unlink()
    >>> float(view.sum())  # without protect(): a segfault
    15.0
    >>> del view
    """
    global _original_close
    with _lock:
        if _original_close is not None:
            return
        _original_close = shared_memory.SharedMemory.__dict__["close"]
        shared_memory.SharedMemory.close = safe_close


def unprotect() -> None:
    """Put the standard library's own ``SharedMemory.close`` back.

    Undoes :func:`protect` (``%unload_ext shm_kernel_safe`` calls it); a
    no-op when it is not installed.

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> sks.protect(); sks.unprotect()
    >>> sks.is_protected()
    False
    """
    global _original_close
    with _lock:
        if _original_close is None:
            return
        shared_memory.SharedMemory.close = _original_close
        _original_close = None


def is_protected() -> bool:
    """Whether the safe close of :func:`protect` is installed.

    Returns
    -------
    bool

    Examples
    --------
    >>> import shm_kernel_safe as sks
    >>> sks.protect()
    >>> sks.is_protected()
    True
    >>> sks.unprotect()
    """
    return shared_memory.SharedMemory.__dict__.get("close") is safe_close
