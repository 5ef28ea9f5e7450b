"""Pieces shared by the fused Mosaic kernels of the chunked matrix memories
(:mod:`memjax.kernels.linear_fused_pallas_tpu`, :mod:`memjax.kernels.delta_fused_pallas_tpu`):
the in-place ``[B, T, H, D]`` block layout, one chunk's masked decay factors formed in VMEM from
per-token rows, head-batched matmul dimension numbers, the launch and byte accounting.

Layout: sequence operands ``[B, T, H, D]`` are read and written in place (no transposed copy: on
a TPU even a reshape to ``[B, T, H * D]`` is a relayout, since HBM tiles the last two dims by
(8, 128)), in blocks of ``nb * C`` time rows by ``hb`` heads (8, one sublane tile, or all ``H``)
by the whole ``D``; each chunk's ``[C, hb, D]`` slice is turned heads-first in VMEM and the
matmuls are batched over the ``hb`` heads. Per-token scalars (log decays, reset flags, write
strengths) travel as ``[B, H, N, 1, C]`` rows: a column array ``[.., C, 1]`` would be padded to
128 lanes in HBM, 128x its bytes, so columns are made in VMEM by a lane reduction of the
diagonal (a sum of one value and zeros: exact).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from memjax.kernels.chunk_pass_pallas_tpu import chunk_block
from memjax.kernels.pallas_common import merge_aliases, pallas_call, poison_output

# Batched over the heads of a block (batch dim 0): [h, m, k] x [h, k, n], x [h, n, k]^T, [h, k, m]^T x [h, k, n]
NN = (((2,), (1,)), ((0,), (0,)))
NT = (((2,), (2,)), ((0,), (0,)))
TN = (((1,), (1,)), ((0,), (0,)))
LANES = 128
def dot(x, y, dims, acc):
    return jax.lax.dot_general(x, y, dims, preferred_element_type=acc)


def to_heads(x, d: int | None = None):
    """A block slice as ``[hb, C, D]``: ``[C, hb, D]`` (time-major, as ``[B, T, H, D]`` lies in
    HBM), or with ``d``, ``[C, hb d]`` of the flat ``[B, T, H d]`` view, cut into heads along the
    lanes (a TPU pads a ``[.., H, 64]`` tile to 128 lanes in HBM; the flat view is not padded)."""
    if d is None:
        return jnp.swapaxes(x, 0, 1)
    return jnp.stack([x[:, j * d:(j + 1) * d] for j in range(x.shape[1] // d)], axis=0)


def from_heads(x, flat: bool = False):
    """The inverse of :func:`to_heads`: ``[hb, C, D]`` as the block slice ``[C, hb, D]`` (``flat``:
    ``[C, hb D]``)."""
    if not flat:
        return jnp.swapaxes(x, 0, 1)
    return jnp.concatenate([x[j] for j in range(x.shape[0])], axis=-1)


def flat_heads(hb: int, dk: int, dv: int) -> bool:
    """Whether a fused call reads its sequence operands as the flat ``[B, T, H D]`` view
    (:func:`to_heads`): a head dim below 128 lanes that divides them (``K = V``), and ``hb D`` a
    whole number of lanes tiles."""
    return dk == dv < LANES and LANES % dk == 0 and (hb * dk) % LANES == 0


class ChunkDecays:
    """The masked decay factors of one chunk for ``hb`` heads from its raw log decays and reset
    flags ``g, z [hb, 1, C]`` (module docstring). The within-chunk sums (reset counts ``r``, the
    cumulative decay ``G`` restarted at every reset) are masked lane reductions of ``[hb, C, C]``
    broadcasts, exact up to float32 summation order; a column array ``[.., C, 1]`` would be padded
    to 128 lanes in HBM (128x its bytes), so columns are made here and rows travel."""

    def __init__(self, g, z, c, acc):
        i = jax.lax.broadcasted_iota(jnp.int32, (1, c, c), 1)
        j = jax.lax.broadcasted_iota(jnp.int32, (1, c, c), 2)
        zero = jnp.zeros((), acc)
        g, z = g.astype(acc), z.astype(acc)
        self.zero, self.diag, self.causal = zero, i == j, i >= j
        rc = jnp.sum(jnp.where(self.causal, z, zero), axis=2, keepdims=True)  # [hb, C, 1]: resets up to i
        self.rr = rr = self.as_row(rc)
        self.rc = rc
        self.same_segment = rc == rr
        self.mask = self.causal & self.same_segment  # j <= i, same segment
        gc = jnp.sum(jnp.where(self.mask, g, zero), axis=2, keepdims=True)  # G_i, restarted at resets
        gr = self.as_row(gc)
        self.gc, self.gr = gc, gr  # the cumulative log decays as a column and a row
        # every exponent is masked before the exp (it is <= 0 on the mask), so nothing off the
        # mask can overflow into a kept value
        self.D = jnp.exp(jnp.where(self.mask, gc - gr, zero))
        g_last, r_last = gr[:, :, c - 1:], rr[:, :, c - 1:]  # [hb, 1, 1]
        self.g_last, self.r_last = g_last, r_last
        first = rc == 0
        self.alpha = jnp.where(first, jnp.exp(jnp.where(first, gc, zero)), zero)  # [hb, C, 1]
        same = rc == r_last
        self.same_as_last = same
        self.beta = jnp.where(same, jnp.exp(jnp.where(same, g_last - gc, zero)), zero)  # [hb, C, 1]
        whole = r_last == 0
        self.a = jnp.where(whole, jnp.exp(jnp.where(whole, g_last, zero)), zero)  # [hb, 1, 1]
        self.z_col = self.as_col(z)

    def intra(self, scores, scale):
        return jnp.where(self.mask, scores * self.D * scale, jnp.zeros((), scores.dtype))

    def as_row(self, col):
        """``[hb, C, 1] -> [hb, 1, C]`` (:func:`column_as_row`)."""
        return column_as_row(col)

    def as_col(self, row):
        """``[hb, 1, C] -> [hb, C, 1]`` (:func:`row_as_column`)."""
        return row_as_column(row)

    def gate_grad(self, dlam, carry):
        """``dg [hb, C, 1]`` and the carry for the chunk before: ``dg_s = sum_{t >= s, same
        segment} dL/dLambda_t``, over this chunk plus ``carry`` (that sum from the next chunk's
        start, when the segment continues across), 0 at a reset."""
        rows = self.as_row(dlam)
        later = jnp.logical_not(self.causal) | self.diag  # [s, t]: t >= s
        later = later & self.same_segment
        dg = jnp.sum(jnp.where(later, rows, self.zero), axis=2, keepdims=True)
        dg = dg + jnp.where(self.same_as_last, carry, self.zero)
        dg = jnp.where(self.z_col > 0, self.zero, dg)
        return dg, dg[:, :1, :]  # a reset at the chunk's first token gives the chunk before 0


def _diagonal(c):
    return jax.lax.broadcasted_iota(jnp.int32, (1, c, c), 1) == jax.lax.broadcasted_iota(jnp.int32, (1, c, c), 2)


def row_as_column(row):
    """``[hb, 1, C] -> [hb, C, 1]``: a lane reduction of the diagonal (a sum of one value and
    zeros: exact). Per-token scalars travel as rows (a column would be padded to 128 lanes in
    HBM); the kernels scale a chunk's ``[hb, C, D]`` rows by columns."""
    return jnp.sum(jnp.where(_diagonal(row.shape[-1]), row, jnp.zeros((), row.dtype)), axis=2, keepdims=True)


