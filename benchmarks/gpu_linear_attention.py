"""Chunked gated delta rule, gated linear attention and Mamba-2 SSD on a GPU: memjax vs jax-linear-attention.

    python -m benchmarks.gpu_linear_attention [--out DIR] [--smoke]

Sizes (the issue's): ``B = 8, T = 4096, H = 16, K = V = 128``, bf16 q/k/v (and beta), float32
log decays, chunk 64; memjax accumulates states in float32. SSD uses the same sizes as the
scalar-decay family it belongs to (``P = V = 128`` channels per head, ``N = K = 128`` state,
one B/C group per head so every library does the same work): ``q = C, k = B, v = dt x,
g = dt A, scale = 1``.

Timed (median ms, see ``gpu_common``): forward (output only) and forward + backward
(``value_and_grad`` of ``sum(o * do)`` w.r.t. every input) for

- memjax's chunked XLA path under each matmul precision (``jax.default_matmul_precision``:
  XLA's default and ``BF16_BF16_F32``: bf16 operands with float32 accumulation);
- memjax's chunked path with the chunk-to-chunk state pass as Pallas (Triton) kernels
  (``impl="pallas"``, :mod:`memjax.kernels.chunk_pass`), once per launch tile in
  ``--tiles`` (``bv,num_warps,num_stages``); a tile that fails to compile is recorded as an error;
- jax-linear-attention (``jla.ops.linear_attention``) ``impl="mosaic_gpu"`` (its Pallas Mosaic
  GPU kernels) and ``impl="chunked"`` (its plain-JAX path), when the package is importable.

FLA's Triton kernels are timed by ``benchmarks/gpu_torch.py`` (a separate process). Checks:
memjax vs the float64 token-by-token recurrence on a small problem, memjax vs FLA's outputs
(``fla_check.npz`` from gpu_torch.py, when present) and memjax vs jla at the full size.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu_common import environment, jax_time_ms, markdown_table, out_dir, rel_err, write_json

MAIN = {"B": 8, "T": 4096, "H": 16, "K": 128, "V": 128}
SMOKE = {"B": 1, "T": 128, "H": 2, "K": 16, "V": 16}
CHECK = {"B": 2, "T": 256, "H": 4, "K": 64, "V": 64}
CHUNK = 64
PRECISIONS = ("default", "BF16_BF16_F32")


def la_inputs_np(size, seed):
    """float32 NumPy inputs in FLA's layout: q, k (L2-normalised), v, g (log decay), beta."""
    rng = np.random.default_rng(seed)
    b, t, h, k, v = size["B"], size["T"], size["H"], size["K"], size["V"]
    q = rng.standard_normal((b, t, h, k), np.float32)
    kk = rng.standard_normal((b, t, h, k), np.float32)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    vv = rng.standard_normal((b, t, h, v), np.float32)
    g = -np.log1p(np.exp(rng.standard_normal((b, t, h), np.float32) - 3.0)).astype(np.float32)  # -softplus
    beta = (1 / (1 + np.exp(-rng.standard_normal((b, t, h), np.float32)))).astype(np.float32)
    return {"q": q, "k": kk, "v": vv, "g": g, "beta": beta}


def memjax_ops(chunk=CHUNK, impl="xla", interpret=None):
    from memjax.memory.delta import delta_rule
    from memjax.memory.linear import linear_attention
    from memjax.memory.ssm import selective_scan

    def ssd(q, k, v, g):
        # Mamba-2's SSD with x = v, B = k, C = q, dt = -g, A = -1 per head:
        # h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T = exp(g_t) h_{t-1} - g_t v_t k_t^T, y_t = h_t C_t,
        # i.e. simple_gla with v' = -g v and scale 1 (what jla_ops passes to jla).
        h = v.shape[2]
        return selective_scan(v, -g, -jnp.ones((h,), jnp.float32), k, q, chunk_size=chunk, **kw)

    kw = dict(impl=impl, interpret=interpret)
    return {
        "gated_delta_rule": (lambda q, k, v, g, beta: delta_rule(q, k, v, beta, g=g, chunk_size=chunk, **kw),
                             ("q", "k", "v", "g", "beta")),
        "gated_linear_attention": (lambda q, k, v, g: linear_attention(q, k, v, g=g, chunk_size=chunk, **kw),
                                   ("q", "k", "v", "g")),
        "ssd": (ssd, ("q", "k", "v", "g")),
    }


