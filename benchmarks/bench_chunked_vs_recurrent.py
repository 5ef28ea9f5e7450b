"""Chunked vs token-by-token recurrent form of every chunked sequence memory, forward + backward.

    python -m benchmarks.bench_chunked_vs_recurrent                 # T = 4096, best of 3 (~8 min on 2 cores)
    python -m benchmarks.bench_chunked_vs_recurrent --T 1024 4096 --repeats 5
    python -m benchmarks.bench_chunked_vs_recurrent --ops vector_g delta_product --json /tmp/x.json
    python -m benchmarks.bench_chunked_vs_recurrent --ops strong   # vector g, general (strong-decay) route

For each mechanism and length: the best wall time of one jitted ``value_and_grad`` (loss
``sum(output) + sum|final state|``, gradients w.r.t. every input) after one warm-up call, for
``mode="chunked"`` and ``mode="recurrent"``, and their ratio (recurrent / chunked: how many
times faster the chunked form is). Issue 18 asks for >= 10x at T = 4096 on CPU.

Shapes: the matrix memories use B = 1, H = 4, K = V = 64, float32, the library's default chunk
(64; the delta-rule family's is per platform, :func:`memjax.memory.chunking.delta_chunk_size`:
32 on CPU); ``mamba1_scan`` B = 1, D = 256, N = 16, chunk 16; ``selective_scan`` (Mamba-2 SSD) and
``mamba3`` B = 1, H = 4, P = 64, N = 64. The log-linear recurrent forms keep an ``[L, K, V]`` stack per token for the
backward (~3.5 GB at T = 4096): they are decoding forms. Writes ``benchmarks/results/chunked_vs_recurrent.json`` (or ``--json``).
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

from benchmarks.runner import Table, loss_and_grad, time_fn
from memjax.memory.chunking import delta_chunk_size
from memjax.memory.delta import delta_rule
from memjax.memory.delta_product import delta_product
from memjax.memory.dplr import dplr_delta_rule
from memjax.memory.gdn2 import gdn2
from memjax.memory.linear import linear_attention
from memjax.memory.log_linear import log_linear_attention, num_levels
from memjax.memory.log_linear_delta import log_linear_delta_rule
from memjax.memory.mamba1 import mamba1_scan
from memjax.memory.mamba3 import mamba3
from memjax.memory.mlstm import mlstm
from memjax.memory.ssm import selective_scan

B, H, K, V = 1, 4, 64, 64


def _normal(key, n, shape):
    return jax.random.normal(key, (n, *shape), jnp.float32)


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def linear_case(T, mode, *, gate):
    """``gate``: "scalar" (g [B, T, H]), "vector" (g [B, T, H, K], GLA), "bonus" (vector g and
    RWKV-6's u [H, K]) or "strong" (vector g 30 times stronger, ~ -2 per token on average, which
    takes the chunked form's general sub-chunk route instead of the factored one)."""
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = _normal(ks[0], 3, (B, T, H, K)) * 0.5
    gshape = (B, T, H) if gate == "scalar" else (B, T, H, K)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[1], gshape) + 3.0) * (30.0 if gate == "strong" else 1.0)
    args = [q, k, v, g]
    if gate == "bonus":
        args.append(jax.random.normal(ks[2], (H, K)) * 0.1)
        fn = lambda q, k, v, g, u: linear_attention(q, k, v, g=g, bonus=u, mode=mode)
    else:
        fn = lambda q, k, v, g: linear_attention(q, k, v, g=g, mode=mode)
    return loss_and_grad(fn, tuple(range(len(args)))), tuple(args)


def delta_case(T, mode):
    ks = jax.random.split(jax.random.key(1), 4)
    q, k, v = _normal(ks[0], 3, (B, T, H, K))
    beta = jax.nn.sigmoid(jax.random.normal(ks[1], (B, T, H)))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[2], (B, T, H)) + 3.0)
    fn = lambda q, k, v, beta, g: delta_rule(q, _unit(k), v, beta, g=g, mode=mode)
    return loss_and_grad(fn, (0, 1, 2, 3, 4)), (q, k, v, beta, g)


def delta_product_case(T, mode, *, nh=2):
    ks = jax.random.split(jax.random.key(2), 5)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k, v = _normal(ks[1], 2, (B, T, nh, H, K))
    beta = 2 * jax.nn.sigmoid(jax.random.normal(ks[2], (B, T, nh, H)))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H)) + 3.0)
    fn = lambda q, k, v, beta, g: delta_product(q, _unit(k), v, beta, g, mode=mode)
    return loss_and_grad(fn, (0, 1, 2, 3, 4)), (q, k, v, beta, g)


