"""Plot each contender's speed relative to the floor, per workload.

The floor is two forked processes computing fixed halves into a shared
output with no messages at all (``bench_hourly.py``); 1.0 means "as fast as
that", more is faster.

python benchmarks/plot.py --readme README.md -o bench_floor.png
python benchmarks/plot.py results/ms_1M.json results/tiny_1M.json -o bench_floor.png

With ``--readme`` the numbers come from the benchmark table in the README
(the published one; the docs build uses this), else from the ``--json``
files of ``bench_hourly.py`` (one workload per file).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

FLOOR = "floor: forked halves, no messages"
_CELL = re.compile(r"([\d.]+) s \(([\d.]+)x serial, ([\d.]+) of floor\)")


def from_readme(path: Path) -> dict[str, dict[str, float]]:
    """{workload: {contender: speed relative to the floor}} from the README table."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| contender |"))
    workloads = [c.strip() for c in lines[start].strip("|").split("|")[1:]]
    out: dict[str, dict[str, float]] = {w: {} for w in workloads}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for workload, cell in zip(workloads, cells[1:], strict=True):
            m = _CELL.fullmatch(cell)
            if m:
                out[workload][cells[0]] = float(m.group(3))
    if not any(out.values()):
        raise SystemExit(f"no benchmark table found in {path}")
    return out


def from_json(paths: list[Path]) -> dict[str, dict[str, float]]:
    out = {}
    for path in paths:
        run = json.loads(path.read_text())
        times = run["times"]
        label = f"{run.get('rows', '?'):,} rows, {run.get('mode', '')}".strip(", ")
        out[label] = {name: times[FLOOR] / t for name, t in times.items()}
    return out


def plot(data: dict[str, dict[str, float]], output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contenders: list[str] = []
    for values in data.values():
        contenders += [c for c in values if c not in contenders]
    n, k = len(contenders), len(data)
    height = 0.8 / k
    fig, ax = plt.subplots(figsize=(9, 0.55 * n + 1.5), dpi=110)
    for j, (workload, values) in enumerate(data.items()):
        ys = [i + (j - (k - 1) / 2) * height for i in range(n)]
        xs = [values.get(c, 0.0) for c in contenders]
        ax.barh(ys, xs, height=height, label=workload)
        for y, x, c in zip(ys, xs, contenders, strict=True):
            if c in values:
                ax.text(x + 0.01, y, f"{x:.2f}", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_yticks(range(n), contenders, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed relative to the floor (higher is faster; 1.0 = the floor)")
    ax.set_title("8760 hourly tasks on 2 cores: each contender against the floor")
    ax.set_xlim(0, max(max(v.values()) for v in data.values()) + 0.15)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(k, 3))
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="*", type=Path, help="bench_hourly.py --json files")
    parser.add_argument("--readme", type=Path, help="read the table from this README instead")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench_floor.png"))
    args = parser.parse_args()
    if bool(args.readme) == bool(args.json):
        parser.error("give either --readme README.md or JSON files")
    data = from_readme(args.readme) if args.readme else from_json(args.json)
    plot(data, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
