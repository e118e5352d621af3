"""Plot each contender's speed relative to the best peer: one figure per run.

A *run* is one invocation of ``bench_hourly.py`` (one workload, its
interleaved rounds on one machine at one time). Runs are never mixed in a
figure: each says in its title what was measured and in its subtitle when,
where, and how loaded the machine was. 1.0 is the best peer's speed (the
fastest hand-written contender of that run), more is faster; the dotted
line is the ideal (serial time / workers), which nothing reaches.

python benchmarks/plot.py --readme README.md --outdir docs/_static
python benchmarks/plot.py benchmarks/results/ms_1M.json benchmarks/results/tiny_1M.json \
    --outdir plots

With ``--readme`` the numbers come from the benchmark table in the README
(the published one; the docs build uses this), else from the ``--json``
files of ``bench_hourly.py``. Figures are written as ``bench_1.png``,
``bench_2.png``, ... in the order of the table's columns (or the files).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from table import IDEAL, ORDER, PEERS, _head, measured

_CELL = re.compile(r"([\d.]+) s \(([\d.]+) of ideal, ([\d.]+) of best peer\)")


@dataclass
class Run:
    """One run: its workload, when/where, and each contender's speed vs the best peer."""

    title: str
    where: str = ""
    speed: dict[str, float] = field(default_factory=dict)
    ideal: float | None = None  # the ideal's speed relative to the best peer


def from_readme(path: Path) -> list[Run]:
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| contender |"))
    heads = [c.strip() for c in lines[start].strip("|").split("|")[1:]]
    runs = [Run(h) for h in heads]
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for run, text in zip(runs, cells[1:], strict=True):
            if cells[0] == "measured":
                run.where = text
                continue
            m = _CELL.fullmatch(text)
            if m is None:
                continue
            if cells[0] == IDEAL:
                run.ideal = float(m.group(3))
            else:
                run.speed[cells[0]] = float(m.group(3))
    if not any(r.speed for r in runs):
        raise SystemExit(f"no benchmark table found in {path}")
    return runs


def from_json(paths: list[Path]) -> list[Run]:
    runs = []
    for path in paths:
        run = json.loads(path.read_text())
        best = run["times"][run["best_peer"]]
        runs.append(
            Run(
                _head(run),
                measured(run),
                {n: best / run["times"][n] for n in ORDER if n in run["times"]},
                best / run["ideal_s"],
            )
        )
    return runs


def plot(run: Run, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(run.speed)
    values = [run.speed[n] for n in names]
    fig, ax = plt.subplots(figsize=(10, 0.36 * len(names) + 1.9), dpi=110)
    colors = [
        "tab:blue" if n.startswith("parallel_map") else "tab:gray" if n in PEERS else "silver"
        for n in names
    ]
    ax.barh(range(len(names)), values, color=colors, height=0.7)
    for i, v in enumerate(values):
        ax.text(v + 0.01, i, f"{v:.2f}", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--", label="best peer (1.0)")
    if run.ideal:
        ax.axvline(
            run.ideal,
            color="tab:green",
            linewidth=1,
            linestyle=":",
            label="ideal: serial / workers",
        )
    ax.set_yticks(range(len(names)), [textwrap.shorten(n, 70) for n in names], fontsize=7.5)
    ax.invert_yaxis()
    ax.set_xlabel("speed relative to the best peer of this run (higher is faster)")
    ax.set_xlim(0, max([*values, run.ideal or 0]) * 1.12)
    fig.suptitle(f"8760 hourly tasks on 2 workers: {run.title}", fontsize=10)
    ax.set_title(
        f"measured {run.where}; blue: shm_kernel_safe, gray: peers" if run.where else "",
        fontsize=7.5,
    )
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="*", type=Path, help="bench_hourly.py --json files")
    parser.add_argument("--readme", type=Path, help="read the table from this README instead")
    parser.add_argument("--outdir", type=Path, default=Path("."))
    args = parser.parse_args()
    if bool(args.readme) == bool(args.json):
        parser.error("give either --readme README.md or JSON files")
    runs = from_readme(args.readme) if args.readme else from_json(args.json)
    for i, run in enumerate(runs, 1):
        out = args.outdir / f"bench_{i}.png"
        plot(run, out)
        print(f"wrote {out}: {run.title}")


if __name__ == "__main__":
    main()
