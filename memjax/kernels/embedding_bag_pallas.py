"""Pallas kernels for the embedding bag ``out[b] = sum_j w[b, j] * values[idx[b, j]]``.

Two kernel families, one per hardware memory model; both run in interpret mode on CPU
(that is how the tests exercise them) and both lower for their target from a CPU-only
install (the tests export them for ``cuda`` / ``tpu`` to catch lowering errors):

``GPU`` (Triton lowering)
    Forward: a program per (``Tile.rows`` bags, ``Tile.cols`` columns); the
    bag's indices and weights are one block, the rows are gathered inside the kernel
    (``values_ref[rows, :]``, a pointer gather) and accumulated in float32 registers.
    Triton has no scalar prefetch, so indices travel as an ordinary blocked input.
    d_values: the (index, weight) pairs are sorted by row outside the kernel (a stable CUB
    radix sort; ``row_start`` from per-row counts); a program owns ``rows`` consecutive table
    rows x a column block, and step ``s`` of its loop gathers the ``s``-th pair of each of its
    rows at once (a ``[rows, cols]`` gather of ``d_out`` rows; rows with fewer pairs re-read
    their last pair with weight 0). Deterministic, no atomics, and rows nobody read get exact
    zeros (Memory Layers at Scale's count / cumsum / reverse-index scheme, with the sort
    standing in for the counting pass).
    d_weights: a program per block of bags, ``<d_out[b], values[idx[b, j]]>``.

``TPU`` (Mosaic lowering)
    Indices (and weights) are scalar-prefetched into SMEM (``PrefetchScalarGridSpec``,
    as in JAX's paged / ragged attention) and the *index map* fetches the row: values are
    viewed as ``[N, 1, D]`` and one ``(1, D)`` row block is DMA'd per grid step, so the
    table never has to fit in VMEM. Forward: grid ``(bags, k)``, float32 VMEM
    accumulator resident across ``k``. d_values: grid over the sorted (row, bag) pairs;
    consecutive steps with the same row revisit the same output block, which stays
    resident and is written back once when the row changes (deterministic, no
    atomics); the running result is an input aliased to the output, so rows that are
    not read keep their (zero) value and chunks can be chained. SMEM is small, so long
    batches are processed in chunks of at most ``TPU_SMEM_ENTRIES`` (index, weight) pairs.

Accumulation is in the weights' dtype (the dispatcher passes float32, or float64 for
float64 tables). Inputs are assumed valid here (indices in range, int32): the
dispatcher in :mod:`memjax.kernels.embedding_bag_ops` validates and clamps. Hardware status:
the GPU family passed its hardware tests on an H100 (JAX 0.11.2), where it runs at 98% of
the measured copy bandwidth forward and 65% backward (benchmarks/GPU_NOTES.md); the TPU
family has not run on a TPU (``VERIFIED_DEVICES`` in the dispatcher).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from memjax.kernels.pallas_common import pad_rows as _pad_rows, pallas_call as _pallas_call
from memjax.kernels.pallas_common import poison_output as _poison_output, pow2_divisor as _pow2_divisor
from memjax.kernels.pallas_common import triton_params

_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
TPU_SMEM_ENTRIES = 8192  # (index, weight) pairs scalar-prefetched per TPU kernel call


def sort_by_row(indices: jax.Array, weights: jax.Array, num_rows: int):
    """Group the flattened (index, weight) pairs by value row, for the deterministic backward.

    Returns ``rows [P]`` (ascending), ``bags [P]`` (bag of each pair), ``w [P]`` and
    ``row_start [N + 1]`` with the pairs of row ``n`` at ``row_start[n]:row_start[n+1]``.
    The sort is stable, so the summation order within a row is fixed (bag-major).

    Keys and payload are sorted as *unsigned* 32-bit integers (indices are in ``[0, N)``, so
    the order is the same): XLA:GPU hands only unsigned-key pair sorts to CUB's radix sort,
    and sorts anything else with its own much slower kernel. ``row_start`` is the running
    sum of per-row counts (a scatter-add), not a binary search per row.
    """
    k = indices.shape[1]
    flat = indices.reshape(-1).astype(jnp.uint32)
    iota = jnp.arange(flat.shape[0], dtype=jnp.uint32)
    rows, order = jax.lax.sort((flat, iota), num_keys=1, is_stable=True)
    rows, order = rows.astype(jnp.int32), order.astype(jnp.int32)
    bags = order // k
    w = weights.reshape(-1)[order]
    counts = jnp.zeros((num_rows,), jnp.int32).at[rows].add(1)
    row_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])
    return rows, bags, w, row_start


# ============================================================================ GPU (Triton)


@dataclasses.dataclass(frozen=True)
class Tile:
    """One GPU kernel's launch shape: a program handles ``rows`` bags (forward, d_weights) or
    table rows (d_values) times ``cols`` columns with ``num_warps`` warps. Powers of two;
    each is capped by the largest power of two dividing the matching dimension."""

    rows: int
    cols: int
    num_warps: int = 4
    num_stages: int = 2


# Per-kernel tiles: the best of ``benchmarks/gpu_embedding_bag.py``'s sweep on an H100 (2026-11-24).
GPU_TILES = {"forward": Tile(8, 256, 8), "d_values": Tile(4, 256, 4), "d_weights": Tile(8, 512, 8)}


def _triton_params(tile: Tile):
    return triton_params(tile.num_warps, tile.num_stages)


def _gpu_fwd_kernel(idx_ref, w_ref, v_ref, *refs, k: int):
    o_ref = refs[-1]  # after the aliased NaN input when poisoned
    bb, bd = o_ref.shape

    def body(j, acc):
        rows = idx_ref[:, j]
        w = w_ref[:, j]
        return acc + w[:, None] * v_ref[rows, :].astype(w.dtype)

    acc = jax.lax.fori_loop(0, k, body, jnp.zeros((bb, bd), w_ref.dtype))
    o_ref[...] = acc.astype(o_ref.dtype)


def gpu_forward(values, indices, weights, *, out_dtype, interpret: bool, tile: Tile | None = None,
                poison: bool = False):
    """``out [Bt, D]``: a program per ``tile.rows`` bags x ``tile.cols`` columns gathers its rows.
    ``poison`` (tests): the output starts as NaN, so an unwritten element survives."""
    tile = tile or GPU_TILES["forward"]
    n, d = values.shape
    bt, k = indices.shape
    bb = tile.rows
    bd = _pow2_divisor(d, tile.cols)
    idx = _pad_rows(indices, bb)
    w = _pad_rows(weights, bb)  # padded bags: index 0, weight 0
    specs = [pl.BlockSpec((bb, k), lambda i, c: (i, 0)), pl.BlockSpec((bb, k), lambda i, c: (i, 0)),
             pl.BlockSpec((n, bd), lambda i, c: (0, c))]
    out_spec = pl.BlockSpec((bb, bd), lambda i, c: (i, c))
    inputs = [idx, w, values]
    extra = _poison_output(poison, specs, inputs, out_spec, (idx.shape[0], d), out_dtype)
    out = _pallas_call(
        functools.partial(_gpu_fwd_kernel, k=k),
        grid=(idx.shape[0] // bb, d // bd),
        in_specs=specs,
        out_specs=out_spec,
        out_shape=((idx.shape[0], d), out_dtype),
        interpret=interpret,
        compiler_params=None if interpret else _triton_params(tile),
        name="embedding_bag_fwd",
        **extra,
    )(*inputs)
    return out[:bt]


def _gpu_dvalues_kernel(start_ref, bag_ref, w_ref, dout_ref, *refs, block_rows: int):
    """Rows ``r0 .. r0 + R`` x one column block of ``d_values``: step ``s`` gathers, for each of
    the R rows at once, its ``s``-th pair's ``d_out`` row; rows with fewer pairs re-read their
    last pair with weight 0."""
    o_ref = refs[-1]  # after the aliased NaN input when poisoned
    r0 = pl.program_id(0) * block_rows
    starts = start_ref[pl.ds(r0, block_rows)]
    ends = start_ref[pl.ds(r0 + 1, block_rows)]
    last = jnp.maximum(ends - 1, 0)

    def body(s, acc):
        p = starts + s
        valid = p < ends
        p = jnp.where(valid, p, last)
        w = jnp.where(valid, w_ref[p], 0)
        return acc + w[:, None] * dout_ref[bag_ref[p], :].astype(w.dtype)

    acc = jax.lax.fori_loop(0, jnp.max(ends - starts), body, jnp.zeros(o_ref.shape, w_ref.dtype))
    o_ref[...] = acc.astype(o_ref.dtype)


def _gpu_dweights_kernel(idx_ref, dout_ref, v_ref, *refs, k: int, d: int, bd: int):
    o_ref = refs[-1]
    bb = idx_ref.shape[0]

    def over_bag(j, carry):
        rows = idx_ref[:, j]

        def over_cols(c, s):
            cols = pl.ds(pl.multiple_of(c * bd, bd), bd)
            prod = v_ref[rows, cols].astype(o_ref.dtype) * dout_ref[:, cols].astype(o_ref.dtype)
            return s + jnp.sum(prod, axis=1)

        o_ref[:, j] = jax.lax.fori_loop(0, d // bd, over_cols, jnp.zeros((bb,), o_ref.dtype))
        return carry

    jax.lax.fori_loop(0, k, over_bag, 0)


def gpu_backward(d_out, values, indices, weights, num_rows: int, *, out_dtype, acc_dtype, interpret: bool,
                 tiles: dict | None = None, poison: bool = False):
    """``(d_values [N, D], d_weights [Bt, k])`` with two kernels.

    ``d_values``: from the pairs sorted by row (:func:`sort_by_row`), a program per
    ``tiles["d_values"]`` block of table rows x columns: deterministic, no atomics, every row
    written (rows nobody read get exact zeros). ``d_weights``: a program per block of bags,
    ``<d_out[b], values[idx[b, j]]>``. ``poison`` (tests): outputs start as NaN, so an
    unwritten element survives into the result.

    (A single fused kernel that also forms the ``d_weights`` partial sums while it holds each
    table row was measured 1.4x slower on an H100: see benchmarks/GPU_NOTES.md.)
    """
    tiles = {**GPU_TILES, **(tiles or {})}
    tv, tw = tiles["d_values"], tiles["d_weights"]
    n, d = values.shape
    bt, k = indices.shape
    _, bags, w, row_start = sort_by_row(indices, weights.astype(acc_dtype), num_rows)
    p = bags.shape[0]

    bd = _pow2_divisor(d, tv.cols)
    br = _pow2_divisor(num_rows, tv.rows)
    dv_spec = pl.BlockSpec((br, bd), lambda r, c: (r, c))
    specs = [pl.BlockSpec((num_rows + 1,), lambda r, c: (0,)), pl.BlockSpec((p,), lambda r, c: (0,)),
             pl.BlockSpec((p,), lambda r, c: (0,)), pl.BlockSpec((bt, bd), lambda r, c: (0, c))]
    inputs = [row_start, bags, w, d_out]
    extra = _poison_output(poison, specs, inputs, dv_spec, (num_rows, d), out_dtype)
    d_values = _pallas_call(
        functools.partial(_gpu_dvalues_kernel, block_rows=br),
        grid=(num_rows // br, d // bd),
        in_specs=specs, out_specs=dv_spec, out_shape=((num_rows, d), out_dtype),
        interpret=interpret, compiler_params=None if interpret else _triton_params(tv),
        name="embedding_bag_bwd_values", **extra,
    )(*inputs)

    bb = tw.rows
    bd = _pow2_divisor(d, tw.cols)
    idx = _pad_rows(indices, bb)
    dout = _pad_rows(d_out, bb)
    dw_spec = pl.BlockSpec((bb, k), lambda i: (i, 0))
    specs = [pl.BlockSpec((bb, k), lambda i: (i, 0)), pl.BlockSpec((bb, d), lambda i: (i, 0)),
             pl.BlockSpec((n, d), lambda i: (0, 0))]
    inputs = [idx, dout, values]
    extra = _poison_output(poison, specs, inputs, dw_spec, (idx.shape[0], k), acc_dtype)
    d_weights = _pallas_call(
        functools.partial(_gpu_dweights_kernel, k=k, d=d, bd=bd),
        grid=(idx.shape[0] // bb,),
        in_specs=specs, out_specs=dw_spec, out_shape=((idx.shape[0], k), acc_dtype),
        interpret=interpret, compiler_params=None if interpret else _triton_params(tw),
        name="embedding_bag_bwd_weights", **extra,
    )(*inputs)
    return d_values, d_weights[:bt]


def gpu_supports(shape, dtype, backend: str) -> bool:
    """Triton kernel: CUDA / ROCm, float32 / bfloat16 (the dtypes run on hardware), ``D`` a multiple of 16."""
    if backend not in ("gpu", "cuda", "rocm") or len(shape) != 2:
        return False
    return jnp.dtype(dtype) in _FLOAT_DTYPES[:2] and shape[1] % 16 == 0


# ============================================================================ TPU (Mosaic)


def _tpu_params(semantics):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics)


def _chunked(fn, arrays, k: int):
    """Run ``fn(*chunk_arrays)`` on SMEM-sized chunks of bags and concatenate the results.

    ``arrays`` have the bag dimension first; long batches go through ``lax.map`` so the
    scalar-prefetched indices of one call never exceed ``TPU_SMEM_ENTRIES``.
    """
    bags = arrays[0].shape[0]
    chunk = max(1, TPU_SMEM_ENTRIES // k)
    if bags <= chunk:
        return fn(*arrays)
    padded = [_pad_rows(a, chunk) for a in arrays]
    stacked = [a.reshape(-1, chunk, *a.shape[1:]) for a in padded]
    out = jax.lax.map(lambda xs: fn(*xs), tuple(stacked))
    return out.reshape(-1, *out.shape[2:])[:bags]


def _tpu_fwd_kernel(idx_ref, w_ref, v_ref, o_ref, acc_ref, *, k: int):
    b, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += w_ref[b * k + j] * v_ref[...].astype(acc_ref.dtype)

    @pl.when(j == k - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tpu_forward(values, indices, weights, *, out_dtype, interpret: bool):
    from jax.experimental.pallas import tpu as pltpu

    n, d = values.shape
    k = indices.shape[1]
    v3 = values.reshape(n, 1, d)

    def call(idx, w):
        bags = idx.shape[0]
        spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(bags, k),
            in_specs=[pl.BlockSpec((pl.Squeezed(), 1, d), lambda b, j, idx, w: (idx[b * k + j], 0, 0))],
            out_specs=pl.BlockSpec((pl.Squeezed(), 1, d), lambda b, j, idx, w: (b, 0, 0)),
            scratch_shapes=[pltpu.VMEM((1, d), weights.dtype)],
        )
        return _pallas_call(
            functools.partial(_tpu_fwd_kernel, k=k), grid_spec=spec,
            out_shape=((bags, 1, d), out_dtype),
            interpret=interpret,
            compiler_params=_tpu_params(("parallel", "arbitrary")),
            name="embedding_bag_fwd_tpu",
        )(idx.reshape(-1), w.reshape(-1), v3)  # 1-D: 2-D SMEM arrays are padded to (8, 128) tiles

    return _chunked(call, (indices, weights), k).reshape(indices.shape[0], d)


def _tpu_dvalues_kernel(rows_ref, bags_ref, w_ref, dout_ref, acc_in_ref, o_ref):
    p = pl.program_id(0)
    first = (p == 0) | (rows_ref[jnp.maximum(p - 1, 0)] != rows_ref[p])

    @pl.when(first)  # the row's output block was just brought in: start from its running value
    def _():
        o_ref[...] = acc_in_ref[...]

    o_ref[...] += w_ref[p] * dout_ref[...].astype(o_ref.dtype)


def tpu_backward_values(d_out, indices, weights, num_rows: int, *, out_dtype, interpret: bool):
    from jax.experimental.pallas import tpu as pltpu

    bt, d = d_out.shape
    k = indices.shape[1]
    dout3 = d_out.reshape(bt, 1, d)
    chunk = max(1, TPU_SMEM_ENTRIES // k) * k  # pairs per kernel call
    flat_idx, flat_w = indices.reshape(-1), weights.reshape(-1)
    pad = (-flat_idx.shape[0]) % chunk
    # Padded pairs read row 0 with weight 0 on behalf of bag 0: they add exact zeros.
    bag_ids = jnp.pad(jnp.arange(flat_idx.shape[0], dtype=jnp.int32) // k, (0, pad))
    flat_idx, flat_w = jnp.pad(flat_idx, (0, pad)), jnp.pad(flat_w, (0, pad))
    n_chunks = flat_idx.shape[0] // chunk

    def one_chunk(c, acc):
        sl = lambda x: jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk)
        idx_c, w_c, bag_c = sl(flat_idx), sl(flat_w), sl(bag_ids)
        order = jnp.argsort(idx_c, stable=True)
        spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(chunk,),
            in_specs=[pl.BlockSpec((pl.Squeezed(), 1, d), lambda p, r, b, w: (b[p], 0, 0)),
                      pl.BlockSpec((pl.Squeezed(), 1, d), lambda p, r, b, w: (r[p], 0, 0))],
            out_specs=pl.BlockSpec((pl.Squeezed(), 1, d), lambda p, r, b, w: (r[p], 0, 0)),
        )
        return _pallas_call(
            _tpu_dvalues_kernel, grid_spec=spec,
            out_shape=((num_rows, 1, d), weights.dtype),
            input_output_aliases={4: 0},  # operand 4 (3 prefetched, d_out, acc) is updated in place
            interpret=interpret,
            compiler_params=_tpu_params(("arbitrary",)),
            name="embedding_bag_bwd_values_tpu",
        )(idx_c[order], bag_c[order], w_c[order], dout3, acc)

    acc = jnp.zeros((num_rows, 1, d), weights.dtype)
    acc = one_chunk(0, acc) if n_chunks == 1 else jax.lax.fori_loop(0, n_chunks, one_chunk, acc)
    return acc.reshape(num_rows, d).astype(out_dtype)


def _tpu_dweights_kernel(idx_ref, v_ref, dout_ref, o_ref, *, k: int):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)

    s = jnp.sum(v_ref[...].astype(o_ref.dtype) * dout_ref[...].astype(o_ref.dtype))
    lane = jax.lax.broadcasted_iota(jnp.int32, o_ref.shape, len(o_ref.shape) - 1)
    o_ref[...] = jnp.where(lane == j, s, o_ref[...])


def tpu_backward_weights(d_out, values, indices, *, acc_dtype, interpret: bool):
    from jax.experimental.pallas import tpu as pltpu

    n, d = values.shape
    bt, k = indices.shape
    v3 = values.reshape(n, 1, d)

    def call(idx, dout):
        bags = idx.shape[0]
        spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(bags, k),
            in_specs=[pl.BlockSpec((pl.Squeezed(), 1, d), lambda b, j, idx: (idx[b * k + j], 0, 0)),
                      pl.BlockSpec((pl.Squeezed(), 1, d), lambda b, j, idx: (b, 0, 0))],
            out_specs=pl.BlockSpec((pl.Squeezed(), 1, k), lambda b, j, idx: (b, 0, 0)),
        )
        return _pallas_call(
            functools.partial(_tpu_dweights_kernel, k=k), grid_spec=spec,
            out_shape=((bags, 1, k), acc_dtype),
            interpret=interpret,
            compiler_params=_tpu_params(("parallel", "arbitrary")),
            name="embedding_bag_bwd_weights_tpu",
        )(idx.reshape(-1), v3, dout.reshape(bags, 1, d))

    return _chunked(call, (indices, d_out), k).reshape(bt, k)


def tpu_supports(shape, dtype, backend: str) -> bool:
    """Mosaic kernel: TPU, float32 / bfloat16, ``D`` a multiple of 128 (one lane-dense row per DMA)."""
    if backend != "tpu" or len(shape) != 2:
        return False
    return jnp.dtype(dtype) in _FLOAT_DTYPES[:2] and shape[1] % 128 == 0


# ============================================================================ registry


def tpu_backward(d_out, values, indices, weights, num_rows: int, *, out_dtype, acc_dtype, interpret: bool):
    """``(d_values, d_weights)`` from the two TPU kernels."""
    return (tpu_backward_values(d_out, indices, weights, num_rows, out_dtype=out_dtype, interpret=interpret),
            tpu_backward_weights(d_out, values, indices, acc_dtype=acc_dtype, interpret=interpret))


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One Pallas implementation: forward, backward (both gradients) and where it applies."""

    name: str
    supports: Callable[..., bool]  # supports(values_shape, dtype, backend) -> bool
    forward: Callable  # (values, indices, weights, *, out_dtype, interpret) -> out
    backward: Callable  # (d_out, values, indices, weights, N, *, out_dtype, acc_dtype, interpret) -> (dv, dw)


KERNELS = {
    "pallas_gpu": Kernel("pallas_gpu", gpu_supports, gpu_forward, gpu_backward),
    "pallas_tpu": Kernel("pallas_tpu", tpu_supports, tpu_forward, tpu_backward),
}
