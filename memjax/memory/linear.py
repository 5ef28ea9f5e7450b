"""Linear attention and gated (decaying) linear attention as one pure function.

Recurrence (per batch and head; ``S_t in R^{K x V}``, ``g_t <= 0`` a log decay)::

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T          o_t = scale * S_t^T q_t

``g = None`` is plain linear attention (Katharopoulos et al. 2020); a per-head scalar ``g`` is
RetNet / Lightning Attention / simple GLA / Mamba-2-style gating. Feature maps (elu+1, Based's
Taylor map, ...) are applied to q and k by the caller (:mod:`memjax.memory.feature_maps`).

Three forms, one result:
  - ``"chunked"`` (training): chunks of ``C`` positions; within a chunk a masked ``C x C`` product
    with decay ``exp(G_i - G_j)``, between chunks one state update per chunk
    (:func:`memjax.kernels.chunk_pass`: a ``lax.scan``, or one Pallas kernel with
    ``impl="pallas"``). O(T C) work for the intra part, O(T/C) sequential steps, no per-token state.
  - ``"recurrent"``: token-by-token ``lax.scan`` (also the decoding form).
  - ``"parallel"``: the quadratic ``T x T`` form (one chunk covering the whole sequence); its
    decays use the cumulative ``g`` over the whole sequence, so for very long, strongly decaying
    sequences in float32 prefer ``"chunked"``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.memory.chunking import chunk_decays, from_head_chunks, pad_time, to_chunks, to_head_chunks
from memjax.memory import nonfinite
from memjax.memory.contract import (check_matrix_memory, operand_dtype, output_dtype, resolve_scale,
                                    state_dtype)
from memjax.memory.segments import segment_resets
from memjax.memory.sequence_parallel import sequence_resets, sharded_chunk_recurrence

MODES = ("chunked", "recurrent", "parallel")


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, g: jax.Array | None = None,
                     scale: float | None = None, initial_state: jax.Array | None = None,
                     segment_ids: jax.Array | None = None, mode: str = "chunked",
                     chunk_size: int = 64, impl: str = "auto",
                     interpret: bool | None = None, seq_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(Gated) linear attention ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      g: ``[B, T, H]`` log decay (``<= 0`` for a contraction) or None (no decay).
      scale: read scale, default ``K ** -0.5``.
      initial_state: ``[B, H, K, V]`` state before ``t = 0`` (zeros if None).
      segment_ids: ``[B, T]`` int, packed documents: where the id changes the state is reset to
        zero before that token's update (``initial_state`` therefore only reaches the first one).
      mode: ``"chunked"``, ``"recurrent"`` or ``"parallel"`` (see the module docstring).
      chunk_size: ``C`` for ``"chunked"``. ``T`` need not be a multiple: the tail is padded with
        ``k = v = q = 0`` and ``g = 0`` (the state is unchanged) and the output sliced back.
      impl: the chunk-to-chunk state pass: ``"auto" | "xla" | "pallas"``
        (:mod:`memjax.kernels.chunk_pass`).
      interpret: run the Pallas kernel in interpret mode (CPU tests); only with ``impl="pallas"``.
      seq_axis: sequence parallelism (:mod:`memjax.memory.sequence_parallel`): call inside
        ``jax.shard_map`` with time split over this mesh axis; the inputs are this device's
        slice of the sequence, ``initial_state`` the state before the whole sequence. Returns
        this slice's outputs and the whole sequence's final state. Chunked / parallel modes.

    Returns:
      ``(o [B, T, H, V]`` in q's dtype, ``final_state [B, H, K, V]`` float32, or float64 for
      float64 inputs). Dtypes follow :mod:`memjax.memory.contract`: q, k, v stay in their dtype
      for the matmuls (float32 accumulation); decays and the state are float32 / float64.
    """
    b, t, h, dk, dv = check_matrix_memory("linear_attention", q, k, v, gates={"g": g}, initial_state=initial_state,
                                          segment_ids=segment_ids, scale=scale, mode=mode, modes=MODES,
                                          chunk_size=chunk_size, impl=impl, seq_axis=seq_axis)
    out_dtype = output_dtype(q)
    acc = state_dtype(q, k, v, g, initial_state)
    md = operand_dtype(q, k, v)
    scale = resolve_scale(scale, dk)
    q, k, v = (x.astype(md) for x in (q, k, v))  # (a no-op unless q, k, v differ in dtype)
    g = None if g is None else g.astype(acc)
    s0 = jnp.zeros((b, h, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
    # A non-finite token poisons only itself and the rest of its document (memjax.memory.nonfinite).
    mask = None
    if seq_axis is None:
        writes = nonfinite.either(nonfinite.bad(k, 3), nonfinite.bad(v, 3), nonfinite.bad(g, 3, gate=True))
        mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.running(writes, segment_ids))  # [B, T, H]
        q, k, v = (nonfinite.finite_or_zero(x) for x in (q, k, v))
        g = nonfinite.finite_gate(g)
    if mode == "recurrent":
        o, s = _recurrent(q, k, v, g, s0, segment_resets(segment_ids), scale, out_dtype)
    else:
        o, s = _chunked(q, k, v, g, s0, segment_ids, scale, t if mode == "parallel" else chunk_size,
                        impl=impl, interpret=interpret, seq_axis=seq_axis)
    return nonfinite.poison_outputs(o.astype(out_dtype), s, mask)


def _recurrent(q, k, v, g, s0, resets, scale, out_dtype):
    """Token-by-token scan; the inputs enter it in their dtype and each token is promoted to the
    state's dtype inside the step (products of two bf16 numbers are exact in float32)."""
    acc = s0.dtype

    def step(s, inp):
        qt, kt, vt, gt, rt = inp
        if gt is not None:
            s = s * jnp.exp(gt)[..., None, None]
        if rt is not None:
            s = jnp.where(rt[:, None, None, None], 0.0, s)
        s = s + kt.astype(acc)[..., :, None] * vt.astype(acc)[..., None, :]
        return s, (jnp.einsum("bhk,bhkv->bhv", qt.astype(acc), s) * scale).astype(out_dtype)

    tm = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)  # time-major for scan
    s, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(g), tm(resets)))
    return jnp.swapaxes(o, 0, 1), s


