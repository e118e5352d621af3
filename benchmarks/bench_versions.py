"""Is this checkout's warm ``parallel_map`` as fast as another checkout's?

    python benchmarks/bench_versions.py --against /path/to/other/checkout

Each round starts one fresh interpreter per checkout (in random order), with
that checkout first on ``sys.path``. Inside, the same workloads run warm,
each timed against a stdlib ``multiprocessing.Pool`` whose initializer
attaches ``x`` once per worker (set-up not timed), in the same process and
the same seconds: the ratio ours / stdlib takes the machine's load out, and
the medians of those ratios over the rounds compare the checkouts. Only the
public API is used, so any two versions can be compared.

Workloads (8760 items over an ``x`` of ``--rows`` x 16 float64):
``tiny-float`` a few microseconds per item, float results (they stack);
``tiny-tuple`` the same with tuple results (they do not stack);
``ms`` about a millisecond per item.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from multiprocessing import Pool, shared_memory
    import shm_kernel_safe as sks

    rows, repeats = int(sys.argv[1]), int(sys.argv[2])
    x = sks.share(np.random.default_rng(0).standard_normal((rows, 16))).view()
    N = 8760
    step = max(1, rows // N)

    def tiny_float(nn):
        return float(x[nn * step, 3])

    def tiny_tuple(nn):
        return (nn, float(x[nn * step, 3]))

    def ms(nn):
        return float(np.percentile(x[nn::N], 50, axis=0).sum())

    _shm = shared_memory.SharedMemory(create=True, size=x.nbytes)
    np.ndarray(x.shape, x.dtype, buffer=_shm.buf)[:] = x
    _X = _SHM = None

    def _attach(name, shape):
        global _X, _SHM
        _SHM = shared_memory.SharedMemory(name=name)  # kept: its close would unmap _X
        _X = np.ndarray(shape, np.float64, buffer=_SHM.buf)

    def p_tiny_float(nn):
        return float(_X[nn * step, 3])

    def p_tiny_tuple(nn):
        return (nn, float(_X[nn * step, 3]))

    def p_ms(nn):
        return float(np.percentile(_X[nn::N], 50, axis=0).sum())

    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    out = {}
    with Pool(2, initializer=_attach, initargs=(_shm.name, x.shape)) as pool:
        for name, ours, peer in [
            ("tiny-float", tiny_float, p_tiny_float),
            ("tiny-tuple", tiny_tuple, p_tiny_tuple),
            ("ms", ms, p_ms),
        ]:
            sks.parallel_map(ours, range(N), processes=2)  # warm: pool up, x mapped
            pool.map(peer, range(N))
            mine = best(lambda: sks.parallel_map(ours, range(N), processes=2))
            theirs = best(lambda: pool.map(peer, range(N)))
            out[name] = mine / theirs
    sks.shutdown_pools()
    _shm.close()
    _shm.unlink()
    print(json.dumps(out))
    """
)


def one_round(checkout: Path, rows: int, repeats: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(rows), str(repeats)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=checkout,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, required=True, help="the other checkout")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per workload")
    args = parser.parse_args(argv)
    checkouts = {"this": HERE, "other": args.against.resolve()}
    ratios: dict[str, dict[str, list[float]]] = {k: {} for k in checkouts}
    for r in range(args.rounds):
        order = list(checkouts)
        random.shuffle(order)
        for who in order:
            for work, ratio in one_round(checkouts[who], args.rows, args.repeats).items():
                ratios[who].setdefault(work, []).append(ratio)
        print(f"round {r + 1}/{args.rounds} done (load {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\nmedian of per-round ratios, parallel_map warm / stdlib Pool attach-once "
          f"({args.rounds} rounds, {args.rows:,} rows; lower is faster)")  # fmt: skip
    print(f"{'workload':12} {'this':>8} {'other':>8} {'this/other':>11}")
    for work in ratios["this"]:
        mine = statistics.median(ratios["this"][work])
        theirs = statistics.median(ratios["other"][work])
        print(f"{work:12} {mine:8.3f} {theirs:8.3f} {mine / theirs:11.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
