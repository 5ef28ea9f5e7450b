"""Associative matrix memory: chunked vs token-by-token recurrent, forward + backward.

    python -m benchmarks.bench_associative            # T in {512, 2048, 4096, 8192}
    python -m benchmarks.bench_associative --quick    # T in {512, 4096}

For gated linear attention and the gated delta rule at each length: median wall time of one
jitted ``value_and_grad`` (loss through the output and the final state, gradients w.r.t. q, k, v,
(beta,) g) and XLA's planned temporary memory of that executable
(``compiled.memory_analysis().temp_size_in_bytes``, a peak-memory proxy), for the chunked form
(chunk 64) and the recurrent form, with their ratios. Shapes: B = 1, H = 4, K = V = 64, float32.
Writes ``benchmarks/results/associative[_quick].json``.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.runner import Table, loss_and_grad, time_and_memory
from memjax.memory.delta import delta_rule
from memjax.memory.linear import linear_attention

B, H, K, V, CHUNK = 1, 4, 64, 64, 64


def _inputs(T):
    ks = jax.random.split(jax.random.key(0), 5)
    q, k = jax.random.normal(ks[0], (2, B, T, H, K))
    k = k * jax.lax.rsqrt(jnp.sum(k * k, -1, keepdims=True))
    v = jax.random.normal(ks[1], (B, T, H, V))
    g = -jax.nn.softplus(jax.random.normal(ks[2], (B, T, H)) - 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
    return q, k, v, beta, g


def linear_attention_case(T, mode):
    q, k, v, _, g = _inputs(T)
    fn = lambda q, k, v, g: linear_attention(q, k, v, g=g, mode=mode, chunk_size=CHUNK)
    return loss_and_grad(fn, (0, 1, 2, 3)), (q, k, v, g)


def gated_delta_rule_case(T, mode):
    q, k, v, beta, g = _inputs(T)
    fn = lambda q, k, v, beta, g: delta_rule(q, k, v, beta, g=g, mode=mode, chunk_size=CHUNK)
    return loss_and_grad(fn, (0, 1, 2, 3, 4)), (q, k, v, beta, g)


OPS = {"gated_linear_attention": linear_attention_case, "gated_delta_rule": gated_delta_rule_case}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T in {512, 4096}")
    ap.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    ap.add_argument("--lengths", nargs="*", type=int, default=None, help="override the sequence lengths")
    args = ap.parse_args(argv)
    lengths = args.lengths or ((512, 4096) if args.quick else (512, 2048, 4096, 8192))
    repeats = 5
    cols = ["op", "T", "chunked_ms", "recurrent_ms", "speedup", "chunked_temp_MiB", "recurrent_temp_MiB",
            "memory_ratio"]
    table = Table("associative_quick" if args.quick else "associative", cols)
    for op in args.ops:
        for T in lengths:
            c_ms, c_mem = time_and_memory(OPS[op], T, "chunked", repeats)
            r_ms, r_mem = time_and_memory(OPS[op], T, "recurrent", repeats)
            table.add({"op": op, "T": T, "chunked_ms": c_ms, "recurrent_ms": r_ms, "speedup": r_ms / c_ms,
                       "chunked_temp_MiB": c_mem, "recurrent_temp_MiB": r_mem,
                       "memory_ratio": r_mem / max(c_mem, 1e-9)})
    table.finish({"what": "forward + backward (value_and_grad), median wall time; temp memory of the executable",
                  "shapes": {"B": B, "H": H, "K": K, "V": V, "chunk_size": CHUNK}})


if __name__ == "__main__":
    main()
