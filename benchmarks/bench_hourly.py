"""The original question's workload, every way people run it, in one process.

    python benchmarks/bench_hourly.py --rows 1000000 [--mode ms|tiny] [--repeats 3]

x is ROWS x 16 float64 (10,000,000 rows = 1.28 GB); 8760 tasks each read a
block of x (sized so one task takes ~1 ms serially, or ~20 us in tiny mode)
and produce one float. Every contender runs here, in the same process, on the
same x, and is reported as a ratio: wall-clock times on a shared 2-core
machine are noise, ratios measured side by side are not. Medians of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from multiprocessing import shared_memory

import numpy as np
import psutil

import shm_kernel_safe as sks

N_TASKS = 8760
ROWS_PER_TASK = 1  # calibrated in main()
_X: np.ndarray | None = None  # per-worker global for the stdlib baselines


def block_start(nn: int, rows: int, k: int) -> int:
    return (nn * (rows - k)) // max(1, N_TASKS - 1)


def work(x: np.ndarray, nn: int, k: int) -> float:
    start = block_start(nn, x.shape[0], k)
    return float(np.sqrt(np.abs(x[start : start + k])).sum())


# -- stdlib baselines (module-level: spawn/forkserver children import them) -
def task_attach_per_task(args):
    """The original question's approach: attach to the segment in every task."""
    name, shape, nn, k = args
    shm = shared_memory.SharedMemory(name=name)
    try:
        x = np.ndarray(shape, dtype=np.float64, buffer=shm.buf)
        value = work(x, nn, k)
        del x
    finally:
        shm.close()
    return value


def init_attach_once(name, shape):
    global _X, _SHM
    _SHM = shared_memory.SharedMemory(name=name)
    _X = np.ndarray(shape, dtype=np.float64, buffer=_SHM.buf)


def task_attached(args):
    nn, k = args
    return work(_X, nn, k)


def floor_half(x, out, lo, hi, k):
    for nn in range(lo, hi):
        out[nn] = work(x, nn, k)


# -- timing helpers ---------------------------------------------------------
def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def pss_of_tree() -> int:
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_full_info().pss
    return total


