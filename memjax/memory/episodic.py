"""Episodic key-value memory: a ring buffer of past ``(key, value)`` pairs read by top-k softmax.

Memorizing Transformers (Wu et al., ICLR 2022), LongMem (Wang et al., NeurIPS 2023) and CAMELoT
(He et al., 2024) keep the keys and values of past tokens in an external, non-differentiable
memory and let a query attend to its ``k`` nearest keys only::

    (s, I) = top_k_j( scale * <q_hat, k_hat_j> )          over the valid slots j   (k_hat = k / ||k||)
    o      = sum_{i < k} softmax_i(s) * v_{I_i}

Keys are L2-normalised when written and queries when read, so the top-k by inner product is the
top-k by cosine similarity (the search a vector index such as ``approx_max_k`` accelerates) and the
read is bounded: ``|scale * <q_hat, k_hat>| <= |scale|``. The memory is non-differentiable
(``stop_gradient`` on the stored keys and values and on what is written): gradients reach the
query (through the selected scores) and ``scale``, never the memory, as in Memorizing
Transformers (section 3: "we do not backpropagate gradients into the external memory").

State (:class:`EpisodicState`, per batch row; every head writes at the same time):
  ``keys [B, Hkv, M, D]`` (normalised), ``values [B, Hkv, M, Dv]`` in the storage dtype,
  ``valid [B, M]`` bool (slot holds a pair), ``positions [B, M]`` int32 (the position the caller
  gave each pair, -1 where empty), ``count [B]`` int32 (pairs written since the last reset; the
  write pointer is ``count % M``).

Functions:

- :func:`episodic_init`      an empty memory.
- :func:`episodic_write`     append ``(k, v)`` of the tokens a mask selects, oldest overwritten first.
- :func:`episodic_reset`     empty the rows a flag selects (a new document).
- :func:`episodic_retrieve`  top-k softmax read of the memory by queries ``q [B, T, H, D]``.
- :func:`topk_attention`     the read itself over any candidate keys with a per-query visibility
  mask (the episodic block reads the ring and the tokens of the current
  call with it).

Search: ``approx=False`` is the exact ``lax.top_k``; ``approx=True`` uses
``jax.lax.approx_max_k(..., recall_target)``, which TPUs accelerate (a partial reduction
that finds each true top-k element with probability ``recall_target``); on CPU and GPU XLA
computes it exactly, so both give the same result there.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from memjax.memory.contract import check_floating, check_shape, shape_of

__all__ = ["EpisodicState", "TopKRead", "episodic_init", "episodic_reset", "episodic_retrieve", "episodic_write",
           "l2_normalize", "topk_attention"]

_EPS = 1e-6  # of the L2 normalisation (as memjax.nn.layers.l2_normalize)


class EpisodicState(NamedTuple):
    """The ring buffer of one memory (a pytree; see the module docstring for the fields)."""

    keys: jax.Array  # [B, Hkv, M, D], L2-normalised
    values: jax.Array  # [B, Hkv, M, Dv]
    valid: jax.Array  # [B, M] bool
    positions: jax.Array  # [B, M] int32, -1 where empty
    count: jax.Array  # [B] int32, pairs written since the last reset

    @property
    def num_slots(self) -> int:
        return self.keys.shape[2]


class TopKRead(NamedTuple):
    """What a top-k read returns: ``output [B, T, H, Dv]`` (``values``' dtype), ``scores`` and
    ``indices [B, T, H, k]`` (descending; ``scores`` float32 or float64, ``-inf`` and an
    arbitrary index where fewer than ``k`` candidates are visible) and ``found [B, T, H]`` bool
    (some candidate was visible; ``output`` is 0 where not)."""

    output: jax.Array
    scores: jax.Array
    indices: jax.Array
    found: jax.Array


def l2_normalize(x: jax.Array, eps: float = _EPS) -> jax.Array:
    """``x / sqrt(||x||^2 + eps)`` over the last axis, computed in float32 (float64 for float64
    inputs) and returned in ``x``'s dtype."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(acc)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _check_int(fn: str, name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
            high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{fn}: {name} must be an int {bound}, got {value!r}")
    return int(value)


def _check_state(fn: str, state) -> tuple[int, int, int, int, int]:
    """``(B, Hkv, M, D, Dv)`` of a well-formed :class:`EpisodicState`."""
    if not isinstance(state, EpisodicState):
        raise TypeError(f"{fn}: state must be an EpisodicState (episodic_init), got {type(state).__name__}")
    b, hkv, m, d = check_shape(fn, "state.keys", state.keys, (None,) * 4, "[B, Hkv, M, D]")
    check_floating(fn, "state.keys", state.keys)
    dv = check_shape(fn, "state.values", state.values, (b, hkv, m, None), "[B, Hkv, M, Dv]")[3]
    check_floating(fn, "state.values", state.values)
    check_shape(fn, "state.valid", state.valid, (b, m), "[B, M]")
    if state.valid.dtype != jnp.bool_:
        raise TypeError(f"{fn}: state.valid must be bool, got {state.valid.dtype}")
    for name, x, want, dims in (("positions", state.positions, (b, m), "[B, M]"),
                                ("count", state.count, (b,), "[B]")):
        check_shape(fn, f"state.{name}", x, want, dims)
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{fn}: state.{name} must have an integer dtype, got {x.dtype}")
    return b, hkv, m, d, dv


def episodic_init(batch_size: int, num_heads: int, num_slots: int, key_dim: int, value_dim: int | None = None,
                  dtype=jnp.float32) -> EpisodicState:
    """An empty memory of ``num_slots`` pairs per row and head, keys and values in ``dtype``."""
    fn = "episodic_init"
    for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("num_slots", num_slots),
                        ("key_dim", key_dim)):
        _check_int(fn, name, value, 1)
    dv = key_dim if value_dim is None else _check_int(fn, "value_dim", value_dim, 1)
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(f"{fn}: dtype must be a floating dtype, got {jnp.dtype(dtype)}")
    b, m = batch_size, num_slots
    return EpisodicState(jnp.zeros((b, num_heads, m, key_dim), dtype), jnp.zeros((b, num_heads, m, dv), dtype),
                         jnp.zeros((b, m), bool), jnp.full((b, m), -1, jnp.int32), jnp.zeros((b,), jnp.int32))


