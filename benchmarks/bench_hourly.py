"""The original question's workload, every way people run it, in one process.

    python benchmarks/bench_hourly.py --rows 1000000 [--mode ms|tiny] [--repeats 3]
    python benchmarks/bench_hourly.py --mode blas [--repeats 5]

x is ROWS x 16 float64 (10,000,000 rows = 1.28 GB); 8760 tasks each read a
block of x (sized so one task takes ~1 ms serially, or ~20 us in tiny mode)
and produce one float. Every contender runs here, in the same process, on the
same x, and is reported as a ratio: wall-clock times on a shared 2-core
machine are noise, ratios measured side by side are not. Contenders are
interleaved: each round times every one once, in rotated order, so drift
in the machine's load falls on all of them; medians over ``--repeats``
rounds.

The parent starts in glibc's steady malloc state (see
``shm_kernel_safe/_malloc.py``), as a long-running kernel is: otherwise its
speed, and that of every pool forked from it, would depend on whether some
earlier contender (joblib, say) happened to free a large buffer first.
Workers of joblib/loky start cold, as they do for users.

``x ordinary`` contenders pass the user's ordinary ndarray, as most users
do: its first call copies x into shared memory, later calls reuse that copy
while x is unchanged (one content hash per call), and a call after
``x[123, 4] += 1`` copies it again and sees the change. They run as one
sequence per round (cache emptied, calls 1, 2, 3, change, call 4).
``--mode blas`` times BLAS-heavy items (one 400x400 matmul each) with the
default thread bound, with one BLAS thread set by hand in the items, and
unbounded (every worker with all CPUs' threads).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
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
ORDINARY = [
    "parallel_map warm, x ordinary, 1st call (copied)",
    "parallel_map warm, x ordinary, 2nd call (cached copy reused)",
    "parallel_map warm, x ordinary, 3rd call (cached copy reused)",
    "parallel_map warm, x ordinary, after x[123, 4] += 1 (copied again)",
]


def block_start(nn: int, rows: int, k: int) -> int:
    return (nn * (rows - k)) // max(1, N_TASKS - 1)


def work(x: np.ndarray, nn: int, k: int) -> float:
    start = block_start(nn, x.shape[0], k)
    return float(np.sqrt(np.abs(x[start : start + k])).sum())


def calibrate(x: np.ndarray, target: float) -> tuple[int, float]:
    """Rows per task so that one task takes ~``target`` s serially; and that time."""
    k = 1
    while True:
        t0 = time.perf_counter()
        for nn in range(0, 200):
            work(x, nn * 37, k)
        per = (time.perf_counter() - t0) / 200
        if per >= target or k >= x.shape[0] // 2:
            return k, per
        k = max(k + 1, int(k * min(4.0, target / max(per, 1e-7))))


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


def workload_args(description: str) -> argparse.ArgumentParser:
    """The options every benchmark of the hourly workload takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--mode", choices=["ms", "tiny", "blas"], default="ms")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")
    return parser


