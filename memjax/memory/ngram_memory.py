"""Hashed n-gram conditional memory (Engram-style): O(1) table lookups keyed by recent token ids.

"Conditional Memory via Scalable Lookup: A New Axis of Sparsity for Large Language
Models" (Engram). For every position ``t`` and n-gram order ``n`` (2, 3, ...), the last
``n`` token ids ``x_t, x_{t-1}, ..., x_{t-n+1}`` are mixed with per-layer random odd
multipliers and XOR, in wrapping uint32 arithmetic:

    h = (x_t * m_0) ^ (x_{t-1} * m_1) ^ ... ^ (x_{t-n+1} * m_{n-1})     (mod 2^32)
    h = fmix32(h)                               # MurmurHash3 finaliser: spreads low-entropy ids
    index[head] = h mod p_head                  # p_head: distinct primes, one per hash head

Each (order, head) pair has its own table of ``p_head`` rows; the tables are stored as one
``[sum p, d]`` array with offsets. Positions before the start of a sequence or of a packed
document (``segment_ids``) use ``pad_id``, so an n-gram never spans a document boundary.

Collisions: for ``M`` distinct n-grams hashed into a table of ``p`` rows the hash behaves
like a uniform random function, so the expected number of colliding pairs is
``M (M - 1) / (2 p)`` and the probability that a given n-gram shares its row with another is
``1 - (1 - 1/p)^(M - 1)``. Heads use distinct primes, so two n-grams collide in every head of
an order with probability about ``prod_head 1/p_head``: the concatenated read is
almost always unique even when single heads collide. ``one_bucket=True`` maps every
n-gram to a single row per head (the control from the Engram discussion: it keeps the
parameters and gate but removes the n-gram information). ``random_ids=True`` is the other
control: the hashed ids are not the tokens but content-free position ids,
``q_t = 1 + (position of t within its document)`` (``0`` before the start), hashed exactly as
above with the layer's multipliers (so they depend on ``seed`` and ``layer``). Each position
then reads its own pseudo-random rows of the same tables through the same gate, so the
parameters and the sparsity of the read are kept but the lookup carries no information about
the tokens (it can learn at most a position embedding). The two controls are exclusive
(``one_bucket`` already ignores the ids; combining them raises ``ValueError``). In decoding the
cache's ``context`` holds the last position ids instead of the last tokens
(:func:`ngram_ids` gives the id stream either way).

Retrieval ``e`` = the heads' rows concatenated. The read enters the residual stream
through a context gate: ``g = sigmoid(sign(s) sqrt(|s|))``, ``s = <RMSNorm(W_k e),
RMSNorm(h)> / sqrt(d)``, output ``g * W_v e`` (the projections and norms live in
``memjax.nn.ngram``). Hashes are computed identically by :func:`ngram_hashes_np` (NumPy,
for the input pipeline, where ids are known before the forward pass) and
:func:`ngram_hashes` (jnp, in the model).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_FMIX_C1, _FMIX_C2 = 0x85EBCA6B, 0xC2B2AE35


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime (trial division); the hash tables use prime sizes so that the modulus mixes well."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def next_primes(start: int, count: int) -> tuple[int, ...]:
    """The ``count`` smallest primes ``>= start``."""
    out, n = [], max(start, 2)
    while len(out) < count:
        if is_prime(n):
            out.append(n)
        n += 1
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class NgramHashParams:
    """Hash configuration of one layer: orders ``2..max_ngram``, ``heads`` per order.

    ``multipliers``: ``max_ngram`` odd uint32 constants; ``table_sizes``: one size per
    (order, head), order-major; all distinct primes (or all 1 with ``one_bucket``).
    ``random_ids``: hash the position ids ``1 + position within the document`` (``0`` before
    the start) instead of the token ids (see the module docstring).
    """

    max_ngram: int
    heads: int
    multipliers: tuple[int, ...]
    table_sizes: tuple[int, ...]
    pad_id: int = 0
    random_ids: bool = False  # control: hash content-free position ids instead of the tokens

    @property
    def orders(self) -> tuple[int, ...]:
        return tuple(range(2, self.max_ngram + 1))

    @property
    def num_heads(self) -> int:
        return len(self.orders) * self.heads

    @property
    def offsets(self) -> np.ndarray:
        """``[num_heads]`` int: first row of each head's table in the concatenated table."""
        return np.concatenate([[0], np.cumsum(self.table_sizes)[:-1]]).astype(np.int64)

    @property
    def total_rows(self) -> int:
        return int(sum(self.table_sizes))