def episodic_reset(state: EpisodicState, reset: jax.Array) -> EpisodicState:
    """Empty the rows where ``reset [B]`` (bool) is True: no pair valid, ``count = 0`` (keys and
    values zeroed too, so a later read can never pick up a stale pair)."""
    fn = "episodic_reset"
    b = _check_state(fn, state)[0]
    check_shape(fn, "reset", reset, (b,), "[B]")
    if reset.dtype != jnp.bool_:
        raise TypeError(f"{fn}: reset must be bool, got {reset.dtype}")
    r4 = reset[:, None, None, None]
    return EpisodicState(jnp.where(r4, jnp.zeros((), state.keys.dtype), state.keys),
                         jnp.where(r4, jnp.zeros((), state.values.dtype), state.values),
                         state.valid & ~reset[:, None], jnp.where(reset[:, None], -1, state.positions),
                         jnp.where(reset, 0, state.count))


def episodic_write(state: EpisodicState, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                   positions: jax.Array | None = None) -> EpisodicState:
    """Append the pairs ``(k_t, v_t)`` of the tokens ``mask`` selects, in time order.

    ``k: [B, T, Hkv, D]``, ``v: [B, T, Hkv, Dv]`` (floating), ``mask: [B, T]`` bool (None: all),
    ``positions: [B, T]`` integer (what the slots record; None: the write index ``count + i``).
    The ``i``-th selected token of row ``b`` goes to slot ``(count_b + i) % M``, so once the
    buffer is full each write overwrites the oldest pair; when a call selects more than ``M``
    tokens only the last ``M`` remain, exactly as writing them one by one would leave it.
    Keys are L2-normalised (in float32) and both are cast to the memory's dtype; nothing written
    carries a gradient.
    """
    fn = "episodic_write"
    b, hkv, m, d, dv = _check_state(fn, state)
    t = check_shape(fn, "k", k, (b, None, hkv, d), "[B, T, Hkv, D]")[1]
    check_floating(fn, "k", k)
    check_shape(fn, "v", v, (b, t, hkv, dv), "[B, T, Hkv, Dv]")
    check_floating(fn, "v", v)
    if mask is not None:
        check_shape(fn, "mask", mask, (b, t), "[B, T]")
        if mask.dtype != jnp.bool_:
            raise TypeError(f"{fn}: mask must be bool, got {mask.dtype}")
    if positions is not None:
        check_shape(fn, "positions", positions, (b, t), "[B, T]")
        if not jnp.issubdtype(positions.dtype, jnp.integer):
            raise TypeError(f"{fn}: positions must have an integer dtype, got {positions.dtype}")
    mask = jnp.ones((b, t), bool) if mask is None else mask
    rank = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1  # index of each selected token among this call's
    n = rank[:, -1:] + 1  # [B, 1] tokens selected
    count = state.count.astype(jnp.int32)
    keep = mask & (rank >= n - m)  # at most the last M: their slots are distinct
    slot = jnp.where(keep, jnp.mod(count[:, None] + rank, m), m)  # m: out of range, dropped by the scatter
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    kn = jax.lax.stop_gradient(l2_normalize(k)).astype(state.keys.dtype)
    vn = jax.lax.stop_gradient(v).astype(state.values.dtype)
    # x.at[rows, :, slot] indexes [B, T] pairs of (row, slot) around the head axis: the update is [B, T, Hkv, .]
    keys = state.keys.at[rows, :, slot].set(kn, mode="drop")
    values = state.values.at[rows, :, slot].set(vn, mode="drop")
    pos = count[:, None] + rank if positions is None else positions.astype(jnp.int32)
    return EpisodicState(keys, values, state.valid.at[rows, slot].set(True, mode="drop"),
                         state.positions.at[rows, slot].set(pos, mode="drop"), count + n[:, 0])


