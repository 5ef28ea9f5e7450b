"""Train-step throughput (tokens/s) of a model config on this machine.

    python -m benchmarks.bench_train --config configs/mqar_tiny.py [--set model.pattern=A,D] [--steps 20]
        [--devices N]

Prints tokens/s, compile time and XLA's planned temporary memory per device of the compiled
train step (``compiled.memory_analysis()``), e.g. to compare ``--devices 1`` with
``--devices 8 --set mesh.data=1 mesh.seq=8`` (sequence parallelism) at one long length.
"""
from __future__ import annotations

import argparse
import time

import jax

from benchmarks.runner import Table, memory_of
from memjax.config import load_config
from memjax.data.pipeline import make_dataset
from memjax.train.loop import build, to_global


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mqar_tiny.py")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--name", default="train_throughput")
    ap.add_argument("--devices", type=int, default=0, help="use the first N devices (0: all)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    setup = build(cfg, devices=jax.devices()[:args.devices] if args.devices else None)
    with jax.set_mesh(setup.mesh):
        state = setup.init_fn()
        batches = [to_global(setup, b) for b, _ in zip(iter(make_dataset(cfg, "train")), range(args.steps))]
        t0 = time.perf_counter()
        compiled = setup.train_step.lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - t0
        state, m = compiled(state, batches[0])  # warm-up
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for b in batches:
            state, m = compiled(state, b)
        jax.block_until_ready(state)
        dt = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    tokens = cfg.train.batch_size * cfg.data.seq_len * len(batches)
    mem = memory_of(compiled)
    table = Table(args.name, ["pattern", "params", "batch", "seq", "mesh", "step_ms", "tokens_per_s", "compile_s",
                              "temp_MiB_per_device"])
    table.add({"pattern": cfg.model.pattern, "params": n_params, "batch": cfg.train.batch_size,
               "seq": cfg.data.seq_len, "mesh": dict(setup.mesh.shape), "step_ms": 1e3 * dt / len(batches),
               "tokens_per_s": tokens / dt, "compile_s": compile_s,
               "temp_MiB_per_device": mem.get("temp_bytes", 0) / 2 ** 20})
    table.finish()


if __name__ == "__main__":
    main()
