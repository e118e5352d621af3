"""The safe close keeps every kind of view readable, and memory is returned
to the OS exactly when the last view dies."""

from __future__ import annotations

import gc
import mmap
import os
from multiprocessing import shared_memory

import numpy as np
import pytest

import shm_kernel_safe as sks
from shm_kernel_safe.memory.segments import Segment, unlink_name

from ..helpers import run_python, shm_entries


@pytest.fixture
def protected():
    sks.protect()
    yield
    sks.unprotect()


def _stdlib_segment(n=1000):
    shm = shared_memory.SharedMemory(create=True, size=n * 8)
    arr = np.ndarray((n,), dtype=np.float64, buffer=shm.buf)
    arr[:] = np.arange(n)
    return shm, arr


def test_protect_is_idempotent_and_reversible():
    original = shared_memory.SharedMemory.__dict__["close"]
    sks.protect()
    sks.protect()
    assert sks.is_protected()
    sks.unprotect()
    sks.unprotect()
    assert shared_memory.SharedMemory.__dict__["close"] is original
    assert not sks.is_protected()


def test_frombuffer_view_no_buffererror(protected):
    shm, _ = _stdlib_segment()
    view = np.frombuffer(shm.buf, dtype=np.float64)  # holds a buffer export
    shm.close()  # stdlib raises BufferError here
    shm.unlink()
    assert view[999] == 999.0
    assert not sks.is_dangling(view)


def test_ndarray_view_slices_transposes_containers(protected):
    shm, arr = _stdlib_segment(1200)
    mat = arr.reshape(40, 30)
    kept = {
        "slice": arr[10:20],
        "T": mat.T,
        "nested": [(mat[::3, ::-2],)],
        "obj": type("O", (), {})(),
    }
    kept["obj"].attr = mat[5]
    expected = {k: np.array(v, copy=True) for k, v in [("slice", arr[10:20]), ("T", mat.T)]}
    del arr, mat
    shm.close()
    shm.unlink()
    gc.collect()
    assert np.array_equal(kept["slice"], expected["slice"])
    assert np.array_equal(kept["T"], expected["T"])
    assert kept["nested"][0][0].shape == (14, 15)
    assert kept["obj"].attr[0] == 150.0
    for v in (kept["slice"], kept["T"], kept["nested"][0][0], kept["obj"].attr):
        assert not sks.is_dangling(v)


def test_close_twice_and_del_are_silent(protected, capfd):
    shm, arr = _stdlib_segment()
    shm.close()
    shm.close()
    shm.unlink()
    del shm
    gc.collect()
    assert arr.sum() == sum(range(1000))
    assert "Exception ignored" not in capfd.readouterr().err


def test_gc_cycle_holding_views_frees_memory():
    """A view inside a reference cycle is unmapped only when the cycle is collected."""
    before = shm_entries()
    arr = sks.zeros(4096)
    cycle: list = [arr[100:200]]
    cycle.append(cycle)
    name = sks.handle_of(arr).name
    del arr
    assert name in shm_entries() - before  # still viewed: the name is kept
    del cycle
    gc.collect()
    assert name not in shm_entries()


def _rss_shmem_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    pytest.skip("no RssShmem in /proc/self/status")


@pytest.mark.timeout(60)
def test_memory_returned_when_last_view_dies():
    code = r"""
import gc, numpy as np
from multiprocessing import shared_memory
import shm_kernel_safe
shm_kernel_safe.protect()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
base = rss()
shm = shared_memory.SharedMemory(create=True, size=64 << 20)
a = np.ndarray((8 << 20,), np.float64, buffer=shm.buf); a[:] = 1.0
touched = rss()
tail = a[-10:]
del a
shm.close(); shm.unlink()
gc.collect()
still = rss()
assert tail.sum() == 10.0
del tail; gc.collect()
print(base, touched, still, rss())
"""
    _rss_shmem_kib()
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    base, touched, still, after = map(int, proc.stdout.split())
    assert touched - base > 60_000  # 64 MiB mapped and touched
    assert still - base > 60_000  # a live slice keeps the mapping
    assert after - base < 4_000  # last view gone: unmapped


def test_segment_close_never_unmaps():
    seg = Segment.create(800)
    view = np.ndarray((100,), np.float64, buffer=seg.root)
    view[:] = 3.0
    seg.close()
    unlink_name(seg.name)
    assert view.sum() == 300.0
    # A third party closing the mmap cannot unmap under our views either.
    mapping = view.base.base.obj
    assert isinstance(mapping, mmap.mmap)
    with pytest.raises(BufferError):
        mapping.close()
    assert not sks.is_dangling(view)


def test_attach_missing_segment_is_clear():
    with pytest.raises(sks.SegmentNotFoundError, match="does not exist"):
        Segment.attach("sks0_1_doesnotexist000", 8)


def test_share_roundtrip_and_readonly_attach(tmp_path):
    x = np.arange(12.0).reshape(3, 4)
    handle = sks.share(x)
    assert handle.view() is not x and np.array_equal(handle.view(), x)
    code = f"""
import pickle, sys
import numpy as np
h = pickle.loads({pickle_bytes(handle.as_readonly())!r})
v = h.view()
assert not v.flags.writeable
print(v.sum(), v.shape)
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "66.0"
    assert os.path.exists(f"/dev/shm/{handle.name}")


def pickle_bytes(obj) -> bytes:
    import pickle

    return pickle.dumps(obj)


def test_handle_is_small_and_exact():
    arr = sks.empty((1001,), dtype=np.uint8)
    handle = sks.handle_of(arr)
    assert handle.segment_nbytes == 1001  # exact, not page-rounded
    assert len(pickle_bytes(handle)) < 300
    assert sks.handle_of(np.zeros(3)) is None


def test_handle_of_views_keeps_offsets_and_strides():
    arr = sks.empty((10, 10))
    arr[:] = np.arange(100).reshape(10, 10)
    for view in (arr[2:5, 1::3], arr.T, arr[::-1, ::-2], arr[7]):
        handle = sks.handle_of(view)
        handle_remote = pickle_loads(pickle_bytes(handle))
        from shm_kernel_safe.memory import arrays

        attached = handle_remote.view()
        assert np.array_equal(attached, view)
        arrays.release_attached()
        del attached


def pickle_loads(data):
    import pickle

    return pickle.loads(data)


def test_object_arrays_refused():
    with pytest.raises(TypeError, match="object"):
        sks.share(np.array([object()]))


def test_segments_are_private_to_this_user():
    arr = sks.empty(100)
    name = sks.handle_of(arr).name
    mode = os.stat(f"/dev/shm/{name}").st_mode & 0o777
    assert mode == 0o600, oct(mode)


@pytest.mark.parametrize("where", ["_advised", "_register"])
def test_interrupt_while_a_segment_is_made_leaves_no_name(where, monkeypatch):
    """ "Interrupt kernel" can land anywhere, also between the moment a name
    exists in /dev/shm and the moment it is registered (where exit and kernel
    shutdown find it): the name must go with the exception."""
    from shm_kernel_safe.memory import segments

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(segments, where, interrupted)
    before = shm_entries()
    with pytest.raises(KeyboardInterrupt):
        Segment.create(1 << 16)
    assert shm_entries() == before