def column_as_row(col):
    """``[hb, C, 1] -> [hb, 1, C]``: a sublane reduction of the diagonal (exact)."""
    return jnp.sum(jnp.where(_diagonal(col.shape[-2]), col, jnp.zeros((), col.dtype)), axis=1, keepdims=True)


def masked_exp(x, ok):
    """``exp(x)`` where ``ok``, 0 elsewhere, the exponent masked before the ``exp`` (so no masked
    entry can overflow, or meet an ``inf - inf``)."""
    zero = jnp.zeros((), x.dtype)
    return jnp.where(ok, jnp.exp(jnp.where(ok, x, zero)), zero)


def forward_outputs(refs, s0_ref, save_states: bool):
    """``(o_ref, sf_ref, st_ref or None, s_ref)`` of a fused forward kernel whose refs end with the
    outputs ``(o, S_final, [states])`` and the state scratch (NaN buffers aliased to the outputs
    when poisoned come before them); the scratch is set from ``s0_ref`` at the first grid step."""
    nout = 3 if save_states else 2
    o_ref, sf_ref = refs[-1 - nout], refs[-nout]
    st_ref = refs[-2] if save_states else None
    s_ref = refs[-1]

    @pl.when(pl.program_id(2) == 0)
    def _():
        s_ref[...] = s0_ref[...].astype(s_ref.dtype)

    return o_ref, sf_ref, st_ref, s_ref


def start_from(*pairs):
    """At the first grid step, set each scratch ref of ``pairs = ((scratch, source), ...)`` from
    its source ref (the state, or its cotangent, carried across the sequential chunk axis)."""
    @pl.when(pl.program_id(2) == 0)
    def _():
        for dst, src in pairs:
            dst[...] = src[...].astype(dst.dtype)