def jla_ops(impl):
    from jla.ops import linear_attention as jla_la

    return {
        "gated_delta_rule": (lambda q, k, v, g, beta: jla_la("gated_deltanet", q, k, v, g=g, beta=beta, impl=impl),
                             ("q", "k", "v", "g", "beta")),
        "gated_linear_attention": (lambda q, k, v, g: jla_la("simple_gla", q, k, v, g=g, impl=impl),
                                   ("q", "k", "v", "g")),
        # SSD as simple_gla: v = dt x with dt = -g (memjax's ssd below takes x = v, dt = -g, A = -1).
        "ssd": (lambda q, k, v, g: jla_la("simple_gla", q, k, (v * -g[..., None]).astype(v.dtype), g=g, scale=1.0,
                                          impl=impl), ("q", "k", "v", "g")),
    }


def device_inputs(x_np, dtype):
    return {k: jnp.asarray(v, jnp.float32 if k == "g" else dtype) for k, v in x_np.items()}


def timings(fn, names, x, iters):
    args = [x[n] for n in names]
    fwd = jax.jit(lambda *a: fn(*a)[0])
    do = jax.random.normal(jax.random.key(3), fwd.eval_shape(*args).shape, jnp.float32)

    def loss(*a):
        return jnp.sum(fn(*a)[0].astype(jnp.float32) * do)

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
    return {"fwd_ms": jax_time_ms(fwd, *args, iters=iters), "fwd_bwd_ms": jax_time_ms(fwd_bwd, *args, iters=iters)}


@contextlib.contextmanager
def chunk_tile(tile):
    """Run with ``tile`` as the chunk-recurrence kernels' default launch shape (restored after)."""
    from memjax.kernels import chunk_pass_pallas as crp

    saved = crp.GPU_TILE
    crp.GPU_TILE = tile or saved
    try:
        yield
    finally:
        crp.GPU_TILE = saved


def parse_tile(text):
    from memjax.kernels.chunk_pass_pallas import Tile

    bv, warps, stages = (int(x) for x in text.split(","))
    return Tile(bv=bv, num_warps=warps, num_stages=stages)


def precision_scope(name):
    return contextlib.nullcontext() if name == "default" else jax.default_matmul_precision(name)


def checks(smoke, out, precisions=PRECISIONS, pallas=True):
    """Relative errors of memjax's chunked forms (float32 inputs) vs float64 recurrence and vs FLA:
    the XLA path under each precision and (``pallas``) the Pallas state pass; on a CPU (smoke
    runs) the kernels run in interpret mode."""
    rows = []
    size = SMOKE if smoke else CHECK
    x_np = la_inputs_np(size, seed=7)
    variants = [(prec, memjax_ops()) for prec in precisions]
    if pallas:
        interpret = True if jax.default_backend() == "cpu" else None
        variants.append(("pallas", memjax_ops(impl="pallas", interpret=interpret)))
    fla_path = os.path.join(out_dir(out), "fla_check.npz")
    fla = dict(np.load(fla_path)) if os.path.exists(fla_path) else None
    if fla is not None:
        x_np = {k: fla[k] for k in ("q", "k", "v", "g", "beta")}  # exactly the inputs FLA saw
    for op, (_, names) in variants[0][1].items():
        with jax.enable_x64(True):  # the float64 reference once per op, not per variant
            o64, s64 = jax.jit(_recurrent(op))(*[jnp.asarray(x_np[n], jnp.float64) for n in names])
            o64, s64 = np.asarray(o64), np.asarray(s64)
        for prec, ops in variants:
            fn = ops[op][0]
            with precision_scope("default" if prec == "pallas" else prec):
                o, s = jax.jit(fn)(*[jnp.asarray(x_np[n]) for n in names])
            row = {"op": op, "precision": prec, "vs_float64_o": rel_err(o, o64), "vs_float64_state": rel_err(s, s64)}
            fla_op = {"gated_delta_rule": "gated_delta_rule", "gated_linear_attention": "simple_gla"}.get(op)
            if fla is not None and fla_op:
                row["vs_fla_o"] = rel_err(o, fla[f"{fla_op}_o"])
                row["vs_fla_state"] = rel_err(s, fla[f"{fla_op}_state"])
            rows.append(row)
            print(row, flush=True)
    return rows


