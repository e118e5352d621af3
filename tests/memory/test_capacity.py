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
