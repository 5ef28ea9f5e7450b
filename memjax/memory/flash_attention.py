"""O(T)-memory softmax attention: the online-softmax recurrence over key/value blocks.

Rabe & Staats, "Self-attention does not need O(n^2) memory" (2021); Dao et al., FlashAttention
(2022) / FlashAttention-2 (2023) for the block recurrence and its backward. For query block
``i`` and key blocks ``j`` (``s_ts = scale q_t . k_s + D_ts`` on visible pairs, ``-inf`` on the
rest)::

    m_t  <- max(m_t, max_s s_ts)                       (running max, float32)
    l_t  <- exp(m_old - m_t) l_t + sum_s exp(s_ts - m_t)
    a_t  <- exp(m_old - m_t) a_t + sum_s exp(s_ts - m_t) v_s
    o_t = a_t / l_t,   lse_t = m_t + log l_t

so only ``[block_q, block_k]`` logits exist at a time. The backward (a ``custom_vjp``) recomputes
each block's probabilities from the saved ``lse`` (``p_ts = exp(s_ts - lse_t)``) and uses
``dP = dO V^T``, ``delta_t = rowsum(dO_t * o_t)`` and ``dS = P * (dP - delta + dlse)``::

    dQ = scale dS K,   dK = scale dS^T Q,   dV = P^T dO,   dG_q = rowsum(dS),   dG_k = -colsum(dS)

(``dlse``, the cotangent of ``lse``, lets ring attention combine partial results with ordinary
differentiable code). Residuals are ``q, k, v, o, lse``: O(T) memory forward and backward.

This module is the kernel over *prepared* arrays (:func:`memjax.memory.attention.causal_attention`
with ``impl="chunked"`` prepares them: finite ``q, k, v``, positions, document ids, cumulative
gates). Rows with no visible key give ``o = 0``, ``lse = -inf`` (as the XLA form gives 0).

Shapes: ``q: [B, T, H, K]``, ``k: [B, S, Hkv, K]``, ``v: [B, S, Hkv, V]`` (``H % Hkv == 0``),
``q_pos: [B, T]``, ``k_pos: [B, S]`` int, optional ``q_seg [B, T]`` / ``k_seg [B, S]`` int,
``k_valid: [B, S]`` bool, ``q_gate: [B, T, H]`` / ``k_gate: [B, S, H]`` float (``D_ts = G_t - G_s``),
``q_resets: [B, T, H]`` / ``k_resets: [B, S, H]`` int (a pair is visible only where they are equal),
``bad_kv: [B, S, H]`` bool (which keys were non-finite: ``seen`` reports the rows that saw one).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from memjax.kernels.manual_axes import common_varying

# Default block sizes (keys / queries per block): measured on XLA:CPU by
# benchmarks/bench_attention.py (see benchmarks/results/attention_cpu.json).
BLOCK_Q = 256
BLOCK_K = 256


class _Aux(NamedTuple):
    """The per-token mask and bias arrays (None where absent), padded to whole blocks."""
    q_pos: jax.Array
    k_pos: jax.Array
    q_seg: jax.Array | None
    k_seg: jax.Array | None
    k_valid: jax.Array | None
    q_resets: jax.Array | None
    k_resets: jax.Array | None
    bad_kv: jax.Array | None


class _Static(NamedTuple):
    scale: float
    window: int
    bq: int
    bk: int
    causal_blocks: bool
    acc: jnp.dtype


def _pad(x, length, axis=1, value=0):
    if x is None or x.shape[axis] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _slice(x, start, size):
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _varying(init, *refs):
    """Loop-carry initial values cast to vary like ``refs`` (inside ``jax.shard_map`` a replicated
    zero cannot meet per-device values in a carry; a no-op elsewhere)."""
    leaves, tree = jax.tree.flatten(init)
    cast, _ = common_varying(*leaves, *refs)
    return jax.tree.unflatten(tree, cast[:len(leaves)])


def _heads(x, hkv):
    """``[B, L, H] -> [B, Hkv, r, L]`` (the logits' layout)."""
    b, length, h = x.shape
    return jnp.moveaxis(x.reshape(b, length, hkv, h // hkv), 1, 3)


def _mask(st: _Static, aux: _Aux, i, j, hkv):
    """``[B, 1|Hkv, 1|r, bq, bk]`` bool: the visible pairs of query block ``i``, key block ``j``."""
    qp, kp = _slice(aux.q_pos, i * st.bq, st.bq), _slice(aux.k_pos, j * st.bk, st.bk)
    m = kp[:, None, :] <= qp[:, :, None]
    if st.window > 0:
        m &= kp[:, None, :] > qp[:, :, None] - st.window
    if aux.q_seg is not None:
        m &= _slice(aux.q_seg, i * st.bq, st.bq)[:, :, None] == _slice(aux.k_seg, j * st.bk, st.bk)[:, None, :]
    if aux.k_valid is not None:
        m &= _slice(aux.k_valid, j * st.bk, st.bk)[:, None, :]
    m = m[:, None, None]
    if aux.q_resets is not None:
        nq = _heads(_slice(aux.q_resets, i * st.bq, st.bq), hkv)
        nk = _heads(_slice(aux.k_resets, j * st.bk, st.bk), hkv)
        m = m & (nq[..., :, None] == nk[..., None, :])
    return m


def _logits(st: _Static, qi, kj, qg_i, kg_j, mask):
    """Masked logits ``[B, Hkv, r, bq, bk]`` (``-inf`` off the mask; ``where`` before any use, so a
    masked pair's finite bias never reaches a kept value)."""
    s = jnp.einsum("bqgrk,bsgk->bgrqs", qi, kj, preferred_element_type=st.acc) * st.scale
    if qg_i is not None:
        s = s + (qg_i[..., :, None] - kg_j[..., None, :])
    return jnp.where(mask, s, -jnp.inf)


def _kv_bounds(st: _Static, i, nk):
    """Key blocks ``[lo, hi)`` that query block ``i`` can see (default positions: aranges)."""
    if not st.causal_blocks:
        return 0, nk
    hi = jnp.minimum(nk, ((i + 1) * st.bq - 1) // st.bk + 1)
    lo = 0 if st.window <= 0 else jnp.maximum(i * st.bq - st.window + 1, 0) // st.bk
    return lo, hi


def _q_bounds(st: _Static, j, nq):
    """Query blocks ``[lo, hi)`` that can see key block ``j`` (default positions)."""
    if not st.causal_blocks:
        return 0, nq
    lo = (j * st.bk) // st.bq
    hi = nq if st.window <= 0 else jnp.minimum(nq, ((j + 1) * st.bk + st.window - 2) // st.bq + 1)
    return lo, hi


def _forward(st: _Static, q, k, v, qg, kg, aux: _Aux):
    """Padded inputs (``q: [B, Tp, Hkv, r, K]``, gates ``[B, Hkv, r, L]``) -> ``(o [B, Tp, Hkv, r, V]``
    float, ``lse [B, Hkv, r, Tp]``, ``seen [B, Hkv, r, Tp]`` bool)."""
    b, tp, hkv, r, _ = q.shape
    dv = v.shape[-1]
    nq, nk = tp // st.bq, k.shape[1] // st.bk
    refs = [x for x in jax.tree.leaves((q, k, v, qg, kg, aux))]

    def q_block(i):
        qi = _slice(q, i * st.bq, st.bq)
        qg_i = None if qg is None else jax.lax.dynamic_slice_in_dim(qg, i * st.bq, st.bq, axis=3)

        def body(j, carry):
            m, l, a, seen = carry
            kj, vj = _slice(k, j * st.bk, st.bk), _slice(v, j * st.bk, st.bk)
            kg_j = None if kg is None else jax.lax.dynamic_slice_in_dim(kg, j * st.bk, st.bk, axis=3)
            mask = _mask(st, aux, i, j, hkv)
            s = _logits(st, qi, kj, qg_i, kg_j, mask)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row with nothing seen yet
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            l = alpha * l + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bgrqs,bsgv->bgrqv", p.astype(v.dtype), vj, preferred_element_type=st.acc)
            a = alpha[..., None] * a + pv
            if aux.bad_kv is not None:
                bad = _heads(_slice(aux.bad_kv, j * st.bk, st.bk), hkv)  # [B, Hkv, r, bk]
                seen = seen | jnp.any(mask & bad[..., None, :], axis=-1)
            return m_new, l, a, seen

        init = (jnp.full((b, hkv, r, st.bq), -jnp.inf, st.acc), jnp.zeros((b, hkv, r, st.bq), st.acc),
                jnp.zeros((b, hkv, r, st.bq, dv), st.acc), jnp.zeros((b, hkv, r, st.bq), bool))
        lo, hi = _kv_bounds(st, i, nk)
        m, l, a, seen = jax.lax.fori_loop(lo, hi, body, _varying(init, *refs))
        empty = l == 0  # no visible key: o = 0 (as the XLA form), lse = -inf
        l_safe = jnp.where(empty, 1.0, l)
        o = jnp.where(empty[..., None], 0.0, a / l_safe[..., None])
        lse = jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))
        return jnp.moveaxis(o, 3, 1), lse, seen  # o: [B, bq, Hkv, r, V]

    o, lse, seen = jax.lax.map(q_block, jnp.arange(nq))  # [nq, ...]
    o = jnp.moveaxis(o, 0, 1).reshape(b, tp, hkv, r, dv)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, hkv, r, tp)
    seen = jnp.moveaxis(seen, 0, 3).reshape(b, hkv, r, tp)
    return o, lse, seen


def _backward(st: _Static, q, k, v, qg, kg, aux: _Aux, o, lse, do, dlse):
    """FlashAttention-2's backward: outer loop over key blocks (``dK, dV`` per block), inner loop
    over the query blocks that see it, ``dQ`` accumulated in an O(T) carry."""
    b, tp, hkv, r, dk = q.shape
    nq, nk = tp // st.bq, k.shape[1] // st.bk
    acc = st.acc
    # delta_t = rowsum(dO_t * o_t) - dlse_t, so that dS = P * (dP - delta)
    delta = jnp.moveaxis(jnp.sum(do * o, axis=-1), 1, 3)  # [B, Hkv, r, Tp]
    if dlse is not None:
        delta = delta - dlse
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)  # empty rows: every s is -inf anyway
    gated = qg is not None
    refs = [x for x in jax.tree.leaves((q, k, v, qg, kg, aux, lse, do, delta))]

    def k_block(carry, j):
        dq, dqg = carry
        kj, vj = _slice(k, j * st.bk, st.bk), _slice(v, j * st.bk, st.bk)
        kg_j = None if kg is None else jax.lax.dynamic_slice_in_dim(kg, j * st.bk, st.bk, axis=3)
        kj32, vj32 = kj.astype(acc), vj.astype(acc)

        def body(i, inner):
            dq, dqg, dkj, dvj, dkg_j = inner
            qi = _slice(q, i * st.bq, st.bq)
            qg_i = None if qg is None else jax.lax.dynamic_slice_in_dim(qg, i * st.bq, st.bq, axis=3)
            mask = _mask(st, aux, i, j, hkv)
            s = _logits(st, qi, kj, qg_i, kg_j, mask)
            p = jnp.exp(s - jax.lax.dynamic_slice_in_dim(lse_safe, i * st.bq, st.bq, axis=3)[..., None])
            do_i = _slice(do, i * st.bq, st.bq)  # [B, bq, Hkv, r, V]
            dp = jnp.einsum("bqgrv,bsgv->bgrqs", do_i, vj32)
            ds = p * (dp - jax.lax.dynamic_slice_in_dim(delta, i * st.bq, st.bq, axis=3)[..., None])
            dvj = dvj + jnp.einsum("bgrqs,bqgrv->bsgv", p, do_i)
            dkj = dkj + st.scale * jnp.einsum("bgrqs,bqgrk->bsgk", ds, qi.astype(acc))
            dq_i = _slice(dq, i * st.bq, st.bq) + st.scale * jnp.einsum("bgrqs,bsgk->bqgrk", ds, kj32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * st.bq, axis=1)
            if gated:
                dqg_i = jax.lax.dynamic_slice_in_dim(dqg, i * st.bq, st.bq, axis=3) + jnp.sum(ds, axis=-1)
                dqg = jax.lax.dynamic_update_slice_in_dim(dqg, dqg_i, i * st.bq, axis=3)
                dkg_j = dkg_j - jnp.sum(ds, axis=-2)
            return dq, dqg, dkj, dvj, dkg_j

        init = (dq, dqg, jnp.zeros((b, st.bk, hkv, dk), acc), jnp.zeros((b, st.bk, hkv, v.shape[-1]), acc),
                jnp.zeros((b, hkv, r, st.bk), acc) if gated else None)
        lo, hi = _q_bounds(st, j, nq)
        dq, dqg, dkj, dvj, dkg_j = jax.lax.fori_loop(lo, hi, body, _varying(init, *refs))
        return (dq, dqg), (dkj, dvj, dkg_j)

    init = (jnp.zeros(q.shape, acc), jnp.zeros((b, hkv, r, tp), acc) if gated else None)
    (dq, dqg), (dk_blocks, dv_blocks, dkg_blocks) = jax.lax.scan(k_block, _varying(init, *refs), jnp.arange(nk))
    sp = k.shape[1]
    dk_ = jnp.moveaxis(dk_blocks, 0, 1).reshape(b, sp, hkv, dk)
    dv_ = jnp.moveaxis(dv_blocks, 0, 1).reshape(b, sp, hkv, v.shape[-1])
    dkg = None if not gated else jnp.moveaxis(dkg_blocks, 0, 3).reshape(b, hkv, r, sp)
    return dq, dk_, dv_, dqg, dkg


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st: _Static, q, k, v, qg, kg, aux: _Aux):
    o, lse, seen = _forward(st, q, k, v, qg, kg, aux)
    return o, lse, seen


