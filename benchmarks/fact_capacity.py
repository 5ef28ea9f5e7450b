"""Fact-capacity study: recall of dense FFNs vs memory layers (and Engram with its controls) as the
number of facts grows, at matched per-token FLOPs (the grid and the FLOPs accounting:
``configs/sweeps/fact_capacity.py``).

    python -m benchmarks.fact_capacity --cpu                       # CPU grid (1k, 4k facts)
    python -m benchmarks.fact_capacity                             # full grid (1k-64k facts, GPU)
    python -m benchmarks.fact_capacity --cpu --facts 1024 --variants pkm,dense_f64
    python -m benchmarks.fact_capacity --report-only

Each run trains in ``<out>/<name>`` and writes ``<out>/<name>/row.json`` (so the sweep resumes
and several processes can share ``out``, as :mod:`benchmarks.sweep`); the rows of every finished
run are assembled into ``benchmarks/results/fact_capacity.{json,md,png}``: held-out fact recall
per variant and number of facts, with parameters and per-token FLOPs, and the figure's three
panels (recall against the number of facts, against parameters, against FLOPs).
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

from benchmarks.runner import machine
from benchmarks.sweep import load_results
from memjax.model.lm import LM
from memjax.train import flops
from memjax.train.loop import train_and_evaluate

SWEEP = "configs/sweeps/fact_capacity.py"
CAPTION = ("Held-out fact recall (eval `fact_accuracy`: facts asked in phrasings never trained on; chance 1/64) "
           "of `A,X` models (d_model 32) after the same number of exposures per fact, one seed; variants, "
           "FLOPs accounting and steps: `configs/sweeps/fact_capacity.py`. Cells: recall (total parameters, steps).")
RESULTS = "benchmarks/results/fact_capacity"


def load_sweep(path: str = SWEEP):
    spec = importlib.util.spec_from_file_location("fact_capacity_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def count_params(cfg) -> int:
    """Parameters of the model ``cfg.model`` builds (abstractly: nothing is allocated)."""
    state = nnx.state(nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(0))), nnx.Param)
    return int(sum(x.size for x in jax.tree.leaves(state)))


def accounting(cfg) -> dict:
    """Parameter split and the repository's own training-FLOPs count (:mod:`memjax.train.flops`,
    forward + backward), a cross-check of the sweep's forward count (``3 x model_flops``)."""
    state = nnx.state(nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(0))), nnx.Param)
    sparse = 0  # tables a token reads a few rows of: product-key values, n-gram tables
    for path, var in nnx.to_flat_state(state):
        if var.get_metadata().get("optim_group") == "memory_values" or path[-1] == "table":
            sparse += int(var.size)
    pc = flops.param_counts(cfg.model)
    return {"params_sparse": sparse, "params_embedding": pc["embedding"],
            "train_flops_repo": int(flops.flops_per_token(cfg.model, cfg.data.seq_len, pc["matmul"])["total"])}


def run_entry(sweep, entry, out: str, *, quiet: bool = True) -> dict:
    """Train and evaluate one ``(name, variant, num_facts, steps, lr)`` entry; write and return its row."""
    name, variant, num_facts, steps, lr = entry
    cfg = sweep.make_config(variant, num_facts, steps=steps, lr=lr)
    workdir = os.path.join(out, name)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        final = train_and_evaluate(cfg, workdir)
    wall = time.perf_counter() - t0
    row = {"name": name, "variant": variant, "num_facts": num_facts, "steps": final["step"], "lr": lr,
           "epochs": round(final["step"] * cfg.train.batch_size * sweep.facts_per_sequence(num_facts) / num_facts, 1),
           "params": count_params(cfg), **accounting(cfg), "block_flops": sweep.block_flops(variant),
           "model_flops": sweep.model_flops(variant, num_facts),
           "fact_accuracy": final.get("fact_accuracy", float("nan")), "eval_loss": final.get("loss", float("nan")),
           "wall_s": wall, "steps_per_s": final["step"] / wall}
    with open(os.path.join(workdir, "row.json"), "w") as f:
        json.dump(row, f, indent=2)
    return row


def run_sweep(sweep, entries, out: str) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    for entry in entries:
        if os.path.exists(os.path.join(out, entry[0], "row.json")):  # finished (here or by another process)
            continue
        print(json.dumps(run_entry(sweep, entry, out)), flush=True)
    return [r for r in load_results(out) if "variant" in r]