def main() -> None:
    parser = workload_args(__doc__.splitlines()[0])
    args = parser.parse_args()
    if args.mode == "blas":
        return main_blas(args)
    P, R = args.processes, args.repeats
    shm_before = shm_bytes()
    from shm_kernel_safe._malloc import tune_malloc

    tune_malloc()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, 16))
    target = 1e-3 if args.mode == "ms" else 20e-6
    k, per = calibrate(x, target)
    print(
        f"x: {x.shape} float64 = {x.nbytes / 2**20:.0f} MiB; {N_TASKS} tasks of {k} rows "
        f"(~{per * 1e6:.0f} us each serially); {P} processes; medians of {R}",
        flush=True,
    )

    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor

    from shm_kernel_safe.displays import TextProgress
    from shm_kernel_safe.memory.digest import digest
    from shm_kernel_safe.memory.share_cache import cache as share_cache
    from shm_kernel_safe.transports.local import sharing

    ref = np.array([work(x, nn, k) for nn in range(N_TASKS)])
    results: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)

    # -- one-off measurements -----------------------------------------------
    memcpy, _ = timed(lambda: x.copy(), R)  # what `x.copy()` costs a user

    def share_once():
        _, rep = sharing.dumps(functools.partial(work, x, k=k))
        sharing.release(rep)

    cap = share_cache.limit()
    share_cache.limit(0)  # every dumps copies x into a fresh segment: no cache
    share_cost, _ = timed(share_once, R)
    share_cache.limit(cap)
    check_cost, _ = timed(lambda: digest(x), R)  # the content check of a reused call

    def jl():
        return Parallel(n_jobs=P)(delayed(work)(x, nn, k) for nn in range(N_TASKS))

    def pm():
        return sks.parallel_map(functools.partial(work, x, k=k), range(N_TASKS), processes=P)

    changed_items = [nn for nn in range(N_TASKS) if block_start(nn, x.shape[0], k) <= 123]
    changed_items = [nn for nn in changed_items if block_start(nn, x.shape[0], k) + k > 123]
    sign = [1.0]

    def ordinary_sequence() -> list[tuple[str, float]]:
        """x ordinary: cache emptied (untimed), calls 1-3, x[123, 4] changed, call 4."""
        share_cache.clear()
        gc.collect()
        out = []
        for name in ORDINARY[:3]:
            t0 = time.perf_counter()
            pm()
            out.append((name, time.perf_counter() - t0))
        x[123, 4] += sign[0]
        sign[0] = -sign[0]
        t0 = time.perf_counter()
        y = pm()
        out.append((ORDINARY[3], time.perf_counter() - t0))
        for nn in changed_items:  # the change is seen
            assert y[nn] == work(x, nn, k), nn
        return out

    def pm_cache_off():
        share_cache.limit(0)
        try:
            return pm()
        finally:
            share_cache.limit(cap)

    t0 = time.perf_counter()
    assert np.allclose(jl(), ref)
    cold = {"joblib (loky, auto-memmap) cold": time.perf_counter() - t0}
    sks.shutdown_pools()
    t0 = time.perf_counter()
    assert np.allclose(pm(), ref)
    cold["parallel_map cold (pool start included)"] = time.perf_counter() - t0

    # -- contenders, interleaved round by round -----------------------------
    shm = shared_memory.SharedMemory(create=True, size=x.nbytes)
    x_stdlib = np.ndarray(x.shape, dtype=x.dtype, buffer=shm.buf)
    x_stdlib[:] = x
    x_shared = sks.share(x).view()
    ctx = mp.get_context()
    pool_per_task = ctx.Pool(P)
    pool_once = ctx.Pool(P, initializer=init_attach_once, initargs=(shm.name, x.shape))

    def floor():
        out = sks.zeros(N_TASKS)
        fork = mp.get_context("fork")
        half = N_TASKS // P
        bounds = [(i * half, N_TASKS if i == P - 1 else (i + 1) * half) for i in range(P)]
        procs = [fork.Process(target=floor_half, args=(x, out, lo, hi, k)) for lo, hi in bounds]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        return np.array(out)

    contenders = {
        "serial loop": lambda: [work(x, nn, k) for nn in range(N_TASKS)],
        "floor: forked halves, no messages": floor,
        "stdlib Pool, attach per task (the question)": lambda: pool_per_task.map(
            task_attach_per_task, [(shm.name, x.shape, nn, k) for nn in range(N_TASKS)]
        ),
        "stdlib Pool, attach once per worker": lambda: pool_once.map(
            task_attached, [(nn, k) for nn in range(N_TASKS)]
        ),
        "joblib (loky, auto-memmap) warm": jl,
        "x ordinary sequence": ordinary_sequence,
        "parallel_map warm, x ordinary, cache off (copied every call)": pm_cache_off,
        "parallel_map warm, x pre-shared (zero copy)": lambda: sks.parallel_map(
            functools.partial(work, x_shared, k=k), range(N_TASKS), processes=P
        ),
        "parallel_map warm, x pre-shared, text progress bar": lambda: sks.parallel_map(
            functools.partial(work, x_shared, k=k),
            range(N_TASKS),
            processes=P,
            progress=TextProgress(stream=io.StringIO(), delay=0),
        ),
    }
    names = list(contenders)
    for name in names:  # warm every pool once, and check every answer
        if name == "x ordinary sequence":
            contenders[name]()
            contenders[name]()  # twice: x changed back
            assert np.allclose(pm(), ref)
        else:
            assert np.allclose(contenders[name](), ref), name
    loads = []
    for rnd in range(R):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]  # rotate
        for name in order:
            gc.collect()
            if name == "x ordinary sequence":
                for sub, seconds in contenders[name]():
                    record(sub, seconds)
                continue
            t0 = time.perf_counter()
            contenders[name]()
            record(name, time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    pool_per_task.terminate()
    pool_once.terminate()
    x_stdlib = None
    shm.close()
    shm.unlink()
    get_reusable_executor().shutdown(wait=True, kill_workers=True)

    # -- memory with x ordinary: what the cache adds is one copy of x ---------
    share_cache.clear()
    sks.parallel_map(int, range(100), processes=P)  # workers drop what was unlinked
    gc.collect()
    pss_before_cache = pss_of_tree()
    for _ in range(2):
        pm()
    x[123, 4] += 1.0
    pm()  # a change: the stale copy goes, one new copy comes
    pss_ordinary = pss_of_tree() - pss_before_cache
    cached_copies = len(share_cache.summary())
    x[123, 4] -= 1.0

    # -- memory: only our pool alive, x only in shared memory ------------------
    x = None
    gc.collect()  # the cached copy goes with x
    sks.parallel_map(functools.partial(work, x_shared, k=k), range(N_TASKS), processes=P)
    pss_shared = pss_of_tree()
    xbytes = x_shared.nbytes
    _, report = sharing.dumps(functools.partial(work, x_shared, k=k))
    pre_copied = report.copied_bytes
    report = None  # it holds the handle, hence the segment
    empty_t, _ = timed(lambda: sks.parallel_map(int, range(N_TASKS), processes=P), max(R, 5))
    x_shared = None
    contenders = None
    sks.shutdown_pools()
    gc.collect()
    time.sleep(0.5)
    leftover = shm_bytes() - shm_before

    times = {name: statistics.median(v) for name, v in results.items()}
    times.update(cold)
    serial = times["serial loop"]
    floor_t = times["floor: forked halves, no messages"]
    print(f"\n{'contender':48s} {'median s':>9s} {'speed-up':>9s} {'of floor':>9s}")
    for name in [
        *names[:5],
        "joblib (loky, auto-memmap) cold",
        "parallel_map cold (pool start included)",
        *ORDINARY,
        *names[6:],
    ]:
        t = times[name]
        print(f"{name:64s} {t:9.3f} {serial / t:8.2f}x {floor_t / t:8.2f}")
    jw = times["joblib (loky, auto-memmap) warm"]
    pw = times[ORDINARY[1]]  # x ordinary, 2nd call: the cached copy reused
    p3 = times[ORDINARY[2]]
    p1 = times[ORDINARY[0]]
    pc = times[ORDINARY[3]]
    poff = times["parallel_map warm, x ordinary, cache off (copied every call)"]
    ps = times["parallel_map warm, x pre-shared (zero copy)"]
    out = {
        "rows": args.rows,
        "mode": args.mode,
        "k": k,
        "repeats": R,
        "times": times,
        "all_times": results,
    }
    print()
    print(
        f"parallel_map warm vs joblib warm: {jw / pw:.2f}x (x ordinary, reused), "
        f"{jw / ps:.2f}x (pre-shared)"
    )
    ov_j = (jw - serial / P) / N_TASKS
    ov_a = (pw - serial / P) / N_TASKS
    ov_s = (ps - serial / P) / N_TASKS
    print(
        f"per-task overhead (wall - serial/{P})/N: parallel_map {ov_a * 1e6:.1f} us "
        f"(x ordinary, reused), {ov_s * 1e6:.1f} us (pre-shared); joblib {ov_j * 1e6:.1f} us "
        f"(ratio {ov_a / ov_j:.2f} of joblib's)"
    )
    budget = 1.15 * xbytes + 300 * 2**20
    pg = times["parallel_map warm, x pre-shared, text progress bar"]
    print(
        f"a live progress bar costs {100 * (pg / ps - 1):+.1f}% of run time "
        "(workers store one integer per item; the parent reads at most 10x/s)"
    )
    out.update(
        progress_cost_pct=100 * (pg / ps - 1),
        vs_joblib_warm=jw / pw,
        vs_joblib_warm_preshared=jw / ps,
        overhead_us={
            "joblib": ov_j * 1e6,
            "parallel_map": ov_a * 1e6,
            "parallel_map_preshared": ov_s * 1e6,
        },
        floor_ratio_warm=floor_t / ps,
        floor_ratio_warm_auto=floor_t / pw,
        floor_ratio_ordinary={
            "call 1": floor_t / p1,
            "call 2": floor_t / pw,
            "call 3": floor_t / p3,
            "changed": floor_t / pc,
            "cache off": floor_t / poff,
        },
        floor_ratio_ordinary_rounds=[  # floor / 2nd call, each in its own round
            f / t
            for f, t in zip(
                results["floor: forked halves, no messages"], results[ORDINARY[1]], strict=True
            )
        ],
        overhead_ratio_vs_joblib=ov_a / ov_j,
        check_s=check_cost,
        share_fresh_s=share_cost,
        check_cost_of_copy=check_cost / share_cost,
        check_cost_of_memcpy=check_cost / memcpy,
        changed_cost_copies=(pc - pw) / share_cost,
        pss_added_by_cache_mb=pss_ordinary / 2**20,
        pss_added_by_cache_budget_mb=(1.15 * xbytes + 50 * 2**20) / 2**20,
        cached_copies_after_change=cached_copies,
        load_avg_1min=loads,
        floor_ratio_cold=times["parallel_map cold (pool start included)"] / floor_t,
        sharing_cost_memcpy=share_cost / memcpy,
        memcpy_s=memcpy,
        pss_shared_mb=pss_shared / 2**20,
        pss_budget_mb=budget / 2**20,
        empty_8760_ms=empty_t * 1e3,
        pre_shared_copied_bytes=pre_copied,
        dev_shm_left_bytes=leftover,
    )
    print(
        f"warm parallel_map at {floor_t / ps:.2f} of the floor's speed (x pre-shared), "
        f"{floor_t / pw:.2f} (auto-shared); cold takes {out['floor_ratio_cold']:.2f}x the floor"
    )
    print(
        f"sharing x costs {share_cost / memcpy:.2f} memcpy of x (x.copy() takes "
        f"{memcpy * 1e3:.0f} ms); with x pre-shared a call copies {pre_copied} bytes"
    )
    print(
        f"x ordinary: calls 1/2/3/changed at {floor_t / p1:.2f}/{floor_t / pw:.2f}/"
        f"{floor_t / p3:.2f}/{floor_t / pc:.2f} of the floor (cache off: {floor_t / poff:.2f}); "
        f"content check {check_cost * 1e3:.0f} ms = {100 * check_cost / share_cost:.1f}% of a "
        f"copy into shared memory ({share_cost * 1e3:.0f} ms), "
        f"{100 * check_cost / memcpy:.0f}% of x.copy(); a changed x costs "
        f"{(pc - pw) / share_cost:.2f} copies; PSS added by the cache after calls, a change and "
        f"a call: {pss_ordinary / 2**20:.0f} MiB (one copy: budget 1.15 x size(x) + 50 MB = "
        f"{(1.15 * xbytes + 50 * 2**20) / 2**20:.0f} MiB), {cached_copies} cached cop(ies)"
    )
    print(f"1-min load average after each round: {', '.join(f'{v:.1f}' for v in loads)}")
    print(
        f"total PSS parent+workers, x in shared memory: {pss_shared / 2**20:.0f} MiB; "
        f"budget 1.15 x size(x) + 300 MB = {budget / 2**20:.0f} MiB"
    )
    print(f"warm call of {N_TASKS} empty tasks: {empty_t * 1e3:.1f} ms")
    print(f"bytes left in /dev/shm: {leftover}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


# -- BLAS-heavy items ----------------------------------------------------------
BLAS_ITEMS = 3000
_HAND_LIMITED = False


def blas_item(mats: np.ndarray, i: int) -> float:
    return float((mats[i % len(mats)] @ mats[(i + 1) % len(mats)]).sum())


def blas_item_hand_limited(mats: np.ndarray, i: int) -> float:
    """The same item, in a worker limited to one BLAS thread by hand."""
    global _HAND_LIMITED
    if not _HAND_LIMITED:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
        _HAND_LIMITED = True
    return blas_item(mats, i)


def main_blas(args: argparse.Namespace) -> None:
    """Default thread bound vs one BLAS thread set by hand vs unbounded."""
    from shm_kernel_safe._platform import usable_cpus
    from shm_kernel_safe.engine.threads import threads_for

    P, R = args.processes, args.repeats
    cpus = usable_cpus()
    mats = np.random.default_rng(0).standard_normal((8, 400, 400))
    ref = np.array([blas_item(mats, i) for i in range(BLAS_ITEMS)])
    contenders = {
        f"default (bounded: {threads_for(P)} BLAS thread(s) per worker)": lambda: sks.parallel_map(
            functools.partial(blas_item, mats), range(BLAS_ITEMS), processes=P
        ),
        "1 BLAS thread per worker set by hand (threadpoolctl in the items)": lambda: (
            sks.parallel_map(
                functools.partial(blas_item_hand_limited, mats),
                range(BLAS_ITEMS),
                processes=P,
                threads_per_worker=cpus,  # a separate, unbounded pool, limited by the items
            )
        ),
        f"unbounded ({cpus} BLAS threads per worker)": lambda: sks.parallel_map(
            functools.partial(blas_item, mats),
            range(BLAS_ITEMS),
            processes=P,
            threads_per_worker=cpus,
        ),
    }
    names = list(contenders)
    # Each contender gets a freshly started pool (started untimed): a limit
    # set by hand stays in its workers, and none may profit from warmer ones.
    pool_threads = {names[0]: None, names[1]: cpus, names[2]: cpus}
    results: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        sks.shutdown_pools()
        assert np.allclose(contenders[name](), ref), name
    loads = []
    for rnd in range(R):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            sks.shutdown_pools()
            sks.prestart(P, threads_per_worker=pool_threads[name])
            gc.collect()
            t0 = time.perf_counter()
            contenders[name]()
            results[name].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
    sks.shutdown_pools()
    med = {n: statistics.median(v) for n, v in results.items()}
    hand, default, unbounded = med[names[1]], med[names[0]], med[names[2]]
    print(f"{BLAS_ITEMS} items of one 400x400 matmul; {P} processes on {cpus} CPUs; {R} rounds")
    for n in names:
        rounds = ", ".join(f"{t:.2f}" for t in results[n])
        print(f"{n:70s} median {med[n]:.2f} s  (rounds {rounds})")
    per_round = [h / d for h, d in zip(results[names[1]], results[names[0]], strict=True)]
    worst = max(results[names[0]]) / default
    print(
        f"default at {hand / default:.2f} of the hand-limited speed (per round "
        f"{', '.join(f'{r:.2f}' for r in per_round)}); slowest default round "
        f"{worst:.2f}x its median; unbounded at {hand / unbounded:.2f} of the hand-limited speed"
    )
    print(f"1-min load average after each round: {', '.join(f'{v:.1f}' for v in loads)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "mode": "blas",
                    "items": BLAS_ITEMS,
                    "repeats": R,
                    "times": med,
                    "all_times": results,
                    "default_vs_hand": hand / default,
                    "default_vs_hand_rounds": per_round,
                    "worst_default_round_vs_median": worst,
                    "unbounded_vs_hand": hand / unbounded,
                    "load_avg_1min": loads,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    sys.exit(main())
