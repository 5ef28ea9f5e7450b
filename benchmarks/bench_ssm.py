"""SSM forms: fast (chunked / associative scan / FFT conv) vs token-by-token recurrent, forward + backward.

    python -m benchmarks.bench_ssm            # T in {1024, 4096, 16384}
    python -m benchmarks.bench_ssm --quick    # T in {1024, 4096}, fewer repeats

For each op and length: median wall time of one jitted ``value_and_grad`` (loss through the output
and the final state, gradients w.r.t. every input) and XLA's planned temporary memory of that
executable (``compiled.memory_analysis().temp_size_in_bytes``, a peak-memory proxy), for the fast
form and the recurrent form, with their ratios. Writes ``benchmarks/results/ssm[_quick].json``.

Shapes: selective_scan batch 2, H 4, P 32, G 1, N 32, chunk 64; rglru batch 2, D 256;
diagonal_ssm batch 2, H 64, N 16 (complex); diagonal_ssm_packed the same with 4 packed documents
per row, chunked form (chunk 16) vs recurrent.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks.runner import Table, loss_and_grad, time_and_memory
from memjax.memory.rg_lru import rglru
from memjax.memory.ssm import diagonal_ssm, selective_scan


def selective_case(T, mode):
    b, h, p, g, n = 2, 4, 32, 1, 32
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (b, T, h, p))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, T, h)) - 2.0)
    A = -jnp.linspace(1.0, 4.0, h)
    Bm, Cm = jax.random.normal(ks[2], (2, b, T, g, n)) * n ** -0.5
    fn = lambda x, dt, Bm, Cm: selective_scan(x, dt, A, Bm, Cm, mode=mode, chunk_size=64)
    return loss_and_grad(fn, (0, 1, 2, 3)), (x, dt, Bm, Cm)


def rglru_case(T, mode):
    b, d = 2, 256
    ks = jax.random.split(jax.random.key(1), 3)
    x, ga, gx = jax.random.normal(ks[0], (3, b, T, d))
    lam = jnp.full((d,), 4.0)
    fn = lambda x, ga, gx, lam: rglru(x, ga, gx, lam, mode=mode)
    return loss_and_grad(fn, (0, 1, 2, 3)), (x, ga, gx, lam)


def diagonal_case(T, mode, *, packed=False):
    """``packed``: four documents per row (resets at T/4, T/2, 3T/4), which the FFT conv cannot
    take; the chunked form (chunk 16, the S4D block's default) handles them."""
    b, h, n = 2, 64, 16
    ks = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(ks[0], (b, T, h))
    A = jnp.broadcast_to(-0.5 + 1j * jnp.pi * jnp.arange(n), (h, n)).astype(jnp.complex64)
    B = jnp.ones((h, n), jnp.complex64)
    C = (jax.random.normal(ks[1], (h, n)) + 1j * jax.random.normal(ks[2], (h, n))).astype(jnp.complex64)
    dt = jnp.full((h,), 0.01)
    kw = dict(segment_ids=jnp.broadcast_to(jnp.arange(T) * 4 // T, (b, T)), chunk_size=16) if packed else {}
    fn = lambda x, B, C: diagonal_ssm(x, A, B, C, dt, mode=mode, **kw)
    return loss_and_grad(fn, (0, 1, 2)), (x, B, C)


OPS = {
    "selective_scan": (selective_case, "chunked"),
    "rglru": (rglru_case, "scan"),
    "diagonal_ssm": (diagonal_case, "conv"),
    "diagonal_ssm_packed": (functools.partial(diagonal_case, packed=True), "chunked"),
}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T in {1024, 4096}, 3 repeats")
    ap.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    args = ap.parse_args(argv)
    lengths = (1024, 4096) if args.quick else (1024, 4096, 16384)
    repeats = 3 if args.quick else 5
    cols = ["op", "T", "fast_form", "fast_ms", "recurrent_ms", "speedup", "fast_temp_MiB", "recurrent_temp_MiB",
            "memory_ratio"]
    table = Table("ssm_quick" if args.quick else "ssm", cols)
    for op in args.ops:
        case, fast = OPS[op]
        for T in lengths:
            f_ms, f_mem = time_and_memory(case, T, fast, repeats)
            r_ms, r_mem = time_and_memory(case, T, "recurrent", repeats)
            table.add({"op": op, "T": T, "fast_form": fast, "fast_ms": f_ms, "recurrent_ms": r_ms,
                       "speedup": r_ms / f_ms, "fast_temp_MiB": f_mem, "recurrent_temp_MiB": r_mem,
                       "memory_ratio": r_mem / max(f_mem, 1e-9)})
    table.finish({"what": "forward + backward (value_and_grad), median wall time; temp memory of the executable"})


if __name__ == "__main__":
    main()
