"""Shared pieces of the GPU benchmarks (``benchmarks/gpu_*.py``): timing, ceilings, errors, JSON.

Timing follows the device method: warm-up calls first (compilation, autotuning), then
``rounds`` rounds of ``iters`` back-to-back calls, each round timed from the host around a
final ``block_until_ready`` (the calls queue asynchronously, so host dispatch overlaps the
device work); the figure is the median round time / ``iters``. PyTorch code is timed with
``triton.testing.do_bench`` (CUDA events, median). Inputs are larger than the L2 cache
(50 MB on an H100) wherever the benchmark is meant to be memory-bound.

Results go to ``$OUT`` when set (the device tool's output folder), else
``benchmarks/results/gpu``.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import numpy as np


def out_dir(explicit: str | None = None) -> str:
    path = explicit or os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results", "gpu")
    os.makedirs(path, exist_ok=True)
    return path


def write_json(name: str, payload: dict, directory: str | None = None, quiet: bool = False) -> str:
    """``<directory>/<name>.json``, written atomically: a kill mid-write leaves the previous file."""
    path = os.path.join(out_dir(directory), f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(path + ".tmp", path)
    if not quiet:
        print(f"wrote {path}", flush=True)
    return path


def jax_time_ms(fn, *args, iters: int = 10, rounds: int = 5, warmup: int = 2) -> float:
    """Median milliseconds per call of a jitted ``fn(*args)`` (see the module docstring)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / iters)
    return 1e3 * statistics.median(per_call)


def torch_time_ms(fn, warmup_ms: int = 50, rep_ms: int = 300) -> float:
    """Median milliseconds per call of ``fn()`` on the current CUDA device (CUDA events)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def rel_err(x, ref) -> float:
    """``||x - ref|| / ||ref||`` in float64 (Frobenius); NaN anywhere gives NaN."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


def jax_ceilings(copy_gib: float = 1.0, n_matmul: int = 8192) -> dict:
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
    import jax
    import jax.numpy as jnp

    n = int(copy_gib * 2 ** 30) // 2
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    scale = jax.jit(lambda x: x * jnp.bfloat16(1.5))  # one read + one write per element
    t_copy = jax_time_ms(scale, x, iters=20) * 1e-3
    a, b = jax.random.normal(jax.random.key(1), (2, n_matmul, n_matmul), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t_mm = jax_time_ms(mm, a, b, iters=10) * 1e-3
    del x, a, b
    return {"copy_GBps": 2 * n * 2 / t_copy / 1e9, "copy_bytes": 2 * n * 2,
            "matmul_bf16_TFLOPs": 2 * n_matmul ** 3 / t_mm / 1e12, "matmul_n": n_matmul}


def environment() -> dict:
    """``benchmarks.runner.machine()``: backend, device, versions, date."""
    from benchmarks.runner import machine

    return machine()


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    from benchmarks.runner import _fmt

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
