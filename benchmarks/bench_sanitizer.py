"""Cost of the namespace sanitizer that runs before every variable-explorer read.

    python benchmarks/bench_sanitizer.py [--variables 1000]

A realistic notebook namespace: arrays (some views, some in shared memory),
scalars, strings, lists, dicts, a few objects holding arrays. Reported as
the median time per sanitize over many runs, and against the time of one
``dir()``-like pass over the same namespace (the floor of any check).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import shm_kernel_safe as sks
from shm_kernel_safe.kernel.inspection import sanitize_namespace


class Result:
    def __init__(self, data):
        self.data = data
        self.meta = {"units": "K"}


def make_namespace(n: int) -> dict:
    rng = np.random.default_rng(0)
    shared = sks.zeros((1000, 16))
    ns: dict = {}
    for i in range(n):
        kind = i % 10
        if kind == 0:
            ns[f"a{i}"] = rng.standard_normal(100)
        elif kind == 1:
            ns[f"v{i}"] = shared[i % 1000]
        elif kind == 2:
            ns[f"s{i}"] = f"label {i}"
        elif kind == 3:
            ns[f"l{i}"] = [1, 2.0, "x", np.zeros(3)]
        elif kind == 4:
            ns[f"d{i}"] = {"k": np.ones(2), "n": i}
        elif kind == 5:
            ns[f"o{i}"] = Result(np.arange(5))
        elif kind == 6:
            ns[f"t{i}"] = (np.zeros(2), i)
        else:
            ns[f"n{i}"] = float(i)
    ns["_keep_shared"] = shared
    return ns


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variables", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    ns = make_namespace(args.variables)
    times, floor = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sanitize_namespace(ns)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _name, _value in list(ns.items()):
            type(_value)
        floor.append(time.perf_counter() - t0)
    med, fl = statistics.median(times), statistics.median(floor)
    print(
        f"namespace of {len(ns)} variables: sanitize median {med * 1e3:.3f} ms "
        f"(p90 {sorted(times)[int(0.9 * len(times))] * 1e3:.3f} ms); "
        f"a bare pass over the names takes {fl * 1e3:.3f} ms ({med / fl:.1f}x)"
    )


if __name__ == "__main__":
    main()
