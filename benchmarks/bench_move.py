"""MoVE (a value-embedding bank shared by every attention layer) vs the memory+ shared pool vs
plain attention, trained on the byte-level standard-library text corpus.

    python -m benchmarks.bench_move                  # three models, 300 steps each
    python -m benchmarks.bench_move --steps 50       # a quick look

Models (``configs/text_stdlib.py`` otherwise: byte-level, vocab 264, 4 heads), all with the same
width, length, batch, steps, learning rate, seed and data:

- ``A``: ``A,F,A,F`` (attention + MLP).
- ``MV``: ``MV,F,MV,F``: the attention layers are :class:`memjax.nn.move.MoVEAttention`, one bank of
  ``--slots`` value embeddings shared by both (dense mixture, ``top_k = 0``).
- ``M+shared``: ``A,F,M,A,F,M``: a ``memory_plus`` layer after each MLP, ``shared_pool=True`` (one
  product-key value table of ``n_keys^2`` rows for both), ``n_keys = sqrt(--slots)`` so the two
  memories hold the same number of ``d_model``-wide value rows.

The parameter counts differ a little (the table gives them): MoVE adds a per-layer router
``d_model x M`` and gate, memory+ its keys, query and gate projections. Reports held-out loss
(nats per byte) and next-byte accuracy on the eval split (held-out files), and the final training
loss. Uses :func:`benchmarks.bench_miras.train_lm` (AdamW, clip 1, warm-up + cosine). Writes
``benchmarks/results/move_text.json``.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np

import memjax.nn.move  # noqa: F401  (registers MV)
from benchmarks.bench_miras import train_lm
from benchmarks.runner import Table
from memjax.config import load_config
from memjax.data.pipeline import make_task

KEYS = ("inputs", "targets", "mask", "segment_ids")


def text_arrays(cfg, split: str, n: int, seed: int = 0) -> dict:
    """``n`` windows of ``split`` (random windows of the training split, the first ``n`` eval ones)."""
    task = make_task(cfg, split)
    idx = np.random.default_rng(seed).choice(len(task), size=n, replace=n > len(task)) if split == "train" \
        else np.arange(min(n, len(task)))
    items = [task[int(i)] for i in idx]
    return {key: np.stack([it[key] for it in items]) for key in KEYS}


def model_overrides(label: str, *, slots: int) -> list[str]:
    n_keys = round(math.sqrt(slots))
    if label == "A":
        return ["model.pattern=A,F,A,F"]
    if label == "MV":
        return ["model.pattern=MV,F,MV,F", f"model.blocks={{'move_attention': {{'num_slots': {slots}}}}}"]
    if label == "M+shared":
        return ["model.pattern=A,F,M,A,F,M",
                f"model.blocks={{'memory_plus': {{'shared_pool': True, 'n_keys': {n_keys}, 'knn': {min(8, n_keys)}}}}}"]
    raise ValueError(f"bench_move: unknown model {label!r}")


MODELS = ("A", "MV", "M+shared")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--slots", type=int, default=256, help="MoVE bank rows = memory+ value rows (n_keys^2)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = ap.parse_args(argv)
    base = [f"model.d_model={args.d_model}", f"data.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}"]
    cfg0 = load_config("configs/text_stdlib.py", base)
    train = text_arrays(cfg0, "train", args.steps * args.batch)
    evals = text_arrays(cfg0, "eval", args.eval_windows)
    table = Table("move_text", ["model", "params", "eval_loss", "accuracy", "final_train_loss", "train_s"],
                  out_dir=args.out_dir)
    for label in args.models:
        cfg = load_config("configs/text_stdlib.py", base + model_overrides(label, slots=args.slots))
        t0 = time.perf_counter()
        row = train_lm(cfg, [args.lr], train, evals, steps=args.steps, batch=args.batch, label=label)[0]
        table.add(dict(row, model=label, pattern=cfg.model.pattern))
        print(f"  ({label}: {time.perf_counter() - t0:.0f} s with compilation)", flush=True)
    return table.finish({"task": "byte-level text (Python standard library sources)", "d_model": args.d_model,
                         "seq_len": args.seq_len, "slots": args.slots, "steps": args.steps, "batch": args.batch,
                         "lr": args.lr, "eval_windows": args.eval_windows,
                         "note": "eval = held-out files; accuracy = next-byte argmax accuracy"})


if __name__ == "__main__":
    main()
