"""Fact-capacity study: recall of dense FFNs vs memory layers (and Engram with its controls) as the
number of facts grows, at matched per-token FLOPs (the grid and the FLOPs accounting:
``configs/sweeps/fact_capacity.py``).

    python -m benchmarks.fact_capacity --cpu                       # CPU grid (512, 2k, 8k facts)
    python -m benchmarks.fact_capacity                             # full grid (1k-64k facts, GPU)
    python -m benchmarks.fact_capacity --cpu --subject-length 1    # one token per subject (first study)
    python -m benchmarks.fact_capacity --cpu --facts 1024 --variants pkm,dense_f64
    python -m benchmarks.fact_capacity --report-only

Each run trains in ``<out>/<name>`` and writes ``<out>/<name>/row.json`` (so the sweep resumes
and several processes can share ``out``, as :mod:`benchmarks.sweep`); the rows of every finished
run are assembled into ``benchmarks/results/fact_capacity_names.{json,md,png}`` (one-token
subjects: ``fact_capacity.*``): held-out fact recall (and recall in the training phrasings)
per variant and number of facts, with parameters and per-token FLOPs, and the figure's three
panels (recall against the number of facts, against parameters, against FLOPs).
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
from flax import nnx

from benchmarks.runner import machine
from benchmarks.sweep import load_results
from memjax.data.pipeline import make_task
from memjax.model.lm import LM
from memjax.train import flops
from memjax.train.evaluate import restore_state
from memjax.train.loop import evaluate, train_and_evaluate

SWEEP = "configs/sweeps/fact_capacity.py"
CAPTION = ("Held-out fact recall (eval `fact_accuracy`: facts asked in phrasings never trained on; chance 1/64) "
           "of `A,X` models (d_model 32) after the same number of exposures per fact, one seed, {world}; variants, "
           "FLOPs accounting and steps: `configs/sweeps/fact_capacity.py`. Cells: held-out recall / recall asked in the "
           "training phrasings, where measured (total parameters, steps).")
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


def train_phrasing_recall(cfg, workdir: str) -> float:
    """``fact_accuracy`` of the run's final checkpoint on the eval split asked in the *training*
    phrasings (fresh sequences, ``eval_phrasings="train"``): how many facts the model stored, apart
    from whether it carries them over to phrasings it never saw (the held-out recall)."""
    setup, state, _ = restore_state(cfg, workdir)
    asked = copy.deepcopy(cfg)
    asked.data.options = {**cfg.data.options, "eval_phrasings": "train"}
    return float(evaluate(setup, state, task=make_task(asked, "eval"))["fact_accuracy"])


def run_entry(sweep, entry, out: str, *, quiet: bool = True) -> dict:
    """Train and evaluate one ``(name, variant, num_facts, steps, lr, subject_length, seed)`` entry;
    write and return its row."""
    name, variant, num_facts, steps, lr, names, seed = entry
    cfg = sweep.make_config(variant, num_facts, steps=steps, lr=lr, subject_length=names, seed=seed)
    workdir = os.path.join(out, name)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        final = train_and_evaluate(cfg, workdir)
    wall = time.perf_counter() - t0
    per_seq = sweep.facts_per_sequence(num_facts, subject_length=names)
    row = {"name": name, "variant": variant, "num_facts": num_facts, "subject_length": names, "seed": seed,
           "steps": final["step"], "lr": lr,
           "epochs": round(final["step"] * cfg.train.batch_size * per_seq / num_facts, 1),
           "params": count_params(cfg), **accounting(cfg), "block_flops": sweep.block_flops(variant),
           "model_flops": sweep.model_flops(variant, num_facts, subject_length=names),
           "fact_accuracy": final.get("fact_accuracy", float("nan")), "eval_loss": final.get("loss", float("nan")),
           "train_phrasing_recall": train_phrasing_recall(cfg, workdir),
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
            stored = f" / {r['train_phrasing_recall']:.3f}" if r and "train_phrasing_recall" in r else ""
            cells.append(f"{r['fact_accuracy']:.3f}{stored} ({r['params'] / 1e3:.0f}k, {r['steps']})" if r else "")
        lines.append(f"| {v} | {first['block_flops']:,} | " + " | ".join(cells) + " |")
    lines += ["", ("| variant | facts | params | of which sparse tables | embedding | forward FLOPs/token "
                   "| train FLOPs/token (memjax.train.flops) | steps | exposures/fact | recall "
                   "| recall in the training phrasings | wall s |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['num_facts']} | {r['params']:,} | {r.get('params_sparse', 0):,} | "
                     f"{r.get('params_embedding', 0):,} | {r['model_flops']:,} | {r.get('train_flops_repo', 0):,} | "
                     f"{r['steps']} | {r['epochs']:g} | {r['fact_accuracy']:.3f} | "
                     f"{r.get('train_phrasing_recall', float('nan')):.3f} | {r['wall_s']:.0f} |")
    names = {r.get("subject_length", 1) for r in rows}
    world = ("subjects named by one token each" if names == {1} else
             "subjects named by " + "/".join(map(str, sorted(names))) + " tokens of a fixed alphabet")
    md = "\n".join([CAPTION.format(world=world), "", *lines])
    with open(path_md, "w") as f:
        f.write(md + "\n")
    return md


def plot(rows, path_png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    facts = sorted({r["num_facts"] for r in rows})
    stored = any("train_phrasing_recall" in r for r in rows)
    fig, axes = plt.subplots(1, 4 if stored else 3, figsize=(21 if stored else 16, 4.5))
    style = {v: ("--" if v.startswith("dense") else ":" if "one_bucket" in v or "random" in v else "-")
             for v in variants}
    for v in variants:
        pts = sorted((r["num_facts"], r["fact_accuracy"]) for r in rows if r["variant"] == v)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o" + style[v], label=v)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("number of facts")
    axes[0].set_title("held-out recall vs number of facts")
    if stored:  # the same facts asked in the training phrasings: what the weights hold
        for v in variants:
            pts = sorted((r["num_facts"], r["train_phrasing_recall"]) for r in rows
                         if r["variant"] == v and "train_phrasing_recall" in r)
            axes[3].plot([p[0] for p in pts], [p[1] for p in pts], "o" + style[v], label=v)
        axes[3].set_xscale("log", base=2)
        axes[3].set_xlabel("number of facts")
        axes[3].set_title("recall in the training phrasings (stored)")
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
        ax.set_ylabel("fact recall" if ax is axes[-1] and stored else "held-out fact recall")
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
    ap.add_argument("--results", default="", help="prefix of the .json/.md/.png outputs (default: "
                    f"{RESULTS}_names for named subjects, {RESULTS} for one-token subjects)")
    ap.add_argument("--subject-length", type=int, default=0,
                    help="tokens per subject name (default: the sweep's SUBJECT_LENGTH; 1: one id per subject)")
    ap.add_argument("--cpu", action="store_true", help="the CPU grid: CPU_FACTS, CPU_VARIANTS, CPU_EPOCHS")
    ap.add_argument("--facts", default="", help="comma-separated numbers of facts (default: the grid's)")
    ap.add_argument("--variants", default="", help="comma-separated variants (default: the grid's)")
    ap.add_argument("--epochs", type=int, default=0, help="exposures per fact (default: the grid's)")
    ap.add_argument("--steps", type=int, default=0, help="fixed steps per run (overrides --epochs)")
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0, help="data and initialisation seed (runs of seed s > 0 "
                    "are reported in a table of their own: --seed s --report-only)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    sweep = load_sweep(args.sweep)
    facts = [int(x) for x in args.facts.split(",")] if args.facts else (sweep.CPU_FACTS if args.cpu else sweep.FACTS)
    variants = args.variants.split(",") if args.variants else (sweep.CPU_VARIANTS if args.cpu else list(sweep.VARIANTS))
    epochs = args.epochs or (sweep.CPU_EPOCHS if args.cpu else sweep.EPOCHS)
    names = args.subject_length or sweep.SUBJECT_LENGTH
    if names < 1:
        raise SystemExit(f"--subject-length must be >= 1, got {names}")
    results = args.results or ((RESULTS if names == 1 else RESULTS + "_names") + (f"_seed{args.seed}" if args.seed else ""))
    entries = sweep.get_sweep(variants=variants, facts=facts, epochs=epochs, steps=args.steps or None,
                              lr=args.lr or sweep.LEARNING_RATE, subject_length=names, seed=args.seed)
    t0 = time.perf_counter()
    rows = ([r for r in load_results(args.out) if "variant" in r] if args.report_only
            else run_sweep(sweep, entries, args.out))
    rows = [r for r in rows if r.get("subject_length", 1) == names and r.get("seed", 0) == args.seed]  # one table each
    for r in rows:  # rows written before a field was added
        cfg = sweep.make_config(r["variant"], r["num_facts"], steps=r["steps"], lr=r["lr"], subject_length=names,
                                seed=args.seed)
        if "train_flops_repo" not in r:
            r.update(accounting(cfg))
        workdir = os.path.join(args.out, r["name"])
        if "train_phrasing_recall" not in r and os.path.isdir(os.path.join(workdir, "checkpoints")):
            r["train_phrasing_recall"] = train_phrasing_recall(cfg, workdir)
            with open(os.path.join(workdir, "row.json"), "w") as f:
                json.dump(r, f, indent=2)
    print(report(rows, results, vars(args), order=list(sweep.VARIANTS)))
    print(f"sweep wall time: {time.perf_counter() - t0:.0f} s on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    main()
