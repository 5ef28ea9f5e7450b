"""The CPU training step with and without the projection guard (:mod:`memjax.nn.dense`).

    python -m benchmarks.bench_dense_guard                       # D:64 D:256 M2:256 A:256, 2 rounds (~4 min)
    python -m benchmarks.bench_dense_guard --models D:256 --rounds 3

For each ``block:T``: a 2-layer d=64 MQAR model (``configs/mqar_tiny.py``, vocabulary 512, 16 pairs,
batch 64) built by the training loop on 1 device, once with the guard (what ``memjax-train`` runs
on CPU) and once with it replaced by a no-op, alternating for ``--rounds``; the median seconds of 11
train steps after a warm-up step. Writes ``benchmarks/results/dense_guard.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import time

import jax

from benchmarks.runner import Table
from memjax.config import load_config
from memjax.data.pipeline import make_dataset

loop = importlib.import_module("memjax.train.loop")  # (memjax.train re-exports functions by module names)


def step_seconds(cfg, batches, guard) -> float:
    """Median wall time of a train step over ``batches[1:]`` with ``guard`` as the loop's context."""
    original = loop.materialized_inputs
    loop.materialized_inputs = guard  # (read when the step is traced: at its first call, below)
    try:
        setup = loop.build(cfg, devices=jax.devices()[:1])
        with jax.set_mesh(setup.mesh):
            state = setup.init_fn()
        state, m = loop.run_steps(setup, state, batches[0])  # compile
        jax.block_until_ready(m)
    finally:
        loop.materialized_inputs = original
    times = []
    for b in batches[1:]:
        t0 = time.perf_counter()
        state, m = loop.run_steps(setup, state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["D:64", "D:256", "M2:256", "A:256"], help="block:seq_len")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=11, help="timed steps per build")
    args = ap.parse_args(argv)
    plain = lambda enabled=True: contextlib.nullcontext()
    table = Table("dense_guard", ["model", "round", "plain_s", "guard_s", "speed_up"])
    for spec in args.models:
        block, t = spec.split(":")
        cfg = load_config("configs/mqar_tiny.py", [f"model.pattern={block},{block}", "model.vocab_size=512",
                                                   f"data.seq_len={t}", "data.options={'num_kv_pairs': 16}"])
        it = iter(make_dataset(cfg, "train"))
        batches = [next(it) for _ in range(args.steps + 1)]
        for r in range(args.rounds):
            p = step_seconds(cfg, batches, plain)
            g = step_seconds(cfg, batches, loop.materialized_inputs)
            table.add({"model": f"{block}, T={t}", "round": r, "plain_s": p, "guard_s": g, "speed_up": p / g})
    table.finish({"what": "median seconds per train step, 2-layer d=64 MQAR, batch 64, 1 device; plain = the guard "
                          "replaced by a no-op", "steps": args.steps})


if __name__ == "__main__":
    main()
