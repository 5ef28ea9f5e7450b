"""Ring attention: causal softmax attention with time split over a mesh axis.

Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite Context"
(2023); zig-zag load balancing as in Brandon et al., "Striped Attention" (2023) and the zig-zag
ring of Megatron-LM's context parallelism. Inside ``jax.shard_map`` over ``seq_axis`` (``P``
devices), every device keeps its queries, and the keys / values travel round the ring with
``lax.ppermute`` (``P - 1`` hops); each device folds the partial results of the blocks it
meets by online softmax: with ``(o_a, lse_a)`` and ``(o_b, lse_b)`` two partial results over
disjoint key sets,

    lse = log(exp(lse_a) + exp(lse_b)),   o = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b

(each partial is :func:`memjax.memory.flash_attention.flash_attention`, O(T / P) memory per
device). The result equals single-device attention to round-off; JAX derives the gradients
(``ppermute`` transposes to the reverse ring, the blockwise kernel has its own backward).

Layout. The caller's layout is the contiguous one of the memories
(:mod:`memjax.memory.sequence_parallel`): device ``i`` holds ``[i T/P, (i + 1) T/P)``. Under a
causal mask that would leave device 0 one block of work and device ``P - 1`` ``P`` blocks, so
the function itself re-lays the sequence out in zig-zag order (two ``ppermute`` of half
shards): device ``i`` holds half-chunks ``i`` and ``2P - 1 - i`` (of ``2P``), every ring step
then costs every device the same half of a square (one query half against one key half
skipped, chosen by ``lax.cond``), and the output is permuted back. This keeps the model's
layout (which the recurrent memories need) and costs ``q, k, v`` and ``o`` one hop each. A local
length that is odd cannot be halved: then the layout stays contiguous and a device skips the
key blocks of later devices (correct, but unbalanced).

Shapes (per device): ``q: [B, T_l, H, K]``, ``k: [B, T_l, Hkv, K]``, ``v: [B, T_l, Hkv, V]``,
``segment_ids: [B, T_l]`` (this shard of the packed row; documents may cross devices).
Positions are the global ``i T_l + t`` (self-attention; the caller's RoPE is applied before).
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from memjax.kernels.manual_axes import common_varying
from memjax.memory import nonfinite
from memjax.memory.attention import attention_inputs
from memjax.memory.flash_attention import flash_attention
from memjax.memory.sequence_parallel import check_axis, sequence_resets

LAYOUTS = ("auto", "zigzag", "contiguous")


def global_document_ids(segment_ids: jax.Array, axis_name: str) -> jax.Array:
    """``[B, T_l]`` int32 document ids that are the same on every device for the same document
    (:func:`memjax.memory.segments.document_ids` of the whole row, minus a constant): local
    counts of document starts plus the starts of the earlier shards (one ``all_gather``)."""
    local = jnp.cumsum(sequence_resets(segment_ids, axis_name), axis=1, dtype=jnp.int32)
    totals = jax.lax.all_gather(local[:, -1], axis_name)  # [P, B]
    earlier = jnp.arange(totals.shape[0]) < jax.lax.axis_index(axis_name)
    return local + jnp.sum(jnp.where(earlier[:, None], totals, 0), axis=0, dtype=jnp.int32)[:, None]


def _zig(c: int, n: int) -> int:
    """The device that holds half-chunk ``c`` (of ``2n``) in zig-zag order."""
    return c if c < n else 2 * n - 1 - c


def to_zigzag(x: jax.Array, axis_name: str) -> jax.Array:
    """Contiguous shard ``[B, T_l, ...]`` (half-chunks ``2i, 2i + 1``) -> zig-zag shard (half-chunks
    ``i, 2P - 1 - i``); ``T_l`` even."""
    n, half = jax.lax.axis_size(axis_name), x.shape[1] // 2
    first = jax.lax.ppermute(x[:, :half], axis_name, [(i, _zig(2 * i, n)) for i in range(n)])
    second = jax.lax.ppermute(x[:, half:], axis_name, [(i, _zig(2 * i + 1, n)) for i in range(n)])
    # an even device received its first slot from an even chunk, an odd device from an odd one
    even = jax.lax.axis_index(axis_name) % 2 == 0
    return jnp.where(even, jnp.concatenate([first, second], 1), jnp.concatenate([second, first], 1))


def from_zigzag(x: jax.Array, axis_name: str) -> jax.Array:
    """The inverse of :func:`to_zigzag`."""
    n, half = jax.lax.axis_size(axis_name), x.shape[1] // 2
    even = jax.lax.axis_index(axis_name) % 2 == 0
    from_even = jnp.where(even, x[:, :half], x[:, half:])  # the slot that came from an even chunk
    from_odd = jnp.where(even, x[:, half:], x[:, :half])
    first = jax.lax.ppermute(from_even, axis_name, [(_zig(2 * i, n), i) for i in range(n)])
    second = jax.lax.ppermute(from_odd, axis_name, [(_zig(2 * i + 1, n), i) for i in range(n)])
    return jnp.concatenate([first, second], 1)


def _empty(b, t, h, dv, acc, refs):
    """A partial result over no keys: ``o = 0``, ``lse = -inf``, nothing seen."""
    out = (jnp.zeros((b, t, h, dv), acc), jnp.full((b, t, h), -jnp.inf, acc), jnp.zeros((b, t, h), bool))
    cast, _ = common_varying(*out, *refs)
    return tuple(cast[:3])


def _combine(a, b):
    """Online-softmax merge of two partial results ``(o, lse, seen)`` over disjoint key sets;
    rows empty in both stay ``o = 0``, ``lse = -inf`` (no ``-inf - -inf``, no ``log 0`` kept)."""
    (oa, la, sa), (ob, lb, sb) = a, b
    m = jnp.maximum(la, lb)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    wa, wb = jnp.exp(la - m_safe), jnp.exp(lb - m_safe)
    total = wa + wb
    empty = total == 0
    total_safe = jnp.where(empty, 1.0, total)
    o = (wa[..., None] * oa + wb[..., None] * ob) / total_safe[..., None]
    lse = jnp.where(empty, -jnp.inf, m_safe + jnp.log(total_safe))
    return o, lse, sa | sb


def _cat(a, b):
    return tuple(jnp.concatenate([x, y], axis=1) for x, y in zip(a, b))


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, seq_axis: str, scale: float | None = None,
                   segment_ids: jax.Array | None = None, window: int = 0, layout: str = "auto",
                   block_q: int | None = None, block_k: int | None = None) -> jax.Array:
    """Causal softmax attention of this device's shard of a sequence split over ``seq_axis``.

    ``o_t = sum_s softmax_s(scale q_t . k_s) v_s`` over every earlier key of the whole sequence
    (within ``window`` if > 0, in the same packed document), equal to
    :func:`memjax.memory.attention.causal_attention` of the gathered sequence; returns this
    device's ``o: [B, T_l, H, V]`` (contiguous layout, in ``v``'s dtype; softmax statistics in
    float32, float64 for float64 inputs). ``layout``: ``"zigzag"`` (load-balanced; needs an even
    ``T_l``), ``"contiguous"`` or ``"auto"`` (zig-zag when ``T_l`` is even). Non-finite inputs
    poison exactly the rows the XLA form poisons. No forget gate here (its cumulative sum would
    need a scan across devices): FoX under ``seq_axis`` is not supported yet.
    """
    fn = "ring_attention"
    n = check_axis(fn, seq_axis)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{fn}: q, k, v must be [B, T, H, D]; got q{q.shape} k{k.shape} v{v.shape}")
    b, tl, h, dk = q.shape
    hkv = k.shape[2]
    if k.shape[:2] != (b, tl) or k.shape[3] != dk or v.shape[:3] != k.shape[:3] or h % hkv:
        raise ValueError(f"{fn}: k{k.shape} / v{v.shape} do not match q{q.shape} (self-attention, H % Hkv == 0)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{fn}: {name} must be floating, got {x.dtype}")
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"{fn}: window must be an int >= 0 (0: no window), got {window!r}")
    if segment_ids is not None and segment_ids.shape != (b, tl):
        raise ValueError(f"{fn}: segment_ids must be [B, T_l] = {(b, tl)}, got {segment_ids.shape}")
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "zigzag" and tl % 2:
        raise ValueError(f"{fn}: layout='zigzag' needs an even local length, got T_l = {tl}")
    zigzag = layout == "zigzag" or (layout == "auto" and tl % 2 == 0 and n > 1)
    scale = dk ** -0.5 if scale is None else scale
    dtype, dv = v.dtype, v.shape[3]
    idx = jax.lax.axis_index(seq_axis)
    pos = jnp.broadcast_to(idx * tl + jnp.arange(tl, dtype=jnp.int32), (b, tl))
    doc = None if segment_ids is None else global_document_ids(segment_ids, seq_axis)
    q, k, v, _, _, _, _, bad_kv, poisoned = attention_inputs(q, k, v)
    if zigzag:
        q, k, v, pos, bad_kv, poisoned = (to_zigzag(x, seq_axis) if x is not None else None
                                          for x in (q, k, v, pos, bad_kv, poisoned))
        doc = None if doc is None else to_zigzag(doc, seq_axis)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    blocks = dict(block_q=block_q, block_k=block_k)
    local = jnp.arange(tl, dtype=jnp.int32)  # relative positions of a diagonal block

    def attend(qs, kv, causal_blocks=False):
        """``flash_attention`` of queries ``qs = (q, pos, doc)`` against ``kv = (k, v, pos, doc, bad)``."""
        (qq, qp, qd), (kk, vv, kp, kd, kb) = qs, kv
        if causal_blocks:  # a diagonal block: both at the same relative positions, aranges from 0
            qp = kp = jnp.broadcast_to(local[: qq.shape[1]], qp.shape)
        return flash_attention(qq, kk, vv, scale=scale, q_pos=qp, k_pos=kp, window=window, q_seg=qd, k_seg=kd,
                               bad_kv=kb, causal_blocks=causal_blocks, **blocks)

    def sl(tree, s):  # a time slice of every array of a tuple
        return jax.tree.map(lambda x: x[:, s], tree)

    def stack(a, b):  # two (queries, keys) problems of the same shape as one, along the batch axis
        return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), a, b)

    def pick(c, a, b):
        return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)

    half = tl // 2
    lo, hi = slice(0, half), slice(half, tl)
    queries, kv = (q, pos, doc), (k, v, pos, doc, bad_kv)
    if zigzag:
        # own blocks: the two causal diagonals as one call (block bounds apply), and the late
        # half against the early one
        diag = attend(stack(sl(queries, lo), sl(queries, hi)), stack(sl(kv, lo), sl(kv, hi)), causal_blocks=True)
        first = (jax.tree.map(lambda x: x[:b], diag),
                 _combine(jax.tree.map(lambda x: x[b:], diag), attend(sl(queries, hi), sl(kv, lo))))
    else:
        first = attend(queries, kv, causal_blocks=True)

    def step(carry, s):
        kv, result = carry
        # keys and values (with their positions, documents and flags) move one device on
        kv = jax.lax.ppermute(kv, seq_axis, [(i, (i + 1) % n) for i in range(n)])
        earlier = (idx - s) % n < idx  # the keys' owner precedes this device
        if zigzag:
            # an earlier device's keys: both query halves see its early half (its late half is in
            # every query's future); a later device's: only the late queries see anything, both
            # halves. Either way two half-by-half problems of one shape, one call, no branch.
            problems = attend(stack(pick(earlier, sl(queries, lo), sl(queries, hi)), sl(queries, hi)),
                              stack(sl(kv, lo), pick(earlier, sl(kv, lo), sl(kv, hi))))
            r0, r1 = jax.tree.map(lambda x: x[:b], problems), jax.tree.map(lambda x: x[b:], problems)
            nothing = _empty(b, half, h, dv, acc, refs)
            part = (pick(earlier, r0, nothing), pick(earlier, r1, _combine(r0, r1)))
            result = (_combine(result[0], part[0]), _combine(result[1], part[1]))
        else:
            part = jax.lax.cond(earlier, lambda: attend(queries, kv), lambda: _empty(b, tl, h, dv, acc, refs))
            result = _combine(result, part)
        return (kv, result), None

    refs = [x for x in (q, k, v, pos, doc) if x is not None]
    (_, result), _ = jax.lax.scan(step, (kv, first), jnp.arange(1, n))
    if zigzag:
        result = _cat(*result)
    o, _, seen = result
    o = nonfinite.poison(o.astype(dtype), nonfinite.either(poisoned, seen))
    return from_zigzag(o, seq_axis) if zigzag else o
