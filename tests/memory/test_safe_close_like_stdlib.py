"""The safe close differs from the standard library's only where the
standard library crashes: it reports a failed descriptor close, and a
reference to ``shm.buf`` itself is released, as the standard library does."""

from __future__ import annotations

import errno
import os
from multiprocessing import shared_memory

import numpy as np
import pytest

import shm_kernel_safe as sks


@pytest.fixture
def protected():
    sks.protect()
    yield
    sks.unprotect()


@pytest.fixture
def segment():
    shm = shared_memory.SharedMemory(create=True, size=8 * 100)
    yield shm
    shm.close()
    shm.unlink()


@pytest.mark.parametrize("safe", [False, True], ids=["stdlib", "safe"])
def test_descriptor_closed_elsewhere_is_reported(safe, segment, request):
    if safe:
        request.getfixturevalue("protected")
    os.close(segment._fd)  # a double close: the descriptor is gone
    with pytest.raises(OSError) as info:
        segment.close()
    assert info.value.errno == errno.EBADF
    if safe:
        segment.close()  # reported once, not again by the next close or __del__
    else:
        segment._fd = -1  # the standard library would report it again at every close


@pytest.mark.parametrize("safe", [False, True], ids=["stdlib", "safe"])
def test_memoryview_of_buf_is_released_by_close(safe, segment, request):
    if safe:
        request.getfixturevalue("protected")
    mv = segment.buf
    mv[:3] = b"abc"
    array = np.frombuffer(segment.buf, dtype=np.uint8)  # its own view: not released
    part = segment.buf[:3]  # a slice is a view of its own too
    if safe:
        segment.close()
    else:
        del array, part  # the standard library cannot close under them (BufferError)
        segment.close()
    with pytest.raises(ValueError, match="released"):
        mv[0]
    with pytest.raises(ValueError, match="released"):
        mv[0] = 1
    assert segment.buf is None
    if safe:
        assert bytes(array[:3]) == b"abc" and bytes(part) == b"abc"
        assert not sks.is_dangling(array)
