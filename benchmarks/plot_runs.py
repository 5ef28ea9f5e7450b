"""Loss curves of a directory of runs, one curve per run workdir.

    python -m benchmarks.plot_runs --runs runs/mqar_grid --filter _d64_T64_kv4_lr0.01 \\
        --out benchmarks/results/mqar_loss_curves.png

Every subdirectory of ``--runs`` holding a ``metrics.jsonl`` (whose name contains
``--filter``) is one curve of ``--metric`` (default ``train/loss``) with its ``eval/...``
points as markers. A run is labelled by its ``row.json``'s ``"block"`` (written by
``benchmarks/sweep.py``), else by its directory name; two runs with the same block get
the directory name appended.
"""
from __future__ import annotations

import argparse
import json
import os

from memjax.eval.plots import plot_loss_curves


def collect_runs(runs: str, name_filter: str = "") -> dict[str, str]:
    """label -> workdir for each run directory under ``runs`` whose name contains ``name_filter``."""
    if not os.path.isdir(runs):
        raise FileNotFoundError(f"--runs {runs!r} is not a directory")
    found: list[tuple[str, str]] = []
    for name in sorted(os.listdir(runs)):
        wd = os.path.join(runs, name)
        if name_filter not in name or not os.path.isfile(os.path.join(wd, "metrics.jsonl")):
            continue
        label = name
        row = os.path.join(wd, "row.json")
        if os.path.isfile(row):
            with open(row) as f:
                label = json.load(f).get("block", name)
        found.append((label, wd))
    counts: dict[str, int] = {}
    for label, _ in found:
        counts[label] = counts.get(label, 0) + 1
    return {(label if counts[label] == 1 else f"{label} ({os.path.basename(wd)})"): wd for label, wd in found}


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="directory whose subdirectories are run workdirs")
    ap.add_argument("--filter", default="", help="keep runs whose directory name contains this")
    ap.add_argument("--metric", default="train/loss")
    ap.add_argument("--logy", action="store_true")
    ap.add_argument("--title", default=None)
    ap.add_argument("--out", default="benchmarks/results/loss_curves.png")
    args = ap.parse_args(argv)
    runs = collect_runs(args.runs, args.filter)
    if not runs:
        raise SystemExit(f"no run with metrics.jsonl under {args.runs!r} matching {args.filter!r}")
    title = args.title or f"{args.runs}" + (f" ({args.filter})" if args.filter else "")
    out = plot_loss_curves(runs, args.out, args.metric, logy=args.logy, title=title)
    print(f"{len(runs)} runs: {', '.join(runs)}\nwrote {out}")
    return out


if __name__ == "__main__":
    main()
