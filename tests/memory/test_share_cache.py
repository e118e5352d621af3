"""Ordinary arrays shared once and reused while unchanged:
real pools, real segments, the sharing report's byte counts."""

from __future__ import annotations

import functools
import gc
import os
import weakref

import numpy as np
import pytest
from IPython.core.interactiveshell import InteractiveShell

import shm_kernel_safe as sks
from shm_kernel_safe import lifecycle
from shm_kernel_safe.memory import digest, segments
from shm_kernel_safe.memory.share_cache import ShareCache
from shm_kernel_safe.memory.share_cache import cache as share_cache
from shm_kernel_safe.transports.local import sharing

from ..helpers import SHM_DIR

pytestmark = [pytest.mark.timeout(120)]


def row_sum(x: np.ndarray, i: int) -> float:
    return float(x[i].sum())


def copied(fn) -> tuple[int, int]:
    """(bytes copied, bytes served from the cache) to pickle ``fn`` for a call."""
    _, report = sharing.dumps(fn)
    try:
        return report.copied_bytes, report.cached_bytes
    finally:
        sharing.release(report)


def segment_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


@pytest.fixture(autouse=True)
def empty_cache():
    share_cache.clear()
    yield
    share_cache.clear()


def test_second_call_copies_nothing_and_sees_every_change():
    x = np.random.default_rng(0).standard_normal((40_000, 16))  # 5 MB
    fn = functools.partial(row_sum, x)
    assert copied(fn) == (x.nbytes, 0)
    assert copied(fn) == (0, x.nbytes)  # reused: 0 bytes copied
    assert copied(fn) == (0, x.nbytes)
    x[123, 4] += 1  # in place
    assert copied(fn) == (x.nbytes, 0)
    assert copied(fn) == (0, x.nbytes)
    view = x[100:200, ::2]
    view[5, 1] = -7.0  # through a view
    assert copied(fn) == (x.nbytes, 0)
    alias = x
    alias[-1, -1] = np.nan  # through another name; NaN compares by bytes
    assert copied(fn) == (x.nbytes, 0)
    assert copied(fn) == (0, x.nbytes)
    assert len(share_cache.summary()) == 1  # one copy per live array, stale ones gone


def test_reuse_across_real_calls_gives_the_changed_result(no_orphans):
    x = np.random.default_rng(1).standard_normal((40_000, 16))
    fn = functools.partial(row_sum, x)
    expected = [row_sum(x, i) for i in range(300)]
    for _ in range(3):
        assert np.array_equal(sks.parallel_map(fn, range(300), processes=2), expected)
    (entry,) = share_cache.summary()
    assert entry["uses"] == 3 and not entry["in_use"]
    x[123, 4] += 1
    y = sks.parallel_map(fn, range(300), processes=2)
    assert y[123] == row_sum(x, 123) and y[123] != expected[123]
    (new_entry,) = share_cache.summary()
    assert new_entry["name"] != entry["name"] and not segment_exists(entry["name"])


def test_copy_is_freed_with_the_array():
    x = np.ones((20_000, 16))
    copied(functools.partial(row_sum, x))
    (entry,) = share_cache.summary()
    assert segment_exists(entry["name"])
    del x
    gc.collect()
    assert share_cache.summary() == []
    assert not segment_exists(entry["name"])
    assert entry["name"] not in {r.name for r in segments.live_segments() if not r.unlinked}


def test_a_copy_in_use_outlives_a_change_until_its_run_ends():
    """A run reads a consistent snapshot: the copy it uses stays named and
    unchanged while the caller changes the array and another call reshares."""
    x = np.zeros((20_000, 16))
    fn = functools.partial(row_sum, x)
    _, first = sharing.dumps(fn)  # a run holding its lease
    (handle,) = [lease.handle for lease in first.leases]
    x[0, 0] = 5.0
    assert copied(fn) == (x.nbytes, 0)  # a second call gets the new bytes
    assert segment_exists(handle.name)  # the first run's copy is still there
    assert handle.view()[0, 0] == 0.0  # and still the snapshot it took
    sharing.release(first)
    assert not segment_exists(handle.name)


def test_cap_is_respected_and_zero_turns_the_cache_off():
    small = ShareCache(max_bytes=6_000_000)
    a, b = np.ones((40_000, 16)), np.zeros((40_000, 16))  # 5.12 MB each
    lease_a = small.acquire(a)
    small.release(lease_a)
    assert small.cached_bytes() == a.nbytes
    lease_b = small.acquire(b)  # evicts a (least recently used, not in use)
    assert small.cached_bytes() == b.nbytes and not segment_exists(lease_a.handle.name)
    small.release(lease_b)
    big = np.ones((80_000, 16))  # over the cap: copied for the call alone
    lease = small.acquire(big)
    assert lease.owned and small.cached_bytes() == b.nbytes
    small.release(lease)
    assert not segment_exists(lease.handle.name)
    small.limit(0)
    assert small.cached_bytes() == 0
    lease = small.acquire(a)
    assert lease.owned
    small.release(lease)
    small.clear()


