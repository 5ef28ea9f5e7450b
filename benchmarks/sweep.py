"""Train and evaluate a list of configs; assemble one comparison table and figure.

    python -m benchmarks.sweep --sweep configs/sweeps/mqar_blocks.py --out runs/sweep_mqar
    python -m benchmarks.sweep ... --blocks A,D --grid 64,64,4      # a subset

Writes ``<out>/results.json``, ``<out>/results.md`` (best accuracy over learning rates per
block / width / task size) and ``<out>/accuracy_vs_state.png`` (accuracy against the
recurrent state size, Zoology's figure). Finished runs are skipped on rerun.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import time

import jax
from flax import nnx

from memjax.config import load_config
from memjax.model.lm import LM


def grid_entries(*, base, blocks, grid, learning_rates, steps, block_overrides, size_tag, task_overrides):
    """Sweep entries ``(name, base, overrides, label)`` for every learning rate x grid point
    ``(d_model, seq_len, size)`` x block: 2 layers of the block, early stop at 0.99, no
    checkpoints. ``task_overrides(seq_len, size)`` gives the task's own keys;
    ``block_overrides[block] = (label, extra overrides)``."""
    entries = []
    for lr in learning_rates:
        for d, seq, size in grid:
            for block in blocks:
                label, extra = block_overrides.get(block, (block, []))
                entries.append((f"{label}_d{d}_T{seq}_{size_tag}{size}_lr{lr:g}", base, [
                    f"model.pattern={block},{block}", f"model.d_model={d}", *task_overrides(seq, size),
                    f"optim.learning_rate={lr}", f"train.steps={steps}",
                    "train.eval_every=200", "train.target_accuracy=0.99", "train.progress=False",
                    "train.log_every=100", "train.checkpoint_every=100000", *extra,
                ], label))
    return entries


def state_size(cfg) -> int:
    """Elements of the decoding state at the training length (KV cache for attention)."""
    def build():
        return LM(cfg.model, rngs=nnx.Rngs(0)).init_cache(1, cfg.data.seq_len)

    return int(sum(x.size for x in jax.tree.leaves(jax.eval_shape(build))))


def load_results(out: str) -> list[dict]:
    """Every finished run under ``out``: one ``row.json`` per run directory (so several sweep
    processes can share ``out``), plus the rows of an older combined ``results.json``."""
    rows = {}
    legacy = os.path.join(out, "results.json")
    if os.path.exists(legacy):
        rows.update((r["name"], r) for r in json.load(open(legacy)))
    for name in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        path = os.path.join(out, name, "row.json")
        if os.path.exists(path):
            rows[name] = json.load(open(path))
    return list(rows.values())


def run_sweep(entries, out: str, size_key: str = "num_kv_pairs") -> list[dict]:
    """Train and evaluate each ``(name, base, overrides, label)`` entry not finished yet."""
    from memjax.train.loop import train_and_evaluate

    os.makedirs(out, exist_ok=True)
    finished = {r["name"] for r in load_results(out)}
    for name, base, overrides, label in entries:
        # row.json is re-checked: another sweep process sharing ``out`` may have finished it.
        if name in finished or os.path.exists(os.path.join(out, name, "row.json")):
            continue
        cfg = load_config(base, overrides)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            final = train_and_evaluate(cfg, os.path.join(out, name))
        row = {"name": name, "block": label, "d_model": cfg.model.d_model,
               "seq_len": cfg.data.seq_len, "num_kv_pairs": cfg.data.options.get(size_key),
               "task": cfg.data.task,
               "lr": cfg.optim.learning_rate, "steps": final["step"], "accuracy": final["accuracy"],
               "state_size": state_size(cfg), "wall_s": time.perf_counter() - t0}
        print(json.dumps(row), flush=True)
        with open(os.path.join(out, name, "row.json"), "w") as f:
            json.dump(row, f, indent=2)
    results = load_results(out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def best_over_lr(results):
    best = {}
    for r in results:
        key = (r["block"], r["d_model"], r["seq_len"], r["num_kv_pairs"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    return best


def write_table(results, out: str, size_key: str = "num_kv_pairs") -> str:
    """One row per block, one column per (width, length, task size) that was run: the best
    accuracy over learning rates, with that run's learning rate; then the decoding state size."""
    best = best_over_lr(results)
    points = sorted({k[1:] for k in best})  # (d_model, seq_len, size)
    blocks = list(dict.fromkeys(r["block"] for r in results))
    short = {"num_kv_pairs": "kv", "num_tokens": "copy"}.get(size_key, size_key)
    cols = [f"d={d}, T={t}, {short}={kv}" for d, t, kv in points]
    lines = ["| block | " + " | ".join(cols) + " | state size (d=%d, T=%d) |" % points[0][:2],
             "|---|" + "---|" * (len(cols) + 1)]
    for b in blocks:
        cells = []
        for p in points:
            r = best.get((b, *p))
            cells.append(f"{r['accuracy']:.3f} ({r['lr']:g})" if r else "")
        first = best.get((b, *points[0]))
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {first['state_size'] if first else ''} |")
    md = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")
    return md