def _chunked(q, k, v, g, s0, segment_ids, scale, chunk_size, *, impl, interpret, seq_axis=None):
    b, t, h, _ = q.shape
    c = chunk_size
    qc, kc, vc = (to_head_chunks(x, c) for x in (q, k, v))  # [B, H, N, C, .]
    n = qc.shape[2]
    gc = None if g is None else to_chunks(pad_time(g, c), c)
    resets = None if segment_ids is None else to_chunks(sequence_resets(pad_time(segment_ids, c, mode="edge"), seq_axis), c)
    acc = s0.dtype
    dec = chunk_decays(gc, resets, (b, n, c, h), acc).heads_major()

    # Parallel over chunks: causal, decayed, segment-masked scores (no softmax), queries
    # weighted by the decay since the chunk start, keys by the decay to the chunk end. The
    # matmul reads q, k in their dtype and accumulates in `acc`; the decayed factors go back to
    # the input dtype as operands of the chunk pass's matmuls (flash-linear-attention's practice).
    md = q.dtype
    scores = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc, preferred_element_type=acc) * dec.matrix * scale
    qg = qc * (dec.from_start * scale)[..., None]
    ke = kc * dec.to_end[..., None]
    o, s = sharded_chunk_recurrence(qg.astype(md), scores.astype(md), vc, ke.astype(md), dec.chunk, s0,
                                    axis_name=seq_axis, impl=impl, interpret=interpret)
    return from_head_chunks(o, t), s
