"""Causal attention on CPU: XLA's dense form vs the O(T)-memory chunked form, time and planned memory.

    python -m benchmarks.bench_attention                       # T = 256 .. 4096 (~5 min on 2 cores)
    python -m benchmarks.bench_attention --T 1024 --repeats 3 --json /tmp/a.json
    python -m benchmarks.bench_attention --block 128 256 512   # the chunked form's block size

For each length and ``impl`` (``xla`` / ``chunked`` of :func:`memjax.memory.attention.causal_attention`,
causal self-attention, default block sizes unless ``--block``): the temporaries XLA plans
(``compile().memory_analysis().temp_size_in_bytes``) and the median wall time of the jitted
forward and of the jitted forward + backward (``value_and_grad`` of ``sum(o * w)`` w.r.t.
``q, k, v``). Shapes: B = 1, H = 8, Hkv = 8, K = V = 64, float32. The dense form's temporaries
grow as ``T^2`` (the ``[B, H, T, T]`` logits and probabilities), the chunked form's as ``T``.
Writes ``benchmarks/results/attention_cpu.json`` (or ``--json``); ``auto`` uses the chunked form
from ``memjax.memory.attention.CHUNKED_MIN_LENGTH`` on, chosen from this table.
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

from benchmarks.runner import Table, memory_of, time_fn
from memjax.memory import flash_attention as flash
from memjax.memory.attention import causal_attention

B, H, HKV, D = 1, 8, 8, 64


def inputs(T: int, b: int = B, h: int = H, hkv: int = HKV, d: int = D):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, T, h, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, T, hkv, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, T, hkv, d), jnp.float32)
    w = jax.random.normal(ks[3], (b, T, h, d), jnp.float32)
    return q, k, v, w


def programs(impl: str):
    """``(forward, forward + backward)`` jitted for ``impl``."""
    fwd = jax.jit(lambda q, k, v: causal_attention(q, k, v, impl=impl))
    loss = lambda q, k, v, w: jnp.sum(causal_attention(q, k, v, impl=impl) * w)
    both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return fwd, both


def measure(T: int, impl: str, repeats: int, shape: dict | None = None) -> dict:
    q, k, v, w = inputs(T, **(shape or {}))
    fwd, both = programs(impl)
    mem_f = memory_of(fwd.lower(q, k, v).compile()).get("temp_bytes", -1)
    mem_b = memory_of(both.lower(q, k, v, w).compile()).get("temp_bytes", -1)
    t_f = time_fn(fwd, q, k, v, warmup=1, repeats=repeats)["median_s"]
    t_b = time_fn(both, q, k, v, w, warmup=1, repeats=repeats)["median_s"]
    return {"T": T, "impl": impl, "fwd_temp_MiB": mem_f / 2 ** 20, "fwd_bwd_temp_MiB": mem_b / 2 ** 20,
            "fwd_ms": 1e3 * t_f, "fwd_bwd_ms": 1e3 * t_b}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096], help="sequence lengths")
    ap.add_argument("--impls", nargs="+", default=["xla", "chunked"], choices=["xla", "chunked"])
    ap.add_argument("--block", type=int, nargs="+", default=None,
                    help="chunked block sizes to try (queries = keys); default: the module's")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per program (median is reported)")
    ap.add_argument("--small", action="store_true", help="B = H = 1, K = V = 8 (smoke tests)")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/attention_cpu.json)")
    args = ap.parse_args(argv)
    name, out_dir = "attention_cpu", None
    if args.json:
        out_dir, base = os.path.split(os.path.abspath(args.json))
        name = base[:-5] if base.endswith(".json") else base
    shape = dict(b=1, h=1, hkv=1, d=8) if args.small else None
    table = Table(name, ["T", "impl", "block", "fwd_temp_MiB", "fwd_bwd_temp_MiB", "fwd_ms", "fwd_bwd_ms"],
                  out_dir=out_dir)
    default = (flash.BLOCK_Q, flash.BLOCK_K)
    for T in args.T:
        for impl in args.impls:
            for block in (args.block or [None]) if impl == "chunked" else [None]:
                if block is not None:
                    flash.BLOCK_Q = flash.BLOCK_K = block
                try:
                    row = measure(T, impl, args.repeats, shape)
                finally:
                    flash.BLOCK_Q, flash.BLOCK_K = default
                row["block"] = (block or default[0]) if impl == "chunked" else "-"
                table.add(row)
    table.finish({"what": "causal self-attention; temporaries XLA:CPU plans (memory_analysis) and the median "
                          "wall time of the jitted forward and forward + backward (value_and_grad w.r.t. q, k, v)",
                  "shapes": shape or dict(B=B, H=H, Hkv=HKV, K=D, V=D), "dtype": "float32",
                  "repeats": args.repeats})


if __name__ == "__main__":
    main()
