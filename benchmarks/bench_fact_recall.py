"""Fact recall with memory layers: the same 2-block model with a dense FFN, product-key memory
(``pkm``), Memory+ (``memory_plus``), hashed n-grams (``ngram_mem``) or STEM (``stem_ffn``) as its
second block, trained on ``fact_recall`` with the one train/eval loop; final eval accuracy.

    python -m benchmarks.bench_fact_recall --quick          # a few minutes on a 2-core CPU
    python -m benchmarks.bench_fact_recall --steps 3000     # longer runs

Facts are stated in training phrasings and asked in held-out phrasings, so a model must
store ``(subject, relation) -> object`` in its parameters; the memory blocks add parameters
that a token reads sparsely. Rows report parameters, steps/s and eval ``fact_accuracy``.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
from flax import nnx

from benchmarks.runner import Table
from memjax.config import Config
from memjax.model.lm import LM
from memjax.train.loop import train_and_evaluate

VARIANTS = {  # name -> (second block, its options)
    "dense_ffn": ("F", {}),
    "pkm": ("P", {"n_keys": 32, "heads": 4, "knn": 8}),
    "memory_plus": ("M", {"n_keys": 32, "heads": 4, "knn": 8}),
    "ngram_mem": ("N", {"table_size": 1021}),
    "stem_ffn": ("T", {}),
}
BLOCK_NAMES = {"P": "pkm", "M": "memory_plus", "N": "ngram_mem", "T": "stem_ffn"}


def make_config(block: str, opts: dict, *, steps: int, d_model: int, batch: int, seq_len: int, lr: float,
                values_lr: float) -> Config:
    cfg = Config(name=f"fact_recall_{block}")
    cfg.data.task = "fact_recall"
    cfg.data.seq_len = seq_len
    cfg.data.options = {"num_subjects": 64, "num_relations": 4, "num_objects": 32, "num_templates": 8,
                        "num_eval_templates": 2}
    cfg.data.num_train_examples = steps * batch
    cfg.data.num_eval_examples = 256
    cfg.model.vocab_size = 128
    cfg.model.d_model = d_model
    cfg.model.num_heads = 2
    cfg.model.pattern = f"A,{block}"
    if block in BLOCK_NAMES:
        cfg.model.blocks = {BLOCK_NAMES[block]: dict(opts)}
    cfg.optim.learning_rate = lr
    cfg.optim.warmup_steps = max(steps // 20, 1)
    cfg.optim.memory_values_lr = values_lr
    cfg.train.steps = steps
    cfg.train.batch_size = batch
    cfg.train.eval_every = steps
    cfg.train.eval_batches = 256 // batch
    cfg.train.log_every = max(steps // 4, 1)
    cfg.train.checkpoint_every = 10 * steps
    cfg.train.async_checkpointing = False
    cfg.train.progress = False
    return cfg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="300 steps, d_model 64")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--d_model", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--values_lr", type=float, default=0.0,
                    help="optim.memory_values_lr for value tables (0: same optimizer as the rest)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = ap.parse_args(argv)
    steps, d_model = (300, 64) if args.quick else (args.steps, args.d_model)
    name = "fact_recall_quick" if args.quick else "fact_recall"
    table = Table(name, ["variant", "pattern", "params", "steps", "steps_per_s", "eval_loss", "eval_accuracy",
                         "fact_accuracy"])
    for variant in args.variants:
        block, opts = VARIANTS[variant]
        cfg = make_config(block, opts, steps=steps, d_model=d_model, batch=args.batch, seq_len=args.seq_len,
                          lr=args.lr, values_lr=args.values_lr)
        with tempfile.TemporaryDirectory() as workdir:
            t0 = time.perf_counter()
            final = train_and_evaluate(cfg, workdir)
            dt = time.perf_counter() - t0
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(
            lambda: LM(cfg.model, rngs=nnx.Rngs(0))), nnx.Param)))
        table.add({"variant": variant, "pattern": cfg.model.pattern, "params": n_params, "steps": final["step"],
                   "steps_per_s": final["step"] / dt, "eval_loss": final.get("loss", float("nan")),
                   "eval_accuracy": final.get("accuracy", float("nan")),
                   "fact_accuracy": final.get("fact_accuracy", float("nan"))})
    table.finish({"args": vars(args)})


if __name__ == "__main__":
    main()
