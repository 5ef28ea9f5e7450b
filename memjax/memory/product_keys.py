"""Product-key memory: exact top-k over ``N = n^2`` slots from two sets of ``n`` sub-keys.

Lample et al. 2019, "Large Memory Layers with Product Keys". Per head, the query
``q in R^d`` is split into halves ``q1, q2 in R^{d/2}``; slot ``(i, j)`` has score
``s(i, j) = <q1, K1_i> + <q2, K2_j>`` and flat index ``i * n + j``. Because the score is a
sum, the top-k slots are among the ``k x k`` pairs of the two halves' top-k:

    (s1, I1) = topk(q1 K1^T, k);  (s2, I2) = topk(q2 K2^T, k)
    (s, c)   = topk(s1[:, None] + s2[None, :], k)          # over the k^2 candidate sums
    index    = I1[c // k] * n + I2[c % k]

which equals the brute-force top-k over all ``n^2`` scores at ``O(n d + k^2)`` cost.
The read is ``out = sum_{heads, k} softmax_k(s) * V[index]`` with one value table shared by
the heads: one bag of ``heads * k`` (index, weight) pairs per token, computed by
:func:`memjax.kernels.embedding_bag_ops.embedding_bag` (or any lookup with its signature, such as
the sharded lookups of :mod:`memjax.memory.sharded_lookup`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from memjax.kernels.embedding_bag_ops import embedding_bag


def _check(query, subkeys, k):
    if getattr(subkeys, "ndim", None) != 4 or subkeys.shape[1] != 2:
        raise ValueError(f"subkeys must be [heads, 2, n, d/2], got shape {getattr(subkeys, 'shape', None)}")
    h, _, n, half = subkeys.shape
    if getattr(query, "ndim", 0) < 2:
        raise ValueError(f"query must be [..., heads, d], got shape {getattr(query, 'shape', None)}")
    if query.shape[-2] != h or query.shape[-1] != 2 * half:
        raise ValueError(
            f"query must be [..., heads={h}, d={2 * half}] to match subkeys {tuple(subkeys.shape)}, "
            f"got shape {tuple(query.shape)}")
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, n={n}] (sub-keys per half), got {k!r}")
    return h, n, half


def topk(query: jax.Array, subkeys: jax.Array, k: int):
    """Exact top-``k`` product-key slots.

    Args:
      query: ``[..., heads, d]`` (``d`` even; the halves score against the two sub-key sets).
      subkeys: ``[heads, 2, n, d/2]``.
      k: slots per head, ``1 <= k <= n``.

    Returns:
      ``(scores [..., heads, k], indices int32 [..., heads, k])`` sorted by descending score;
      ``indices`` address ``N = n^2`` slots as ``i * n + j``. Scores are differentiable in
      ``query`` and ``subkeys`` (the selection is piecewise constant).
    """
    h, n, half = _check(query, subkeys, k)
    q = query.reshape(*query.shape[:-1], 2, half)  # [..., H, 2, d/2]
    s = jnp.einsum("...hcd,hcnd->...hcn", q, subkeys.astype(q.dtype))  # [..., H, 2, n]
    s_half, i_half = jax.lax.top_k(s, k)  # [..., H, 2, k]
    s1, s2 = s_half[..., 0, :], s_half[..., 1, :]
    i1, i2 = i_half[..., 0, :], i_half[..., 1, :]
    cand = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], k * k)
    scores, c = jax.lax.top_k(cand, k)
    rows = jnp.take_along_axis(i1, c // k, axis=-1)
    cols = jnp.take_along_axis(i2, c % k, axis=-1)
    return scores, (rows * n + cols).astype(jnp.int32)


def product_key_lookup(query: jax.Array, subkeys: jax.Array, values: jax.Array, k: int, *,
                       lookup: Callable | None = None, impl: str = "auto", interpret: bool | None = None):
    """Multi-head product-key memory read.

    ``out[t] = sum_h sum_{j<k} softmax_j(s[t, h])_j * values[idx[t, h, j]]``.

    Args:
      query: ``[..., heads, d]``; subkeys ``[heads, 2, n, d/2]``; values ``[n^2, D]``.
      k: slots per head.
      lookup: ``lookup(values, indices [Bt, heads*k], weights [Bt, heads*k]) -> [Bt, D]``;
        default :func:`embedding_bag` with ``impl`` / ``interpret``.

    Returns:
      ``(out [..., D], indices [..., heads, k])`` (the indices for slot-usage statistics).
    """
    h, n, _ = _check(query, subkeys, k)
    if getattr(values, "ndim", None) != 2 or values.shape[0] != n * n:
        raise ValueError(f"values must be [n^2={n * n}, D], got shape {getattr(values, 'shape', None)}")
    scores, idx = topk(query, subkeys, k)
    w = jax.nn.softmax(scores.astype(jnp.promote_types(scores.dtype, jnp.float32)), axis=-1)
    lead = query.shape[:-2]
    flat_idx = idx.reshape(-1, h * k)
    flat_w = w.reshape(-1, h * k)
    if lookup is None:
        out = embedding_bag(values, flat_idx, flat_w, impl=impl, interpret=interpret)
    else:
        out = lookup(values, flat_idx, flat_w)
    return out.reshape(*lead, values.shape[1]), idx


def slot_usage(indices: jax.Array, num_slots: int) -> jax.Array:
    """Fraction of the ``num_slots`` slots read at least once by ``indices`` (any shape).

    Indices outside ``[0, num_slots)`` (e.g. ``-1`` padding) read no slot: they are dropped, not
    wrapped around as negative indices otherwise would be.
    """
    if num_slots <= 0:
        raise ValueError(f"num_slots must be positive, got {num_slots}")
    idx = indices.reshape(-1)
    idx = jnp.where((idx >= 0) & (idx < num_slots), idx, num_slots)  # num_slots: out of bounds, dropped
    hit = jnp.zeros((num_slots,), jnp.bool_).at[idx].set(True, mode="drop")
    return jnp.mean(hit.astype(jnp.float32))
