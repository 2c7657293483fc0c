"""Items/s against concurrency from a serve_throughput.py result: one panel per workload, one line per mode, the
engine in process as a horizontal line.

python bench/plot.py bench/results/throughput-cpu-aoti.json throughput.png
python bench/plot.py warmserve.json litserve.json side-by-side.png     # runs of one machine, merged
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def plot(result: dict[str, Any], out: str | Path) -> Path:
    """Draw ``result`` (serve_throughput.py's JSON) into the PNG file ``out``; points measured with more client
    processes (``--check-clients``) are left out: they repeat a point of a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in result["points"] if "client_procs" not in p]
    workloads = list(dict.fromkeys(p["workload"] for p in points)) or ["(no points)"]
    modes = list(dict.fromkeys(p["mode"] for p in points))
    levels = sorted({p["clients"] for p in points})
    ceiling = result["in_process"]["items_per_s"]
    cols = min(3, len(workloads))
    rows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.6), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(workloads):
            ax.set_visible(False)
            continue
        workload = workloads[i]
        for mode in modes:
            line = sorted(
                (p["clients"], p["items_per_s"]) for p in points if p["mode"] == mode and p["workload"] == workload
            )
            if line:
                ax.plot(*zip(*line, strict=True), marker="o", label=mode)
        ax.axhline(ceiling, color="#888", linestyle="--", label=f"in process, batch {result['in_process']['batch']}")
        ax.set_xscale("log")
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_title(workload)
        ax.set_xlabel("concurrent clients")
        if i % cols == 0:
            ax.set_ylabel("items/s")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize="small", frameon=False)
    fig.suptitle(
        f"{result['model']} via {result['backend']} on {result['device']} — {result['date']}", fontsize="medium"
    )
    fig.tight_layout(rect=(0, 0.06 if rows == 1 else 0.03, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of one machine side by side (say, warmserve's modes and LitServe's, measured one after the other):
    the first run's settings and ceiling, every run's points."""
    merged = {**results[0], "points": [p for r in results for p in r["points"]]}
    for r in results[1:]:
        merged.update({k: v for k, v in r.items() if k not in merged})
    return merged


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: python bench/plot.py RESULT.json [MORE.json ...] OUT.png")
    print(plot(merge([json.loads(Path(f).read_text()) for f in sys.argv[1:-1]]), sys.argv[-1]))


if __name__ == "__main__":
    main()
