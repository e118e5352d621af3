"""Asking for more shared memory than exists fails with a clear error, before
any write (the alternative is SIGBUS on first touch)."""

from __future__ import annotations

import os

import pytest

import shm_kernel_safe as sks
from shm_kernel_safe.memory import capacity

from ..helpers import shm_entries, small_tmpfs


def test_statvfs_check_names_bytes_and_fix():
    free = capacity.free_bytes()
    assert free is not None
    before = shm_entries()
    with pytest.raises(sks.SharedMemoryCapacityError) as info:
        sks.empty(free // 8 + (1 << 30) // 8)
    err = info.value
    assert err.needed > err.free
    text = str(err)
    assert "/dev/shm" in text and "--shm-size" in text and "free" in text
    assert isinstance(err, MemoryError)
    assert shm_entries() == before  # nothing was created


@pytest.fixture
def small_shm():
    with small_tmpfs("8m") as mnt:
        yield mnt


def test_fallocate_reservation_turns_sigbus_into_error(small_shm):
    """Like Docker's 64 MB /dev/shm: the check passes (racing writer) but the
    reservation of real pages fails, so the caller gets an error, not SIGBUS."""
    path = os.path.join(small_shm, "seg")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 32 << 20)  # succeeds on tmpfs: the trap
        with pytest.raises(sks.SharedMemoryCapacityError) as info:
            capacity.reserve(fd, 32 << 20, directory=small_shm)
        assert small_shm in str(info.value)
        capacity.reserve(fd, 1 << 20, directory=small_shm)  # what fits is fine
    finally:
        os.close(fd)
    with pytest.raises(sks.SharedMemoryCapacityError):
        capacity.check_capacity(16 << 20, directory=small_shm)


def test_a_segment_filled_by_write_fails_as_clearly_when_full(small_shm):
    """``sks.share`` writes an array's bytes straight into its new segment
    (no reservation first): a full /dev/shm is the same clear error, and
    what fits arrives whole."""
    path = os.path.join(small_shm, "seg")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 32 << 20)
        with pytest.raises(sks.SharedMemoryCapacityError) as info:
            capacity.write_all(fd, memoryview(bytes(32 << 20)), directory=small_shm)
        assert small_shm in str(info.value) and info.value.needed == 32 << 20
        os.ftruncate(fd, 0)
        data = os.urandom(3 << 20)
        capacity.write_all(fd, memoryview(data), directory=small_shm)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
