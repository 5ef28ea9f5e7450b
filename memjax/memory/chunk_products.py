"""Chunk-local products of the scalar-decay chunked forms with hand-written transposes.

Shared by Mamba-2 SSD (:func:`memjax.memory.ssm.selective_scan`) and Mamba-3
(:func:`memjax.memory.mamba3.mamba3`). Each op's transpose computes its reductions as dot
products (einsum contractions) or sums of slices: on XLA:CPU the fused multiply-then-reduce that
autodiff produces for a broadcast product (the gradient of a per-row scale, or of a repeat over
heads) ran 10 to 40 times slower than the same reduction as a dot (measured, ``[1, 4, 64, 64, 64]``
float32: ~4-10 ms vs ~0.3 ms).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.memory.chunking import ChunkDecays, masked_exp

__all__ = ["head_chunk_decays", "pair_decays", "repeat_groups", "times_cols", "times_rows"]


@jax.custom_vjp
def times_rows(v: jax.Array, w: jax.Array) -> jax.Array:
    """``v * w[..., None]`` rounded to ``v``'s dtype: ``v [..., D]`` (any float dtype), ``w [...]``
    (the accumulation dtype). The product is formed at the wider precision and rounded once."""
    return (v * w[..., None]).astype(v.dtype)


def _times_rows_fwd(v, w):
    return times_rows(v, w), (v, w)


def _times_rows_bwd(res, g):
    v, w = res
    dv = (g * w[..., None]).astype(v.dtype)
    dw = jnp.einsum("...d,...d->...", g, v, preferred_element_type=w.dtype)  # a dot, not a fused reduce
    return dv, dw.astype(w.dtype)


times_rows.defvjp(_times_rows_fwd, _times_rows_bwd)


def repeat_groups(v: jax.Array, r: int, axis: int = 1) -> jax.Array:
    """``[..., G, ...] -> [..., G * r, ...]`` along ``axis``: group ``g``'s entry for its heads
    ``g * r .. (g + 1) * r - 1`` (Mamba-2's ``repeat(B, "g n -> (g r) n")``); the transpose sums
    the ``r`` copies as slices."""
    return v if r == 1 else _repeat_groups_vjp(v, r, axis % v.ndim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _repeat_groups_vjp(v, r, axis):
    return jnp.repeat(v, r, axis=axis)


def _repeat_groups_vjp_fwd(v, r, axis):
    return _repeat_groups_vjp(v, r, axis), None


def _repeat_groups_vjp_bwd(r, axis, _, g):
    gs = g.reshape(*g.shape[:axis], g.shape[axis] // r, r, *g.shape[axis + 1:])
    return (functools.reduce(jnp.add, [jnp.take(gs, i, axis=axis + 1) for i in range(r)]),)


_repeat_groups_vjp.defvjp(_repeat_groups_vjp_fwd, _repeat_groups_vjp_bwd)


@jax.custom_vjp
def pair_decays(G: jax.Array, keep: jax.Array) -> jax.Array:
    """``L_ij = exp(G_i - G_j)`` where ``keep_ij``, else exactly 0: ``G [..., C]``, ``keep [..., C, C]``
    bool (broadcastable). The exponent is selected before the ``exp`` (callers keep only
    ``G_i - G_j <= 0``), so masked pairs never overflow and get a zero gradient."""
    return jnp.where(keep, jnp.exp(jnp.where(keep, G[..., :, None] - G[..., None, :], 0)), 0)


def _pair_decays_fwd(G, keep):
    L = pair_decays(G, keep)
    return L, L


def _pair_decays_bwd(L, g):
    e = g * L  # d/dG_i of L_ij is L_ij, of L_ji is -L_ji; masked entries are 0
    ones = jnp.ones(L.shape[-1], L.dtype)
    dG = jnp.einsum("...ij,j->...i", e, ones) - jnp.einsum("...ij,i->...j", e, ones)
    return dG, None


pair_decays.defvjp(_pair_decays_fwd, _pair_decays_bwd)


@jax.custom_vjp
def times_cols(m: jax.Array, w: jax.Array) -> jax.Array:
    """``m * w[..., None, :]``: column ``j`` of ``m [..., C, C]`` scaled by ``w_j`` (``w [..., C]``),
    with the transpose's column sums as a dot."""
    return m * w[..., None, :]


def _times_cols_fwd(m, w):
    return times_cols(m, w), (m, w)


def _times_cols_bwd(res, g):
    m, w = res
    return g * w[..., None, :], jnp.einsum("...ij,...ij->...j", g, m).astype(w.dtype)


times_cols.defvjp(_times_cols_fwd, _times_cols_bwd)


def head_chunk_decays(g: jax.Array, seg: jax.Array | None, dtype) -> ChunkDecays:
    """:class:`memjax.memory.chunking.ChunkDecays` (heads-major: ``matrix [b, H, Z, C, C]``,
    ``from_start`` / ``to_end [b, H, Z, C]``, ``chunk [b, H, Z]``) of the chunked per-head log
    decays ``g [b, H, Z, C]`` and chunked segment resets ``seg [b, Z, C]`` (or None).

    The same factors as :func:`memjax.memory.chunking.chunk_decays` (a decay whose ``exp`` is
    exactly 0 is a reset of that head with ``g = 0`` there; every exponent is ``<= 0`` and selected
    before the ``exp``), with the in-chunk sums restarted at each reset as one ``[C, C]`` 0/1
    matmul per chunk (a sum never mixes two segments' gates) and the decay matrix through
    :func:`pair_decays`, both cheaper to differentiate on XLA:CPU than ``cumsum`` and ``exp``
    of a broadcast difference."""
    g = g.astype(dtype)
    full = jnp.exp(g) == 0
    g = jnp.where(full, jnp.zeros((), dtype), g)
    resets = full if seg is None else full | seg[:, None]
    c = g.shape[-1]
    tril = jnp.tril(jnp.ones((c, c), bool))
    # [b, H, Z, C]: resets in [0, i] of the chunk, as a 0/1 matmul (counts <= C, exact at HIGHEST
    # precision); XLA:CPU lowers cumsum to a reduce_window.
    rc = jnp.einsum("...j,ij->...i", resets.astype(dtype), tril.astype(dtype), precision=jax.lax.Precision.HIGHEST)
    keep = tril & (rc[..., :, None] == rc[..., None, :])  # j <= i, one segment
    G = jnp.einsum("...ij,...j->...i", keep.astype(dtype), g, precision=jax.lax.Precision.HIGHEST)  # inclusive
    # sums, restarted at resets (HIGHEST: a TPU's default would round the decays to bfloat16)
    last = rc[..., -1:]
    return ChunkDecays(pair_decays(G, keep), masked_exp(G, rc == 0), masked_exp(G[..., -1:] - G, rc == last),
                       masked_exp(G[..., -1], last[..., 0] == 0))
