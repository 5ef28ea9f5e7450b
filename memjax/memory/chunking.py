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

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from memjax.kernels.platform import target_platform
from memjax.memory.segments import segment_cumsum

# The chunk length of the chunked delta-rule family (delta_rule, KDA, GDN-2, DPLR; DeltaProduct
# counts sub-steps) when ``chunk_size`` is None, by the platform the computation is built for
# (memjax.kernels.platform.target_platform, so a TPU program compiled on a CPU host gets the TPU's).
# Accelerators: 64, a full MXU / tensor-core tile (flash-linear-attention's default too). CPU: 32,
# because the intra-chunk work per token grows with C (C x C scores, the C x C triangular solve)
# while a CPU's matmuls stop gaining efficiency well below 64. Measured forward + backward at
# T = 4096 (B = 1, H = 4, K = V = 64, float32, 2-core CPU, 2026-12-07, best of 5, three rounds):
# gated delta rule 0.103-0.111 s at C = 32 against 0.126-0.133 at 64 and 0.122-0.127 at 16; DPLR
# 0.160-0.165 against 0.181-0.203; KDA 0.137-0.139 against 0.142-0.155; GDN-2 0.132-0.145 against
# 0.141-0.156. (Linear attention, mLSTM, SSD and Mamba-3 gained nothing at 32 and keep 64.)
DELTA_CHUNK = {"cpu": 32}
ACCELERATOR_CHUNK = 64


def delta_chunk_size(chunk_size: int | None, backend: str | None = None) -> int:
    """``chunk_size``, or when it is None the delta-rule family's default for the target platform:
    32 on CPU, 64 on GPU and TPU (:data:`DELTA_CHUNK`)."""
    if chunk_size is not None:
        return chunk_size
    return DELTA_CHUNK.get(target_platform(backend), ACCELERATOR_CHUNK)

# The chunk-start reference ("tame") fast paths factor a chunk's decays through its start:
# exp(G_i - G_j) = exp(G_i) exp(-G_j). That is exact up to round-off while every |G| in the chunk
# stays within this fraction of log(float max) (about 44 in float32, 354 in float64), so neither
# factor overflows; past it the callers take their general form.
TAME_SPAN = 0.5


def tame_limit(dtype) -> float:
    """The largest total ``sum |g|`` over a chunk that the tame fast paths accept in ``dtype``."""
    return TAME_SPAN * math.log(float(jnp.finfo(dtype).max))


def pad_time(x: jax.Array, multiple: int, *, mode: str = "constant", value=0) -> jax.Array:
    """Pad axis 1 of ``x`` at the end to a multiple of ``multiple``.

    ``mode="constant"`` pads with ``value`` (zeros: for q, k, v, beta and log decays they leave
    the state unchanged); ``mode="edge"`` repeats the last entry (for ``segment_ids``, so the tail
    starts no new segment).
    """
    t = x.shape[1]
    extra = -t % multiple
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    if mode == "constant":
        return jnp.pad(x, widths, constant_values=value)
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
        G = segment_cumsum(g, resets if resets.ndim == 4 else resets[..., None], axis=2)
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


class ChannelDecays(NamedTuple):
    """Log-space decay data of a per-key-channel recurrence within each chunk (heads-major,
    ``[B, H, N, C, Kg]`` with ``Kg = K``, or 1 for a per-head decay broadcast over channels).

    - ``G``, ``r``: the *write* side: ``G_j`` = cumulative ``g`` up to and including ``j``
      (restarted at every reset), ``r_j`` = number of resets at positions ``<= j`` in the chunk.
    - ``Gq``, ``rq``: the *read* side: equal to ``G``, ``r`` when the read at ``i`` follows token
      ``i``'s update; with ``read_before_update`` (RWKV-6's bonus form, the read at ``i`` sees
      ``S_{i-1}``) ``Gq_i = G_{i-1}`` and ``rq_i`` counts the resets before ``i`` and a segment
      start at ``i`` (a ``g = -inf`` at ``i`` only clears the state after ``i``'s read).

    Token ``j``'s write reaches the read at ``i`` with weight ``exp(Gq_i - G_j)`` in every channel
    where ``rq_i == r_j`` (and ``j <= i``, or ``j < i`` with ``read_before_update``), else 0; the
    exponent is ``<= 0`` there. The state carried into the chunk reaches ``i`` with
    ``exp(Gq_i)`` where ``rq_i == 0``.
    """

    G: jax.Array
    r: jax.Array
    Gq: jax.Array
    rq: jax.Array


def _with_read_sums(G, r, seg, read_before_update: bool) -> ChannelDecays:
    """:class:`ChannelDecays` from the inclusive sums ``G`` and reset counts ``r``; reading before
    the update (RWKV-6's bonus form) reads with the sums up to the previous token, and a segment
    start counts as a reset for its own read (``seg``: ``[B, 1, N, C, 1]`` resets or None)."""
    if not read_before_update:
        return ChannelDecays(G, r, G, r)
    shift = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(1, 0), (0, 0)])[..., :-1, :]
    Gq, rq = shift(G), shift(r)
    if seg is not None:
        rq = rq + seg.astype(jnp.int32)
    return ChannelDecays(G, r, Gq, rq)


