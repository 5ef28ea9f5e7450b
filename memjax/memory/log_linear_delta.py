"""Log-linear gated delta rule (log-linear Gated DeltaNet; Guo, Yang, Goel, Xing, Dao, Kim 2025,
"Log-Linear Attention", arXiv:2506.04761, Sec. 3.3).

Gated DeltaNet's transition ``A_t = exp(g_t) (I - beta_t k_t k_t^T)`` applied to every bucket of
the Fenwick partition of :mod:`memjax.memory.log_linear`, each bucket read with its own weight
``lambda = level_scales``::

    o_t = scale * sum_{s <= t} lambda[t, level(t, s)] q_t^T A_t A_{t-1} ... A_{s+1} beta_s k_s v_s^T

(the ``[K, V]`` state layout: ``S_t = A_t S_{t-1} + beta_t k_t v_t^T``). With ``lambda = 1`` this is
:func:`memjax.memory.delta.delta_rule` with the same ``g`` and ``beta``. State:
:class:`memjax.memory.log_linear.LogLinearState` (``levels[l]`` = the bucket-``l`` part of the
delta-rule state of the last query, ``position`` the tokens of the current document seen).

Forms, one result:
  - ``"recurrent"`` (decoding): the Fenwick stack; per token, merge the buckets at the binary
    carry (:func:`memjax.memory.log_linear.merge_levels`), apply ``A_t`` to every level, put
    ``beta_t k_t v_t^T`` in level 0 and read ``sum_l lambda[t, l] levels[l]^T q_t``.
  - ``"chunked"`` (training): the delta rule is linear in the values, with transitions that do
    not depend on them, so each key's contribution can be tracked on its own. Within a chunk, with
    ``D_ij = exp(G_i - G_j)`` (``i >= j``, no reset between), ``gamma_i = exp(G_i)`` and the UT
    transform ``T = (I + L)^{-1} diag(beta)``, ``L_ij = beta_i D_ij k_i.k_j`` (``i > j``) of
    :mod:`memjax.memory.delta`, key ``s``'s write as seen by query ``i`` of the same chunk is
    ``q_i^T (A_i ... A_{s+1}) beta_s k_s = [(Q K^T * D) T]_{is}``, so the intra-chunk part is
    ``((Q K^T * D) T * Lambda) V`` with the hierarchical mask ``Lambda_is = lambda[i, level(i, s)]``.
    A carried level state ``S`` reaches query ``i`` as ``q~_i^T S`` with
    ``q~ = diag(gamma) Q - (Q K^T * D) W``, ``W = T diag(gamma) K``, and leaves the chunk as
    ``M S``, ``M = gamma_last I - (K * D_last)^T W`` (the same ``K x K`` matrix for every level);
    the chunk's own keys enter level ``m`` of its last token as ``(K * D_last)^T T (V * 1[level = m])``.
    :func:`memjax.memory.log_linear.level_pass` carries the stack with the matrix transition.
    ``O(T C (C + K + L V) + T L K V)`` work, ``T / C`` sequential steps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.memory import nonfinite
from memjax.memory.chunking import chunk_decays, from_head_chunks, pad_time, to_chunks, to_head_chunks
from memjax.memory.contract import operand_dtype, output_dtype, resolve_scale, state_dtype
from memjax.memory.delta import unit_lower_inverse
from memjax.memory.log_linear import (LogLinearState, aligned_levels, check_log_linear, fenwick_chunks, gather_levels,
                                      initial_levels, is_aligned, level_pass, merge_levels, read_levels,
                                      sharded_levels, token_positions)
from memjax.memory.segments import segment_resets
from memjax.memory.sequence_parallel import extend_columns

MODES = ("chunked", "recurrent")


def log_linear_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, level_scales: jax.Array, *,
                          g: jax.Array | None = None, scale: float | None = None,
                          initial_state: LogLinearState | None = None, segment_ids: jax.Array | None = None,
                          mode: str = "chunked", chunk_size: int = 64,
                          seq_axis: str | None = None) -> tuple[jax.Array, LogLinearState]:
    """Log-linear (gated) delta rule; see the module docstring for the equations and forms.

    Args:
      q, k: ``[B, T, H, K]`` (callers usually L2-normalise k); v: ``[B, T, H, V]``.
      beta: ``[B, T, H]`` write strength (``(0, 2]``).
      level_scales: ``[B, T, H, L]``, ``L >= ceil(log2 T) + 1``.
      g: ``[B, T, H]`` log decay or None (no decay).
      scale: read scale, default ``K ** -0.5``.
      initial_state: :class:`memjax.memory.log_linear.LogLinearState` or None; reaches only the
        first document of a packed row.
      segment_ids: ``[B, T]`` int packed documents (positions restart, no key crosses a boundary).
      mode: ``"chunked"`` or ``"recurrent"`` (no separate quadratic form: one chunk of ``C >= T``
        is it).
      chunk_size: ``C``; ``T`` need not be a multiple.
      seq_axis: sequence parallelism (chunked mode): as :func:`memjax.memory.log_linear.log_linear_attention`'s
        (:func:`memjax.memory.log_linear.sharded_levels`: the transition is affine in the level stack
        and acts alike on every value column).

    Returns:
      ``(o [B, T, H, V]`` in q's dtype, :class:`LogLinearState` of the last document).
    """
    fn = "log_linear_delta_rule"
    b, t, h, dk, dv, n = check_log_linear(fn, q, k, v, level_scales, initial_state, gates={"beta": beta, "g": g},
                                          required=("beta",), segment_ids=segment_ids, scale=scale, mode=mode,
                                          modes=MODES, chunk_size=chunk_size, seq_axis=seq_axis)
    out_dtype = output_dtype(q)
    acc = state_dtype(q, k, v, beta, g, level_scales, None if initial_state is None else initial_state[0])
    md = operand_dtype(q, k, v)
    scale = resolve_scale(scale, dk)
    q, k, v = (x.astype(md) for x in (q, k, v))
    beta = beta.astype(acc)
    g = None if g is None else g.astype(acc)
    lam = level_scales.astype(acc)
    s0, p0 = initial_levels(initial_state, (b, h, n, dk, dv), acc)
    # (memjax.memory.nonfinite: reads q, lam poison their token, writes the rest of the document,
    # across shards under seq_axis)
    writes = nonfinite.either(nonfinite.bad(k, 3), nonfinite.bad(v, 3), nonfinite.bad(beta, 3),
                              nonfinite.bad(g, 3, gate=True))
    mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.bad(lam, 3),
                            nonfinite.running(writes, segment_ids, axis_name=seq_axis))
    q, k, v, beta, lam = (nonfinite.finite_or_zero(x) for x in (q, k, v, beta, lam))
    g = nonfinite.finite_gate(g)
    if seq_axis is not None:
        run = lambda lv, p: _chunked(q, k, extend_columns(v, n * dk), beta, g, lam, lv, p,
                                     token_positions(b, t, segment_ids, p), segment_ids, scale, chunk_size)
        o, state = sharded_levels(run, s0, p0, segment_ids, t, axis_name=seq_axis)
        o, s = nonfinite.poison_outputs(o.astype(out_dtype), state.levels, mask, seq_axis)
        return o, LogLinearState(s, state.position)
    pos = token_positions(b, t, segment_ids, p0)
    if mode == "recurrent":
        o, s = _recurrent(q, k, v, beta, g, lam, s0, pos, scale, out_dtype)
    else:
        o, s = _chunked(q, k, v, beta, g, lam, s0, p0, pos, segment_ids, scale, chunk_size,
                        aligned=is_aligned(chunk_size, t, segment_ids, initial_state))
    o, s = nonfinite.poison_outputs(o.astype(out_dtype), s, mask)
    return o, LogLinearState(s, pos[:, -1] + 1)


def _recurrent(q, k, v, beta, g, lam, s0, pos, scale, out_dtype):
    acc = s0.dtype

    def step(s, inp):
        qt, kt, vt, bt, gt, lt, pt = inp
        qt, kt, vt = (x.astype(acc) for x in (qt, kt, vt))
        s = merge_levels(s, pt)
        if gt is not None:
            s = s * jnp.exp(gt)[..., None, None, None]
        ks = jnp.einsum("bhk,bhlkv->bhlv", kt, s)  # (I - beta k k^T) on every level
        s = s - (bt[..., None, None] * kt[..., None, :])[..., None] * ks[..., None, :]
        s = s.at[:, :, 0].set(kt[..., :, None] * (bt[..., None] * vt)[..., None, :])
        r = jnp.einsum("bhk,bhlkv->bhlv", qt, s)
        return s, (jnp.einsum("bhl,bhlv->bhv", lt, r) * scale).astype(out_dtype)

    tm = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
    s, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(beta), tm(g), tm(lam), tm(pos)))
    return jnp.swapaxes(o, 0, 1), s


def _chunked(q, k, v, beta, g, lam, s0, p0, pos, segment_ids, scale, chunk_size, aligned=False):
    b, t, h, dk = q.shape
    c, n_lv = chunk_size, s0.shape[2]
    acc, md = s0.dtype, q.dtype
    qc, kc, vc = (to_head_chunks(x, c) for x in (q, k, v))  # [B, H, N, C, .]
    n = qc.shape[2]
    bc = to_head_chunks(beta, c)  # [B, H, N, C]; the padded tail has beta = 0
    lc = to_head_chunks(lam, c)
    gc = None if g is None else to_chunks(pad_time(g, c), c)
    resets = None if segment_ids is None else to_chunks(segment_resets(pad_time(segment_ids, c, mode="edge")), c)
    dec = chunk_decays(gc, resets, (b, n, c, h), acc).heads_major()
    if aligned:
        al = aligned_levels(t, c, n_lv)
        pairs = jnp.broadcast_to(jnp.asarray(al.pairs), (b, n, c, c))
    else:
        fw = fenwick_chunks(to_chunks(pad_time(pos, c, mode="edge"), c), p0, n_lv, acc)
        pairs = fw.pairs
    gamma = dec.from_start[..., None]  # [B, H, N, C, 1]

    # The UT transform T = (I + L)^{-1} diag(beta) (in acc: it feeds three further products) and
    # W = T diag(gamma) K.
    kk = jnp.einsum("bhnik,bhnjk->bhnij", kc, kc, preferred_element_type=acc)
    tr = unit_lower_inverse(bc[..., :, None] * kk * dec.matrix) * bc[..., None, :]
    w = jnp.einsum("bhnij,bhnjk->bhnik", tr, gamma * kc.astype(acc))
    qkd = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc, preferred_element_type=acc) * dec.matrix
    # Intra-chunk: key s's write seen by query i, (Q K^T * D) T, under the hierarchical mask.
    scores = jnp.einsum("bhnij,bhnjs->bhnis", qkd, tr) * gather_levels(lc, pairs) * scale
    o = jnp.einsum("bhnij,bhnjv->bhniv", scores.astype(md), vc, preferred_element_type=acc)
    # Inter-chunk: carried states read through q~ and moved by M; the chunk's keys enter the
    # stack at their level for the last token, through T.
    qr = (gamma * qc.astype(acc) - jnp.einsum("bhnij,bhnjk->bhnik", qkd, w)) * scale
    ke = kc.astype(acc) * dec.to_end[..., None]
    eye = jnp.eye(dk, dtype=acc)
    trans = dec.chunk[..., None, None] * eye - jnp.einsum("bhnck,bhncj->bhnkj", ke, w)  # [B, H, N, K, K]
    if not aligned:
        vl = fw.keys[:, None, ..., None] * vc.astype(acc)[..., None, :]  # [B, H, N, C, L, V]
        tvl = jnp.einsum("bhnij,bhnjlv->bhnilv", tr, vl)
        u = jnp.einsum("bhnck,bhnclv->bhnlkv", ke, tvl)
        stack, s = level_pass(s0, fw.remap, u, transition=trans)
        o = o + read_levels(qr.astype(md), gather_levels(lc, fw.read), stack, acc)
        return from_head_chunks(o, t), s
    # Aligned chunks (memjax.memory.log_linear.AlignedLevels): one level per chunk's keys.
    u = jnp.einsum("bhnck,bhncv->bhnkv", ke, jnp.einsum("bhnij,bhnjv->bhniv", tr, vc.astype(acc)))
    stack, _ = level_pass(s0[:, :, al.first:], al.remap, u, transition=trans, u_level=al.keys)
    o = o + read_levels(qr.astype(md), lc[..., al.first:], stack, acc)
    last = jnp.einsum("bhkj,bhljv->bhlkv", trans[:, :, -1], stack[:, :, -1])  # moved to the last token
    s = jnp.einsum("lm,bhlkv->bhmkv", jnp.asarray(al.final, acc), last)
    vl = jnp.asarray(al.last_keys, acc)[None, None, :, :, None] * vc[:, :, -1].astype(acc)[..., None, :]
    s = s + jnp.einsum("bhck,bhclv->bhlkv", ke[:, :, -1], jnp.einsum("bhij,bhjlv->bhilv", tr[:, :, -1], vl))
    return from_head_chunks(o, t), s
