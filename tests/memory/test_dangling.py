"""is_dangling() spots unmapped arrays without reading their memory: each
case below would segfault on a read."""

from __future__ import annotations

import mmap
from multiprocessing import shared_memory

import numpy as np

import shm_kernel_safe as sks


def test_stdlib_close_leaves_dangling_view():
    sks.unprotect()
    shm = shared_memory.SharedMemory(create=True, size=80)
    arr = np.ndarray((10,), np.float64, buffer=shm.buf)
    sub = arr[2:5].T.reshape(3, 1)
    assert not sks.is_dangling(arr)
    shm.close()  # original stdlib close: unmaps under arr
    shm.unlink()
    assert sks.is_dangling(arr)
    assert sks.is_dangling(sub)


def test_mmap_closed_directly():
    mm = mmap.mmap(-1, 4096)
    arr = np.ndarray((512,), np.float64, buffer=mm)
    mm.close()
    assert sks.is_dangling(arr)


def test_memmap_private_mmap_closed(tmp_path):
    path = tmp_path / "data.bin"
    mem = np.memmap(path, dtype=np.float32, mode="w+", shape=(100,))
    view = mem[10:20]
    mem._mmap.close()
    assert sks.is_dangling(mem)
    assert sks.is_dangling(view)


def test_released_memoryview_and_chains_through_views():
    from shm_kernel_safe.memory.arrays import chain_end_released

    mm = mmap.mmap(-1, 64)
    outer = memoryview(mm)
    assert chain_end_released(outer) is False
    outer.release()
    assert chain_end_released(outer) is True  # released view: memory unreachable
    mm.close()
    assert chain_end_released(mm) is True
    # a memoryview over an ndarray over a closed mmap
    mm2 = mmap.mmap(-1, 64)
    arr = np.ndarray((8,), np.float64, buffer=mm2)
    mv = memoryview(arr)
    assert chain_end_released(mv) is False
    mv.release()
    mm2.close()
    assert chain_end_released(arr) is True


def test_not_arrays_and_ordinary_arrays():
    for obj in (None, 3, "x", [np.zeros(2)], np.zeros((2, 2)).T, np.arange(5)[::2]):
        assert sks.is_dangling(obj) is False
    assert sks.is_dangling(np.frombuffer(b"abcdefgh", dtype=np.uint8)) is False
