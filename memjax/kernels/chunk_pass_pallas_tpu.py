"""Pallas (Mosaic lowering) kernels for the chunk-to-chunk state recurrence on a TPU (the
equations are in :mod:`memjax.kernels.chunk_pass`; this is the TPU twin of
:mod:`memjax.kernels.chunk_pass_pallas`, with the same inputs, outputs and saved residuals, so
the dispatcher's ``custom_vjp`` serves both).

Grid ``(B, H, V / bv, N / nb)``: the first three axes are independent programs ("parallel": a
megacore chip may split them over its two TensorCores); the chunk axis is the innermost,
"arbitrary" (sequential) one. Each grid step gets ``nb`` consecutive chunks' ``[C, K]`` /
``[C, C]`` / ``[C, bv]`` tiles, which the Pallas pipeline double-buffers from HBM while the
previous block is computed, walks them with a ``fori_loop`` and carries the ``[K, bv]`` state
from step to step in a float32 VMEM scratch buffer (float64 in interpret mode for float64
inputs). Walking blocks of chunks with the grid, rather than all ``N`` in one step, keeps VMEM
use independent of the sequence length (the whole ``[N, K, bv]`` stack of saved states would not
fit at long ``T``); several chunks per step amortise the per-step pipeline overhead, which is
larger than one chunk's matmuls at C = 64, K = V = 128.

Forward, chunk ``n = 0 .. N-1``::

    delta_n = u_n - w_n S_n              (w = None: delta_n = u_n)
    o_n     = qg_n S_n + p_n delta_n
    S_{n+1} = a_n S_n + ke_n^T delta_n   (a_n a scalar, or diag(a_n) for per-key-channel decays)

optionally writing ``S_n`` for the backward. Backward, chunk ``n = N-1 .. 0`` (the index maps
reverse the grid's chunk-block axis, the loop each block), with ``dS`` the gradient w.r.t. ``S_{n+1}``::

    d_delta_n = p_n^T do_n + ke_n dS
    dS       <- a_n dS + qg_n^T do_n - w_n^T d_delta_n

writing ``d_delta_n``, the ``dS`` each chunk was entered with and the initial state's gradient.

Block shapes follow Mosaic's rule (the last two dims of a block are multiples of (8, 128) or the
array's full dims): the ``C`` and ``K`` axes are always whole, ``bv`` is ``V`` or a multiple of
128 dividing it; chunk blocks index an untiled leading axis. Chunk decays travel as
``[B, H, N, 1, 1]`` (scalar) or ``[B, H, N, K, 1]`` (per key channel) arrays, so each block is
whole in its last two dims and each chunk's decay broadcasts
against the ``[K, bv]`` state without a transpose. Matmul operands keep the chunk tensors' dtype
(the state and ``delta`` are rounded to it for the product, as on the GPU) and accumulate in
float32.

``pl.CostEstimate`` gives XLA the kernels' FLOPs and HBM bytes (without it a ``tpu_custom_call``
counts as 0 FLOPs in ``cost_analysis``).

Status: compiled through Mosaic for v5p and v5e topologies from a CPU host and tested in
interpret mode (``tests/test_chunk_pass_tpu.py``); never run on a TPU, so not in the
dispatcher's ``VERIFIED_DEVICES``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from memjax.kernels.pallas_common import merge_aliases, pallas_call, poison_output

_NN = (((1,), (0,)), ((), ()))  # [m, k] x [k, n]
_TN = (((0,), (0,)), ((), ()))  # [k, m]^T x [k, n]
_LANES = 128


@dataclasses.dataclass(frozen=True)
class Tile:
    """Launch shape: ``bv`` value columns per program (``V`` itself when it does not split into
    multiples of 128; else the largest multiple of 128 dividing ``V`` that is at most ``bv``) and
    ``chunks`` chunks per grid step (the largest divisor of ``N`` that is at most ``chunks``)."""

    bv: int = 128
    chunks: int = 8


# Not timed on hardware. 128 columns: one lane-width of the MXU / vregs per state tile, and
# at K = V = 128 one program per (batch, head), so each chunk tile is read from HBM once.
# 8 chunks per step: a grid step costs ~0.35 us of pipeline overhead, more than one chunk's
# four 64 x 128 x 128 matmuls, so steps take several chunks (at C = 64, K = V = 128, bf16:
# ~1.3 MiB of double-buffered blocks per step, far inside VMEM).
TPU_TILE = Tile()


def value_block(v: int, cap: int) -> int:
    """Value columns per program: a multiple of 128 dividing ``v`` (at most ``cap``, at least
    128), else all of ``v`` (Mosaic accepts a block equal to the full dim)."""
    if v % _LANES:
        return v
    best = _LANES
    for m in range(_LANES, min(v, max(cap, _LANES)) + 1, _LANES):
        if v % m == 0:
            best = m
    return best


def chunk_block(n: int, cap: int) -> int:
    """Chunks per grid step: the largest divisor of ``n`` that is at most ``cap`` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def _dot(x, y, dims, acc):
    return jax.lax.dot_general(x, y, dims, preferred_element_type=acc)


