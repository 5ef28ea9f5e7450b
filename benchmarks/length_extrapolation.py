"""Length extrapolation: train each block at length L, evaluate the same parameters at L, 2L, 4L.

    python -m benchmarks.length_extrapolation --out runs/length_extrapolation               # every block, MQAR
    python -m benchmarks.length_extrapolation --blocks A,D,M2,L --steps 400 --lrs 0.01      # a small set
    python -m benchmarks.length_extrapolation --study text --blocks A,D --steps 300          # text corpus
    python -m benchmarks.length_extrapolation --out runs/length_extrapolation --report-only  # table + figure

The sweep config (``configs/sweeps/length_extrapolation.py``) lists the blocks, the training
point and the evaluation modes (MQAR with the same number of pairs spread over a longer context,
or with the pairs scaled with the length; text in longer windows). Each run trains in
``<out>/<name>`` (an existing workdir is resumed from its checkpoint, a finished one is not
retrained), then its latest checkpoint is evaluated at every multiple and mode; the run's row
goes to ``<out>/<name>/row.json``, and a run with a row is skipped on rerun, so an interrupted
sweep continues where it stopped. Writes ``<out>/results.json``, ``results.md`` (per block, the
learning rate with the best accuracy -- text: lowest loss -- at the training length, and that
run's numbers at every length) and ``length_extrapolation.png``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import os
import time

import jax

from memjax.config import ConfigError, load_config, validate
from memjax.data.pipeline import make_task
from memjax.train.evaluate import restore_state
from memjax.train.loop import build, evaluate, train_and_evaluate

DEFAULT_SWEEP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sweeps",
                             "length_extrapolation.py")


def load_sweep(path: str):
    """The sweep config module at ``path`` (``STUDIES``, ``BLOCKS``, ``MULTIPLES``, ``get_sweep``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--sweep: no sweep config at {path!r}")
    spec = importlib.util.spec_from_file_location("length_extrapolation_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def longer_config(cfg, multiple: int, mode: str):
    """The config of the evaluation at ``multiple`` times the training length (same model).

    ``mode``: ``"same_pairs"`` / ``"same"`` change only ``data.seq_len``; ``"scaled_pairs"`` also
    multiplies MQAR's ``num_kv_pairs``. Raises :class:`ConfigError` when the task cannot be built
    at that length (e.g. a vocabulary too small for MQAR at ``multiple * L``)."""
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    if mode not in ("same", "same_pairs", "scaled_pairs"):
        raise ValueError(f"mode must be 'same', 'same_pairs' or 'scaled_pairs', got {mode!r}")
    longer = copy.deepcopy(cfg)
    longer.data.seq_len = cfg.data.seq_len * multiple
    longer.model.max_seq_len = max(cfg.model.max_seq_len, longer.data.seq_len)
    if mode == "scaled_pairs":
        if "num_kv_pairs" not in (cfg.data.options or {}):
            raise ConfigError(f"mode 'scaled_pairs' needs an MQAR task with data.options.num_kv_pairs, "
                              f"got task {cfg.data.task!r} with options {cfg.data.options!r}")
        longer.data.options = {**cfg.data.options, "num_kv_pairs": cfg.data.options["num_kv_pairs"] * multiple}
    validate(longer)
    return longer


def evaluate_lengths(cfg, workdir: str, multiples, modes, num_batches: int | None = None) -> dict:
    """``{mode: {"x<m>": metrics or {"skipped": reason}}}`` of the latest checkpoint in ``workdir``.
    The training length (``m = 1``) is the same data in every mode and is evaluated once; the modes
    of one multiple share one compiled model (same shapes, different data)."""
    setup, state, step = restore_state(cfg, workdir)
    out = {"step": step, **{mode: {} for mode in modes}}
    base = evaluate(setup, state, num_batches=num_batches)
    for m in multiples:
        long_setup = setup if m == 1 else None
        for mode in modes:
            if m == 1:
                out[mode]["x1"] = base
                continue
            try:
                longer = longer_config(cfg, m, mode)
                long_setup = long_setup or build(longer)  # same parameters: only sequence shapes change
            except ConfigError as e:
                out[mode][f"x{m}"] = {"skipped": str(e)}
                continue
            out[mode][f"x{m}"] = evaluate(long_setup, state, num_batches=num_batches, task=make_task(longer, "eval"))
    return out


def load_rows(out: str) -> list[dict]:
    """Every finished run under ``out`` (one ``row.json`` per run directory)."""
    rows = []
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        path = os.path.join(out, name, "row.json")
        if os.path.exists(path):
            rows.append(json.load(open(path)))
    return rows


def run(entries, out: str, *, multiples, modes, num_batches: int | None = None, quiet: bool = True) -> list[dict]:
    """Train (or resume) and evaluate every ``(name, base, overrides, label)`` entry without a row."""
    os.makedirs(out, exist_ok=True)
    for name, base, overrides, label in entries:
        workdir = os.path.join(out, name)
        if os.path.exists(os.path.join(workdir, "row.json")):
            continue
        cfg = load_config(base, overrides)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            final = train_and_evaluate(cfg, workdir)
            if "preempted_at" in final:  # SIGTERM: the checkpoint is saved; the next call resumes
                raise SystemExit(f"{name}: preempted at step {final['preempted_at']}; rerun to continue")
            evals = evaluate_lengths(cfg, workdir, multiples, modes, num_batches)
        row = {"name": name, "block": label, "task": cfg.data.task, "d_model": cfg.model.d_model,
               "seq_len": cfg.data.seq_len, "num_kv_pairs": (cfg.data.options or {}).get("num_kv_pairs"),
               "vocab_size": cfg.model.vocab_size, "lr": cfg.optim.learning_rate, "steps": final["step"],
               "multiples": list(multiples), "eval": evals, "wall_s": round(time.perf_counter() - t0, 1)}
        print(json.dumps({k: row[k] for k in ("name", "steps", "wall_s")} |
                         {f"{mode}/{x}": round(v.get("accuracy", float("nan")), 3)
                          for mode in modes for x, v in evals[mode].items()}), flush=True)
        with open(os.path.join(workdir, "row.json"), "w") as f:
            json.dump(row, f, indent=2)
    rows = load_rows(out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def best_rows(rows, metric: str = "accuracy") -> dict:
    """Per ``(block, d_model, seq_len, num_kv_pairs)``: the run whose training-length ``metric`` is
    best over learning rates (highest accuracy; lowest loss)."""
    best = {}
    sign = -1.0 if metric == "loss" else 1.0
    for r in rows:
        key = (r["block"], r["d_model"], r["seq_len"], r["num_kv_pairs"])
        mode = next(k for k in r["eval"] if k != "step")
        v = sign * r["eval"][mode]["x1"][metric]
        if key not in best or v > best[key][0]:
            best[key] = (v, r)
    return {k: r for k, (_, r) in best.items()}


def _modes(rows):
    """The evaluation modes present in ``rows``, in order of appearance."""
    return list(dict.fromkeys(k for r in rows for k in r["eval"] if k != "step"))


def write_table(rows, out: str, metric: str = "accuracy") -> str:
    """Markdown table (one row per block and training point, its best learning rate; one column per
    length and mode), also written to ``<out>/results.md``."""
    best = best_rows(rows, metric)
    modes = _modes(rows)
    mults = sorted({m for r in rows for m in r["multiples"]})
    cols = []
    for mode in modes:
        for m in mults:
            if m == 1 and mode != modes[0]:
                continue
            cols.append((mode, m))
    head = ["block", "d", "T", "lr", "steps"] + [f"{m}x" + ("" if m == 1 else f" {mode}") for mode, m in cols]
    lines = [f"MQAR {metric}" if rows and rows[0]["task"] == "mqar" else f"{metric} per token",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (block, d, t, kv), r in best.items():
        cells = [block, str(d), str(t) + (f" ({kv} pairs)" if kv else ""), f"{r['lr']:g}", str(r["steps"])]
        for mode, m in cols:
            v = r["eval"][mode].get(f"x{m}", {})
            cells.append(f"{v[metric]:.3f}" if metric in v else ("skipped" if "skipped" in v else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines += distance_table(best, modes, mults)
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    return md


def distance_table(best: dict, modes, mults) -> list[str]:
    """MQAR only: accuracy by query distance (the task's ``accuracy_dist_<lo>_<hi>`` buckets) of each
    best run at each length, which separates "far from its key" from "at a new position"."""
    buckets = []
    for r in best.values():
        for mode in modes:
            for v in r["eval"].get(mode, {}).values():
                buckets += [k for k in v if k.startswith("accuracy_dist_") and k not in buckets]
    if not buckets:
        return []
    buckets.sort(key=lambda k: int(k.split("_")[2]))
    lines = ["", "Accuracy by query distance (tokens from the key's last write to the query):", "",
             "| block | length | " + " | ".join(k[len("accuracy_dist_"):].replace("_", "-") for k in buckets) + " |",
             "|---|---|" + "---|" * len(buckets)]
    for (block, d, t, kv), r in best.items():
        for mode in modes:
            for m in mults:
                if m == 1 and mode != modes[0]:
                    continue
                v = r["eval"].get(mode, {}).get(f"x{m}", {})
                if "accuracy" not in v:
                    continue
                where = f"{m}x" + ("" if m == 1 else f" {mode}")
                cells = [f"{v[k]:.2f}" if k in v else "" for k in buckets]
                lines.append(f"| {block} | {where} | " + " | ".join(cells) + " |")
    return lines


def plot(rows, out: str, metric: str = "accuracy") -> str:
    """``metric`` against evaluation length, one panel per mode, one line per block (best learning rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_rows(rows, metric)
    modes = _modes(rows)
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for (block, d, t, kv), r in best.items():
            pts = [(t * int(x[1:]), v[metric]) for x, v in r["eval"][mode].items() if metric in v]
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{block} (d={d})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel(metric)
        ax.set_title(f"trained at T={rows[0]['seq_len']}: {mode}")
        if metric == "accuracy":
            ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "length_extrapolation.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", default=DEFAULT_SWEEP)
    ap.add_argument("--study", default="mqar", help="a key of the sweep's STUDIES (mqar, text)")
    ap.add_argument("--out", default="")
    ap.add_argument("--blocks", default="", help="comma-separated subset of the sweep's blocks")
    ap.add_argument("--grid", nargs="*", default=[], help="d_model,seq_len,kv triples")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--lrs", default="", help="comma-separated learning rates (default: the sweep's)")
    ap.add_argument("--multiples", default="", help="comma-separated length multiples (default: the sweep's)")
    ap.add_argument("--eval-batches", type=int, default=0, help="eval batches per length (default: the config's)")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides for every run (key=value)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild table and figure")
    args = ap.parse_args(argv)
    mod = load_sweep(args.sweep)
    if args.study not in mod.STUDIES:
        ap.error(f"--study: expected one of {sorted(mod.STUDIES)}, got {args.study!r}")
    study = mod.STUDIES[args.study]
    out = args.out or os.path.join("runs", f"length_extrapolation_{args.study}")
    multiples = tuple(int(x) for x in args.multiples.split(",")) if args.multiples else tuple(mod.MULTIPLES)
    if 1 not in multiples or any(m < 1 for m in multiples):
        ap.error(f"--multiples must be positive and include 1 (the training length), got {multiples}")
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()] or None
    grid = [tuple(int(x) for x in g.split(",")) for g in args.grid] or None
    entries = mod.get_sweep(blocks=blocks, grid=grid, steps=args.steps or None, study=args.study,
                            learning_rates=[float(x) for x in args.lrs.split(",")] if args.lrs else None)
    entries = [(n, b, o + list(args.set), lab) for n, b, o, lab in entries]
    t0 = time.perf_counter()
    if args.report_only:
        rows = load_rows(out)
    else:
        rows = run(entries, out, multiples=multiples, modes=study["modes"], num_batches=args.eval_batches or None)
    if not rows:
        raise SystemExit(f"no finished run under {out}")
    metric = study["metric"]
    print(write_table(rows, out, metric))
    print("figure:", plot(rows, out, metric))
    print(f"wall time: {time.perf_counter() - t0:.0f} s on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    main()
