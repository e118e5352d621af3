"""Render benchmark JSON results as the Markdown table in the README.

python benchmarks/table.py benchmarks/results/ms_1M.json [...]
python benchmarks/table.py benchmarks/results/dask_ms_1M.json benchmarks/results/dask_tiny_1M.json
"""

from __future__ import annotations

import json
import sys

ORDER = [
    "serial loop",
    "floor: forked halves, no messages",
    "stdlib Pool, attach per task (the question)",
    "stdlib Pool, attach once per worker",
    "joblib (loky, auto-memmap) cold",
    "joblib (loky, auto-memmap) warm",
    "parallel_map cold (pool start included)",
    "parallel_map warm, x auto-shared per call",
    "parallel_map warm, x pre-shared (zero copy)",
    "parallel_map warm, x pre-shared, text progress bar",
]


def cell(run: dict, name: str) -> str:
    times = run["times"]
    if name not in times:
        return "(not measured)"
    t = times[name]
    serial = times["serial loop"]
    floor = times["floor: forked halves, no messages"]
    return f"{t:.2f} s ({serial / t:.2f}x serial, {floor / t:.2f} of floor)"


def summary(run: dict) -> str:
    ov = run["overhead_us"]
    parts = [
        f"warm parallel_map vs warm joblib {run['vs_joblib_warm']:.2f}x (auto-shared) / "
        f"{run['vs_joblib_warm_preshared']:.2f}x (pre-shared)",
        f"per-task overhead {ov['parallel_map']:.1f} us (auto-shared), "
        f"{ov['parallel_map_preshared']:.1f} us (pre-shared) vs joblib {ov['joblib']:.1f} us",
        f"sharing x costs {run['sharing_cost_memcpy']:.2f} memcpy",
        f"total PSS with x shared {run['pss_shared_mb']:.0f} MiB "
        f"(budget {run['pss_budget_mb']:.0f} MiB)",
        f"8760 empty tasks {run['empty_8760_ms']:.1f} ms",
        f"{run['dev_shm_left_bytes']} bytes left in /dev/shm",
    ]
    if "progress_cost_pct" in run:
        parts.append(f"a live progress bar {run['progress_cost_pct']:+.1f}% of run time")
    return "; ".join(parts)


DASK_ORDER = [
    "serial loop",
    "local backend, x auto-shared per call",
    "dask backend, x unchanged (kept on the cluster)",
    "dask backend, x changed in place (sent again)",
    "dask client.map, one task per item (x scattered once)",
]


def dask_cell(run: dict, name: str) -> str:
    if name not in run["times"]:
        return "(not run)"
    t = run["times"][name]
    local = run["times"]["local backend, x auto-shared per call"]
    return f"{t:.2f} s ({local / t:.2f} of local, {run['overhead_us'][name]:.0f} us/task)"


def dask_summary(run: dict) -> str:
    return (
        f"{run['chunks']} dask tasks for 8760 items; {run['empty_dask_ms']:.0f} ms for 8760 "
        f"empty items (local {run['empty_local_ms']:.0f} ms); sending x to the workers "
        f"{run['scatter_x_ms']:.0f} ms, hashing it {run['digest_x_ms']:.0f} ms; "
        f"{run['bytes_per_worker_per_call'] / 2**20:.1f} MiB per worker when x is sent, "
        f"~{run['bytes_per_task_out']} B per task out, ~{run['bytes_per_item_back']:.0f} B "
        f"per item back; cluster start {run['cluster_start_s']:.1f} s"
    )


def _head(run: dict) -> str:
    return f"{run['rows']:,} rows, {'~20 us' if run['mode'] == 'tiny' else '~1 ms'} tasks"


def render(runs: list[dict], order: list[str], cell_of, summary_of) -> None:
    heads = [_head(r) for r in runs]
    print("| contender | " + " | ".join(heads) + " |")
    print("| --- |" + " --- |" * len(runs))
    for name in order:
        print(f"| {name} | " + " | ".join(cell_of(r, name) for r in runs) + " |")
    print()
    for run, head in zip(runs, heads, strict=True):
        print(f"* {head}: {summary_of(run)}")


def main(paths: list[str]) -> None:
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    if all("dask_vs_local" in r for r in runs):  # benchmarks/bench_dask.py results
        render(runs, DASK_ORDER, dask_cell, dask_summary)
    else:
        render(runs, ORDER, cell, summary)


if __name__ == "__main__":
    main(sys.argv[1:])
