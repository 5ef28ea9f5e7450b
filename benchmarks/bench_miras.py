"""Miras models (Moneta, Yaad, Memora; matrix memory): chunked vs recurrent, forward + backward.

    python -m benchmarks.bench_miras             # T in {1024, 2048, 4096}
    python -m benchmarks.bench_miras --quick     # T in {1024}, 1 repeat

For each model and length: median wall time of one jitted ``value_and_grad`` (loss through the
output and the final state, gradients w.r.t. every input) and XLA's planned temporary memory of
that executable, for the chunked form (gradients at the chunk start, chunk 16) and the
token-by-token recurrent form. The two forms are different algorithms for these nonlinear models
(as for Titans), so this compares costs, not a speed-up at equal output. Shapes: B = 1, H = 2,
K = V = 32, float32. Writes ``benchmarks/results/miras[_quick].json``.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.runner import Table, loss_and_grad, time_and_memory
from memjax.memory.miras import PRESETS, miras

B, H, K, V = 1, 2, 32, 32
CHUNK = 16
MODELS = ("moneta", "yaad", "memora")


def _unit(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True))


def case_of(name):
    spec = PRESETS[name]

    def case(T, mode):
        ks = jax.random.split(jax.random.key(0), 6)
        q, k = _unit(jax.random.normal(ks[0], (2, B, T, H, K)))
        v = jax.random.normal(ks[1], (B, T, H, V))
        eta = 0.5 * jax.nn.sigmoid(jax.random.normal(ks[2], (B, T, H)))
        g = -0.05 * jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
        delta = jax.nn.softplus(jax.random.normal(ks[4], (B, T, H)))
        if name == "yaad":
            fn = lambda q, k, v, e, g, d: miras(q, k, v, spec, eta=e, g=g, delta=d, mode=mode, chunk_size=CHUNK)
            return loss_and_grad(fn, tuple(range(6))), (q, k, v, eta, g, delta)
        fn = lambda q, k, v, e, g: miras(q, k, v, spec, eta=e, g=g, mode=mode, chunk_size=CHUNK)
        return loss_and_grad(fn, tuple(range(5))), (q, k, v, eta, g)

    return case


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T in {1024}, 1 repeat")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--lengths", nargs="*", type=int, default=None, help="override the sequence lengths")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    lengths = args.lengths or ((1024,) if args.quick else (1024, 2048, 4096))
    repeats = args.repeats or (1 if args.quick else 3)
    cols = ["model", "T", "chunked_ms", "recurrent_ms", "speedup", "chunked_temp_MiB", "recurrent_temp_MiB"]
    table = Table("miras_quick" if args.quick else "miras", cols)
    for name in args.models:
        for T in lengths:
            c_ms, c_mem = time_and_memory(case_of(name), T, "chunked", repeats)
            r_ms, r_mem = time_and_memory(case_of(name), T, "recurrent", repeats)
            table.add({"model": name, "T": T, "chunked_ms": c_ms, "recurrent_ms": r_ms, "speedup": r_ms / c_ms,
                       "chunked_temp_MiB": c_mem, "recurrent_temp_MiB": r_mem})
    table.finish({"what": "forward + backward (value_and_grad), median wall time; temp memory of the executable",
                  "shapes": {"B": B, "H": H, "K": K, "V": V, "chunk": CHUNK},
                  "note": "matrix memory; chunked = gradients at the chunk start (Titans-style), a different "
                          "algorithm from recurrent for these nonlinear models"})


if __name__ == "__main__":
    main()