def _check_top_k(fn: str, top_k, s: int) -> int:
    return _check_int(fn, "top_k", top_k, 1, s)


def _resolve_scale(fn: str, scale, h: int, d: int):
    """A Python scalar or an ``[H]`` array of per-head scales (default ``D ** -0.5``)."""
    if scale is None:
        return d ** -0.5
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        return float(scale)
    got = shape_of(scale)
    if got not in ((), (h,)):
        raise ValueError(f"{fn}: scale must be a number or have shape [H] = ({h},), got {got}")
    check_floating(fn, "scale", scale)
    return scale


def topk_attention(q: jax.Array, keys: jax.Array, values: jax.Array, top_k: int, *,
                   visible: jax.Array | None = None, scale=None, approx: bool = False,
                   recall_target: float = 0.95) -> TopKRead:
    """Softmax attention over the ``top_k`` best visible keys of each query (no normalisation
    here: callers pass normalised ``q`` and ``keys`` for a cosine search).

    Shapes: ``q: [B, T, H, D]``, ``keys: [B, S, Hkv, D]``, ``values: [B, S, Hkv, Dv]`` with
    ``H % Hkv == 0`` (grouped heads: query head ``h`` reads key head ``h // (H / Hkv)``),
    ``visible: [B, T, S]`` bool (None: all), ``top_k`` an int in ``[1, S]``, ``scale`` a number
    or ``[H]`` per-head array (default ``D ** -0.5``).

    ``s_j = scale * <q, k_j>`` (float32; float64 for float64 inputs), ``(s, I) = top_k(s_j : j
    visible)``, ``o = sum_i softmax_i(s) v_{I_i}`` over the selected visible keys only (hidden
    ones are ``-inf`` before the search and masked with ``where`` before the exponential, so a
    query with fewer than ``top_k`` visible keys averages those it has and one with none reads
    0). ``keys`` and ``values`` carry no gradient (``stop_gradient``); ``q`` and ``scale`` do,
    through the selected scores.
    """
    fn = "topk_attention"
    b, t, h, d = check_shape(fn, "q", q, (None,) * 4, "[B, T, H, D]")
    check_floating(fn, "q", q)
    s, hkv = check_shape(fn, "keys", keys, (b, None, None, d), "[B, S, Hkv, D]")[1:3]
    check_floating(fn, "keys", keys)
    dv = check_shape(fn, "values", values, (b, s, hkv, None), "[B, S, Hkv, Dv]")[3]
    check_floating(fn, "values", values)
    if hkv == 0 or h % hkv:
        raise ValueError(f"{fn}: the query heads H = {h} must be a multiple of the key heads Hkv = {hkv}")
    if visible is not None:
        check_shape(fn, "visible", visible, (b, t, s), "[B, T, S]")
        if visible.dtype != jnp.bool_:
            raise TypeError(f"{fn}: visible must be bool, got {visible.dtype}")
    top_k = _check_top_k(fn, top_k, s)
    scale = _resolve_scale(fn, scale, h, d)
    if not isinstance(approx, bool):
        raise ValueError(f"{fn}: approx must be a bool, got {approx!r}")
    if not (isinstance(recall_target, numbers.Real) and 0.0 < recall_target <= 1.0):
        raise ValueError(f"{fn}: recall_target must be in (0, 1], got {recall_target!r}")
    r = h // hkv
    acc = jnp.promote_types(jnp.promote_types(q.dtype, keys.dtype), jnp.float32)
    keys, values = jax.lax.stop_gradient(keys), jax.lax.stop_gradient(values)
    qg = q.reshape(b, t, hkv, r, d)
    logits = jnp.einsum("btgrd,bsgd->btgrs", qg, keys.astype(q.dtype), preferred_element_type=acc)
    sc = jnp.asarray(scale, acc)
    logits = logits * (sc.reshape(hkv, r, 1) if sc.ndim else sc)
    if visible is not None:
        logits = jnp.where(visible[:, :, None, None, :], logits, -jnp.inf)
    if approx:
        top, idx = jax.lax.approx_max_k(logits, top_k, recall_target=recall_target)
    else:
        top, idx = jax.lax.top_k(logits, top_k)  # [B, T, Hkv, r, k], descending
    ok = top > -jnp.inf
    found = ok[..., 0]
    # `where` before the exponential: a hidden pick (-inf) never meets the arithmetic
    m = jax.lax.stop_gradient(jnp.where(found, top[..., 0], 0.0))[..., None]  # softmax is shift-invariant
    e = jnp.where(ok, jnp.exp(jnp.where(ok, top, 0.0) - m), 0.0)
    w = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(acc).tiny)
    # gather the picked values per key head: [B, Hkv, S, Dv] at [B, Hkv, T*r*k]
    vg = jnp.moveaxis(values, 2, 1)
    flat = jnp.moveaxis(idx, 2, 1).reshape(b, hkv, t * r * top_k)
    picked = jnp.take_along_axis(vg, flat[..., None], axis=2).reshape(b, hkv, t, r, top_k, dv)
    out = jnp.einsum("bgtrk,bgtrkv->btgrv", w.transpose(0, 2, 1, 3, 4), picked.astype(acc))
    return TopKRead(out.reshape(b, t, h, dv).astype(values.dtype), top.reshape(b, t, h, top_k),
                    idx.reshape(b, t, h, top_k).astype(jnp.int32), found.reshape(b, t, h))