def mlstm_case(T, mode):
    ks = jax.random.split(jax.random.key(3), 3)
    q, k, v = _normal(ks[0], 3, (B, T, H, K))
    i, f = _normal(ks[1], 2, (B, T, H))
    fn = lambda q, k, v, i, f: mlstm(q, k, v, i, f + 3.0, mode=mode)
    return loss_and_grad(fn, (0, 1, 2, 3, 4)), (q, k, v, i, f)


def mamba1_case(T, mode):
    d, n = 256, 16
    ks = jax.random.split(jax.random.key(4), 4)
    u, delta = _normal(ks[0], 2, (B, T, d))
    A = -jnp.exp(jax.random.normal(ks[1], (d, n)) * 0.5)
    Bm, Cm = _normal(ks[2], 2, (B, T, n)) * n ** -0.5
    # chunk 16: the mamba1 docstring's advice for large D * N (its chunked form builds a
    # [C, C, D, N] decay tensor per chunk; the default C = 64 took ~100 s here, forward + backward)
    fn = lambda u, delta, Bm, Cm: mamba1_scan(u, delta - 2.0, A, Bm, Cm, delta_softplus=True, mode=mode,
                                              chunk_size=16)
    return loss_and_grad(fn, (0, 1, 2, 3)), (u, delta, Bm, Cm)


def selective_case(T, mode):
    p, n = 64, 64
    ks = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(ks[0], (B, T, H, p))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (B, T, H)) - 2.0)
    A = -jnp.linspace(1.0, 4.0, H)
    Bm, Cm = _normal(ks[2], 2, (B, T, 1, n)) * n ** -0.5
    fn = lambda x, dt, Bm, Cm: selective_scan(x, dt, A, Bm, Cm, mode=mode)
    return loss_and_grad(fn, (0, 1, 2, 3)), (x, dt, Bm, Cm)


def kda_case(T, mode):
    ks = jax.random.split(jax.random.key(6), 4)
    q, k, v = _normal(ks[0], 3, (B, T, H, K))
    beta = jax.nn.sigmoid(jax.random.normal(ks[1], (B, T, H)))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[2], (B, T, H, K)) + 3.0)
    fn = lambda q, k, v, beta, g: delta_rule(q, _unit(k), v, beta, g=g, mode=mode)
    return loss_and_grad(fn, (0, 1, 2, 3, 4)), (q, k, v, beta, g)


def gdn2_case(T, mode):
    ks = jax.random.split(jax.random.key(7), 5)
    q, k, v = _normal(ks[0], 3, (B, T, H, K))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[1], (B, T, H, K)) + 3.0)
    b = jax.nn.sigmoid(jax.random.normal(ks[2], (B, T, H, K)))
    w = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H, V)))
    fn = lambda q, k, v, g, b, w: gdn2(q, _unit(k), v, g, b, w, mode=mode)
    return loss_and_grad(fn, (0, 1, 2, 3, 4, 5)), (q, k, v, g, b, w)


def dplr_case(T, mode):
    """The RWKV-7 regime: a = -kappa, b = kappa * a_gate with a unit kappa (contracting transitions)."""
    ks = jax.random.split(jax.random.key(8), 5)
    q, k, v, kappa = _normal(ks[0], 4, (B, T, H, K))
    gate = jax.nn.sigmoid(jax.random.normal(ks[1], (B, T, H, K)))
    g = -jnp.exp(-0.5) * jax.nn.sigmoid(jax.random.normal(ks[2], (B, T, H, K)))

    def fn(q, k, v, kappa, gate, g):
        kh = _unit(kappa)
        return dplr_delta_rule(q, k * K ** -0.5, v, -kh, kh * gate, g, mode=mode)

    return loss_and_grad(fn, (0, 1, 2, 3, 4, 5)), (q, k, v, kappa, gate, g)


def log_linear_case(T, mode, *, delta=False):
    ks = jax.random.split(jax.random.key(9), 4)
    q, k, v = _normal(ks[0], 3, (B, T, H, K))
    g = jax.nn.log_sigmoid(jax.random.normal(ks[1], (B, T, H)) + 3.0)
    lam = jax.nn.softplus(jax.random.normal(ks[2], (B, T, H, num_levels(T))))
    if delta:
        beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
        fn = lambda q, k, v, g, lam, beta: log_linear_delta_rule(q, _unit(k), v, beta, lam, g=g, mode=mode)
        return loss_and_grad(fn, (0, 1, 2, 3, 4, 5)), (q, k, v, g, lam, beta)
    fn = lambda q, k, v, g, lam: log_linear_attention(q, k, v, g, lam, mode=mode)
    return loss_and_grad(fn, (0, 1, 2, 3, 4)), (q, k, v, g, lam)