def _core_fwd(st, q, k, v, qg, kg, aux):
    o, lse, seen = _forward(st, q, k, v, qg, kg, aux)
    return (o, lse, seen), (q, k, v, qg, kg, aux, o, lse)


def _core_bwd(st, res, cts):
    q, k, v, qg, kg, aux, o, lse = res
    do, dlse, _ = cts
    dq, dk, dv, dqg, dkg = _backward(st, q, k, v, qg, kg, aux, o, lse, do.astype(st.acc),
                                     None if dlse is None else dlse.astype(st.acc))
    aux_ct = jax.tree.map(lambda _: None, aux)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            None if qg is None else dqg.astype(qg.dtype), None if kg is None else dkg.astype(kg.dtype), aux_ct)


_core.defvjp(_core_fwd, _core_bwd)


def _check(q, k, v, q_pos, k_pos, q_seg, k_seg, k_valid, q_gate, k_gate, q_resets, k_resets, bad_kv) -> None:
    """Shapes and dtypes of :func:`flash_attention`'s arguments, before any compute."""
    fn = "flash_attention"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{fn}: q, k, v must be [B, T, H, K], [B, S, Hkv, K], [B, S, Hkv, V]; got q{q.shape} "
                         f"k{k.shape} v{v.shape}")
    b, t, h, dk = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != dk or v.shape[:3] != k.shape[:3] or h % hkv:
        raise ValueError(f"{fn}: k{k.shape} / v{v.shape} do not match q{q.shape} (H a multiple of Hkv)")
    for name, x in (("q", q), ("k", k), ("v", v), ("q_gate", q_gate), ("k_gate", k_gate)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{fn}: {name} must be floating, got {x.dtype}")
    expected = {"q_pos": (b, t), "k_pos": (b, s), "q_seg": (b, t), "k_seg": (b, s), "k_valid": (b, s),
                "q_gate": (b, t, h), "k_gate": (b, s, h), "q_resets": (b, t, h), "k_resets": (b, s, h),
                "bad_kv": (b, s, h)}
    given = dict(q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg, k_valid=k_valid, q_gate=q_gate,
                 k_gate=k_gate, q_resets=q_resets, k_resets=k_resets, bad_kv=bad_kv)
    for name, x in given.items():
        if x is not None and tuple(x.shape) != expected[name]:
            raise ValueError(f"{fn}: {name} must have shape {expected[name]}, got {tuple(x.shape)}")
    for a, b_ in (("q_seg", "k_seg"), ("q_gate", "k_gate"), ("q_resets", "k_resets")):
        if (given[a] is None) != (given[b_] is None):
            raise ValueError(f"{fn}: {a} and {b_} go together (got only one)")


def _block(block: int | None, length: int, default: int) -> int:
    block = default if block is None else block
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"flash_attention: block sizes must be positive ints, got {block!r}")
    return min(block, length)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, q_pos: jax.Array,
                    k_pos: jax.Array, window: int = 0, q_seg: jax.Array | None = None,
                    k_seg: jax.Array | None = None, k_valid: jax.Array | None = None,
                    q_gate: jax.Array | None = None, k_gate: jax.Array | None = None,
                    q_resets: jax.Array | None = None, k_resets: jax.Array | None = None,
                    bad_kv: jax.Array | None = None, causal_blocks: bool = False,
                    block_q: int | None = None, block_k: int | None = None):
    """Blockwise masked softmax attention over prepared arrays (module docstring for shapes).

    Returns ``(o [B, T, H, V]`` in the accumulation dtype (float32; float64 for float64 inputs),
    ``lse [B, T, H]`` (``-inf`` for rows that see no key), ``seen [B, T, H]`` bool: the rows
    that see a key flagged in ``bad_kv``; all False without it). Differentiable in ``q, k, v``
    and the gates through both ``o`` and ``lse``.

    ``causal_blocks=True`` promises that ``q_pos`` and ``k_pos`` are ``arange(T)`` / ``arange(S)``
    in every row: the loops then visit only the key blocks a query block can see (causal, and
    ``window``), about half the work of the full square (``window / S`` of it with a window).
    """
    _check(q, k, v, q_pos, k_pos, q_seg, k_seg, k_valid, q_gate, k_gate, q_resets, k_resets, bad_kv)
    b, t, h, dk = q.shape
    s, hkv = k.shape[1], k.shape[2]
    r = h // hkv
    acc = jnp.promote_types(jnp.promote_types(q.dtype, k.dtype), jnp.float32)
    bq, bk = _block(block_q, t, BLOCK_Q), _block(block_k, s, BLOCK_K)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    st = _Static(float(scale), int(window), bq, bk, bool(causal_blocks), jnp.dtype(acc))
    if sp != s and k_valid is None:
        k_valid = jnp.ones((b, s), bool)  # the padded keys are masked out
    aux = _Aux(_pad(q_pos, tp), _pad(k_pos, sp), _pad(q_seg, tp), _pad(k_seg, sp), _pad(k_valid, sp, value=False),
               _pad(q_resets, tp), _pad(k_resets, sp), _pad(bad_kv, sp, value=False))
    if causal_blocks and tp != t:
        # padded queries continue the arange, so the block bounds stay exact (they are dropped)
        aux = aux._replace(q_pos=jnp.broadcast_to(jnp.arange(tp, dtype=aux.q_pos.dtype), (b, tp)))
    if causal_blocks and sp != s:
        aux = aux._replace(k_pos=jnp.broadcast_to(jnp.arange(sp, dtype=aux.k_pos.dtype), (b, sp)))
    qp = _pad(q, tp).reshape(b, tp, hkv, r, dk)
    kp, vp = _pad(k, sp), _pad(v, sp)
    qg = None if q_gate is None else _heads(_pad(q_gate.astype(acc), tp), hkv)
    kg = None if k_gate is None else _heads(_pad(k_gate.astype(acc), sp), hkv)
    o, lse, seen = _core(st, qp, kp, vp, qg, kg, aux)
    o = o.reshape(b, tp, h, v.shape[-1])[:, :t]

    def per_head(x):  # [B, Hkv, r, Tp] -> [B, T, H]
        return jnp.moveaxis(x, 3, 1).reshape(b, tp, h)[:, :t]

    return o, per_head(lse), per_head(seen)