def write_final(ref, value):
    """Write the state after the last grid step's chunks to ``ref``."""
    @pl.when(pl.program_id(2) == pl.num_programs(2) - 1)
    def _():
        ref[...] = value.astype(ref.dtype)


def load_chunk(ref, rows, acc, d: int | None = None):
    """A chunk of a ``[rows, hb, D]`` block as ``[hb, C, D]`` in ``acc`` (``d``: of a flat ``[rows,
    hb d]`` block, :func:`to_heads`), and where it is finite."""
    x = to_heads(ref[rows].astype(acc), d)
    ok = jnp.abs(x) < jnp.inf
    return jnp.where(ok, x, jnp.zeros((), acc)), ok


def head_block(h: int) -> int:
    """Heads per program: 8 (a sublane tile of the ``[.., H, D]`` layout) when ``H`` is a multiple
    of 8, else all ``H`` (Mosaic accepts a block equal to the whole dim)."""
    return 8 if h % 8 == 0 else h


class BlockSpecs:
    """BlockSpecs over the grid ``(B, H / hb, N / nb)``; ``reverse`` walks the chunk blocks last to
    first. Sequence operands ``[B, T, H, D]`` are read in place in ``[nb C, hb, D]`` blocks (time
    rows, a sublane tile of heads, whole ``D``)."""

    def __init__(self, hb, nb, c, steps, reverse):
        self.hb, self.nb, self.c = hb, nb, c
        self.at = (lambda i: steps - 1 - i) if reverse else (lambda i: i)

    def seq(self, d):
        return pl.BlockSpec((pl.Squeezed(), self.nb * self.c, self.hb, d), lambda b, g, i: (b, self.at(i), g, 0))

    def flat(self, d):  # [B, T, H d]: the flat view of a [B, T, H, d] operand (flat_heads)
        return pl.BlockSpec((pl.Squeezed(), self.nb * self.c, self.hb * d), lambda b, g, i: (b, self.at(i), g))

    def shared(self, d):  # [B, T, 1, D]: one head every block reads
        return pl.BlockSpec((pl.Squeezed(), self.nb * self.c, 1, d), lambda b, g, i: (b, self.at(i), 0, 0))

    def partial(self, d):  # [B, H / hb, T, D]: one partial sum per head block
        return pl.BlockSpec((pl.Squeezed(), pl.Squeezed(), self.nb * self.c, d), lambda b, g, i: (b, g, self.at(i), 0))

    def rows(self):  # [B, H, N, 1, C] log decays, reset flags, their gradient
        return pl.BlockSpec((pl.Squeezed(), self.hb, self.nb, 1, self.c), lambda b, g, i: (b, g, self.at(i), 0, 0))

    def per_head(self):  # [B, H, 1, 1]
        return pl.BlockSpec((pl.Squeezed(), self.hb, 1, 1), lambda b, g, i: (b, g, 0, 0))

    def state(self, k, v):  # [B, H, K, V]
        return pl.BlockSpec((pl.Squeezed(), self.hb, k, v), lambda b, g, i: (b, g, 0, 0))

    def states(self, k, v):  # [B, H, N, K, V]
        return pl.BlockSpec((pl.Squeezed(), self.hb, self.nb, k, v), lambda b, g, i: (b, g, self.at(i), 0, 0))