def mamba3_case(T, mode):
    """SISO with rotations on half the state pairs, the trapezoid weight lam data dependent."""
    p, n = 64, 64
    ks = jax.random.split(jax.random.key(10), 5)
    x = jax.random.normal(ks[0], (B, T, H, p))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (B, T, H)) - 2.0)
    A = -jnp.linspace(1.0, 4.0, H)
    Bm, Cm = _normal(ks[2], 2, (B, T, 1, n)) * n ** -0.5
    lam = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
    theta = jax.random.normal(ks[4], (B, T, H, n // 4))
    fn = lambda x, dt, Bm, Cm, lam, theta: mamba3(x, dt, A, Bm, Cm, lam=lam, theta=theta, mode=mode)
    return loss_and_grad(fn, (0, 1, 2, 3, 4, 5)), (x, dt, Bm, Cm, lam, theta)


OPS = {
    "linear_attention_scalar_g": lambda T, mode: linear_case(T, mode, gate="scalar"),
    "linear_attention_vector_g": lambda T, mode: linear_case(T, mode, gate="vector"),
    "linear_attention_vector_g_bonus": lambda T, mode: linear_case(T, mode, gate="bonus"),
    "delta_rule_scalar_g": delta_case,
    "delta_product_nh2": delta_product_case,
    "mlstm": mlstm_case,
    "mamba1_scan": mamba1_case,
    "selective_scan": selective_case,
    "kda": kda_case,
    "gdn2": gdn2_case,
    "dplr_delta_rule": dplr_case,
    "log_linear_attention": log_linear_case,
    "log_linear_delta_rule": lambda T, mode: log_linear_case(T, mode, delta=True),
    "mamba3": mamba3_case,
}
# Not in the default run: the vector-gate chunked form's slower general route (strong decays).
EXTRA = {"linear_attention_vector_g_strong": lambda T, mode: linear_case(T, mode, gate="strong")}
ALIASES = {"scalar_g": "linear_attention_scalar_g", "vector_g": "linear_attention_vector_g",
           "bonus": "linear_attention_vector_g_bonus", "delta_rule": "delta_rule_scalar_g",
           "delta_product": "delta_product_nh2", "strong": "linear_attention_vector_g_strong"}


def best_seconds(case, T, mode, repeats):
    fn, args = case(T, mode)
    return time_fn(fn, *args, warmup=1, repeats=repeats)["min_s"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[4096], help="sequence lengths")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per form (best is reported)")
    ap.add_argument("--ops", nargs="*", default=list(OPS),
                    choices=list(OPS) + list(EXTRA) + list(ALIASES))
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/chunked_vs_recurrent.json)")
    args = ap.parse_args(argv)
    ops = [ALIASES.get(o, o) for o in args.ops]
    name, out_dir = "chunked_vs_recurrent", None
    if args.json:
        out_dir, base = os.path.split(os.path.abspath(args.json))
        name = base[:-5] if base.endswith(".json") else base
    table = Table(name, ["mechanism", "T", "chunked_s", "recurrent_s", "ratio"], out_dir=out_dir)
    for op in ops:
        for T in args.T:
            case = {**OPS, **EXTRA}[op]
            c = best_seconds(case, T, "chunked", args.repeats)
            r = best_seconds(case, T, "recurrent", args.repeats)
            table.add({"mechanism": op, "T": T, "chunked_s": c, "recurrent_s": r, "ratio": r / c})
    table.finish({"what": "forward + backward (jit value_and_grad), best of --repeats after one warm-up; "
                          "ratio = recurrent / chunked",
                  "shapes": {"matrix_memories": dict(B=B, H=H, K=K, V=V, chunk=64,
                                                         delta_rule_family_chunk=delta_chunk_size(None)),
                             "mamba1_scan": dict(B=B, D=256, N=16, chunk=16),
                             "selective_scan": dict(B=B, H=H, P=64, N=64),
                             "mamba3": dict(B=B, H=H, P=64, N=64, rotated_pairs=16)},
                  "repeats": args.repeats})


if __name__ == "__main__":
    main()