def make_hash_params(*, max_ngram: int = 3, heads: int = 2, table_size: int = 4099, layer: int = 0,
                     seed: int = 0, pad_id: int = 0, one_bucket: bool = False,
                     random_ids: bool = False) -> NgramHashParams:
    """Deterministic hash parameters for one layer.

    Multipliers come from ``numpy.random.default_rng([seed, layer])`` (odd, below 2^32);
    table sizes are the ``(max_ngram - 1) * heads`` smallest primes ``>= table_size`` (distinct).
    ``one_bucket`` and ``random_ids`` are the two controls (exclusive).
    """
    if one_bucket and random_ids:
        raise ValueError("one_bucket and random_ids are exclusive controls (one_bucket already ignores the ids)")
    if max_ngram < 2:
        raise ValueError(f"max_ngram must be >= 2 (orders 2..max_ngram), got {max_ngram}")
    if heads < 1:
        raise ValueError(f"heads must be >= 1, got {heads}")
    if table_size < 2 and not one_bucket:
        raise ValueError(f"table_size must be >= 2, got {table_size}")
    if not 0 <= pad_id < 2 ** 32:
        raise ValueError(f"pad_id must be in [0, 2^32), got {pad_id}")
    rng = np.random.default_rng([seed, layer])
    mult = tuple(int(m) for m in rng.integers(0, 2 ** 31, size=max_ngram, dtype=np.uint64) * 2 + 1)
    count = (max_ngram - 1) * heads
    sizes = (1,) * count if one_bucket else next_primes(table_size, count)
    return NgramHashParams(max_ngram, heads, mult, sizes, pad_id, random_ids)


# ----------------------------------------------------------------------------- hashing


def _check_tokens(tokens, segment_ids, context, params):
    if getattr(tokens, "ndim", None) != 2:
        raise ValueError(f"tokens must be [B, T], got shape {getattr(tokens, 'shape', None)}")
    if segment_ids is not None and segment_ids.shape != tokens.shape:
        raise ValueError(f"segment_ids must be [B, T] = {tuple(tokens.shape)}, got {tuple(segment_ids.shape)}")
    if context is not None and context.shape != (tokens.shape[0], params.max_ngram - 1):
        raise ValueError(
            f"context must be [B, max_ngram - 1] = {(tokens.shape[0], params.max_ngram - 1)}, "
            f"got {tuple(context.shape)}")


def _hash(xp, tokens, segment_ids, context, params: NgramHashParams):
    """Shared NumPy / jnp implementation (``xp`` is the array module); uint32 arithmetic."""
    u32 = xp.uint32
    b, t = tokens.shape
    c = params.max_ngram - 1
    tok = tokens.astype(u32)
    pad = xp.full((b, c), params.pad_id, dtype=u32) if context is None else context.astype(u32)
    full = xp.concatenate([pad, tok], axis=1)  # [B, c + T]; context/pad precede position 0
    if segment_ids is not None:
        seg = segment_ids.astype(xp.int32)
        full_seg = xp.concatenate([xp.repeat(seg[:, :1], c, axis=1) if context is not None
                                   else xp.full((b, c), -1, dtype=xp.int32), seg], axis=1)
    out = []
    h = xp.zeros((b, t), dtype=u32)
    for s in range(params.max_ngram):
        x = full[:, c - s: c - s + t]  # token at position t - s
        if segment_ids is not None and s > 0:
            same = full_seg[:, c - s: c - s + t] == seg
            x = xp.where(same, x, u32(params.pad_id))
        h = h ^ (x * u32(params.multipliers[s]))
        if s == 0:
            continue
        # h now mixes the (s + 1)-gram ending at t: finalise and reduce per head.
        f = h ^ (h >> u32(16))
        f = f * u32(_FMIX_C1)
        f = f ^ (f >> u32(13))
        f = f * u32(_FMIX_C2)
        f = f ^ (f >> u32(16))
        for j in range(params.heads):
            size = params.table_sizes[(s - 1) * params.heads + j]
            out.append(f % u32(size))
    return xp.stack(out, axis=-1).astype(xp.int32)