def shm_bytes() -> int:
    total = 0
    for entry in os.scandir("/dev/shm"):
        with contextlib.suppress(FileNotFoundError):
            total += entry.stat().st_blocks * 512
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--mode", choices=["ms", "tiny"], default="ms")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--skip-joblib", action="store_true")
    args = parser.parse_args()
    P, R = args.processes, args.repeats
    shm_before = shm_bytes()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, 16))
    target = 1e-3 if args.mode == "ms" else 20e-6
    k = 1
    while True:  # rows per task so that one task takes ~target serially
        t0 = time.perf_counter()
        for nn in range(0, 200):
            work(x, nn * 37, k)
        per = (time.perf_counter() - t0) / 200
        if per >= target or k >= args.rows // 2:
            break
        k = max(k + 1, int(k * min(4.0, target / max(per, 1e-7))))
    print(
        f"x: {x.shape} float64 = {x.nbytes / 2**20:.0f} MiB; {N_TASKS} tasks of {k} rows "
        f"(~{per * 1e6:.0f} us each serially); {P} processes; medians of {R}",
        flush=True,
    )

    rows: dict[str, float] = {}
    ref = np.array([work(x, nn, k) for nn in range(N_TASKS)])
    rows["serial loop"], _ = timed(lambda: [work(x, nn, k) for nn in range(N_TASKS)], R)

    # memcpy of x, the unit of the sharing cost: what `x.copy()` costs a user
    # (fresh pages, so page faults included, as for any new segment)
    memcpy, _ = timed(lambda: x.copy(), R)
    from shm_kernel_safe import sharing

    def share_once():
        _, rep = sharing.dumps(lambda nn: work(x, nn, k))
        sharing.release(rep)

    share_cost, _ = timed(share_once, R)

    # floor: two forked processes, fixed halves, shared output, no messages
    def floor():
        out = sks.zeros(N_TASKS)
        ctx = mp.get_context("fork")
        half = N_TASKS // P
        bounds = [(i * half, N_TASKS if i == P - 1 else (i + 1) * half) for i in range(P)]
        procs = [ctx.Process(target=floor_half, args=(x, out, lo, hi, k)) for lo, hi in bounds]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return np.array(out)

    rows["floor: forked halves, no messages"], y = timed(floor, R)
    assert np.allclose(y, ref)

    # stdlib Pool, the original question: attach per task
    shm = shared_memory.SharedMemory(create=True, size=x.nbytes)
    xs = np.ndarray(x.shape, dtype=x.dtype, buffer=shm.buf)
    xs[:] = x
    ctx = mp.get_context()
    with ctx.Pool(P) as pool:

        def per_task():
            tasks = [(shm.name, x.shape, nn, k) for nn in range(N_TASKS)]
            return pool.map(task_attach_per_task, tasks)

        rows["stdlib Pool, attach per task (the question)"], y = timed(per_task, R)
    assert np.allclose(y, ref)
    with ctx.Pool(P, initializer=init_attach_once, initargs=(shm.name, x.shape)) as pool:

        def once():
            return pool.map(task_attached, [(nn, k) for nn in range(N_TASKS)])

        rows["stdlib Pool, attach once per worker"], y = timed(once, R)
    assert np.allclose(y, ref)
    xs = None
    shm.close()
    shm.unlink()

    if not args.skip_joblib:
        from joblib import Parallel, delayed

        def jl():
            return Parallel(n_jobs=P)(delayed(work)(x, nn, k) for nn in range(N_TASKS))

        t0 = time.perf_counter()
        y = jl()
        rows["joblib (loky, auto-memmap) cold"] = time.perf_counter() - t0
        rows["joblib (loky, auto-memmap) warm"], y = timed(jl, R)
        assert np.allclose(y, ref)
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True, kill_workers=True)

    # parallel_map, automatic sharing of x (one copy per call)
    sks.shutdown_pools()

    def pm():
        return sks.parallel_map(lambda nn: work(x, nn, k), range(N_TASKS), processes=P)

    t0 = time.perf_counter()
    y = pm()
    rows["parallel_map cold (pool start included)"] = time.perf_counter() - t0
    assert np.allclose(y, ref)
    rows["parallel_map warm, x auto-shared per call"], y = timed(pm, R)
    pss_auto = pss_of_tree()

    # parallel_map with x already in shared memory: zero copy
    xs = sks.share(x).view()
    xbytes = x.nbytes
    x = None  # only the shared copy remains, as after %shm_share x
    gc.collect()

    def pm_shared():
        return sks.parallel_map(lambda nn: work(xs, nn, k), range(N_TASKS), processes=P)

    pm_shared()
    rows["parallel_map warm, x pre-shared (zero copy)"], y = timed(pm_shared, R)
    assert np.allclose(y, ref)
    pss_shared = pss_of_tree()
    _, report = sharing.dumps(lambda nn: work(xs, nn, k))
    pre_copied = report.copied_bytes
    del report  # it holds the handle, hence the segment

    # empty tasks, warm
    empty_t, _ = timed(lambda: sks.parallel_map(int, range(N_TASKS), processes=P), max(R, 5))
    xs = None
    sks.shutdown_pools()
    gc.collect()
    time.sleep(0.5)
    leftover = shm_bytes() - shm_before

    serial = rows["serial loop"]
    floor_t = rows["floor: forked halves, no messages"]
    print(f"\n{'contender':48s} {'median s':>9s} {'speed-up':>9s} {'of floor':>9s}")
    for name, t in rows.items():
        print(f"{name:48s} {t:9.3f} {serial / t:8.2f}x {floor_t / t:8.2f}")
    out = {"rows": args.rows, "mode": args.mode, "k": k, "times": rows}
    print()
    if "joblib (loky, auto-memmap) warm" in rows:
        jw = rows["joblib (loky, auto-memmap) warm"]
        pw = rows["parallel_map warm, x auto-shared per call"]
        out["vs_joblib_warm"] = jw / pw
        print(f"parallel_map warm vs joblib warm: {jw / pw:.2f}x faster")
        if args.mode == "tiny":
            ov_j = (jw - serial / P) / N_TASKS
            ov_p = (pw - serial / P) / N_TASKS
            out["overhead_us"] = {"joblib": ov_j * 1e6, "parallel_map": ov_p * 1e6}
            print(
                f"per-task overhead (wall - serial/{P})/N: parallel_map {ov_p * 1e6:.1f} us, "
                f"joblib {ov_j * 1e6:.1f} us (ratio {ov_p / ov_j:.2f})"
            )
    pw = rows["parallel_map warm, x auto-shared per call"]
    ps = rows["parallel_map warm, x pre-shared (zero copy)"]
    out.update(
        floor_ratio_warm=floor_t / ps,
        floor_ratio_warm_auto=floor_t / pw,
        floor_ratio_cold=rows["parallel_map cold (pool start included)"] / floor_t,
        sharing_cost_memcpy=share_cost / memcpy,
        memcpy_s=memcpy,
        call_delta_memcpy=(pw - ps) / memcpy,
        pss_auto_mb=pss_auto / 2**20,
        pss_shared_mb=pss_shared / 2**20,
        pss_budget_mb=(1.15 * xbytes + 300 * 2**20) / 2**20,
        empty_8760_ms=empty_t * 1e3,
        pre_shared_copied_bytes=pre_copied,
        dev_shm_left_bytes=leftover,
    )
    print(
        f"warm parallel_map (pre-shared x) at {floor_t / ps:.2f} of the floor's speed; "
        f"auto-shared at {floor_t / pw:.2f}; cold takes {out['floor_ratio_cold']:.2f}x the floor"
    )
    print(
        f"sharing x automatically costs {share_cost / memcpy:.2f} memcpy of x "
        f"(x.copy() takes {memcpy * 1e3:.0f} ms); a warm call with auto-sharing takes "
        f"{(pw - ps) / memcpy:.2f} memcpy longer than with x pre-shared, which copies "
        f"{pre_copied} bytes"
    )
    budget = 1.15 * xbytes + 300 * 2**20
    print(
        f"total PSS parent+workers: pre-shared {pss_shared / 2**20:.0f} MiB, auto-shared "
        f"{pss_auto / 2**20:.0f} MiB; budget 1.15 x size(x) + 300 MB = {budget / 2**20:.0f} MiB"
    )
    print(f"warm call of {N_TASKS} empty tasks: {empty_t * 1e3:.1f} ms")
    print(f"bytes left in /dev/shm: {leftover}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    sys.exit(main())
