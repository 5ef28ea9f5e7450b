"""Embedding-bag speed: forward and forward+backward, XLA (and Pallas on GPU/TPU), with effective GB/s.

    python -m benchmarks.bench_embedding_bag --quick                 # CPU: XLA only
    python -m benchmarks.bench_embedding_bag --backend gpu           # GPU: XLA vs the Pallas (Triton) kernel

On CPU only XLA is timed: Pallas runs there in interpret mode, which is a correctness
tool, not a speed reference. The ``--backend gpu`` / ``tpu`` path times ``impl="xla"``
against ``impl="pallas"`` over several sizes. The measured H100 figures (with correctness
checks, a tile sweep and PyTorch alongside) come from ``benchmarks/gpu_embedding_bag.py``
(see benchmarks/GPU_NOTES.md); this script has not been run on a TPU.

Effective bandwidth counts the bytes a gather-based implementation must move at least:
forward ``Bt*k*D`` table reads + ``Bt*D`` output writes (+ indices and weights); backward
``Bt*D`` cotangent reads per slot (``Bt*k*D``), the ``N*D`` dense table gradient written once,
and the ``Bt*k*D`` rows re-read for ``d_weights``.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.runner import Table, compiled_memory, time_fn
from memjax.kernels.embedding_bag_ops import embedding_bag

FULL = [  # (N, D, Bt, k): k = heads * knn of a memory layer (4 x 32 in Memory Layers at Scale)
    (2 ** 16, 256, 2048, 32),
    (2 ** 18, 256, 2048, 128),
    (2 ** 20, 512, 4096, 128),
]
QUICK = [(2 ** 12, 128, 256, 16), (2 ** 14, 128, 512, 32)]


def bytes_moved(n, d, bt, k, itemsize):
    index_bytes = bt * k * (4 + 4)
    fwd = (bt * k * d + bt * d) * itemsize + index_bytes
    bwd = (bt * k * d + n * d + bt * k * d) * itemsize + index_bytes
    return fwd, fwd + bwd


def run_case(n, d, bt, k, dtype, impl, repeats):
    rng = np.random.default_rng(0)
    values = jnp.asarray(rng.standard_normal((n, d)), dtype)
    idx = jnp.asarray(rng.integers(0, n, (bt, k)), jnp.int32)
    w = jnp.asarray(rng.standard_normal((bt, k)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((bt, d)), dtype)

    fwd = jax.jit(lambda v, i, w: embedding_bag(v, i, w, impl=impl))

    def loss(v, w, i):
        return jnp.sum(embedding_bag(v, i, w, impl=impl).astype(jnp.float32) * g.astype(jnp.float32))

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    t_f = time_fn(fwd, values, idx, w, repeats=repeats)["median_s"]
    t_fb = time_fn(fwd_bwd, values, w, idx, repeats=repeats)["median_s"]
    mem = compiled_memory(fwd_bwd, values, w, idx)
    b_f, b_fb = bytes_moved(n, d, bt, k, jnp.dtype(dtype).itemsize)
    return {"N": n, "D": d, "Bt": bt, "k": k, "dtype": jnp.dtype(dtype).name, "impl": impl,
            "fwd_ms": 1e3 * t_f, "fwd_GBps": b_f / t_f / 1e9, "fwd_bwd_ms": 1e3 * t_fb,
            "fwd_bwd_GBps": b_fb / t_fb / 1e9, "fwd_bwd_temp_MB": mem.get("temp_bytes", 0) / 2 ** 20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds on a laptop CPU)")
    ap.add_argument("--backend", choices=["cpu", "gpu", "tpu"], default=None,
                    help="expected backend (default: jax.default_backend()); gpu/tpu add the Pallas kernel")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    backend = args.backend or jax.default_backend()
    if backend != jax.default_backend():
        raise SystemExit(f"--backend {backend} requested but JAX runs on {jax.default_backend()!r}")
    impls = ["xla"] if backend == "cpu" else ["xla", "pallas"]
    dtypes = [jnp.float32] if backend == "cpu" else [jnp.float32, jnp.bfloat16]
    sizes = QUICK if args.quick else FULL
    name = args.name or f"embedding_bag_{backend}{'_quick' if args.quick else ''}"
    table = Table(name, ["N", "D", "Bt", "k", "dtype", "impl", "fwd_ms", "fwd_GBps", "fwd_bwd_ms", "fwd_bwd_GBps",
                         "fwd_bwd_temp_MB"])
    for n, d, bt, k in sizes:
        for dtype in dtypes:
            for impl in impls:
                table.add(run_case(n, d, bt, k, dtype, impl, args.repeats))
    table.finish({"note": "GB/s: bytes a gather implementation must move (see module docstring)"})


if __name__ == "__main__":
    main()