def _recurrent(op):
    from memjax.memory.delta import delta_rule
    from memjax.memory.linear import linear_attention
    from memjax.memory.ssm import selective_scan

    if op == "gated_delta_rule":
        return lambda q, k, v, g, beta: delta_rule(q, k, v, beta, g=g, mode="recurrent")
    if op == "gated_linear_attention":
        return lambda q, k, v, g: linear_attention(q, k, v, g=g, mode="recurrent")
    return lambda q, k, v, g: selective_scan(v, -g, -jnp.ones((v.shape[2],), g.dtype), k, q, mode="recurrent")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--jla-impls", nargs="*", default=["mosaic_gpu"], choices=["mosaic_gpu", "chunked"])
    ap.add_argument("--tiles", nargs="*", default=["64,8,1", "32,8,1"],
                    help="chunk-recurrence Pallas tiles 'bv,num_warps,num_stages' to time; none: skip the kernels")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    size = SMOKE if args.smoke else MAIN
    result = {"environment": environment(), "size": size, "chunk": CHUNK, "timings": [], "agreement": []}
    try:
        result["checks"] = checks(args.smoke, args.out, args.precisions, pallas=bool(args.tiles))
    except Exception:  # noqa: BLE001
        result["checks"] = {"error": traceback.format_exc()[-2000:]}
        print(result["checks"]["error"], flush=True)
    x = device_inputs(la_inputs_np(size, seed=0), jnp.bfloat16)
    impls = [(f"memjax chunked XLA ({p})", memjax_ops, p, None) for p in args.precisions]
    interpret = True if jax.default_backend() == "cpu" else None  # smoke runs on a CPU
    impls += [(f"memjax Pallas bv{t.bv} w{t.num_warps} s{t.num_stages}",
               lambda: memjax_ops(impl="pallas", interpret=interpret), "default", t)
              for t in map(parse_tile, args.tiles)]
    impls += [(f"jla {i}", lambda i=i: jla_ops(i), "default", None) for i in args.jla_impls]
    outputs = {}
    for label, make, prec, tile in impls:
        try:
            ops = make()
        except Exception as err:  # noqa: BLE001 - jla not installed: say so
            result["timings"].append({"impl": label, "error": repr(err)[:300]})
            print(label, "unavailable:", err, flush=True)
            continue
        for op, (fn, names) in ops.items():
            row = {"impl": label, "op": op, **size}
            try:
                with precision_scope(prec), chunk_tile(tile):
                    row.update(timings(fn, names, x, args.iters))
                    outputs[(label, op)] = np.asarray(jax.jit(lambda *a: fn(*a)[0])(*[x[n] for n in names]),
                                                      np.float32)
            except Exception as err:  # noqa: BLE001 - e.g. a kernel that does not support the shape
                row["error"] = repr(err)[:300]
            result["timings"].append(row)
            print(row, flush=True)
            write_json("gpu_linear_attention", result, args.out)  # keep what is done if time runs out
    ref_label = "memjax chunked XLA (default)"
    for (label, op), o in outputs.items():
        if label != ref_label and (ref_label, op) in outputs:
            result["agreement"].append({"impl": label, "op": op, "rel_err_vs_memjax_default": rel_err(o, outputs[(ref_label, op)])})
    result["seconds"] = time.perf_counter() - t0
    write_json("gpu_linear_attention", result, args.out)
    print(markdown_table([r for r in result["timings"] if "fwd_ms" in r], ["impl", "op", "fwd_ms", "fwd_bwd_ms"]))
    print(markdown_table(result["agreement"], ["impl", "op", "rel_err_vs_memjax_default"]))
    return result


if __name__ == "__main__":
    main()
