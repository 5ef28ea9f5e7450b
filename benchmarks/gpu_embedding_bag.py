"""Embedding bag on a GPU: the Pallas (Triton) kernels vs XLA, checked and timed (PyTorch: gpu_torch.py).

    python -m benchmarks.gpu_embedding_bag                # on the GPU: checks, tile sweep, table
    python -m benchmarks.gpu_embedding_bag --smoke        # tiny sizes, interpret mode (CPU)

1. Ceilings: copy bandwidth (bytes read + written per second of an elementwise pass over
   1 GiB) and the bf16 matmul rate, measured here.
2. Correctness of the compiled kernels against a float64 NumPy reference on fresh random
   inputs (float32 and bfloat16 tables), with every output first filled with NaN (the
   kernels' outputs alias a NaN buffer) so an unwritten element fails the check.
3. A tile sweep per kernel (forward, d_values, d_weights) at the main size.
4. Forward, backward (d_values + d_weights from ``jax.vjp``; the forward is dead code there
   and XLA drops it) and both, for ``impl="xla"`` and the tuned Pallas tiles, bf16 and float32
   tables; and the backward's sort of the pairs alone.

Bytes counted (the fewest a gather implementation must move, each input read once, each
output written once): forward ``Bt k D`` table-row reads + ``Bt D`` output + ``Bt k`` (index,
weight) pairs; backward the dense ``N D`` table gradient written + ``Bt k D`` table rows
re-read for ``d_weights`` + ``Bt D`` cotangent + the pairs. Achieved GB/s = bytes / time,
compared with the measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu_common import environment, jax_ceilings, jax_time_ms, markdown_table, rel_err, write_json
from memjax.kernels import embedding_bag_pallas as ebp
from memjax.kernels.embedding_bag_ops import embedding_bag

MAIN = {"N": 2 ** 20, "D": 1024, "Bt": 8192 * 4, "k": 32}  # 8192 tokens x 4 heads, 32 slots each
SMOKE = {"N": 256, "D": 64, "Bt": 64, "k": 8}
CHECKS = [(4096, 256, 512, 32), (2 ** 16, 1024, 1024, 32), (1000, 96, 77, 7)]
SMOKE_CHECKS = [(64, 32, 24, 4)]
SWEEP = {  # around the best tiles of the first H100 sweep (benchmarks/GPU_NOTES.md)
    "forward": [ebp.Tile(r, c, w) for r, c, w in itertools.product((8, 16), (256, 512), (8,))],
    "d_values": [ebp.Tile(r, c, w) for r, c, w in itertools.product((4, 8, 16), (256, 512), (4,))],
    "d_weights": [ebp.Tile(r, c, w) for r, c, w in itertools.product((8, 16), (256, 512), (4, 8))],
}


def problem(n, d, bt, k, dtype, seed):
    rng = np.random.default_rng(seed)
    values = jnp.asarray(rng.standard_normal((n, d), np.float32), dtype)
    idx = jnp.asarray(rng.integers(0, n, (bt, k)), jnp.int32)
    w = jnp.asarray(rng.standard_normal((bt, k), np.float32))
    d_out = jnp.asarray(rng.standard_normal((bt, d), np.float32), dtype)
    return values, idx, w, d_out


def reference(values, idx, w, d_out):
    """float64 NumPy forward, d_values and d_weights of the (dtype-rounded) inputs."""
    v, g = np.asarray(values, np.float64), np.asarray(d_out, np.float64)
    idx, w = np.asarray(idx), np.asarray(w, np.float64)
    rows = v[idx]  # [Bt, k, D]
    out = np.einsum("bk,bkd->bd", w, rows)
    d_v = np.zeros_like(v)
    np.add.at(d_v, idx.reshape(-1), (w[..., None] * g[:, None, :]).reshape(-1, v.shape[1]))
    d_w = np.einsum("bd,bkd->bk", g, rows)
    return out, d_v, d_w


def kernel_calls(n, interpret, tiles):
    """Jitted direct kernel calls with NaN-poisoned outputs: forward, and backward -> (d_values, d_weights)."""
    fwd = jax.jit(lambda v, i, w: ebp.gpu_forward(v, i, w, out_dtype=v.dtype, interpret=interpret,
                                                  tile=tiles["forward"], poison=True))
    bwd = jax.jit(lambda g, v, i, w: ebp.gpu_backward(g, v, i, w, n, out_dtype=v.dtype, acc_dtype=jnp.float32,
                                                      interpret=interpret, tiles=tiles, poison=True))
    return fwd, bwd


def check(sizes, interpret, tiles):
    """Relative errors of the compiled kernels (NaN-poisoned outputs) vs float64, per size and dtype."""
    rows = []
    for seed, ((n, d, bt, k), dtype) in enumerate(itertools.product(sizes, (jnp.float32, jnp.bfloat16))):
        values, idx, w, d_out = problem(n, d, bt, k, dtype, seed + 100)
        fwd, bwd = kernel_calls(n, interpret, tiles)
        out, (d_v, d_w) = fwd(values, idx, w), bwd(d_out, values, idx, w)
        ref = reference(values, idx, w, d_out)
        # float32: accumulation-order rounding only; bfloat16 outputs: one bf16 rounding (2^-9).
        tol = 1e-5 if dtype == jnp.float32 else 4e-3
        errs = {"out": rel_err(out, ref[0]), "d_values": rel_err(d_v, ref[1]), "d_weights": rel_err(d_w, ref[2])}
        nan = any(bool(np.isnan(np.asarray(x, np.float32)).any()) for x in (out, d_v, d_w))
        ok = not nan and errs["out"] < tol and errs["d_values"] < tol and errs["d_weights"] < 1e-5
        rows.append({"N": n, "D": d, "Bt": bt, "k": k, "dtype": jnp.dtype(dtype).name, **errs,
                     "unwritten_nan": nan, "tol": tol, "ok": ok})
        print(rows[-1], flush=True)
    return rows


def bytes_moved(n, d, bt, k, itemsize):
    pairs = bt * k * 8
    fwd = bt * k * d * itemsize + bt * d * itemsize + pairs
    bwd = n * d * itemsize + bt * k * d * itemsize + bt * d * itemsize + pairs
    return fwd, bwd


def sweep(size, dtype, interpret, iters, space):
    """Best tile per kernel at ``size`` (median ms of each candidate in ``space``)."""
    n, d, bt, k = size["N"], size["D"], size["Bt"], size["k"]
    values, idx, w, d_out = problem(n, d, bt, k, dtype, 0)
    results, best = {}, {}
    for name, candidates in space.items():
        timings = []
        for tile in candidates:
            try:
                if name == "forward":
                    f = jax.jit(lambda v, i, w, t=tile: ebp.gpu_forward(v, i, w, out_dtype=v.dtype,
                                                                         interpret=interpret, tile=t))
                    ms = jax_time_ms(f, values, idx, w, iters=iters)
                else:  # the whole backward (sort + both kernels) with this tile for one kernel
                    f = jax.jit(lambda g, v, i, w, t=tile, name=name: ebp.gpu_backward(
                        g, v, i, w, n, out_dtype=v.dtype, acc_dtype=jnp.float32, interpret=interpret,
                        tiles={name: t}))
                    ms = jax_time_ms(f, d_out, values, idx, w, iters=iters)
            except Exception as err:  # noqa: BLE001 - a tile Triton rejects (e.g. registers) is skipped
                print(f"{name} {tile}: failed: {str(err)[:200]}", flush=True)
                continue
            timings.append({"tile": [tile.rows, tile.cols, tile.num_warps], "ms": ms})
            print(f"{name} rows={tile.rows} cols={tile.cols} warps={tile.num_warps}: {ms:.3f} ms", flush=True)
        timings.sort(key=lambda r: r["ms"])
        results[name] = timings
        if timings:
            r, c, nw = timings[0]["tile"]
            best[name] = ebp.Tile(r, c, nw)
    return results, best


def _sort_by_row_signed(indices, weights, num_rows):
    """The previous sort: ``jnp.argsort`` of int32 keys (XLA's own sort kernel, not CUB) and a
    ``searchsorted`` per row; timed beside :func:`ebp.sort_by_row` for the notes."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = flat[order]
    row_start = jnp.searchsorted(rows, jnp.arange(num_rows + 1, dtype=rows.dtype), side="left")
    return rows, order // k, weights.reshape(-1)[order], row_start


def time_sort(size, iters):
    """The backward's sort of the (index, weight) pairs by row, alone: current and previous."""
    n, bt, k = size["N"], size["Bt"], size["k"]
    _, idx, w, _ = problem(n, 8, bt, k, jnp.float32, 2)
    new = jax.jit(lambda i, w: ebp.sort_by_row(i, w, n))
    old = jax.jit(lambda i, w: _sort_by_row_signed(i, w, n))
    same = all(bool(jnp.array_equal(a, b)) for a, b in zip(new(idx, w), old(idx, w)))
    return {"sort_by_row_ms": jax_time_ms(new, idx, w, iters=iters),
            "previous_argsort_searchsorted_ms": jax_time_ms(old, idx, w, iters=iters), "same_result": same}


def time_impls(size, dtype, interpret, iters, copy_gbps):
    """Forward / backward / both for XLA and Pallas (the current ``ebp.GPU_TILES``)."""
    n, d, bt, k = size["N"], size["D"], size["Bt"], size["k"]
    values, idx, w, d_out = problem(n, d, bt, k, dtype, 1)
    b_fwd, b_bwd = bytes_moved(n, d, bt, k, jnp.dtype(dtype).itemsize)
    rows = []
    for impl in ("xla", "pallas_gpu"):
        kw = {"impl": impl, "interpret": True} if interpret and impl != "xla" else {"impl": impl}
        bag = lambda v, i, w: embedding_bag(v, i, w, **kw)
        fwd = jax.jit(bag)
        bwd = jax.jit(lambda v, i, w, g: jax.vjp(lambda v, w: bag(v, i, w), v, w)[1](g))

        def both(v, i, w, g):
            out, vjp = jax.vjp(lambda v, w: bag(v, i, w), v, w)
            return out, vjp(g)

        both = jax.jit(both)
        row = {"impl": impl, "dtype": jnp.dtype(dtype).name, **size}
        try:
            row["fwd_ms"] = jax_time_ms(fwd, values, idx, w, iters=iters)
            row["bwd_ms"] = jax_time_ms(bwd, values, idx, w, d_out, iters=iters)
            row["fwd_bwd_ms"] = jax_time_ms(both, values, idx, w, d_out, iters=iters)
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: report, keep the other rows
            row["error"] = str(err)[:300]
            rows.append(row)
            print(row, flush=True)
            continue
        row["fwd_GBps"] = b_fwd / row["fwd_ms"] / 1e6
        row["bwd_GBps"] = b_bwd / row["bwd_ms"] / 1e6
        row["fwd_pct_copy"] = 100 * row["fwd_GBps"] / copy_gbps
        row["bwd_pct_copy"] = 100 * row["bwd_GBps"] / copy_gbps
        rows.append(row)
        print(row, flush=True)
    return rows, {"fwd_bytes": b_fwd, "bwd_bytes": b_bwd}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes in interpret mode (CPU)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    interpret = args.smoke or jax.default_backend() == "cpu"
    size = SMOKE if args.smoke else MAIN
    dtype = jnp.bfloat16
    t0 = time.perf_counter()
    result = {"environment": environment(), "size": size, "dtype": "bfloat16"}
    result["ceilings"] = ceil = jax_ceilings(copy_gib=0.01 if args.smoke else 1.0, n_matmul=256 if args.smoke else 8192)
    print("ceilings", ceil, flush=True)
    result["checks"] = check(SMOKE_CHECKS if args.smoke else CHECKS, interpret, ebp.GPU_TILES)
    defaults = dict(ebp.GPU_TILES)
    if not args.no_sweep:
        space = {name: tiles[:2] for name, tiles in SWEEP.items()} if args.smoke else SWEEP  # smoke: keep it short
        result["sweep"], best = sweep(size, dtype, interpret, max(2, args.iters // 2), space)
        result["default_tiles"] = {k: [t.rows, t.cols, t.num_warps] for k, t in defaults.items()}
        result["best_tiles"] = {k: [t.rows, t.cols, t.num_warps] for k, t in best.items()}
        # The tuned tiles must pass the same checks as the defaults.
        result["checks_best_tiles"] = check(SMOKE_CHECKS if args.smoke else CHECKS[:2], interpret,
                                            {**defaults, **best})
        ebp.GPU_TILES.update(best)  # the public embedding_bag() below runs with the tuned tiles
    try:
        result["timings"], result["bytes"] = time_impls(size, dtype, interpret, args.iters, ceil["copy_GBps"])
        if not args.smoke:  # float32 tables (PyTorch's per-sample-weight gradient needs them)
            rows, result["bytes_float32"] = time_impls(size, jnp.float32, interpret, args.iters, ceil["copy_GBps"])
            result["timings"] += rows
    finally:
        ebp.GPU_TILES.clear()
        ebp.GPU_TILES.update(defaults)  # leave the library's defaults as they were
    result["sort"] = time_sort(size, args.iters)
    result["seconds"] = time.perf_counter() - t0
    write_json("gpu_embedding_bag", result, args.out)
    print(markdown_table(result["checks"], ["N", "D", "Bt", "k", "dtype", "out", "d_values", "d_weights", "ok"]))
    print("sort", result["sort"])
    print(markdown_table(result["timings"], ["impl", "dtype", "fwd_ms", "fwd_GBps", "fwd_pct_copy", "bwd_ms", "bwd_GBps",
                                             "bwd_pct_copy", "fwd_bwd_ms"]))
    return result


if __name__ == "__main__":
    main()
