"""Packed sequences: one implementation of segment starts, positions and masks.

A packed row holds several documents one after another; ``segment_ids: [B, T]`` int labels each
token with its document (ids need not be sorted, but each document must be contiguous: two
runs of the same id are two documents). Every memory resets its state where a new segment
starts, attention never looks across a boundary, and positions (RoPE) restart at each start.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_resets(segment_ids: jax.Array | None) -> jax.Array | None:
    """``[B, T]`` bool, True where a new segment starts at ``t > 0`` (never at ``t = 0``,
    where ``initial_state`` applies). ``None`` in, ``None`` out."""
    if segment_ids is None:
        return None
    # Compared with the row shifted by one (edge padded, so t = 0 compares with itself). Not
    # `concatenate([zeros, ids[:, 1:] != ids[:, :-1]])`: with time sharded over an Auto mesh axis
    # (jax 0.10.2, CPU) that form lost the changes at shard boundaries.
    previous = jnp.pad(segment_ids, ((0, 0), (1, 0)), mode="edge")[:, :-1]
    return segment_ids != previous


def full_decays_as_resets(g: jax.Array | None, resets: jax.Array | None):
    """``(g, resets)`` with every full per-head decay (``exp(g_t) == 0``, e.g. ``g = -inf``) turned
    into a reset of that head with ``g_t = 0``: the same state (``exp(g) S = 0``) without an
    ``-inf`` in any cumulative sum. ``g: [B, T, H]`` or None; ``resets: [B, T]`` (segment starts,
    broadcast over heads) or None; the returned resets are ``[B, T, H]`` when ``g`` is given."""
    if g is None:
        return g, resets
    full = jnp.exp(g) == 0
    g = jnp.where(full, jnp.zeros((), g.dtype), g)
    return g, full if resets is None else full | resets[..., None]


def _add_unless_restart(a, b):
    """Combine of the segmented sum: ``b``'s run restarts (drops ``a``'s sum) where it is flagged."""
    (ra, sa), (rb, sb) = a, b
    return ra | rb, jnp.where(rb, sb, sa + sb)


def segment_cumsum(x: jax.Array, starts: jax.Array, axis: int) -> jax.Array:
    """Inclusive cumulative sum of ``x`` along ``axis``, restarted where ``starts`` (bool,
    broadcastable to ``x``) is True. The restart is a ``where``, not a subtraction, so a value
    depends only on its own segment's entries, bit for bit, whatever the others hold (a NaN or
    inf in another document never reaches it)."""
    starts = jnp.broadcast_to(starts, x.shape)
    return jax.lax.associative_scan(_add_unless_restart, (starts, x), axis=axis)[1]


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` bool, True at the first token of every segment (``t = 0`` included)."""
    return segment_resets(segment_ids).at[:, 0].set(True)


def positions_in_segment(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` int32: index of each token within its segment (0 at every segment start)."""
    idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    start_idx = jax.lax.cummax(jnp.where(segment_starts(segment_ids), idx, 0), axis=1)
    return idx - start_idx


def positions(batch: int, length: int, segment_ids: jax.Array | None = None, offset=0) -> jax.Array:
    """``[B, T]`` int32 token positions: ``offset + t``, or restarting per segment."""
    if segment_ids is not None:
        return positions_in_segment(segment_ids) + offset
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length))


def same_segment_as_shifted(segment_ids: jax.Array | None, shift: int) -> jax.Array | None:
    """``[B, T]`` bool: True where token ``t - shift`` exists and is in the same segment as ``t``
    (a causal window of width ``shift + 1`` may read it). ``None`` in, ``None`` out."""
    if segment_ids is None:
        return None
    t = segment_ids.shape[1]
    same = jnp.zeros(segment_ids.shape, bool)
    if shift < t:
        same = same.at[:, shift:].set(segment_ids[:, shift:] == segment_ids[:, : t - shift])
    # a run of the same id that was interrupted is a different document
    resets = jnp.cumsum(segment_resets(segment_ids), axis=1)
    prev = jnp.pad(resets, ((0, 0), (shift, 0)), constant_values=-1)[:, :t]
    return same & (prev == resets)


def document_ids(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` int32 ids that differ for every contiguous run (so equal ids mean the same
    document even when a caller reuses an id later in the row)."""
    return jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)