def _fwd_kernel(*refs, has_w: bool, save_states: bool, block: int):
    it = iter(refs)
    qg_ref, p_ref, u_ref = next(it), next(it), next(it)
    w_ref = next(it) if has_w else None
    ke_ref, a_ref, s0_ref = next(it), next(it), next(it)
    rest = list(it)
    # Outputs, then the scratch state (after the aliased NaN inputs when poisoned).
    s_ref = rest[-1]
    o_ref, sf_ref = rest[-4:-2] if save_states else rest[-3:-1]
    sin_ref = rest[-2] if save_states else None
    acc = s_ref.dtype
    step = pl.program_id(3)

    @pl.when(step == 0)
    def _():
        s_ref[...] = s0_ref[...].astype(acc)

    def chunk(j, s):  # chunk j of this step's block
        if save_states:
            sin_ref[j] = s
        u = u_ref[j].astype(acc)
        delta = u - _dot(w_ref[j], s.astype(w_ref.dtype), _NN, acc) if has_w else u
        o = _dot(qg_ref[j], s.astype(qg_ref.dtype), _NN, acc) + _dot(p_ref[j], delta.astype(p_ref.dtype), _NN, acc)
        o_ref[j] = o.astype(o_ref.dtype)
        return a_ref[j].astype(acc) * s + _dot(ke_ref[j], delta.astype(ke_ref.dtype), _TN, acc)

    s = jax.lax.fori_loop(0, block, chunk, s_ref[...])
    s_ref[...] = s

    @pl.when(step == pl.num_programs(3) - 1)
    def _():
        sf_ref[...] = s


def _bwd_kernel(*refs, has_w: bool, block: int):
    it = iter(refs)
    qg_ref, p_ref = next(it), next(it)
    w_ref = next(it) if has_w else None
    ke_ref, a_ref, do_ref, dsf_ref = next(it), next(it), next(it), next(it)
    rest = list(it)
    dd_ref, dsn_ref, ds0_ref, ds_ref = rest[-4:]
    acc = ds_ref.dtype
    step = pl.program_id(3)  # the index maps walk the chunk blocks last to first

    @pl.when(step == 0)
    def _():
        ds_ref[...] = dsf_ref[...].astype(acc)

    def chunk(i, ds):
        j = block - 1 - i  # and each block's chunks last to first
        do = do_ref[j]
        dd = _dot(p_ref[j], do.astype(p_ref.dtype), _TN, acc) + _dot(ke_ref[j], ds.astype(ke_ref.dtype), _NN, acc)
        dd_ref[j] = dd.astype(dd_ref.dtype)
        dsn_ref[j] = ds
        ds = a_ref[j].astype(acc) * ds + _dot(qg_ref[j], do.astype(qg_ref.dtype), _TN, acc)
        if has_w:
            ds = ds - _dot(w_ref[j], dd.astype(w_ref.dtype), _TN, acc)
        return ds

    ds = jax.lax.fori_loop(0, block, chunk, ds_ref[...])
    ds_ref[...] = ds

    @pl.when(step == pl.num_programs(3) - 1)
    def _():
        ds0_ref[...] = ds