def test_cleared_at_shutdown_and_unload():
    x = np.ones((20_000, 16))
    copied(functools.partial(row_sum, x))
    (entry,) = share_cache.summary()
    lifecycle.run(lifecycle.KERNEL_SHUTDOWN)
    assert share_cache.summary() == [] and not segment_exists(entry["name"])
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "shm_kernel_safe")
    try:
        copied(functools.partial(row_sum, x))
        (entry,) = share_cache.summary()
        shell.run_line_magic("shm_status", "")
    finally:
        shell.run_line_magic("unload_ext", "shm_kernel_safe")
    assert share_cache.summary() == [] and not segment_exists(entry["name"])


def test_status_shows_cached_copies(capsys):
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "shm_kernel_safe")
    try:
        x = np.ones((20_000, 16))
        copied(functools.partial(row_sum, x))
        shell.run_line_magic("shm_status", "")
        out = capsys.readouterr().out
        assert "Cached shared copies of arrays: 1, 2.4 MiB" in out, out
        assert "(20000, 16) float64" in out
    finally:
        shell.run_line_magic("unload_ext", "shm_kernel_safe")


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(60_000.0).reshape(3000, 20),
        lambda: np.asfortranarray(np.arange(60_000.0).reshape(3000, 20)),
        lambda: np.arange(120_000.0).reshape(3000, 40)[:, ::2],
        lambda: np.arange(60_000, dtype=np.int16).reshape(30, 40, 50)[:, 1:, ::3],
    ],
    ids=["C", "F", "strided", "3d-strided"],
)
def test_digest_is_the_copys_for_every_layout(make):
    arr = make()
    lease = share_cache.acquire(arr)
    try:
        shared = lease.handle.view()
        assert np.array_equal(shared, arr)
        assert digest.digest(shared) == digest.digest(arr)
        again = share_cache.acquire(arr)
        assert again.copied_bytes == 0
        share_cache.release(again)
        arr[1, 1] += 1
        changed = share_cache.acquire(arr)
        assert changed.copied_bytes == arr.nbytes
        share_cache.release(changed)
    finally:
        share_cache.release(lease)


def test_entry_does_not_keep_the_array_alive():
    x = np.ones((20_000, 16))
    ref = weakref.ref(x)
    copied(functools.partial(row_sum, x))
    del x
    gc.collect()
    assert ref() is None


def attached(_: int) -> tuple[int, tuple[str, ...]]:
    from shm_kernel_safe.memory import arrays

    return os.getpid(), tuple(sorted(arrays.attached_names()))


def test_workers_drop_a_replaced_copy_in_the_call_that_replaces_it(no_orphans):
    x = np.ones((40_000, 16))

    def probe(i):
        return (attached(i), float(x[i, 0]))[0]

    first = sks.parallel_map(probe, range(40), processes=2)
    (old,) = share_cache.summary()
    assert any(old["name"] in names for _, names in first)
    x[0, 0] = 2.0
    second = sks.parallel_map(probe, range(40), processes=2)
    (new,) = share_cache.summary()
    assert all(old["name"] not in names for _, names in second)  # not one call later
    assert any(new["name"] in names for _, names in second)


def test_low_dev_shm_evicts_older_copies_first(monkeypatch):
    from shm_kernel_safe.memory import share_cache as module

    cache = ShareCache(max_bytes=1 << 40)
    a, b = np.ones((40_000, 16)), np.zeros((40_000, 16))  # 5.12 MB each
    cache.release(cache.acquire(a))
    monkeypatch.setattr(module, "_shm_size", lambda: 40_000_000)
    # 12 MB free: taking 5 MB more would leave less than a quarter (10 MB)
    monkeypatch.setattr(module.capacity, "free_bytes", lambda directory=None: 12_000_000)
    lease = cache.acquire(b)
    assert [e["shape"] for e in cache.summary()] == [b.shape]  # a's copy went first
    cache.release(lease)
    cache.clear()


def test_a_full_dev_shm_empties_the_cache_and_retries(monkeypatch):
    from shm_kernel_safe.errors import SharedMemoryCapacityError
    from shm_kernel_safe.memory import share_cache as module

    cache = ShareCache(max_bytes=1 << 40)
    a, b = np.ones((40_000, 16)), np.zeros((40_000, 16))
    first = cache.acquire(a)
    cache.release(first)
    real_share, calls = module.share, []

    def share_once_full(arr):
        calls.append(arr.shape)
        if len(calls) == 1:
            raise SharedMemoryCapacityError(arr.nbytes, 0, "/dev/shm")
        return real_share(arr)

    monkeypatch.setattr(module, "share", share_once_full)
    lease = cache.acquire(b)
    assert len(calls) == 2 and not segment_exists(first.handle.name)
    assert np.array_equal(lease.handle.view(), b)
    cache.release(lease)
    cache.clear()
