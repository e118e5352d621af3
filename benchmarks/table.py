"""Render benchmark JSON results as the Markdown table in the README.

python benchmarks/table.py benchmarks/results/ms_1M.json [...]
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
]


def main(paths: list[str]) -> None:
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    heads = [
        f"{r['rows']:,} rows, {'~20 us' if r['mode'] == 'tiny' else '~1 ms'} tasks" for r in runs
    ]
    print("| contender | " + " | ".join(heads) + " |")
    print("| --- |" + " --- |" * len(runs))
    for name in ORDER:
        cells = []
        for r in runs:
            t = r["times"][name]
            serial = r["times"]["serial loop"]
            floor = r["times"]["floor: forked halves, no messages"]
            cells.append(f"{t:.2f} s ({serial / t:.2f}x serial, {floor / t:.2f} of floor)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    for r, head in zip(runs, heads, strict=True):
        ov = r["overhead_us"]
        print(
            f"* {head}: warm parallel_map vs warm joblib {r['vs_joblib_warm']:.2f}x "
            f"(auto-shared) / {r['vs_joblib_warm_preshared']:.2f}x (pre-shared); per-task "
            f"overhead {ov['parallel_map']:.1f} us (auto-shared), "
            f"{ov['parallel_map_preshared']:.1f} us (pre-shared) vs joblib {ov['joblib']:.1f} us; "
            f"sharing x costs {r['sharing_cost_memcpy']:.2f} memcpy; total PSS with x shared "
            f"{r['pss_shared_mb']:.0f} MiB (budget {r['pss_budget_mb']:.0f} MiB); 8760 empty "
            f"tasks {r['empty_8760_ms']:.1f} ms; {r['dev_shm_left_bytes']} bytes left in /dev/shm"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
