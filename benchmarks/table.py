"""Render benchmark JSON results as the Markdown table in the README.

python benchmarks/table.py benchmarks/results/ms_1M.json [...]
python benchmarks/table.py benchmarks/results/dask_ms_1M.json benchmarks/results/dask_tiny_1M.json
"""

from __future__ import annotations

import json
import statistics
import sys

IDEAL = "ideal: serial time / workers (not a run)"
BEST = "best peer"
ORDER = [
    IDEAL,
    "serial loop",
    "fixed halves: 2 forked processes, no messages (peer)",
    "stdlib Pool, attach once per worker (peer)",
    "mpire WorkerPool, fork, x as shared object (peer; pool start timed)",
    "stdlib Pool, attach per task (the question)",
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
PEERS = (
    "fixed halves: 2 forked processes, no messages (peer)",
    "stdlib Pool, attach once per worker (peer)",
    "mpire WorkerPool, fork, x as shared object (peer; pool start timed)",
    "stdlib Pool, attach per task (the question)",
    "joblib (loky, auto-memmap) warm",
)
SHORT = dict(
    zip(
        PEERS,
        ["fixed halves", "stdlib attach-once", "mpire", "stdlib per task", "joblib"],
        strict=True,
    )
)
OURS_WARM = (
    "parallel_map warm, x ordinary, 2nd call (cached copy reused)",
    "parallel_map warm, x pre-shared (zero copy)",
)


def cell(run: dict, name: str) -> str:
    """``median s (speed as a fraction of the ideal, speed relative to the best peer)``."""
    times = run["times"]
    ideal, best = run["ideal_s"], times[run["best_peer"]]
    if name == IDEAL:
        return f"{ideal:.2f} s (1.00 of ideal, {best / ideal:.2f} of best peer)"
    if name not in times:
        return "(not run)"
    t = times[name]
    return f"{t:.2f} s ({ideal / t:.2f} of ideal, {best / t:.2f} of best peer)"


def _pct(value: float) -> str:
    # A negative cost is noise (the contender's rounds fell on a quieter
    # moment than its baseline's); it is said so, never printed as a gain.
    return f"+{value:.1f}%" if value >= 0 else f"none measurable ({value:+.1f}%, noise)"


def _us(value: float) -> str:
    return f"{value:.1f} us" if value >= 0 else "below the noise"


def vs_peer(run: dict, name: str, peer: str) -> tuple[float, list[float]]:
    """Median of per-round ratios ``peer time / name time``, and the ratios."""
    times = run["all_times"]
    ratios = [p / t for p, t in zip(times[peer], times[name], strict=True)]
    return statistics.median(ratios), ratios


def summary(run: dict) -> str:
    best = run["best_peer"]
    parts = [f"best peer by median: {SHORT[best]}"]
    peers = [p for p in PEERS if p in run["all_times"]]
    for name in OURS_WARM:
        if name not in run["all_times"]:
            continue
        median, ratios = vs_peer(run, name, best)
        others = ", ".join(f"{SHORT[p]} {vs_peer(run, name, p)[0]:.2f}" for p in peers if p != best)
        parts.append(
            f"{name.removeprefix('parallel_map warm, ')}: {median:.2f} x the best peer's "
            f"speed as the median of per-round ratios ({', '.join(f'{r:.2f}' for r in ratios)}; "
            f"against the other peers: {others})"
        )
    if "cold_vs_best_peer" in run:
        parts.append(f"cold parallel_map {run['cold_vs_best_peer']:.2f} x the best peer's time")
    ov = run["overhead_us"]
    parts.append(
        "per-task overhead over the ideal: "
        + ", ".join(f"{n.split(' (')[0]} {_us(v)}" for n, v in ov.items())
    )
    parts.append(
        f"sks.share(x) {run['share_vs_copy']:.2f} x the time of x.copy() "
        f"({run['share_s'] * 1e3:.0f} vs {run['memcpy_s'] * 1e3:.0f} ms); content check "
        f"{run['check_s'] * 1e3:.0f} ms"
    )
    parts.append(
        "peak PSS, parent + own workers: "
        + ", ".join(f"{n.split(' (')[0]} {v:.0f} MiB" for n, v in run["pss_peak_mb"].items())
    )
    if run.get("pss_added_by_cache_mb"):
        parts.append(f"PSS added by the share cache {run['pss_added_by_cache_mb']:.0f} MiB")
    parts.append(f"a live progress bar {_pct(run['progress_cost_pct'])}")
    parts.append(f"8760 empty tasks {run['empty_8760_ms']:.1f} ms")
    parts.append(f"{run['dev_shm_left_bytes']} bytes left in /dev/shm")
    return "; ".join(parts)


def measured(run: dict) -> str:
    """When and where: the plot's subtitle, and a row of the table."""
    loads = run["load_avg_1min"]
    busy = "busy" if max(loads) > 1.5 * run.get("processes", 2) else "quiet"
    return (
        f"{run['measured_at']}, {run['machine']}, {run['repeats']} rounds, "
        f"load {min(loads):.1f}-{max(loads):.1f} ({busy})"
    )


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
    size = f"x {run['rows'] * 128 / 1e9:.2f} GB" if run["rows"] >= 5_000_000 else ""
    per = run.get("seconds_per_item")
    item = f"~{per * 1e6:.0f} us" if per and per < 1e-3 else f"~{per * 1e3:.1f} ms" if per else ""
    if not item:
        item = "~20 us" if run["mode"] == "tiny" else "~1 ms"
    return ", ".join(p for p in (f"{run['rows']:,} rows", size, f"{item} tasks") if p)


def render(runs: list[dict], order: list[str], cell_of, summary_of) -> None:
    heads = [_head(r) for r in runs]
    print("| contender | " + " | ".join(heads) + " |")
    print("| --- |" + " --- |" * len(runs))
    if all("measured_at" in r for r in runs):
        print("| measured | " + " | ".join(measured(r) for r in runs) + " |")
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


def render_scale(run: dict) -> None:
    """Per-item overhead of each pool at 10^4, 10^5, 10^6 tiny items."""
    sizes = list(run["overhead_us"])
    names = [n for n in run["overhead_us"][sizes[0]] if n != "serial loop"]
    print(
        "| per-item overhead over serial / workers | "
        + " | ".join(f"{int(n):,} items" for n in sizes)
        + " |"
    )
    print("| --- |" + " --- |" * len(sizes))
    for name in names:
        print(
            f"| {name} | "
            + " | ".join(f"{run['overhead_us'][n][name]:.2f} us" for n in sizes)
            + " |"
        )


def main(paths: list[str]) -> None:
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    if all(r.get("mode") == "scale" for r in runs):
        for run in runs:
            render_scale(run)
    elif all(r.get("mode") == "blas" for r in runs):  # bench_hourly.py --mode blas
        for run in runs:
            render_blas(run)
    elif all("dask_vs_local" in r for r in runs):  # benchmarks/bench_dask.py results
        render(runs, DASK_ORDER, dask_cell, dask_summary)
    else:
        render(runs, ORDER, cell, summary)


if __name__ == "__main__":
    main(sys.argv[1:])