def episodic_retrieve(state: EpisodicState, q: jax.Array, top_k: int, *, scale=None, approx: bool = False,
                      recall_target: float = 0.95) -> TopKRead:
    """Read the memory: :func:`topk_attention` of the L2-normalised ``q: [B, T, H, D]`` over the
    valid slots (``H`` a multiple of the memory's ``Hkv``; ``top_k`` in ``[1, M]``).

    ``indices`` are slot numbers in ``[0, M)`` (``state.positions`` maps them to positions);
    ``scale`` (number or ``[H]``) defaults to ``D ** -0.5``, though with unit vectors a larger
    (learned) temperature is what makes the softmax selective.
    """
    fn = "episodic_retrieve"
    b, hkv, m, d, _ = _check_state(fn, state)
    t, h = check_shape(fn, "q", q, (b, None, None, d), "[B, T, H, D]")[1:3]
    check_floating(fn, "q", q)
    if h % hkv:
        raise ValueError(f"{fn}: q's heads H = {h} must be a multiple of the memory's heads Hkv = {hkv}")
    _check_top_k(fn, top_k, m)
    keys, values = jnp.moveaxis(state.keys, 1, 2), jnp.moveaxis(state.values, 1, 2)  # [B, M, Hkv, .]
    visible = jnp.broadcast_to(state.valid[:, None, :], (b, t, m))
    return topk_attention(l2_normalize(q), keys, values, top_k, visible=visible, scale=scale, approx=approx,
                          recall_target=recall_target)