def write_table(rows, path_md: str) -> str:
    """One row per variant: block FLOPs, then per number of facts the recall (and parameters)."""
    facts = sorted({r["num_facts"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["num_facts"]): r for r in rows}
    head = "| variant | sub-layer FLOPs/token | " + " | ".join(
        f"recall @ {n} facts (params, steps)" for n in facts) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(facts)]
    for v in variants:
        first = next(r for r in rows if r["variant"] == v)
        cells = []
        for n in facts:
            r = by.get((v, n))
            cells.append(f"{r['fact_accuracy']:.3f} ({r['params'] / 1e3:.0f}k, {r['steps']})" if r else "")
        lines.append(f"| {v} | {first['block_flops']:,} | " + " | ".join(cells) + " |")
    lines += ["", ("| variant | facts | params | of which sparse tables | embedding | forward FLOPs/token "
                   "| train FLOPs/token (memjax.train.flops) | steps | exposures/fact | recall | wall s |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['num_facts']} | {r['params']:,} | {r.get('params_sparse', 0):,} | "
                     f"{r.get('params_embedding', 0):,} | {r['model_flops']:,} | {r.get('train_flops_repo', 0):,} | "
                     f"{r['steps']} | {r['epochs']:g} | {r['fact_accuracy']:.3f} | {r['wall_s']:.0f} |")
    md = "\n".join([CAPTION, "", *lines])
    with open(path_md, "w") as f:
        f.write(md + "\n")
    return md


def plot(rows, path_png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    facts = sorted({r["num_facts"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    style = {v: ("--" if v.startswith("dense") else ":" if "one_bucket" in v or "random" in v else "-")
             for v in variants}
    for v in variants:
        pts = sorted((r["num_facts"], r["fact_accuracy"]) for r in rows if r["variant"] == v)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o" + style[v], label=v)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("number of facts")
    axes[0].set_title("recall vs number of facts")
    for ax, key, label in ((axes[1], "params", "parameters"), (axes[2], "model_flops", "forward FLOPs / token")):
        markers = "os^vD"
        for i, n in enumerate(facts):
            for v in variants:
                r = next((r for r in rows if r["variant"] == v and r["num_facts"] == n), None)
                if r:
                    ax.scatter(r[key], r["fact_accuracy"], marker=markers[i % len(markers)],
                               color=f"C{variants.index(v) % 10}", label=f"{v}" if i == 0 else None)
            ax.annotate(f"{n} facts: " + markers[i % len(markers)], (0.02, 0.95 - 0.06 * i),
                        xycoords="axes fraction", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_title(f"recall vs {label}")
    for ax in axes:
        ax.set_ylabel("held-out fact recall")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    return path_png


def report(rows, results: str = RESULTS, args: dict | None = None, order=()) -> str:
    """Write ``results`` + ``.md`` (the table), ``.json`` (machine, args, rows) and ``.png`` (the figure);
    variants in ``order`` first, in that order, then the rest by name."""
    rank = {v: i for i, v in enumerate(order)}
    rows = sorted(rows, key=lambda r: (r["num_facts"], rank.get(r["variant"], len(rank)), r["name"]))
    md = write_table(rows, results + ".md")
    with open(results + ".json", "w") as f:
        json.dump({"name": "fact_capacity", "machine": machine(), "args": args or {}, "rows": rows}, f, indent=2)
    if rows:
        plot(rows, results + ".png")
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", default=SWEEP)
    ap.add_argument("--out", default="runs/fact_capacity")
    ap.add_argument("--results", default=RESULTS, help="prefix of the .json/.md/.png outputs")
    ap.add_argument("--cpu", action="store_true", help="the CPU grid: CPU_FACTS, CPU_VARIANTS, CPU_EPOCHS")
    ap.add_argument("--facts", default="", help="comma-separated numbers of facts (default: the grid's)")
    ap.add_argument("--variants", default="", help="comma-separated variants (default: the grid's)")
    ap.add_argument("--epochs", type=int, default=0, help="exposures per fact (default: the grid's)")
    ap.add_argument("--steps", type=int, default=0, help="fixed steps per run (overrides --epochs)")
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    sweep = load_sweep(args.sweep)
    facts = [int(x) for x in args.facts.split(",")] if args.facts else (sweep.CPU_FACTS if args.cpu else sweep.FACTS)
    variants = args.variants.split(",") if args.variants else (sweep.CPU_VARIANTS if args.cpu else list(sweep.VARIANTS))
    epochs = args.epochs or (sweep.CPU_EPOCHS if args.cpu else sweep.EPOCHS)
    entries = sweep.get_sweep(variants=variants, facts=facts, epochs=epochs, steps=args.steps or None,
                              lr=args.lr or sweep.LEARNING_RATE)
    t0 = time.perf_counter()
    rows = ([r for r in load_results(args.out) if "variant" in r] if args.report_only
            else run_sweep(sweep, entries, args.out))
    for r in rows:  # rows written before a field was added
        if "train_flops_repo" not in r:
            r.update(accounting(sweep.make_config(r["variant"], r["num_facts"], steps=r["steps"], lr=r["lr"])))
    print(report(rows, args.results, vars(args), order=list(sweep.VARIANTS)))
    print(f"sweep wall time: {time.perf_counter() - t0:.0f} s on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    main()
