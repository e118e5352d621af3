"""Big inputs a dask cluster keeps between runs, as our local workers keep
the segments a kernel still holds.

An input is named by its content (dtype, shape, XXH3-128 of the bytes), so a
run finds on the cluster what an earlier run sent and sends nothing, while
any in-place change gives a new name and the array is sent again. What is
kept is tied to the kernel's array object: when that object is collected,
or changes so that its content has a new name, the cluster copy is
released. So the cluster holds at most one copy per live array the user
ran something on, and nothing for arrays that are gone.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...memory.digest import hexdigest


def content_name(arr: np.ndarray) -> str:
    """What an array holds: dtype, shape and an XXH3-128 digest of its bytes.

    The same check as the local share cache's (:mod:`~shm_kernel_safe.memory.digest`):
    ~160 ms per 1.28 GB here where SHA-1 took ~0.85-1.4 s, a small fraction
    of sending the array to the workers (W times the array through the
    scheduler), and it sees any in-place change, where an id or a sampled
    checksum would not.
    """
    shape = "x".join(map(str, arr.shape))
    return f"{arr.dtype.str.strip('<>|=')}-{shape}-{hexdigest(arr)}"


@dataclass
class _Entry:
    source: weakref.ref
    name: str
    future: Any
    nbytes: int


class KeptArrays:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, dict[int, _Entry]] = {}  # client id -> id(source) -> entry

    def lookup(self, client: Any, name: str) -> Any | None:
        """A future of data named ``name`` already on the cluster, or None."""
        with self._lock:
            for entry in self._entries.get(client.id, {}).values():
                if entry.name == name and entry.future.status == "finished":
                    return entry.future
        return None

    def add(self, client: Any, name: str, source: np.ndarray, future: Any) -> None:
        """Keep ``future`` while ``source`` lives and holds the same content."""
        key = id(source)

        def gone(ref: weakref.ref, client_id: str = client.id) -> None:
            with self._lock:
                entries = self._entries.get(client_id, {})
                if key in entries and entries[key].source is ref:
                    del entries[key]  # the future goes with it: released on the cluster

        entry = _Entry(weakref.ref(source, gone), name, future, source.nbytes)
        with self._lock:
            self._entries.setdefault(client.id, {})[key] = entry  # replaces a stale one

    def summary(self, client: Any) -> tuple[int, int]:
        """(arrays, bytes per worker) kept on the cluster of ``client``."""
        with self._lock:
            entries = list(self._entries.get(client.id, {}).values())
        return len(entries), sum(e.nbytes for e in entries)

    def forget(self, client: Any | None = None) -> None:
        """Release what is kept on one cluster, or on all."""
        with self._lock:
            if client is None:
                self._entries.clear()
            else:
                self._entries.pop(client.id, None)


kept_arrays = KeptArrays()
