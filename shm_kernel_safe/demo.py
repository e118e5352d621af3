"""The seed scenario end to end: 8760 hourly tasks over one big array.

Run with ``python -m shm_kernel_safe demo``. It shows the three things the
package exists for: the original question's crash cannot happen with
``protect()``; the same hourly loop runs in parallel from code that would
not survive ``spawn`` with the standard library (a lambda over a closure, no
``__main__`` guard needed); and nothing is left in ``/dev/shm``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np

N_HOURS = 8760


#: Percentiles of one hour's analysis: enough work per item (about half a
#: millisecond) that two workers beat the loop, the first call included.
PERCENTILES = np.arange(5, 100, 5)


def hourly_calc(x: np.ndarray, nn: int, rows_per_hour: int) -> float:
    """A stand-in for one hour's analysis: the percentile profile of that hour's rows."""
    start = (nn * (x.shape[0] - rows_per_hour)) // (N_HOURS - 1)
    block = x[start : start + rows_per_hour]
    return float(np.percentile(block, PERCENTILES, axis=0).sum())


def why_slower(serial: float, hint: str | None) -> str:
    """Why a run was not faster than the loop, in the words of its causes:
    load first (it spoils every other number), then what the run said."""
    from ._platform import usable_cpus

    cpus = usable_cpus()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cpus - 0.5:
        return (
            f"the machine is busy (load average {load:.1f} on {cpus} CPUs): the workers "
            f"shared the cores with other programs; run it again when it is idle"
        )
    if hint is not None:
        return "the run was too short to repay starting workers and copying x: " + hint
    per_item = serial / N_HOURS
    return (
        f"items of {per_item * 1e6:.0f} us each leave little for {cpus} workers to share; "
        f"try more --rows"
    )


def _safety_check() -> str:
    """The original crash, neutralised: views outlive close() + unlink()."""
    from multiprocessing import shared_memory

    import shm_kernel_safe as sks

    sks.protect()
    shm = shared_memory.SharedMemory(create=True, size=8 * 1000)
    view = np.ndarray((1000,), dtype=np.float64, buffer=shm.buf)
    view[:] = 1.5
    shm.close()
    shm.unlink()
    total = float(view.sum())  # without protect(): segfault, the kernel dies
    dangling = sks.is_dangling(view)
    sks.unprotect()
    return f"after close()+unlink() the view still reads {total} (dangling: {dangling})"


def _made_here(entry: str) -> bool:
    """Whether a /dev/shm entry was made by this process (ours or loky's)."""
    from .memory.naming import parse_name

    parsed = parse_name(entry)
    if parsed is not None:
        return parsed.pid == os.getpid()
    return entry.startswith(f"sem.loky-{os.getpid()}-")


def _workload(args: argparse.Namespace) -> bool:
    import shm_kernel_safe as sks

    rng = np.random.default_rng(2026)
    x = rng.standard_normal((args.rows, 16))
    rows_per_hour = max(1, args.rows // 2000)
    print(f"2. x = {x.shape} float64 ({x.nbytes / 2**20:.0f} MiB); {N_HOURS} hourly tasks")

    # Workers start in glibc's steady malloc state (see _malloc.py); put this
    # process there too, or the serial loop pays a page fault per 4 KiB of
    # every numpy temporary and the speed-up looks better than 2 cores allow.
    sks.tune_malloc()
    t0 = time.perf_counter()
    y_serial = np.array([hourly_calc(x, nn, rows_per_hour) for nn in range(N_HOURS)])
    serial = time.perf_counter() - t0
    print(f"   serial loop:            {serial:6.2f} s")

    def run(data: np.ndarray, label: str) -> np.ndarray:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", sks.PerformanceHint)
            result = sks.parallel_map(
                lambda nn: hourly_calc(data, nn, rows_per_hour),
                range(N_HOURS),
                processes=args.processes,
                start_method=args.start_method,
            )
        took = time.perf_counter() - t0
        line = f"   parallel_map ({label}): {took:6.2f} s  speed-up {serial / took:4.2f}x"
        if took >= serial:
            hints = [str(w.message) for w in caught if w.category is sks.PerformanceHint]
            line += f"\n     slower than the loop: {why_slower(serial, (hints or [None])[0])}"
        print(line)
        return result

    y = run(x, "cold, x copied to shared memory")
    x_shared = sks.share(x).view()  # what %shm_share x does: one copy, then zero
    y_warm = run(x_shared, "warm, x shared once")
    agree = np.allclose(y, y_serial) and np.allclose(y_warm, y_serial)
    print(f"   results agree with the serial loop: {agree}")

    return bool(agree)


def main(argv: list[str] | None = None) -> int:
    import shm_kernel_safe as sks

    parser = argparse.ArgumentParser(
        prog="python -m shm_kernel_safe demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=2_000_000,
        help="rows of x (x is ROWS x 16 float64; the question had 10,000,000)",
    )
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--start-method", default=None)
    args = parser.parse_args(argv)

    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    print("1. safety:", _safety_check())

    agree = _workload(args)
    sks.shutdown_pools()
    left: set[str] = set()
    if os.path.isdir("/dev/shm"):  # only what this process made: others may be running
        left = {e for e in set(os.listdir("/dev/shm")) - shm_before if _made_here(e)}
    print(f"3. left in /dev/shm: {sorted(left) if left else 'nothing'}")
    return 0 if agree and not left else 1
