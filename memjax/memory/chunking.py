"""Shared helpers for chunkwise-parallel sequence memories: padding, chunk reshapes,
packed-sequence (segment) resets and masked scalar-decay factors.

Conventions: time is axis 1 (``[B, T, ...]``); a chunked array is ``[B, N, C, ...]`` with
``N = ceil(T / C)`` chunks of ``C`` positions. Per-head log decays are ``g: [B, T, H]`` (``g <= 0``;
``exp(g_t)`` multiplies the state before token ``t`` is written). A *reset* at position ``t``
(``t > 0`` and ``segment_ids[:, t] != segment_ids[:, t - 1]``) zeroes the state before token
``t``'s update; it acts as a multiplicative decay of exactly zero, which is applied here with
masks rather than ``g = -inf`` so that no ``inf - inf`` or ``0 * inf`` can make a NaN in the
forward or backward pass.

These helpers are used by linear attention and the delta rule, and fit any recurrence with a
scalar per-head decay (e.g. Mamba-2 SSD).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def pad_time(x: jax.Array, multiple: int, *, mode: str = "constant") -> jax.Array:
    """Pad axis 1 of ``x`` at the end to a multiple of ``multiple``.

    ``mode="constant"`` pads with zeros (for q, k, v, beta and log decays zeros leave the state
    unchanged); ``mode="edge"`` repeats the last entry (for ``segment_ids``, so the tail starts
    no new segment).
    """
    t = x.shape[1]
    extra = -t % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, mode=mode)


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """``[B, T, ...] -> [B, T // C, C, ...]``; ``T`` must be a multiple of ``C`` (see :func:`pad_time`)."""
    b, t = x.shape[:2]
    if t % chunk_size:
        raise ValueError(f"to_chunks: length {t} is not a multiple of chunk_size {chunk_size}; pad first")
    return x.reshape(b, t // chunk_size, chunk_size, *x.shape[2:])


def from_chunks(x: jax.Array) -> jax.Array:
    """``[B, N, C, ...] -> [B, N * C, ...]``."""
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def to_head_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """``[B, T, H, ...] -> [B, H, N, C, ...]``, padding ``T`` with zeros to a multiple of ``C``
    (the heads-major chunk stacks of :func:`memjax.kernels.chunk_pass`)."""
    return jnp.moveaxis(to_chunks(pad_time(x, chunk_size), chunk_size), 3, 1)


def from_head_chunks(x: jax.Array, length: int) -> jax.Array:
    """``[B, H, N, C, ...] -> [B, T, H, ...]`` with the padding beyond ``length`` dropped."""
    return from_chunks(jnp.moveaxis(x, 1, 3))[:, :length]


class ChunkDecays(NamedTuple):
    """Decay factors for one chunk of a scalar-decay recurrence (``G`` = inclusive cumulative ``g``
    within the chunk, ``r`` = number of resets in the chunk up to and including a position).

    - ``matrix``: ``[B, N, H, C, C]``, ``exp(G_i - G_j)`` where ``i >= j`` and no reset in
      ``(j, i]``, else 0: the weight of token ``j``'s write in the state read at ``i``.
    - ``from_start``: ``[B, N, C, H]``, ``exp(G_i)`` if no reset in ``[0, i]`` else 0: the weight of
      the state carried into the chunk as seen at ``i``.
    - ``to_end``: ``[B, N, C, H]``, ``exp(G_{C-1} - G_j)`` if no reset in ``(j, C-1]`` else 0: the
      weight of token ``j``'s write in the chunk's final state.
    - ``chunk``: ``[B, N, H]``, ``exp(G_{C-1})`` if the chunk has no reset else 0: the decay of the
      carried-in state across the whole chunk.

    Every exponent is ``G_i - G_j`` with ``i >= j`` (or ``G_i`` itself), so it is ``<= 0``: no
    overflow however long the chunk or strong the decay. Masked entries are selected before the
    ``exp`` and again after it, so their gradient is exactly zero.
    """

    matrix: jax.Array
    from_start: jax.Array
    to_end: jax.Array
    chunk: jax.Array

    def heads_major(self) -> "ChunkDecays":
        """The same factors with heads before chunks: ``matrix [B, H, N, C, C]``,
        ``from_start`` / ``to_end [B, H, N, C]``, ``chunk [B, H, N]``."""
        return ChunkDecays(jnp.swapaxes(self.matrix, 1, 2), jnp.moveaxis(self.from_start, 3, 1),
                           jnp.moveaxis(self.to_end, 3, 1), jnp.swapaxes(self.chunk, 1, 2))


def _masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _segment_combine(a, b):
    fa, xa = a
    fb, xb = b
    return fa | fb, jnp.where(fb, xb, xa + xb)


def _segment_cumsum(x: jax.Array, starts: jax.Array) -> jax.Array:
    """Inclusive cumulative sum of ``x`` along axis 2, restarted where ``starts`` is True: a value
    depends only on its own segment's entries (bit for bit, whatever the other segments hold)."""
    return jax.lax.associative_scan(_segment_combine, (starts, x), axis=2)[1]


def chunk_decays(g: jax.Array | None, resets: jax.Array | None, shape: tuple, dtype) -> ChunkDecays:
    """Decay factors for chunked log decays ``g: [B, N, C, H]`` (or None: no decay) and
    chunked resets ``[B, N, C]`` or per head ``[B, N, C, H]`` bool (or None). ``shape = (B, N, C, H)``.

    A log decay of ``-inf`` (or one whose ``exp`` underflows to exactly 0, e.g. ``g <= -104`` in
    float32) is a full reset: it is turned into a reset of that head with ``g = 0`` there, which
    is exactly what the recurrent form computes (``exp(g) S = 0``) without ever forming
    ``-inf - (-inf)`` or losing the precision of the other decays to a huge cumulative sum."""
    b, n, c, h = shape
    if g is not None:
        g = g.astype(dtype)
        full = jnp.exp(g) == 0  # exactly the recurrent form's zero decay
        g = jnp.where(full, jnp.zeros((), dtype), g)
        if resets is not None:
            full = full | (resets[..., None] if resets.ndim == 3 else resets)
        resets = full
    if g is None:
        G = jnp.zeros(shape, dtype)
    elif resets is None:
        G = jnp.cumsum(g, axis=2)
    else:  # restarted at every reset: sums never mix two segments' gates (nor their round-off)
        G = _segment_cumsum(g, jnp.broadcast_to(resets if resets.ndim == 4 else resets[..., None], g.shape))
    r = jnp.zeros((b, n, c, 1), jnp.int32) if resets is None else jnp.cumsum(resets.astype(jnp.int32), axis=2)
    if r.ndim == 3:
        r = r[..., None]  # [B, N, C, H or 1]
    causal = jnp.tril(jnp.ones((c, c), bool))
    rh = jnp.moveaxis(r, 3, 2)  # [B, N, H or 1, C]
    mask = causal & (rh[..., :, None] == rh[..., None, :])  # [B, N, H or 1, Ci, Cj]
    Gh = jnp.moveaxis(G, 3, 2)  # [B, N, H, C]
    matrix = _masked_exp(Gh[..., :, None] - Gh[..., None, :], mask)
    from_start = _masked_exp(G, r == 0)
    last_r = r[:, :, -1:]
    to_end = _masked_exp(G[:, :, -1:, :] - G, r == last_r)
    chunk = _masked_exp(G[:, :, -1, :], last_r[:, :, 0] == 0)
    return ChunkDecays(matrix, from_start, to_end, chunk)
