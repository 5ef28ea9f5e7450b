"""ParaRNN: Newton-parallel evaluation vs the sequential ``lax.scan`` of the same diagonal cell.

    python -m benchmarks.bench_pararnn            # GRU and LSTM, T in {1024, 2048, 4096, 8192, 16384}
    python -m benchmarks.bench_pararnn --quick    # GRU, T in {1024, 4096}, 3 repeats

For each cell and length: median wall time of the jitted forward and of the jitted forward +
backward (``value_and_grad`` of ``sum(output) + sum|final state|`` w.r.t. the inputs and the
recurrent weights) for ``mode="newton"`` (early exit at ``tol = 1e-5``, at most 32 iterations, the
block's defaults) and ``mode="sequential"``; the Newton iterations the forward ran; the largest
output difference between the two forms. Shapes: batch 2, H 4, D 16 (64 channels), inputs
``N(0, 1)``, recurrent weights ``U(-0.5, 0.5)`` (the block's initialisation). Writes
``benchmarks/results/pararnn[_quick].json``.

Expect the sequential form to win on a CPU: it does ``T`` cheap steps, while every Newton
iteration is an associative scan with ``O(T)`` work plus the cell and its Jacobian; the parallel
form pays off where many cores / a GPU run the scan's levels wide (the paper's setting).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.runner import Table, loss_and_grad, time_fn
from memjax.memory.pararnn import CELLS, pararnn

B, H, D = 2, 4, 16
TOL, MAX_ITERS = 1e-5, 32


def case(cell_name: str, T: int):
    cell = CELLS[cell_name]
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(B, T, H, cell.gates * D)), jnp.float32)
    params = {k: jnp.asarray(r.uniform(-0.5, 0.5, size=(H, D)), jnp.float32) for k in cell.params}
    return cell, x, params


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="GRU only, T in {1024, 4096}, 3 repeats")
    ap.add_argument("--cells", nargs="*", default=None, choices=list(CELLS))
    ap.add_argument("--lengths", nargs="*", type=int, default=None)
    args = ap.parse_args(argv)
    cells = args.cells or (["gru"] if args.quick else ["gru", "lstm"])
    lengths = args.lengths or ((1024, 4096) if args.quick else (1024, 2048, 4096, 8192, 16384))
    repeats = 3 if args.quick else 5
    cols = ["cell", "T", "newton_iters", "fwd_newton_ms", "fwd_seq_ms", "fwd_speedup", "fwdbwd_newton_ms",
            "fwdbwd_seq_ms", "fwdbwd_speedup", "max_abs_diff"]
    table = Table("pararnn_quick" if args.quick else "pararnn", cols)
    for name in cells:
        for T in lengths:
            cell, x, params = case(name, T)
            fwd = {m: jax.jit(lambda x, p, m=m: pararnn(cell, p, x, mode=m, max_iters=MAX_ITERS, tol=TOL,
                                                        return_iters=True))
                   for m in ("newton", "sequential")}
            both = {m: loss_and_grad(lambda x, p, m=m: pararnn(cell, p, x, mode=m, max_iters=MAX_ITERS, tol=TOL),
                                     (0, 1)) for m in ("newton", "sequential")}
            yn, _, iters = fwd["newton"](x, params)
            ys, _, _ = fwd["sequential"](x, params)
            ms = {f"fwd_{m}": 1e3 * time_fn(fwd[m], x, params, warmup=1, repeats=repeats)["median_s"] for m in fwd}
            ms.update({f"fwdbwd_{m}": 1e3 * time_fn(both[m], x, params, warmup=1, repeats=repeats)["median_s"]
                       for m in both})
            table.add({"cell": name, "T": T, "newton_iters": int(iters),
                       "fwd_newton_ms": ms["fwd_newton"], "fwd_seq_ms": ms["fwd_sequential"],
                       "fwd_speedup": ms["fwd_sequential"] / ms["fwd_newton"],
                       "fwdbwd_newton_ms": ms["fwdbwd_newton"], "fwdbwd_seq_ms": ms["fwdbwd_sequential"],
                       "fwdbwd_speedup": ms["fwdbwd_sequential"] / ms["fwdbwd_newton"],
                       "max_abs_diff": float(jnp.max(jnp.abs(yn - ys)))})
    table.finish({"what": "median wall time (ms) of the jitted forward and forward+backward; speedup = "
                          "sequential / newton (> 1: Newton faster)",
                  "shapes": {"batch": B, "heads": H, "D": D}, "tol": TOL, "max_iters": MAX_ITERS,
                  "note": "CPU, 2 cores shared with other jobs (load average ~20): absolute times are inflated "
                          "and noisy; the ratios are the figure to read"})


if __name__ == "__main__":
    main()