def _position_ids(xp, tokens, segment_ids, context):
    """``1 + position within the document`` (``int32 [B, T]``), the content-free ids of ``random_ids``.

    Without ``context`` the document starts at position 0 or, with ``segment_ids``, where the
    segment id changes; with ``context`` (decoding, one document) the positions continue from
    the last id of the context (``0``: nothing seen yet).
    """
    b, t = tokens.shape
    idx = xp.broadcast_to(xp.arange(t, dtype=xp.int32), (b, t))
    if context is not None:
        return (context[:, -1:].astype(xp.int32) + 1 + idx).astype(xp.int32)
    if segment_ids is None:
        return idx + 1
    seg = segment_ids.astype(xp.int32)
    starts = xp.concatenate([xp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    marked = xp.where(starts, idx, 0)
    # The start of each position's document: the running maximum of the marked starts.
    first = np.maximum.accumulate(marked, axis=1) if xp is np else jax.lax.cummax(marked, axis=1)
    return (idx - first + 1).astype(xp.int32)


def _ids(xp, tokens, segment_ids, context, params: NgramHashParams):
    """The id stream that is hashed and the params to hash it with: the tokens, or (``random_ids``)
    the position ids with ``0`` as the id before a document's start."""
    if not params.random_ids:
        return tokens, params
    return _position_ids(xp, tokens, segment_ids, context), dataclasses.replace(params, pad_id=0)


def ngram_ids(tokens, params: NgramHashParams, *, segment_ids=None, context=None):
    """The ids :func:`ngram_hashes` mixes, ``[B, T]``: ``tokens`` itself, or with ``params.random_ids``
    the position ids ``1 + position within the document`` (continuing from ``context``'s last id).
    A decoding cache keeps the last ``max_ngram - 1`` of these (NumPy in, NumPy out; jnp otherwise)."""
    _check_tokens(tokens, segment_ids, context, params)
    xp = np if isinstance(tokens, np.ndarray) else jnp
    return _ids(xp, tokens, segment_ids, context, params)[0]


def ngram_hashes_np(tokens, params: NgramHashParams, *, segment_ids=None, context=None) -> np.ndarray:
    """NumPy hashes for the input pipeline; equal to :func:`ngram_hashes`.

    Args:
      tokens: ``int [B, T]`` ids in ``[0, 2^32)``.
      segment_ids: ``int [B, T]`` or None (packed documents; n-grams stop at boundaries).
      context: ``int [B, max_ngram - 1]`` ids preceding position 0 (decoding), oldest first;
        None means padding. With ``params.random_ids`` these are position ids (:func:`ngram_ids`).

    Returns:
      ``int32 [B, T, num_heads]``: row of each (order, head) table, order-major. With
      ``params.random_ids`` the rows depend on the positions only, never on ``tokens``' values.
    """
    tokens = np.asarray(tokens)
    segment_ids = None if segment_ids is None else np.asarray(segment_ids)
    context = None if context is None else np.asarray(context)
    _check_tokens(tokens, segment_ids, context, params)
    ids, hp = _ids(np, tokens, segment_ids, context, params)
    with np.errstate(over="ignore"):
        return _hash(np, ids, segment_ids, context, hp)


def ngram_hashes(tokens: jax.Array, params: NgramHashParams, *, segment_ids=None, context=None) -> jax.Array:
    """jnp version of :func:`ngram_hashes_np` (same arguments and result)."""
    _check_tokens(tokens, segment_ids, context, params)
    ids, hp = _ids(jnp, tokens, segment_ids, context, params)
    return _hash(jnp, ids, segment_ids, context, hp)


# ----------------------------------------------------------------------------- retrieval and gate


def ngram_lookup(table: jax.Array, hashes: jax.Array, params: NgramHashParams) -> jax.Array:
    """Rows of the concatenated table for each head, concatenated: ``[..., num_heads * d]``.

    ``table: [params.total_rows, d]``; ``hashes: int [..., num_heads]`` from :func:`ngram_hashes`,
    head ``j``'s in ``[0, table_sizes[j])``. An out-of-range hash would read another head's rows:
    concrete hashes are checked (``ValueError``); under ``jit`` such a head reads zeros.
    """
    if getattr(table, "ndim", None) != 2 or table.shape[0] != params.total_rows:
        raise ValueError(f"table must be [total_rows={params.total_rows}, d], got {getattr(table, 'shape', None)}")
    if hashes.shape[-1] != params.num_heads:
        raise ValueError(f"hashes must be [..., num_heads={params.num_heads}], got {tuple(hashes.shape)}")
    sizes = jnp.asarray(params.table_sizes, jnp.int32)
    in_range = (hashes >= 0) & (hashes < sizes)
    if not isinstance(hashes, jax.core.Tracer) and not bool(jnp.all(in_range)):
        h = np.asarray(hashes).reshape(-1, params.num_heads)
        bad = int(np.argmax(~np.all((h >= 0) & (h < np.asarray(params.table_sizes)), axis=0)))
        raise ValueError(f"hashes[..., {bad}] must be in [0, {params.table_sizes[bad]}) (head {bad}'s table "
                         f"size), got values in [{h[:, bad].min()}, {h[:, bad].max()}]")
    rows = jnp.where(in_range, hashes, 0) + jnp.asarray(params.offsets, jnp.int32)
    e = jnp.where(in_range[..., None], jnp.take(table, rows, axis=0), 0)  # [..., H, d]
    return e.reshape(*hashes.shape[:-1], -1)


def context_gate(key: jax.Array, hidden: jax.Array, eps: float = 1e-6) -> jax.Array:
    """``g = sigmoid(sign(s) sqrt(|s|))``, ``s = <key, hidden> / sqrt(d)``; returns ``[..., 1]``.

    ``key`` and ``hidden`` (``[..., d]``) are the RMS-normalised projected read and hidden
    state. ``|s|`` is floored at ``eps`` inside the square root so the gradient stays finite
    at ``s = 0`` (where ``d sqrt(|s|)/ds`` would be infinite).
    """
    if key.shape != hidden.shape:
        raise ValueError(f"key and hidden must have the same shape [..., d], got {key.shape} and {hidden.shape}")
    dt = jnp.promote_types(key.dtype, jnp.float32)  # float32 at least (float64 in x64 tests)
    kf, hf = key.astype(dt), hidden.astype(dt)
    s = jnp.sum(kf * hf, axis=-1, keepdims=True) / jnp.sqrt(float(key.shape[-1]))
    return jax.nn.sigmoid(jnp.sign(s) * jnp.sqrt(jnp.maximum(jnp.abs(s), eps)))
