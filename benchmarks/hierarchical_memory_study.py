"""Task result of the hierarchical memory bank: cluster-specific fact recall, with and without the bank.

    python -m benchmarks.hierarchical_memory_study            # 4 models x 800 steps (2 CPU cores: ~7 min)
    python -m benchmarks.hierarchical_memory_study --quick    # tiny, a few steps (the smoke test)
    python -m benchmarks.hierarchical_memory_study --models "A,F;A,HM"   # a subset

Data (:mod:`memjax.data.clustered_facts`, the preset ``configs/hierarchical_memory.py``): 16
document clusters, each with its own table of ``32 subjects x 4 relations`` facts (objects from 32
symbols), 2048 facts in all; a document opens with its cluster's marker token and states ~9 facts
of its cluster. The cluster id is the document's path in the bank's tree (``branching 4, depth 2``:
one leaf block per cluster, a level-1 block per 4 clusters; ``data.cluster_paths.method="label"``).

Models (one layer group, ``d_model 64``, all trained by the same loop, steps, batch and learning
rate schedule; the bank rows by the loop's row-wise Adam at the same learning rate):

- ``A,F``: attention + gated FFN (``4d`` hidden): the model without the bank;
- ``A,HM``: the same with the hierarchical memory FFN: the same gated FFN plus, per document, the
  two ``block_hidden``-unit blocks on its path fetched from a 20-block TensorStore bank (the only
  difference from ``A,F`` is the bank);
- ``A,F wide``: ``A,F`` with a wider FFN holding as many parameters as ``A,HM`` in all (device
  parameters + the whole bank): a dense model of the same total size;
- ``A,HM hashed paths``: ``A,HM`` with paths from the documents' hashed n-grams
  (``data.cluster_paths.method="ngram"``), blind to the cluster: the same bank, optimizer and
  parameters, without cluster-tied routing (the control for "the bank helps because of the routing").

Caveats: the bank is routed by the true cluster id (as the paper routes by a precomputed
clustering), while the dense models must read the cluster from the marker token; the bank rows get
the loop's row-wise Adam (no weight decay, no clipping), the device parameters AdamW with clipping.

Eval: 512 held-out documents stating facts in the training phrasings (recall of stored facts) and
in held-out phrasings; ``fact acc``: facts whose object is predicted right. Writes
``benchmarks/results/hierarchical_memory_study[_quick].json`` (or into ``--out-dir``).
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import jax
import numpy as np

# (registers the block and the task: the package __init__s may not list them)
import memjax.nn.hierarchical_memory  # noqa: F401
from benchmarks.runner import Table
from memjax.config import Config, load_config, options_from_dict, validate
from memjax.data.clustered_facts import ClusteredFactRecall
from memjax.data.pipeline import make_dataset
from memjax.train.loop import build, evaluate, open_host_tables, run_steps

MODELS = ("A,F", "A,HM", "A,F wide", "A,HM hashed paths")
COLUMNS = ["model", "pattern", "device_params", "bank_params", "total_params", "active_params", "steps",
           "train_loss", "eval_loss", "eval_acc", "fact_acc", "heldout_fact_acc", "train_s", "step_ms"]


PRESET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "hierarchical_memory.py")


def preset() -> Config:
    """The runnable preset ``configs/hierarchical_memory.py`` (validated)."""
    return load_config(PRESET)


def bank_params(cfg: Config) -> int:
    """Parameters of the whole bank of one ``hierarchical_memory`` block (``w1`` and ``w2``)."""
    o = cfg.model.blocks["hierarchical_memory"]
    blocks = sum(o["branching"] ** (l + 1) for l in range(o["depth"]))
    return blocks * 2 * cfg.model.d_model * o["block_hidden"]


def variants(base: Config, *, steps: int) -> list[tuple[str, Config]]:
    """``(name, config)`` of the three models (module docstring), from the preset ``base``."""
    out = []
    hidden = base.model.resolved_mlp_hidden
    for name in MODELS:
        cfg = copy.deepcopy(base)
        cfg.train.steps = steps
        cfg.model.mlp_hidden = hidden
        if name.startswith("A,HM"):  # (the block's own gated FFN takes model.mlp_hidden, as F does)
            cfg.model.pattern = "A,HM"
            if name == "A,HM hashed paths":  # (paths from the text's n-grams: blind to the cluster)
                cfg.data.cluster_paths = {k: v for k, v in base.data.cluster_paths.items() if k in ("branching", "depth")}
        else:
            cfg.model.pattern = "A,F"
            cfg.data.cluster_paths = {}
            if name == "A,F wide":  # (a gated FFN has 3 d x hidden weights: match the bank's parameters)
                cfg.model.mlp_hidden = hidden + round(bank_params(base) / (3 * base.model.d_model))
        validate(cfg)
        out.append((name, cfg))
    return out


def run_variant(name: str, cfg: Config, root: str, *, eval_batches: int) -> dict:
    """Train ``cfg`` for ``cfg.train.steps`` steps with the loop's own step (bank fetch / write-back
    included) and evaluate on both phrasing sets; one row of the table."""
    setup = build(cfg, devices=jax.devices()[:1])
    open_host_tables(setup, root, fresh=True)
    with jax.set_mesh(setup.mesh):
        state = setup.init_fn()
    device_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state["params"]))
    it = iter(make_dataset(cfg, "train"))
    losses, times = [], []
    for _ in range(cfg.train.steps):
        t0 = time.perf_counter()
        state, metrics = run_steps(setup, state, next(it))
        losses.append(jax.block_until_ready(metrics["loss"]))  # (a dense step would only time its dispatch)
        times.append(time.perf_counter() - t0)
    losses = [float(x) for x in jax.device_get(losses)]
    row = {"model": name, "pattern": cfg.model.pattern, "device_params": device_params, "steps": cfg.train.steps,
           "train_loss": float(np.mean(losses[-max(1, len(losses) // 10):])), "train_s": sum(times),
           "step_ms": 1e3 * float(np.median(times[1:] or times))}  # (the first step compiles)
    bank = bank_params(cfg) if setup.host_modules else 0
    # Active per token: every device parameter, plus the fetched blocks (depth of them per table).
    hm = cfg.model.blocks.get("hierarchical_memory", {})
    active = device_params + (hm["depth"] * 2 * cfg.model.d_model * hm["block_hidden"] if bank else 0)
    row.update(bank_params=bank, total_params=device_params + bank, active_params=active)
    for key, phrasings in (("", "train"), ("heldout_", "heldout")):
        opts = options_from_dict(ClusteredFactRecall.Options, {**cfg.data.options, "eval_phrasings": phrasings},
                                 "data.options")
        task = ClusteredFactRecall(opts, seq_len=cfg.data.seq_len, vocab_size=cfg.model.vocab_size, split="eval",
                                   num_examples=cfg.data.num_eval_examples, seed=cfg.data.seed)
        ev = evaluate(setup, state, num_batches=eval_batches, task=task)
        if not key:
            row.update(eval_loss=ev["loss"], eval_acc=ev["accuracy"])
        row[f"{key}fact_acc"] = ev["fact_accuracy"]
    return row


def quick_config() -> Config:
    """The preset at toy size (the smoke test): 4 clusters, d_model 16, a few steps."""
    cfg = preset()
    cfg.model.d_model, cfg.model.vocab_size = 16, 64
    cfg.model.blocks = {"hierarchical_memory": {"branching": 2, "depth": 2, "block_hidden": 4, "fetch_rows": 8}}
    cfg.data.cluster_paths = {**cfg.data.cluster_paths, "branching": 2, "depth": 2}
    cfg.data.options = {**cfg.data.options, "num_clusters": 4, "num_subjects": 8, "num_words": 4}
    cfg.data.seq_len, cfg.data.num_eval_examples = 24, 8
    cfg.train.batch_size, cfg.train.progress = 4, False
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="toy sizes, 3 steps")
    ap.add_argument("--steps", type=int, default=None, help="train steps per model (default 800; --quick 3)")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--models", default=";".join(MODELS), help=f"';'-separated subset of {MODELS}")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(";")]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {MODELS}")
    base = quick_config() if args.quick else preset()
    base.train.progress = False
    steps = args.steps or (3 if args.quick else base.train.steps)
    eval_batches = 1 if args.quick else base.data.num_eval_examples // base.train.batch_size
    table = Table("hierarchical_memory_study_quick" if args.quick else "hierarchical_memory_study", COLUMNS,
                  out_dir=args.out_dir)
    print(" | ".join(COLUMNS))
    for name, cfg in variants(base, steps=steps):
        if name not in names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            table.add(run_variant(name, cfg, tmp, eval_batches=eval_batches))
    table.finish({"what": "cluster-specific fact recall (memjax.data.clustered_facts): eval over held-out documents, "
                          "facts in the training phrasings (fact_acc) and in held-out phrasings; same steps, batch "
                          "and learning-rate schedule for every model",
                  "config": "configs/hierarchical_memory.py" + (" (quick sizes)" if args.quick else ""),
                  "data_options": dict(base.data.options), "batch_size": base.train.batch_size,
                  "learning_rate": base.optim.learning_rate,
                  "bank": dict(base.model.blocks["hierarchical_memory"])})
    return table.rows


if __name__ == "__main__":
    main()
