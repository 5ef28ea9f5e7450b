"""Titans neural memory and mixture-of-memories: chunked vs recurrent, forward + backward.

    python -m benchmarks.bench_titans            # T in {512, 2048, 8192}
    python -m benchmarks.bench_titans --quick    # T in {512, 2048}, fewer repeats

For each op and length: median wall time of one jitted ``value_and_grad`` (loss through the output
and the final state, gradients w.r.t. every input) and XLA's planned temporary memory of that
executable (a peak-memory proxy), for the chunked form and the token-by-token recurrent form.
For Titans the two forms are different algorithms (chunk-start gradients vs per-token ones), so
this compares costs, not a speed-up at equal output. Shapes: B = 1, H = 4, K = V = 64, float32;
Titans chunk 16 (depth 1: linear memory; depth 2: MLP with hidden 128); MoM: 4 memories + shared,
top-2, gated delta rule, chunk 64. Writes ``benchmarks/results/titans[_quick].json``.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.runner import Table, loss_and_grad, time_and_memory
from memjax.memory.mixture import mixture_of_memories
from memjax.memory.neural_memory import titans

B, H, K, V = 1, 4, 64, 64
TITANS_CHUNK, MOM_CHUNK, MEMORIES, HIDDEN = 16, 64, 4, 128


def _unit(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True))


def titans_case(depth):
    def case(T, mode):
        ks = jax.random.split(jax.random.key(0), 8)
        q, k = _unit(jax.random.normal(ks[0], (2, B, T, H, K)))
        v = jax.random.normal(ks[1], (B, T, H, V))
        theta = 0.2 * jax.nn.sigmoid(jax.random.normal(ks[2], (B, T, H)))
        eta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
        alpha = 0.01 * jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
        dims = [K] + [HIDDEN] * (depth - 1) + [V]
        params0 = tuple(jax.random.normal(ks[5 + i], (H, a, b)) * a ** -0.5
                        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])))
        fn = lambda q, k, v, th, et, al, p0: titans(q, k, v, th, et, al, params0=p0, mode=mode,
                                                    chunk_size=TITANS_CHUNK)
        return loss_and_grad(fn, tuple(range(7))), (q, k, v, theta, eta, alpha, params0)
    return case


def mom_case(T, mode):
    ks = jax.random.split(jax.random.key(0), 6)
    mp = MEMORIES + 1
    q = _unit(jax.random.normal(ks[0], (B, T, H, K)))
    k = _unit(jax.random.normal(ks[1], (B, T, mp, H, K)))
    v = jax.random.normal(ks[2], (B, T, mp, H, V))
    logits = jax.random.normal(ks[3], (B, T, MEMORIES))
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, mp, H)))
    g = -jax.nn.softplus(jax.random.normal(ks[5], (B, T, mp, H)) - 3.0)
    fn = lambda q, k, v, r, b, g: mixture_of_memories(q, k, v, r, top_k=2, beta=b, g=g, memory="delta",
                                                      mode=mode, chunk_size=MOM_CHUNK)
    return loss_and_grad(fn, tuple(range(6))), (q, k, v, logits, beta, g)


OPS = {"titans_depth1": titans_case(1), "titans_depth2": titans_case(2), "mom_delta": mom_case}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T in {512, 2048}, 3 repeats")
    ap.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    ap.add_argument("--lengths", nargs="*", type=int, default=None, help="override the sequence lengths")
    args = ap.parse_args(argv)
    lengths = args.lengths or ((512, 2048) if args.quick else (512, 2048, 8192))
    repeats = 3 if args.quick else 5
    cols = ["op", "T", "chunked_ms", "recurrent_ms", "speedup", "chunked_temp_MiB", "recurrent_temp_MiB"]
    table = Table("titans_quick" if args.quick else "titans", cols)
    for op in args.ops:
        for T in lengths:
            c_ms, c_mem = time_and_memory(OPS[op], T, "chunked", repeats)
            r_ms, r_mem = time_and_memory(OPS[op], T, "recurrent", repeats)
            table.add({"op": op, "T": T, "chunked_ms": c_ms, "recurrent_ms": r_ms, "speedup": r_ms / c_ms,
                       "chunked_temp_MiB": c_mem, "recurrent_temp_MiB": r_mem})
    table.finish({"what": "forward + backward (value_and_grad), median wall time; temp memory of the executable",
                  "shapes": {"B": B, "H": H, "K": K, "V": V, "titans_chunk": TITANS_CHUNK, "hidden": HIDDEN,
                             "mom_chunk": MOM_CHUNK, "memories": MEMORIES, "top_k": 2}})


if __name__ == "__main__":
    main()
