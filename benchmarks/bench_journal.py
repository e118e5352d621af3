"""What a journal costs: the seed workload with and without ``journal=``.

    python benchmarks/bench_journal.py [--rows 1000000] [--repeats 7] [--dir PATH]

x is ROWS x 16 float64 (1,000,000 rows = 128 MB, an ordinary array, as most
users pass it); 8760 items each read a block of x sized so that one item
takes ~1 ms serially, return one float and write it into ``y`` (``out=``).
Both contenders run in this process on the same warm pool, interleaved in a
fresh random order each round; reported are medians and the median of the
per-round ratios (journaled / not journaled), which is what stays steady on
a busy machine. The journal lives in ``--dir`` (default: a temporary folder
on the same disk as the per-user cache), and each journaled call starts
fresh (its journal is removed when the run finishes, as for users).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np

import shm_kernel_safe as sks
from shm_kernel_safe.engine import journal as jmod

sys.path.insert(0, os.path.dirname(__file__))
from bench_hourly import N_TASKS, calibrate, work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--dir", default=None, help="folder of the journals")
    parser.add_argument("--json", default=None, help="write the numbers here too")
    parser.add_argument(
        "--chunksize",
        type=int,
        default=None,
        help="fixed chunks for both (a journaled run otherwise cuts chunks of at most "
        "2 s of work, which alone changes the schedule): isolates the journal's own cost",
    )
    parser.add_argument(
        "--rows-per-item", type=int, default=None, help="skip the calibration (a busy machine)"
    )
    args = parser.parse_args(argv)

    x = np.random.default_rng(0).standard_normal((args.rows, 16))
    if args.rows_per_item:
        k = args.rows_per_item
        t0 = time.perf_counter()
        for nn in range(200):
            work(x, nn * 37, k)
        per = (time.perf_counter() - t0) / 200
    else:
        k, per = calibrate(x, 0.001)
    y = np.zeros(N_TASKS)
    folder = args.dir or tempfile.mkdtemp(prefix="sks-bench-journal-", dir=os.path.expanduser("~"))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "bench.sksj")

    def item(nn: int) -> float:
        value = work(x, nn, k)
        y[nn] = value
        return value

    sks.prestart(args.processes)
    expected = sks.parallel_map(item, range(N_TASKS), out=y, processes=args.processes)

    def plain() -> np.ndarray:
        return sks.parallel_map(
            item, range(N_TASKS), out=y, processes=args.processes, chunksize=args.chunksize
        )

    def journaled() -> np.ndarray:
        return sks.parallel_map(item, range(N_TASKS), out=y, processes=args.processes, journal=path)

    # The parent's own time in the journal (opening with its key, flushes,
    # finishing), per journaled call: the cost the ratio hides in noise.
    spent = {"open": 0.0, "flush": 0.0, "finish": 0.0, "flushes": 0}

    def timed(name: str, fn: object) -> object:
        def wrapper(*a: object, **kw: object) -> object:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)  # type: ignore[operator]
            finally:
                spent[name] += time.perf_counter() - t0
                if name == "flush":
                    spent["flushes"] += 1

        return wrapper

    jmod.Journal.open = classmethod(timed("open", jmod.Journal.open.__func__))  # type: ignore[method-assign]
    jmod.Journal.flush = timed("flush", jmod.Journal.flush)  # type: ignore[method-assign]
    jmod.Journal.finish = timed("finish", jmod.Journal.finish)  # type: ignore[method-assign]
    contenders = {"not journaled": plain, "journal=PATH": journaled}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    ratios = []
    for _ in range(args.repeats):
        order = list(contenders)
        random.shuffle(order)
        this_round = {}
        for name in order:
            y[:] = 0
            t0 = time.perf_counter()
            result = contenders[name]()
            this_round[name] = time.perf_counter() - t0
            assert np.array_equal(result, expected) and np.array_equal(y, expected)
            assert not os.path.exists(path)
        for name, seconds in this_round.items():
            times[name].append(seconds)
        ratios.append(this_round["journal=PATH"] / this_round["not journaled"])
    sks.shutdown_pools()
    report = {
        "rows": args.rows,
        "items": N_TASKS,
        "rows_per_item": k,
        "chunksize": args.chunksize,
        "item_seconds": per,
        "median_seconds": {name: statistics.median(t) for name, t in times.items()},
        "ratio_journaled_median": statistics.median(ratios),
        "ratios": ratios,
        "journal_folder": folder,
        "journal_seconds_per_call": {
            name: value / args.repeats for name, value in spent.items() if name != "flushes"
        },
        "flushes_per_call": spent["flushes"] / args.repeats,
    }
    own = sum(report["journal_seconds_per_call"].values())
    report["journal_share_of_plain"] = own / report["median_seconds"]["not journaled"]
    print(f"x: {args.rows} x 16 float64, {N_TASKS} items of ~{per * 1e3:.2f} ms ({k} rows)")
    for name, t in times.items():
        print(f"  {name:<14} median {statistics.median(t):.3f} s  ({len(t)} rounds)")
    print(
        f"  journaled / not journaled: median of per-round ratios "
        f"{report['ratio_journaled_median']:.3f}  (rounds: "
        + ", ".join(f"{r:.3f}" for r in ratios)
        + ")"
    )
    per_call = report["journal_seconds_per_call"]
    print(
        f"  the parent's time in the journal per call: {own * 1e3:.1f} ms "
        f"(open {per_call['open'] * 1e3:.1f}, {report['flushes_per_call']:.1f} flushes "
        f"{per_call['flush'] * 1e3:.1f}, finish {per_call['finish'] * 1e3:.1f}) = "
        f"{100 * report['journal_share_of_plain']:.2f} % of a call"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if args.dir is None:
        os.rmdir(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
