"""Figures and tables from run outputs: loss curves, the needle heat-map, a metrics table.

Inputs are the files the loop writes: ``<workdir>/metrics.jsonl`` (one JSON object per
logged step, ``{"step": s, "train/loss": ..., "eval/accuracy": ...}``) and
``eval_metrics.json`` (:func:`memjax.train.evaluate.evaluate_checkpoint`). Matplotlib is
imported inside the plotting functions with the non-interactive Agg backend, so
:func:`metrics_table_markdown` works without it and no display is ever needed.
"""
from __future__ import annotations

import json
import math
import os


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``<workdir>/metrics.jsonl``, in file order.

    A truncated last line (a run still writing) is skipped rather than failing the read.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"workdir {workdir!r} has no metrics.jsonl")
    records = []
    with open(path) as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return records


def metric_series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, sorted by step; a step logged twice (resumed run) keeps its last value."""
    by_step = {}
    for r in records:
        if key in r and "step" in r:
            by_step[int(r["step"])] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(workdirs: dict[str, str], out_png: str, metric: str = "train/loss", *,
                     logy: bool = False, title: str | None = None) -> str:
    """One line per run of ``metric`` against step; the matching ``eval/...`` points as markers.

    Args:
      workdirs: label -> run directory holding ``metrics.jsonl``.
      out_png: where the figure goes (parent directories are created).
      metric: a ``metrics.jsonl`` key, e.g. ``"train/loss"``; its eval counterpart
        (``"eval/loss"``) is overlaid in the same colour when the run logged it.
      logy: logarithmic y axis.
    Returns ``out_png``.
    """
    if not isinstance(workdirs, dict) or not workdirs:
        raise ValueError(f"workdirs must be a non-empty dict label -> path, got {workdirs!r}")
    if not isinstance(metric, str) or "/" not in metric:
        raise ValueError(f"metric must be a 'section/name' key such as 'train/loss', got {metric!r}")
    eval_key = "eval/" + metric.split("/", 1)[1]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for label, wd in workdirs.items():
        records = read_metrics(wd)
        steps, values = metric_series(records, metric)
        color = None
        if steps:
            (line,) = ax.plot(steps, values, ".-", lw=1.5, ms=3, label=label)
            color = line.get_color()
            drawn += 1
        if eval_key != metric:
            e_steps, e_values = metric_series(records, eval_key)
            if e_steps:
                ax.plot(e_steps, e_values, "o", ms=4, color=color,
                        label=None if color else f"{label} ({eval_key})")
                drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError(f"no run in {sorted(workdirs)} logged {metric!r} or {eval_key!r}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric + (f" (markers: {eval_key})" if eval_key != metric else ""))
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_needle_heatmap(results: dict, out_png: str, *, title: str = "pass-key retrieval") -> str:
    """Heat-map of ``results[(context_length, depth)] = accuracy``: length on x, depth on y.

    Cells are coloured on a fixed 0..1 scale and annotated with their value; a pair
    missing from ``results`` is left blank. Returns ``out_png``.
    """
    if not isinstance(results, dict) or not results:
        raise ValueError(f"results must be a non-empty dict (context_length, depth) -> accuracy, got {results!r}")
    for k, v in results.items():
        if not (isinstance(k, tuple) and len(k) == 2):
            raise ValueError(f"results keys must be (context_length, depth) pairs, got {k!r}")
        if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
            raise ValueError(f"results[{k!r}] must be an accuracy in [0, 1], got {v!r}")
    import numpy as np

    lengths = sorted({k[0] for k in results})
    depths = sorted({k[1] for k in results})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for (length, depth), acc in results.items():
        grid[depths.index(depth), lengths.index(length)] = acc
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.55 * len(depths) + 2))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", origin="upper", aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (0 = start)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def metrics_table_markdown(metrics: dict) -> str:
    """An ``eval_metrics.json`` dict as a Markdown table: one row per length multiple, one column per metric.

    Keys without a ``len_x{m}/`` prefix are the training length (row ``x1``); ``len_x{m}/k``
    go to row ``x{m}``. Columns: ``loss``, ``accuracy``, then every other metric (e.g. the
    per-bin accuracies) in order of first appearance. A multiple skipped by the evaluator
    (``len_x{m}/skipped``) gets its reason in a ``note`` column. ``step`` heads the table.
    """
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a dict (an eval_metrics.json), got {type(metrics).__name__}")
    rows: dict[int, dict] = {}
    notes: dict[int, str] = {}
    for key, value in metrics.items():
        if key == "step":
            continue
        mult, name = 1, key
        if key.startswith("len_x") and "/" in key:
            prefix, name = key.split("/", 1)
            try:
                mult = int(prefix[len("len_x"):])
            except ValueError:
                raise ValueError(f"metrics key {key!r}: expected 'len_x<int>/<name>'") from None
        if name == "skipped":
            notes[mult] = str(value)
            rows.setdefault(mult, {})
            continue
        rows.setdefault(mult, {})[name] = value
    if not rows:
        raise ValueError("metrics holds no metric to tabulate")
    names: list[str] = [n for n in ("loss", "accuracy") if any(n in r for r in rows.values())]
    for r in rows.values():
        names += [n for n in r if n not in names]
    cols = ["length"] + names + (["note"] if notes else [])
    lines = []
    if "step" in metrics:
        lines += [f"Checkpoint step {metrics['step']}.", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    for mult in sorted(rows):
        cells = [f"x{mult}"] + [fmt(rows[mult][n]) if n in rows[mult] else "" for n in names]
        if notes:
            cells.append(notes.get(mult, "").replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
