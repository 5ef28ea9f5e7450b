"""Hierarchical parametric memory bank: tree-indexed FFN-memory blocks (pure functions).

Paper: Pouransari et al., "Pretraining with hierarchical memories: separating long-tail and
common knowledge" (2025). A large bank of small FFN blocks is organised as a tree over clusters of
the training corpus; a document's cluster path (one child index per tree level) selects one block
per level, and the fetched blocks act as extra hidden units of the layer's feed-forward network:

    y = FFN(x) + W2_mem sigma(W1_mem x),
    W1_mem = [W1_{n_1} | ... | W1_{n_L}]   ([D, L*H], the fetched blocks along the hidden axis),
    W2_mem = [W2_{n_1}; ...; W2_{n_L}]     ([L*H, D]),

where ``n_l`` is the tree node the document's path reaches at level ``l``. Only the fetched blocks
see gradients, so the bank (which need not fit on the device; see
:mod:`memjax.train.memory_bank`) is trained sparsely.

Tree numbering (:func:`path_block_ids`): level ``l = 0 .. depth-1`` has ``branching**(l+1)``
nodes; a path ``(c_0, ..., c_{depth-1})`` with ``0 <= c_l < branching`` reaches node
``m_l = sum_{i<=l} c_i branching**(l-i)`` of level ``l``, whose global block id is
``offset_l + m_l`` with ``offset_l = sum_{j<l} branching**(j+1)``. The bank holds
:func:`num_blocks` ``= sum_{l<depth} branching**(l+1)`` blocks. The nodes are the clusters of a
hierarchical clustering: two documents share the blocks of their common path prefix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from memjax.memory.contract import check_floating, check_shape, state_dtype

__all__ = ["ACTIVATIONS", "memory_ffn", "num_blocks", "path_block_ids"]

ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


def _check_tree(fn: str, branching, depth) -> None:
    for name, v in (("branching", branching), ("depth", depth)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{fn}: {name} must be a positive int, got {v!r}")


def num_blocks(branching: int, depth: int) -> int:
    """Blocks in a tree of ``depth`` levels below the root, ``branching`` children per node:
    ``sum_{l=1..depth} branching**l``."""
    _check_tree("num_blocks", branching, depth)
    return sum(branching ** (l + 1) for l in range(depth))


def path_block_ids(cluster_path, branching: int, depth: int):
    """Global block ids of the tree nodes on each cluster path.

    ``cluster_path: [..., depth]`` int, entries in ``[0, branching)`` (child index per level) ->
    ``[..., depth]`` int32 ids in ``[0, num_blocks(branching, depth))`` (see the module docstring
    for the numbering). NumPy in, NumPy out (the host-side fetch uses it); a jax array in, a jax
    array out. Out-of-range entries of a NumPy path raise ``ValueError``.
    """
    fn = "path_block_ids"
    _check_tree(fn, branching, depth)
    shape = getattr(cluster_path, "shape", None)
    if shape is None or len(shape) < 1 or shape[-1] != depth:
        raise ValueError(f"{fn}: cluster_path must have shape [..., depth] = [..., {depth}], got {shape}")
    dtype = getattr(cluster_path, "dtype", None)
    if not (np.issubdtype(dtype, np.integer)):
        raise TypeError(f"{fn}: cluster_path must have an integer dtype, got {dtype}")
    host = isinstance(cluster_path, np.ndarray)
    if host and cluster_path.size and (cluster_path.min() < 0 or cluster_path.max() >= branching):
        raise ValueError(f"{fn}: cluster_path entries must be in [0, branching) = [0, {branching}), got "
                         f"values in [{cluster_path.min()}, {cluster_path.max()}]")
    xp = np if host else jnp
    path = cluster_path.astype(xp.int64 if host else jnp.int32)
    ids, node, offset = [], 0, 0
    for level in range(depth):
        node = node * branching + path[..., level]  # index of the level's node (prefix in base b)
        ids.append(offset + node)
        offset += branching ** (level + 1)
    out = xp.stack(ids, axis=-1)
    if host and offset > np.iinfo(np.int32).max:
        raise ValueError(f"{fn}: the tree has {offset} blocks, more than int32 ids can address")
    return out.astype(xp.int32)


def memory_ffn(x, w1_rows, w2_rows, row_index, *, activation: str = "silu"):
    """Extra FFN hidden units from fetched memory blocks: ``y = W2_mem sigma(W1_mem x)``.

    Shapes: ``x: [B, T, D]``; ``w1_rows: [N, D, H]`` and ``w2_rows: [N, H, D]``, the ``N`` fetched
    blocks; ``row_index: [B, L]`` int, which ``L`` of the fetched blocks example ``b`` uses (its
    cluster path's blocks). Per example the ``L`` blocks are concatenated along the hidden axis,

        y[b, t] = sum_l W2[r_bl]^T sigma(W1[r_bl]^T x[b, t]),   r_bl = row_index[b, l],

    i.e. ``W2_mem sigma(W1_mem x)`` with ``W1_mem = [W1_{r_b1} | ... | W1_{r_bL}]`` (``[D, L*H]``);
    ``sigma`` = ``activation`` (``silu``, ``gelu``, ``relu``), applied per hidden unit. Position-wise:
    packed documents in one row share the row's blocks. Matmuls run in the common dtype of ``x``
    and the rows with float32 (float64 for float64 inputs) accumulation; the output has ``x``'s
    dtype. Gradients reach only the fetched rows that ``row_index`` selects (rows no example
    selects get exact zeros). Returns ``[B, T, D]``.
    """
    fn = "memory_ffn"
    b, _, d = check_shape(fn, "x", x, (None, None, None), "[B, T, D]")
    check_floating(fn, "x", x)
    n, _, h = check_shape(fn, "w1_rows", w1_rows, (None, d, None), "[N, D, H]")
    check_floating(fn, "w1_rows", w1_rows)
    check_shape(fn, "w2_rows", w2_rows, (n, h, d), "[N, H, D]")
    check_floating(fn, "w2_rows", w2_rows)
    _, num_levels = check_shape(fn, "row_index", row_index, (b, None), "[B, L]")
    if not jnp.issubdtype(row_index.dtype, jnp.integer):
        raise TypeError(f"{fn}: row_index must have an integer dtype, got {row_index.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if n == 0 or num_levels == 0:
        raise ValueError(f"{fn}: need at least one fetched block and one level, got N={n}, L={num_levels}")
    acc = state_dtype(x, w1_rows, w2_rows)
    op = jnp.result_type(x, w1_rows, w2_rows)
    # Gather each example's blocks: [B, L, D, H] -> the concatenated [B, D, L*H] (and [B, L*H, D]).
    w1 = jnp.take(w1_rows, row_index, axis=0, mode="clip")
    w2 = jnp.take(w2_rows, row_index, axis=0, mode="clip")
    w1 = jnp.moveaxis(w1, 1, 2).reshape(b, d, num_levels * h).astype(op)
    w2 = w2.reshape(b, num_levels * h, d).astype(op)
    pre = jnp.einsum("btd,bdk->btk", x.astype(op), w1, preferred_element_type=acc)
    hid = ACTIVATIONS[activation](pre).astype(op)
    y = jnp.einsum("btk,bkd->btd", hid, w2, preferred_element_type=acc)
    return y.astype(x.dtype)