def channel_decays(g: jax.Array, segment_resets: jax.Array | None, dtype, *,
                   read_before_update: bool = False) -> ChannelDecays:
    """:class:`ChannelDecays` of chunked log decays ``g: [B, H, N, C, Kg]`` and chunked segment
    resets ``[B, N, C]`` bool (or None).

    As in :func:`chunk_decays`, a log decay whose ``exp`` is exactly 0 (``-inf``, or below about
    ``-104`` in float32) is turned into a reset of that channel with ``g = 0``, so no
    ``-inf - (-inf)`` is ever formed, and the cumulative sums restart at every reset (a
    document's sums never carry another's gates or their round-off)."""
    g = g.astype(dtype)
    full = jnp.exp(g) == 0
    g = jnp.where(full, jnp.zeros((), dtype), g)
    seg = None if segment_resets is None else segment_resets[:, None, :, :, None]  # [B, 1, N, C, 1]
    resets = full if seg is None else full | seg
    G = segment_cumsum(g, resets, axis=3)
    r = jnp.cumsum(resets.astype(jnp.int32), axis=3)
    return _with_read_sums(G, r, seg, read_before_update)


def masked_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``exp(x)`` where ``mask``, else 0; the masked entries are replaced before the ``exp`` (no
    overflow, no NaN gradient) and after it (exactly zero gradient)."""
    return _masked_exp(x, mask)


def chunk_span_sums(log_a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log weights between chunks for a loop-free chunk-to-chunk pass, from per-chunk log decays
    ``log_a [..., N]`` (``-inf`` for a chunk holding a reset).

    Returns ``(span [..., N + 1, N + 1], lower [N + 1, N + 1])`` over the extended chunk index
    (position 0: the state before the first chunk; position ``p``: chunk ``p - 1``), with
    ``span[e, m] = sum_{m < l <= e} log_a_l`` where ``lower`` (``m <= e``), else 0. Each entry is
    its own sum over only the chunks between ``m`` and ``e`` (a reverse cumulative sum along each
    row, every term ``<= 0``), not a difference of prefix sums over the whole sequence, so a weight
    near 1 stays exact after a long stretch of strong decays; ``-inf`` terms make the span ``-inf``
    (callers mask before the ``exp``)."""
    n = log_a.shape[-1]
    idx = jnp.arange(n + 1)
    lower = idx[None, :] <= idx[:, None]  # [e, m]
    la = jnp.concatenate([jnp.zeros((*log_a.shape[:-1], 1), log_a.dtype), log_a], axis=-1)  # [..., N + 1]
    rows = jnp.where(lower, la[..., None, :], jnp.zeros((), log_a.dtype))  # [..., e, l]: log a_l for l <= e
    incl = jax.lax.cumsum(rows, axis=rows.ndim - 1, reverse=True)  # sum over m <= l <= e at column m
    span = jnp.concatenate([incl[..., 1:], jnp.zeros((*incl.shape[:-1], 1), log_a.dtype)], axis=-1)
    return span, lower


def segment_cumsum_matrix(segment_resets: jax.Array | None, chunk_size: int, dtype) -> jax.Array:
    """``M [B, N, C, C]`` (or ``[1, 1, C, C]`` without resets) with ``M_ij = 1`` where ``j <= i``
    and no reset in ``(j, i]``, else 0, for chunked segment resets ``[B, N, C]`` bool (or None):
    ``M @ x`` is the inclusive cumulative sum of ``x`` within each chunk, restarted at every reset.

    A matmul instead of a scan: XLA:CPU lowers ``cumsum`` to a ``reduce_window`` and an
    ``associative_scan`` to a chain of slices whose backward pass fuses poorly; one small
    ``[C, C]`` product per chunk is far cheaper forward and backward. Entries of other segments
    are multiplied by an exact 0, so a sum never depends on another segment's values (finite
    ones: callers pass finite gates)."""
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    if segment_resets is None:
        return causal.astype(dtype)[None, None]
    r = jnp.cumsum(segment_resets.astype(jnp.int32), axis=-1)
    return (causal & (r[..., :, None] == r[..., None, :])).astype(dtype)


def uniform_channel_decays(g: jax.Array, segment_resets: jax.Array | None, dtype, *,
                           read_before_update: bool = False) -> ChannelDecays:
    """:func:`channel_decays` for gates with no full decay (``exp(g) > 0`` everywhere), so that
    the only resets are segment starts, shared by all channels: the same :class:`ChannelDecays`
    (``G``, ``Gq`` ``[B, H, N, C, Kg]``) with the reset counts ``r``, ``rq`` as
    ``[B, 1, N, C, 1]`` (broadcast over heads and channels) and the cumulative sums as one
    ``[C, C]`` matmul per chunk (:func:`segment_cumsum_matrix`). The caller checks the
    precondition (a ``g`` whose ``exp`` is 0 needs :func:`channel_decays`' per-channel resets)."""
    g = g.astype(dtype)
    c = g.shape[3]
    m = segment_cumsum_matrix(segment_resets, c, dtype)  # [B or 1, N or 1, C, C]
    if segment_resets is None:  # one [C, C] matrix for all chunks (not broadcast to every one)
        G = jnp.einsum("ij,bhnjk->bhnik", m[0, 0], g)
    else:
        G = jnp.einsum("bnij,bhnjk->bhnik", m, g)
    if segment_resets is None:
        r = jnp.zeros((1, 1, 1, c, 1), jnp.int32)
        seg = None
    else:
        seg = segment_resets[:, None, :, :, None]  # [B, 1, N, C, 1]
        r = jnp.cumsum(seg.astype(jnp.int32), axis=3)
    return _with_read_sums(G, r, seg, read_before_update)