def _specs(n, c, k, bv, nb, reverse: bool):
    """BlockSpecs over the grid ``(B, H, V / bv, N / nb)``; batch and head dims are squeezed, so a
    kernel sees ``[nb, C, .]`` stacks of chunk tiles, ``[nb, 1 or K, 1]`` decays, ``[nb, K, bv]``
    saved states and ``[K, bv]`` states. ``reverse``: grid step ``i`` reads chunk block
    ``N / nb - 1 - i``."""
    sq = pl.Squeezed()
    at = (lambda i: n // nb - 1 - i) if reverse else (lambda i: i)
    per_chunk = lambda width: pl.BlockSpec((sq, sq, nb, c, width), lambda b, h, l, i: (b, h, at(i), 0, 0))
    v_cols = pl.BlockSpec((sq, sq, nb, c, bv), lambda b, h, l, i: (b, h, at(i), 0, l))
    decay = lambda rows: pl.BlockSpec((sq, sq, nb, rows, 1), lambda b, h, l, i: (b, h, at(i), 0, 0))
    state = pl.BlockSpec((sq, sq, k, bv), lambda b, h, l, i: (b, h, 0, l))
    states = pl.BlockSpec((sq, sq, nb, k, bv), lambda b, h, l, i: (b, h, at(i), 0, l))
    return per_chunk, v_cols, decay, state, states


def _decay_array(a, k):
    """``a [B, H, N]`` -> ``[B, H, N, 1, 1]``; ``[B, H, N, K]`` -> ``[B, H, N, K, 1]`` (float32 or wider)."""
    a = a.astype(jnp.promote_types(a.dtype, jnp.float32))
    return a[..., None, None] if a.ndim == 3 else a[..., None]


def _nbytes(*arrays):
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in arrays)


def _launch(kernel, name, inputs, specs, outs, grid, scratch, interpret, poison, cost):
    """``pallas_call`` of ``kernel`` with outputs ``outs = [(shape, dtype, spec), ...]`` and
    one VMEM scratch buffer; ``poison`` (tests) pre-fills every output with NaN through an
    aliased input."""
    extra = merge_aliases(*(poison_output(poison, specs, inputs, spec, shape, dtype, output=i)
                            for i, (shape, dtype, spec) in enumerate(outs)))
    return pallas_call(
        kernel,
        grid=grid,
        in_specs=specs,
        out_specs=tuple(spec for _, _, spec in outs),
        out_shape=tuple((shape, dtype) for shape, dtype, _ in outs),
        scratch_shapes=[pltpu.VMEM(*scratch)],
        interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
        name=name,
        **extra,
    )(*inputs)


