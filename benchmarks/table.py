"""Render benchmark JSON results as the Markdown table in the README.

python benchmarks/table.py benchmarks/results/ms_1M.json [...]
python benchmarks/table.py benchmarks/results/dask_ms_1M.json benchmarks/results/dask_tiny_1M.json
"""

from __future__ import annotations

import json
import statistics
import sys

ORDER = [
    "serial loop",
    "floor: forked halves, no messages",
    "stdlib Pool, attach per task (the question)",
    "stdlib Pool, attach once per worker",
    "joblib (loky, auto-memmap) cold",
    "joblib (loky, auto-memmap) warm",
    "parallel_map cold (pool start included)",
    "parallel_map warm, x ordinary, 1st call (copied)",
    "parallel_map warm, x ordinary, 2nd call (cached copy reused)",
    "parallel_map warm, x ordinary, 3rd call (cached copy reused)",
    "parallel_map warm, x ordinary, after x[123, 4] += 1 (copied again)",
    "parallel_map warm, x ordinary, cache off (copied every call)",
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


def _median_of_round_ratios(run: dict, name: str) -> float:
    floor = run["all_times"]["floor: forked halves, no messages"]
    return statistics.median(f / t for f, t in zip(floor, run["all_times"][name], strict=True))


def _round_ratios(run: dict, name: str) -> str:
    floor = run["all_times"]["floor: forked halves, no messages"]
    ratios = [f / t for f, t in zip(floor, run["all_times"][name], strict=True)]
    return ", ".join(f"{r:.2f}" for r in ratios)


def summary(run: dict) -> str:
    ov = run["overhead_us"]
    reused = "parallel_map warm, x ordinary, 2nd call (cached copy reused)"
    parts = [
        f"warm parallel_map vs warm joblib {run['vs_joblib_warm']:.2f}x (x ordinary, reused) / "
        f"{run['vs_joblib_warm_preshared']:.2f}x (pre-shared)",
        f"x ordinary, 2nd call: {_median_of_round_ratios(run, reused):.2f} of floor as the "
        f"median of per-round ratios (rounds {_round_ratios(run, reused)})",
        f"per-task overhead {ov['parallel_map']:.1f} us (x ordinary, reused; "
        f"{run['overhead_ratio_vs_joblib']:.2f} of joblib's), "
        f"{ov['parallel_map_preshared']:.1f} us (pre-shared) vs joblib {ov['joblib']:.1f} us",
        f"content check {run['check_s'] * 1e3:.0f} ms = {100 * run['check_cost_of_copy']:.1f}% "
        f"of a copy into shared memory ({run['share_fresh_s'] * 1e3:.0f} ms), "
        f"{100 * run['check_cost_of_memcpy']:.0f}% of x.copy()",
        f"PSS added by the cache {run['pss_added_by_cache_mb']:.0f} MiB "
        f"(one copy of x: budget {run['pss_added_by_cache_budget_mb']:.0f} MiB)",
        f"sharing x costs {run['sharing_cost_memcpy']:.2f} memcpy",
        f"total PSS with x shared {run['pss_shared_mb']:.0f} MiB "
        f"(budget {run['pss_budget_mb']:.0f} MiB)",
        f"8760 empty tasks {run['empty_8760_ms']:.1f} ms",
        f"{run['dev_shm_left_bytes']} bytes left in /dev/shm",
    ]
    if "progress_cost_pct" in run:
        parts.append(f"a live progress bar {run['progress_cost_pct']:+.1f}% of run time")
    if "load_avg_1min" in run:
        loads = run["load_avg_1min"]
        parts.append(f"1-min load average {min(loads):.1f}-{max(loads):.1f} on 2 cores")
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


def render_blas(run: dict) -> None:
    """BLAS-heavy items: each contender's median and rounds, as a table."""
    hand = next(n for n in run["times"] if n.startswith("1 BLAS"))
    print(f"| {run['items']} items of one 400x400 matmul | median | of hand-limited | rounds |")
    print("| --- | --- | --- | --- |")
    for name, t in run["times"].items():
        rounds = ", ".join(f"{x:.2f}" for x in run["all_times"][name])
        print(f"| {name} | {t:.2f} s | {run['times'][hand] / t:.2f} | {rounds} |")
    print()
    per_round = ", ".join(f"{r:.2f}" for r in run["default_vs_hand_rounds"])
    print(
        f"* default vs hand-limited per round: {per_round}; slowest default round "
        f"{run['worst_default_round_vs_median']:.2f}x its median; 1-min load average "
        f"{min(run['load_avg_1min']):.1f}-{max(run['load_avg_1min']):.1f} on 2 cores"
    )


def main(paths: list[str]) -> None:
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    if all(r.get("mode") == "blas" for r in runs):  # bench_hourly.py --mode blas
        for run in runs:
            render_blas(run)
    elif all("dask_vs_local" in r for r in runs):  # benchmarks/bench_dask.py results
        render(runs, DASK_ORDER, dask_cell, dask_summary)
    else:
        render(runs, ORDER, cell, summary)


if __name__ == "__main__":
    main(sys.argv[1:])