class HeadLayout:
    """The BlockSpecs of a fused call (:class:`BlockSpecs`) and how it lays out its sequence
    operands ``[B, T, H, D]``: in place, or, for a head dim below 128 lanes (:func:`flat_heads`:
    ``K = V = 64``), as the flat ``[B, T, H D]`` view, which the kernels cut into heads along the
    lanes (:func:`to_heads`, ``d``): a TPU pads a ``[.., H, 64]`` tile to 128 lanes in HBM, twice
    the bytes."""

    def __init__(self, hb, dk, dv, nb, c, steps, reverse, flat: bool = True):
        self.sp = BlockSpecs(hb, nb, c, steps, reverse)
        self.d = dk if flat and flat_heads(hb, dk, dv) else None

    def seq(self, d):
        """The BlockSpec of a ``[B, T, H, d]`` sequence operand as passed."""
        return self.sp.seq(d) if self.d is None else self.sp.flat(d)

    def seq_shape(self, shape):
        b, t, h, d = shape
        return shape if self.d is None else (b, t, h * d)

    def view(self, x):
        return x if self.d is None else x.reshape(self.seq_shape(x.shape))

    def unview(self, x):
        return x if self.d is None else x.reshape(*x.shape[:2], x.shape[2] // self.d, self.d)


def gate_rows(g, resets, shape, acc):
    """``g [B, T, H]`` log decays and ``resets [B, T, H]`` bool (None: zeros) -> ``[B, H, N, 1, C]``
    rows, ``shape = (B, N, C, H)``; resets as float32 0 / 1."""
    b, n, c, h = shape
    g = jnp.zeros((b, n * c, h), acc) if g is None else g.astype(acc)
    z = jnp.zeros((b, n * c, h), jnp.float32) if resets is None else resets.astype(jnp.float32)
    return tuple(jnp.moveaxis(x.reshape(b, n, c, h), 3, 1)[..., None, :] for x in (g, z))


def launch(kernel, name, inputs, specs, outs, grid, scratch, interpret, poison, cost, vmem_limit=None):
    """``pallas_call`` over the grid ``(B, H / hb, N / nb)`` (the chunk axis sequential) with
    outputs ``outs = [(shape, dtype, spec), ...]``, VMEM scratch buffers ``scratch = [(shape,
    dtype), ...]``, a ``pl.CostEstimate`` and, when given, the scoped-VMEM limit in bytes;
    ``poison`` (tests) pre-fills every output with NaN through an aliased input."""
    extra = merge_aliases(*(poison_output(poison, specs, inputs, spec, shape, dtype, output=i)
                            for i, (shape, dtype, spec) in enumerate(outs)))
    return pallas_call(
        kernel,
        grid=grid,
        in_specs=specs,
        out_specs=tuple(spec for _, _, spec in outs),
        out_shape=tuple((shape, dtype) for shape, dtype, _ in outs),
        scratch_shapes=[pltpu.VMEM(*x) for x in scratch],
        interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit),
        cost_estimate=cost,
        name=name,
        **extra,
    )(*inputs)


def nbytes(*arrays):
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in arrays)


def out_bytes(outs):
    return sum(math.prod(shape) * jnp.dtype(dt).itemsize for shape, dt, _ in outs)


def tile_bytes(rows: int, cols: int, itemsize: int) -> int:
    """VMEM bytes of a ``[rows, cols]`` block in Mosaic's native tiling (8 sublanes of 32 bits,
    so 16 rows for 16-bit types, by 128 lanes)."""
    sub = 8 * max(1, 4 // itemsize)
    return -(-rows // sub) * sub * -(-cols // LANES) * LANES * itemsize


def chunks_per_step(n: int, c: int, hb: int, k: int, v: int, itemsize: int, cap: int, vmem_bytes, budget: int) -> int:
    """Chunks per grid step: the largest divisor of ``n`` at most ``cap`` whose estimate
    ``vmem_bytes(c, hb, k, v, itemsize, nb)`` fits ``budget`` (at least 1)."""
    nb = chunk_block(n, cap)
    while nb > 1 and vmem_bytes(c, hb, k, v, itemsize, nb) > budget:
        nb = chunk_block(n, nb - 1)
    return nb


def fits(shape, dtype, backend: str, vmem_bytes, budget: int) -> bool:
    """The fused kernels' shared ``supports``: ``shape = (B, T, H, K, V, C)`` on a TPU, float32 or
    bfloat16 (Mosaic rejects float16 loads on v5), ``C``, ``K``, ``V`` multiples of 8, and one
    chunk per step of ``head_block(H)`` heads within ``budget`` by the kernel's ``vmem_bytes``."""
    if backend != "tpu" or len(shape) != 6:
        return False
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return False
    _, _, h, k, v, c = shape
    if c % 8 or k % 8 or v % 8 or min(c, k, v) <= 0:
        return False
    return vmem_bytes(c, head_block(h), k, v, jnp.dtype(dtype).itemsize, 1) <= budget


def geometry(q, v, c: int, chunks: int, vmem_bytes, budget: int, *, shared_qk: bool = False):
    """``(B, T, H, K, V, N, hb, nb, shared)`` of a fused call: ``q [B, T, H or 1, K]``, ``v [B, T, H,
    V]`` with ``T`` a multiple of ``c``; ``shared`` when q, k have one head for all of v's (only
    where the kernel takes it, ``shared_qk``)."""
    b, t, hq, k = q.shape
    h = v.shape[2]
    n = t // c
    if n * c != t:
        raise ValueError(f"the fused TPU kernel needs T a multiple of the chunk size {c}, got T={t}")
    if hq != h and not (shared_qk and hq == 1):
        raise ValueError(f"the fused TPU kernel takes q, k with the value heads' count {h}"
                         + (" or one shared head" if shared_qk else "") + f", got {hq}")
    hb = head_block(h)
    nb = chunks_per_step(n, c, hb, k, v.shape[-1], jnp.dtype(q.dtype).itemsize, chunks, vmem_bytes, budget)
    return b, t, h, k, v.shape[-1], n, hb, nb, hq == 1 and h > 1