def forward(qg, p, u, w, ke, a, s0, *, save_states: bool, interpret: bool, tile: Tile | None = None,
            poison: bool = False):
    """``(o [B, H, N, C, V], s_final [B, H, K, V], s_in [B, H, N, K, V] or None)``; ``o`` in u's
    dtype, states in the accumulation dtype. ``a``: ``[B, H, N]`` or ``[B, H, N, K]``.
    ``poison`` (tests): outputs start as NaN."""
    tile = tile or TPU_TILE
    b, h, n, c, k = qg.shape
    v = u.shape[-1]
    acc = jnp.promote_types(u.dtype, jnp.float32)
    bv, nb = _blocks(n, c, k, v, jnp.dtype(qg.dtype).itemsize, tile)
    per_chunk, v_cols, decay, state, states = _specs(n, c, k, bv, nb, reverse=False)
    has_w = w is not None
    a5 = _decay_array(a, k)
    inputs = [qg, p, u] + ([w] if has_w else []) + [ke, a5, s0]
    specs = [per_chunk(k), per_chunk(c), v_cols] + ([per_chunk(k)] if has_w else []) + \
        [per_chunk(k), decay(a5.shape[3]), state]
    outs = [((b, h, n, c, v), u.dtype, v_cols), ((b, h, k, v), acc, state)]
    if save_states:
        outs.append(((b, h, n, k, v), acc, states))
    # Chunk tiles of qg / p / ke / w are read once per value block.
    flops = 2 * b * h * n * c * v * (2 * k + c + (k if has_w else 0))
    read = (v // bv) * _nbytes(qg, p, ke, *([w] if has_w else [])) + _nbytes(u, a5, s0)
    written = sum(math.prod(shape) * jnp.dtype(dt).itemsize for shape, dt, _ in outs)
    cost = pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=read + written)
    kernel = functools.partial(_fwd_kernel, has_w=has_w, save_states=save_states, block=nb)
    res = _launch(kernel, "chunk_recurrence_fwd_tpu", inputs, specs, outs, (b, h, v // bv, n // nb), ((k, bv), acc),
                  interpret, poison, cost)
    return res[0], res[1], (res[2] if save_states else None)


def backward(qg, p, w, ke, a, do, dsf, *, interpret: bool, tile: Tile | None = None, poison: bool = False):
    """``(d_delta [B, H, N, C, V], ds_next [B, H, N, K, V], ds0 [B, H, K, V])``: the gradient of
    each chunk's ``delta`` (= of ``u``), of the state after each chunk, and of the initial state.
    ``poison`` (tests): outputs start as NaN."""
    tile = tile or TPU_TILE
    b, h, n, c, k = qg.shape
    v = do.shape[-1]
    acc = jnp.promote_types(do.dtype, jnp.float32)
    bv, nb = _blocks(n, c, k, v, jnp.dtype(qg.dtype).itemsize, tile)
    per_chunk, v_cols, decay, state, states = _specs(n, c, k, bv, nb, reverse=True)
    has_w = w is not None
    a5 = _decay_array(a, k)
    inputs = [qg, p] + ([w] if has_w else []) + [ke, a5, do, dsf]
    specs = [per_chunk(k), per_chunk(c)] + ([per_chunk(k)] if has_w else []) + \
        [per_chunk(k), decay(a5.shape[3]), v_cols, state]
    outs = [((b, h, n, c, v), acc, v_cols), ((b, h, n, k, v), acc, states), ((b, h, k, v), acc, state)]
    flops = 2 * b * h * n * c * v * (2 * k + c + (k if has_w else 0))
    read = (v // bv) * _nbytes(qg, p, ke, *([w] if has_w else [])) + _nbytes(do, a5, dsf)
    written = sum(math.prod(shape) * jnp.dtype(dt).itemsize for shape, dt, _ in outs)
    cost = pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=read + written)
    kernel = functools.partial(_bwd_kernel, has_w=has_w, block=nb)
    return _launch(kernel, "chunk_recurrence_bwd_tpu", inputs, specs, outs, (b, h, v // bv, n // nb), ((k, bv), acc),
                   interpret, poison, cost)


def _tile_bytes(rows: int, cols: int, itemsize: int) -> int:
    """VMEM bytes of a ``[rows, cols]`` block in Mosaic's native tiling (8 sublanes of 32 bits,
    so 16 rows for 16-bit types, by 128 lanes)."""
    sub = 8 * max(1, 4 // itemsize)
    return -(-rows // sub) * sub * -(-cols // _LANES) * _LANES * itemsize


def vmem_bytes(c: int, k: int, bv: int, itemsize: int, nb: int = 1, *, has_w: bool = True) -> int:
    """An upper estimate of the VMEM one kernel needs (the larger of forward and backward) with
    ``nb`` chunks per grid step: every input and output block double-buffered by the pipeline,
    plus the state scratch."""
    f32 = 4
    chunk_tiles = (2 + has_w) * _tile_bytes(c, k, itemsize) + _tile_bytes(c, c, itemsize)  # qg, ke, (w), p
    decay = _tile_bytes(k, 1, f32)
    state = _tile_bytes(k, bv, f32)
    per_chunk_in = chunk_tiles + _tile_bytes(c, bv, itemsize) + decay  # + u (forward) or do (backward)
    fwd = 2 * (nb * per_chunk_in + state) + 2 * (nb * (_tile_bytes(c, bv, itemsize) + state) + state) + state
    bwd = 2 * (nb * per_chunk_in + state) + 2 * (nb * (_tile_bytes(c, bv, f32) + state) + state) + state
    return max(fwd, bwd)


# Below the smallest default scoped-VMEM limit of the TPUs targeted (16 MiB on v5e; Mosaic
# refuses, at compile time, kernels over the limit: measured at K = 2048, V = 1024, f32).
VMEM_BUDGET = 12 * 2 ** 20


def _blocks(n, c, k, v, itemsize, tile: Tile) -> tuple[int, int]:
    """``(bv, nb)``: value columns and chunks per grid step, ``nb`` cut to fit the VMEM budget."""
    bv = value_block(v, tile.bv)
    nb = chunk_block(n, tile.chunks)
    while nb > 1 and vmem_bytes(c, k, bv, itemsize, nb) > VMEM_BUDGET:
        nb = chunk_block(n, nb - 1)
    return bv, nb


def tpu_supports(shape, dtype, backend: str, *, vector_decay: bool = False, tile: Tile | None = None) -> bool:
    """Mosaic kernel: TPU; float32 or bfloat16 chunk tensors (Mosaic rejects float16 loads on
    v5); ``shape = (B, H, N, C, K, V)`` with ``C`` and ``K`` multiples of 8 and ``V`` a multiple of
    128 (split into lane-dense value tiles) or of 8 (one whole tile), within a 12 MiB VMEM
    estimate; scalar or per-key-channel decays (``vector_decay``), with or without ``w``."""
    del vector_decay  # both decay forms are handled
    if backend != "tpu" or len(shape) != 6:
        return False
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return False
    _, _, _, c, k, v = shape
    if c % 8 or k % 8 or v % 8 or min(c, k, v) <= 0:
        return False
    return vmem_bytes(c, k, value_block(v, (tile or TPU_TILE).bv), dtype.itemsize) <= VMEM_BUDGET
