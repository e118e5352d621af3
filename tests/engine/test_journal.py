"""Journals: a run's completed items survive the process that ran it.

Real scripts running ``parallel_map(..., journal=PATH)`` are killed with
SIGKILL at random moments (from the first items to the last ones), run
again until one finishes; the results and ``out=`` equal an uninterrupted
run's, and a per-item side channel (each item appends its index to a file
of its run) shows that no item the journal had recorded before a kill ran
again after it.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import psutil
import pytest

import shm_kernel_safe as sks
from shm_kernel_safe.engine import journal as jmod

from ..backends import backend, kw  # noqa: F401 - fixtures
from ..helpers import small_tmpfs

pytestmark = pytest.mark.timeout(240)

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import shm_kernel_safe as sks

    N = int(sys.argv[2])
    x = np.arange(N * 4, dtype=np.float64).reshape(N, 4)
    y = np.zeros((N, 2))

    def work(i):
        fd = os.open(os.environ["SIDE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{i}\\n".encode())
        os.close(fd)
        time.sleep(0.015)  # a run (~2 s) spans flushes (every second)
        y[i, 0] = x[i].sum()
        y[i, 1] = -i
        if i % 7 == 0:
            return f"item {i}"  # not like the others: a value, not a stacked row
        return float(i) * 1.5

    if __name__ == "__main__":
        kw = eval(sys.argv[3])
        r = sks.parallel_map(work, range(N), out=y, journal=sys.argv[1], **kw)
        np.save(sys.argv[1] + ".y.npy", y)
        np.save(sys.argv[1] + ".r.npy", np.asarray(r, dtype=object), allow_pickle=True)
        print("FINISHED")
    """
)


def expected(n: int) -> tuple[list, np.ndarray]:
    x = np.arange(n * 4, dtype=np.float64).reshape(n, 4)
    y = np.stack([x.sum(axis=1), -np.arange(n, dtype=np.float64)], axis=1)
    r = [f"item {i}" if i % 7 == 0 else float(i) * 1.5 for i in range(n)]
    return r, y