def lr_sensitivity(results, within: float = 0.05) -> dict:
    """Per ``(block, d_model, seq_len, size)``: ``{"accuracy": {lr: acc}, "best": acc, "good": n}``,
    ``n`` the learning rates whose accuracy is within ``within`` of the best (Zoology's point that
    recurrent models solve MQAR only in a narrow window shows as a small ``n``)."""
    out = {}
    for r in results:
        key = (r["block"], r["d_model"], r["seq_len"], r["num_kv_pairs"])
        out.setdefault(key, {"accuracy": {}})["accuracy"][r["lr"]] = r["accuracy"]
    for v in out.values():
        v["best"] = max(v["accuracy"].values())
        v["good"] = sum(a >= v["best"] - within for a in v["accuracy"].values())
    return out


def write_lr_table(results, out: str, size_key: str = "num_kv_pairs") -> str:
    """``lr_sensitivity.md``: one row per block and point, the accuracy at every learning rate run,
    and how many rates come within 0.05 of the best."""
    sens = lr_sensitivity(results)
    lrs = sorted({r["lr"] for r in results})
    short = {"num_kv_pairs": "kv", "num_tokens": "copy"}.get(size_key, size_key)
    lines = ["| block | d | T | " + short + " | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | within 0.05 of best |",
             "|---|---|---|---|" + "---|" * (len(lrs) + 1)]
    for (b, d, t, kv), v in sorted(sens.items(), key=lambda kv_: (kv_[0][1:], kv_[0][0])):
        cells = [f"{v['accuracy'][lr]:.3f}" if lr in v["accuracy"] else "" for lr in lrs]
        lines.append(f"| {b} | {d} | {t} | {kv} | " + " | ".join(cells) + f" | {v['good']}/{len(v['accuracy'])} |")
    md = "\n".join(lines)
    with open(os.path.join(out, "lr_sensitivity.md"), "w") as f:
        f.write(md + "\n")
    return md


def plot(results, out: str, size_key: str = "num_kv_pairs", metric: str = "MQAR accuracy") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_over_lr(results)
    tasks = sorted({(k[2], k[3]) for k in best})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, (t, kv) in zip(axes[0], tasks):
        for b in dict.fromkeys(r["block"] for r in results):
            pts = sorted((r["state_size"], r["accuracy"]) for k, r in best.items() if k[0] == b and k[2:] == (t, kv))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=b)
        ax.set_xscale("log")
        ax.set_xlabel("decoding state size (elements)")
        ax.set_ylabel(metric)
        ax.set_title(f"T={t}, {size_key}={kv}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=7, ncol=2, loc="center right")
    fig.tight_layout()
    path = os.path.join(out, "accuracy_vs_state.png")
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default="configs/sweeps/mqar_blocks.py")
    ap.add_argument("--out", default="runs/sweep_mqar")
    ap.add_argument("--blocks", default="", help="comma-separated subset of the sweep's blocks")
    ap.add_argument("--grid", nargs="*", default=[], help="d_model,seq_len,kv triples")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--lrs", default="", help="comma-separated learning rates (default: the sweep's)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild table and figure")
    args = ap.parse_args(argv)
    spec = importlib.util.spec_from_file_location("sweep", args.sweep)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    grid = [tuple(int(x) for x in g.split(",")) for g in args.grid] or None
    entries = mod.get_sweep(blocks=args.blocks.split(",") if args.blocks else None, grid=grid,
                            steps=args.steps or None,
                            learning_rates=[float(x) for x in args.lrs.split(",")] if args.lrs else None)
    t0 = time.perf_counter()
    size_key = getattr(mod, "SIZE_KEY", "num_kv_pairs")
    results = load_results(args.out) if args.report_only else run_sweep(entries, args.out, size_key)
    print(write_table(results, args.out, size_key))
    print(write_lr_table(results, args.out, size_key))
    print("figure:", plot(results, args.out, size_key, getattr(mod, "METRIC", "MQAR accuracy")))
    print(f"sweep wall time: {time.perf_counter() - t0:.0f} s on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    main()