def side_items(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(line) for line in f if line.strip()]


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not any(sks._platform.pid_alive(p) for p in pids):  # type: ignore[attr-defined]
            return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_at_random_moments_never_reruns_recorded_items(kw, tmp_path, stale_cleaned):
    n = 300
    path = str(tmp_path / "run.sksj")
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    options = {k: v for k, v in kw.items()}
    rng = random.Random(1234 + len(str(options)))
    kills = 0
    attempt = 0
    resumed_from = 0  # the most items a journal held when a run started
    while True:
        side = str(tmp_path / f"side{attempt}")
        env = dict(os.environ, SIDE=side)
        before = jmod.recorded_mask(path) if os.path.exists(path) else np.zeros(n, dtype=bool)
        proc = subprocess.Popen(
            [sys.executable, str(script), path, str(n), repr(options)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        # kill when a random number of items has started: early (the first
        # chunk), in the middle, or among the last items
        target = rng.choice([1, 2, rng.randrange(3, n), n - rng.randrange(1, 10)])
        target = min(target, n - int(before.sum()))
        killed = False
        if kills < 6:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if len(side_items(side)) >= target:
                    family = [proc.pid] + [
                        c.pid for c in psutil.Process(proc.pid).children(recursive=True)
                    ]
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    _wait_gone(family)
                    killed = True
                    kills += 1
                    break
                time.sleep(0.002)
        out, err = proc.communicate(timeout=300)
        ran = side_items(side)
        resumed_from = max(resumed_from, int(before.sum()))
        again = sorted(set(ran) & set(np.flatnonzero(before).tolist()))
        assert not again, f"recorded items ran again after kill {kills}: {again[:10]}"
        attempt += 1
        if not killed:
            assert proc.returncode == 0, err.decode()[-3000:]
            assert b"FINISHED" in out
            break
    assert resumed_from > 0, "no run started from a journal that recorded items"
    r_want, y_want = expected(n)
    y = np.load(path + ".y.npy")
    r = np.load(path + ".r.npy", allow_pickle=True).tolist()
    np.testing.assert_array_equal(y, y_want)
    assert r == r_want
    assert not os.path.exists(path), "a finished run's journal is removed"
    assert kills == 6


@pytest.mark.filterwarnings("ignore::shm_kernel_safe.PerformanceHint")
def test_interrupted_run_resumes(kw, tmp_path, capsys):
    """A run stopped by an item's error leaves its journal; the same call
    (``y`` as it started, as in a new kernel) runs only the rest, and ends
    as an uninterrupted run (every transport, dask included)."""
    path = str(tmp_path / "j.sksj")
    flag = str(tmp_path / "fail")
    side = str(tmp_path / "side")
    open(flag, "w").close()
    y = np.zeros(60)

    def work(i):
        if i == 45 and os.path.exists(flag):
            raise ValueError("stop here")
        with open(side, "a") as fh:
            fh.write(f"{i}\n")
        y[i] = i + 0.5
        return i * 2.0

    with pytest.raises(sks.TaskError):
        sks.parallel_map(work, range(60), out=y, journal=path, chunksize=5, **kw)
    recorded = jmod.recorded_mask(path)
    assert 0 < recorded.sum() < 60 and not recorded[45]
    os.unlink(flag)
    os.unlink(side)
    y[:] = 0  # what the notebook makes again in a new kernel
    capsys.readouterr()
    r = sks.parallel_map(work, range(60), out=y, journal=path, **kw)
    line = capsys.readouterr().out
    assert f"resuming: {int(recorded.sum())} of 60 items recorded" in line
    assert not set(side_items(side)) & set(np.flatnonzero(recorded).tolist())
    np.testing.assert_array_equal(r, np.arange(60) * 2.0)
    np.testing.assert_array_equal(y, np.arange(60) + 0.5)
    assert not os.path.exists(path)


def test_same_kernel_run_again_resumes_from_its_own_writes(tmp_path):
    """Run again in the same process after an interrupt: ``y`` holds what
    the run wrote, which the journal accepts as well as the start."""
    path = str(tmp_path / "k.sksj")
    flag = str(tmp_path / "stop")
    open(flag, "w").close()
    y = np.zeros(20)

    def f(i):
        if i == 12 and os.path.exists(flag):
            raise KeyboardInterrupt
        y[i] = i
        return float(i)

    with pytest.raises(KeyboardInterrupt):
        sks.parallel_map(f, range(20), out=y, journal=path, backend="serial")
    os.unlink(flag)
    r = sks.parallel_map(f, range(20), out=y, journal=path, backend="serial")
    np.testing.assert_array_equal(r, np.arange(20.0))
    np.testing.assert_array_equal(y, np.arange(20.0))
    # another y (neither the start nor what was written) is refused
    open(flag, "w").close()
    with pytest.raises(KeyboardInterrupt):
        sks.parallel_map(f, range(20), out=y, journal=path, backend="serial")
    y[:] = 7.0
    with pytest.raises(sks.JournalError, match="out= array 0"):
        sks.parallel_map(f, range(20), out=y, journal=path, backend="serial")


def test_mismatched_journal_is_refused_naming_it(tmp_path):
    path = str(tmp_path / "m.sksj")
    flag = str(tmp_path / "stop")
    open(flag, "w").close()
    x = np.arange(10.0)

    def f(i):
        if i == 8 and os.path.exists(flag):
            raise KeyboardInterrupt
        return x[i] * 2

    with pytest.raises(KeyboardInterrupt):
        sks.parallel_map(f, range(10), journal=path, backend="serial")
    assert jmod.recorded_mask(path)[:8].all()
    with pytest.raises(sks.JournalError, match=r"10 items, this one has 11") as info:
        sks.parallel_map(f, range(11), journal=path, backend="serial")
    assert path in str(info.value) and "discard_journal" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(sks.JournalError, match="other values"):
        sks.parallel_map(f, list(range(1, 11)), journal=path, backend="serial")
    with pytest.raises(sks.JournalError, match="other code"):
        sks.parallel_map(lambda i: x[i] * 3, range(10), journal=path, backend="serial")
    x[3] = 99.0
    with pytest.raises(sks.JournalError, match=r"changed \(x\)"):
        sks.parallel_map(f, range(10), journal=path, backend="serial")
    x[3] = 3.0
    os.unlink(flag)
    r = sks.parallel_map(f, range(10), journal=path, backend="serial")
    np.testing.assert_array_equal(r, np.arange(10.0) * 2)
    assert not os.path.exists(path)


def test_discard_and_listing(tmp_path):
    path = str(tmp_path / "d.sksj")
    flag = str(tmp_path / "stop")
    open(flag, "w").close()

    def f(i):
        if i == 5 and os.path.exists(flag):
            raise KeyboardInterrupt
        return i

    with pytest.raises(KeyboardInterrupt):
        sks.parallel_map(f, range(10), journal=path, backend="serial")
    (info,) = sks.journals(str(tmp_path))
    assert (info.path, info.recorded, info.total, info.in_use) == (path, 5, 10, False)
    assert "5 of 10 items" in info.describe()
    old = time.time() - 30 * 86400
    os.utime(path, (old, old))
    assert sks.memory.janitor.remove_old_journals(str(tmp_path)) == [path]
    assert sks.journals(str(tmp_path)) == []
    with pytest.raises(FileNotFoundError):
        sks.discard_journal(path)


def test_truncated_tail_is_reported_and_cut_damage_is_refused(tmp_path):
    path = str(tmp_path / "t.sksj")

    def f(i):
        if i in (15, 16):
            raise KeyboardInterrupt
        return float(i)

    with pytest.raises(KeyboardInterrupt):
        sks.parallel_map(f, range(30), journal=path, backend="serial", chunksize=3)
    with open(path, "rb") as fh:
        good = fh.read()
    # a torn last record: reported once, cut off, the rest resumes
    with open(path, "wb") as fh:
        fh.write(good[:-5])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(KeyboardInterrupt):
            sks.parallel_map(f, range(30), journal=path, backend="serial", chunksize=3)
    assert [w for w in caught if issubclass(w.category, sks.JournalWarning)]
    # a damaged record before the last: refused, never trusted
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    data[len(jmod.SIGNATURE) + jmod._FRAME.size + 3] ^= 0xFF  # inside the header
    with open(path, "wb") as fh:
        fh.write(bytes(data))
    with pytest.raises(sks.JournalError, match="damaged"):
        sks.parallel_map(f, range(30), journal=path, backend="serial")
    with open(path, "wb") as fh:
        fh.write(b"not a journal at all")
    with pytest.raises(sks.JournalError, match="signature"):
        sks.parallel_map(f, range(30), journal=path, backend="serial")
    listed = sks.journals(str(tmp_path))
    assert [j.recorded for j in listed] == [-1]
    sks.discard_journal(listed[0])
    assert sks.journals(str(tmp_path)) == []


@pytest.fixture
def small_disk():
    """A 1 MiB tmpfs: a disk that fills during the run."""
    with small_tmpfs("1m") as mnt:
        yield mnt


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend_name", ["serial", "local"])
def test_disk_full_warns_once_and_the_run_completes(small_disk, backend_name, no_orphans):
    path = os.path.join(small_disk, "full.sksj")
    y = np.zeros(300_000)  # 2.4 MB of out= state: more than the disk holds

    def f(i):
        time.sleep(0.01)
        y[i * 1000 : (i + 1) * 1000] = i
        return float(i)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = sks.parallel_map(
            f, range(300), out=y, journal=path, keep_journal=True, backend=backend_name
        )
    found = [w for w in caught if issubclass(w.category, sks.JournalWarning)]
    assert len(found) == 1, [str(w.message) for w in caught]
    assert "No space left" in str(found[0].message) and path in str(found[0].message)
    np.testing.assert_array_equal(r, np.arange(300.0))
    np.testing.assert_array_equal(y, np.repeat(np.arange(300.0), 1000))
    # what was recorded before the disk filled stays a valid journal
    jmod.read(path)


def test_journal_true_uses_the_cache_folder_and_status_lists_it(tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    monkeypatch.setenv("XDG_CACHE_HOME", cache)
    flag = str(tmp_path / "stop")
    open(flag, "w").close()

    def hourly(i):
        if i == 6 and os.path.exists(flag):
            raise KeyboardInterrupt
        return i * 3

    with pytest.raises(KeyboardInterrupt):
        sks.parallel_map(hourly, range(10), journal=True, backend="serial")
    (info,) = sks.journals()
    assert info.path.startswith(os.path.join(cache, "shm_kernel_safe", "journals"))
    assert info.label.endswith("hourly") and info.recorded == 6
    env = dict(os.environ, XDG_CACHE_HOME=cache)
    out = subprocess.run(
        [sys.executable, "-m", "shm_kernel_safe", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "journals of unfinished runs: 1" in out and "6 of 10 items" in out, out
    os.unlink(flag)
    r = sks.parallel_map(hourly, range(10), journal=True, backend="serial")
    np.testing.assert_array_equal(r, np.arange(10) * 3)
    assert sks.journals() == []


INTERRUPTED = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import shm_kernel_safe as sks

    def f(i):
        time.sleep(0.003)
        return f"v{i}"  # results that do not stack: logged by workers in runs

    if __name__ == "__main__":
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sks.prestart(2)
        threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        try:
            sks.parallel_map(f, range(3000), processes=2, journal=sys.argv[1])
        except KeyboardInterrupt as exc:
            bad = [i for i, (v, d) in enumerate(zip(exc.partial, exc.done)) if d and v != f"v{i}"]
            print("partial wrong:", len(bad))
        r = sks.parallel_map(f, range(3000), processes=2, journal=sys.argv[1])
        print("resumed wrong:", sum(v != f"v{i}" for i, v in enumerate(r)))
    """
)


@pytest.mark.timeout(120)
def test_interrupt_keeps_the_values_of_chunks_back_during_cancel(tmp_path):
    """Chunks that come back while an interrupt cancels the run carry some
    values in their log: the partial results, and hence the journal, have them."""
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "i.sksj")],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert "partial wrong: 0" in proc.stdout and "resumed wrong: 0" in proc.stdout, (
        proc.stdout + proc.stderr[-2000:]
    )


HOLDER = textwrap.dedent(
    """
    import sys, time
    import shm_kernel_safe as sks

    def slow(i):
        time.sleep(0.05)
        return i

    sks.parallel_map(slow, range(2000), journal=sys.argv[1], backend="serial")
    """
)


@pytest.mark.timeout(120)
def test_a_journal_in_use_by_another_process_is_refused(tmp_path):
    path = str(tmp_path / "held.sksj")
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), path])
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(path)
        with pytest.raises(sks.JournalError, match="in use"):
            sks.parallel_map(_square, range(2000), journal=path, backend="serial")
        with pytest.raises(sks.JournalError, match="in use"):
            sks.discard_journal(path)
        assert [j.in_use for j in sks.journals(str(tmp_path))] == [True]
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert [j.in_use for j in sks.journals(str(tmp_path))] == [False]
    sks.discard_journal(path)


def _square(i: int) -> int:
    return i * i


def test_cleanup_command_removes_old_journals(tmp_path):
    cache = tmp_path / "cache"
    folder = cache / "shm_kernel_safe" / "journals"
    folder.mkdir(parents=True)
    old, new = folder / "old.sksj", folder / "new.sksj"
    for p in (old, new):
        p.write_bytes(jmod.SIGNATURE)
    stamp = time.time() - 30 * 86400
    os.utime(old, (stamp, stamp))
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    out = subprocess.run(
        [sys.executable, "-m", "shm_kernel_safe", "cleanup"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert f"removed journal {old}" in out, out
    assert not old.exists() and new.exists()


def test_a_write_stopped_by_an_interrupt_is_recorded_by_the_last_flush(tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing a record: the record is cut off, and
    the run's last flush records its items and out= blocks after all."""
    path = str(tmp_path / "w.sksj")
    y = np.zeros(300 * 1000)

    def f(i):
        time.sleep(0.01)
        y[i * 1000 : (i + 1) * 1000] = i + 1
        return float(i)

    real = jmod._write_all
    calls = []

    def interrupted_once(fd, data):
        calls.append(len(data))
        if len(calls) == 2:  # the first commit (the header was the first write)
            real(fd, data[: len(data) // 2])
            raise KeyboardInterrupt
        real(fd, data)

    monkeypatch.setattr(jmod, "_write_all", interrupted_once)
    with pytest.raises(KeyboardInterrupt) as info:
        sks.parallel_map(f, range(300), out=y, journal=path, backend="serial")
    monkeypatch.setattr(jmod, "_write_all", real)
    assert len(calls) == 3  # header, the interrupted commit, the last flush
    done = info.value.done
    assert 0 < done.sum() < 300
    np.testing.assert_array_equal(jmod.recorded_mask(path), done)
    y[:] = 0  # a new kernel
    r = sks.parallel_map(f, range(300), out=y, journal=path, backend="serial")
    np.testing.assert_array_equal(r, np.arange(300.0))
    np.testing.assert_array_equal(y, np.repeat(np.arange(1.0, 301.0), 1000))
