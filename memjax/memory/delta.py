"""Delta rule (DeltaNet) and gated delta rule (Gated DeltaNet) as one pure function.

Recurrence (per batch and head; ``S_t in R^{K x V}``, ``beta_t in (0, 2]``, ``g_t <= 0``)::

    S'_t = exp(g_t) * S_{t-1}                                  (decay first; g = None: no decay)
    S_t  = S'_t + k_t (beta_t * (v_t - S'_t^T k_t))^T          (one step of online regression)
    o_t  = scale * S_t^T q_t

Sources: Schlag et al. 2021; Yang et al. 2024 "Parallelizing Linear Transformers with the Delta
Rule over Sequence Length"; Yang, Kautz, Hatamizadeh 2024 "Gated Delta Networks".

Kimi Delta Attention (KDA; Kimi team 2025, "Kimi Linear: An Expressive, Efficient Attention
Architecture"): a log decay per key channel, ``g: [B, T, H, K]``, makes the decay ``diag(exp g_t)``::

    S'_t = diag(exp g_t) S_{t-1};   S_t = S'_t + k_t (beta_t (v_t - S'_t^T k_t))^T

That case runs the channel-wise core of :mod:`memjax.memory.gdn2` (GDN-2 with erase and write
gates ``b_t = w_t = beta_t 1``), whose chunked form keeps every decay relative to an in-chunk
reference point (no ``exp`` of a positive number); see there. Grouped value heads: ``v``,
``beta``, ``g`` and the state may have ``HV`` heads, a multiple of ``H``; value head ``j`` reads
and writes with q/k head ``j // (HV / H)``.

Negative eigenvalues (Grazzi et al., ICLR 2025, "Unlocking State-Tracking in Linear RNNs Through
Negative Eigenvalues"): with a unit key the transition ``I - beta_t k_t k_t^T`` has eigenvalues 1
and ``1 - beta_t``, so ``beta in (0, 2]`` spans ``[-1, 1)`` (``beta = 2``: a reflection) and the
state stays bounded. Both forms are exact for any ``beta`` (the UT system below is unit
triangular whatever its entries); tested against a float64 token loop at ``beta`` in
``[1.9, 2]``. Round-off does grow: ``|L_ij|`` reaches 2 instead of 1, the inverse's entries
(measured, C = 64, unit keys) reach ~2 instead of ~1, with alternating signs, so ``U = T V`` and
``W = T diag(gamma) K`` cancel more. With bf16 inputs, whose chunked form rounds ``(I + L)^{-1}``
and ``U, W`` to bf16 as flash-linear-attention does, the error near ``beta = 2`` is about 3x that at
``beta < 1`` (relative max error ~2e-2 vs ~7e-3, T = 200, K = V = 16), and float32 inputs lose
up to ~20x more than at ``beta < 1`` (~2e-5 vs ~1e-6 relative, keys in a 2-D subspace, T = 130;
~3e-6 for random keys); the recurrent form is unaffected. float64 stays exact (1e-10 tested).

Forms:
  - ``"chunked"``: the chunkwise-parallel WY / UT algorithm. Within a chunk with incoming state
    ``S`` and decay weights ``D_ij = exp(G_i - G_j)`` (``i >= j``, no reset in between),
    ``gamma_i = exp(G_i)`` (no reset in ``[0, i]``), the per-token corrections
    ``delta_j = beta_j (v_j - S'_j^T k_j)`` solve the unit lower-triangular system::

        (I + L) delta = diag(beta) (V - diag(gamma) K S),   L_ij = beta_i D_ij k_i.k_j  (i > j)

    so ``delta = U - W S`` with ``U = T V``, ``W = T diag(gamma) K``,
    ``T = (I + L)^{-1} diag(beta)`` (the UT transform). ``(I + L)^{-1}`` comes from
    :func:`memjax.memory.ut_transform.unit_lower_inverse` (block forward substitution written as
    batched matmuls, no LAPACK call; see there). Then::

        O      = scale * (diag(gamma) Q S + (Q K^T * D) delta)
        S_next = gamma_{C-1} S + (K * D_{C-1, :})^T delta

    Everything except ``delta = U - W S``, the ``Q S`` read and the state update is computed for
    all chunks at once; :func:`memjax.kernels.chunk_pass` carries only the ``[B, H, K, V]``
    state from chunk to chunk (a ``lax.scan``, or one Pallas kernel with ``impl="pallas"``), and
    no per-token state is ever formed.
  - ``"recurrent"``: token-by-token ``lax.scan`` (also the decoding form).
  - There is no ``"parallel"`` form: the quadratic form of the delta rule *is* the chunked form
    with one chunk, i.e. ``mode="chunked", chunk_size >= T``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.memory.chunk_products import times_rows
from memjax.memory.chunking import chunk_decays, delta_chunk_size, from_head_chunks, pad_time, to_chunks, to_head_chunks
from memjax.memory import nonfinite
from memjax.memory.delta_kernel import chunked_delta_kernel, delta_kernel
from memjax.memory.contract import (check_matrix_memory, operand_dtype, output_dtype, resolve_scale,
                                    state_dtype)
from memjax.memory.gdn2 import channel_delta, check_channel_options
from memjax.memory.kda_kernel import chunked_kda_kernel, kda_kernel
from memjax.memory.segments import segment_resets
from memjax.memory.sequence_parallel import (extend_columns, sequence_resets, sharded_chunk_recurrence,
                                             sharded_columns)
from memjax.memory.ut_transform import unit_lower_inverse

__all__ = ["MODES", "delta_rule", "unit_lower_inverse"]

MODES = ("chunked", "recurrent")


def delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, *, g: jax.Array | None = None,
               scale: float | None = None, initial_state: jax.Array | None = None,
               segment_ids: jax.Array | None = None, mode: str = "chunked",
               chunk_size: int | None = None, impl: str = "auto",
               interpret: bool | None = None, seq_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(Gated) delta rule; see the module docstring for the equations.

    Args:
      q, k: ``[B, T, H, K]`` (callers usually L2-normalise k, which keeps ``I - beta k k^T``
        a contraction); v: ``[B, T, HV, V]`` with ``HV`` a multiple of ``H`` (usually ``HV = H``;
        grouped value heads otherwise, see the module docstring).
      beta: ``[B, T, HV]`` write strength, typically ``sigmoid(.)`` in ``(0, 1)``, or ``2 sigmoid(.)``
        in ``(0, 2)`` for negative eigenvalues (see the module docstring).
      g: ``[B, T, HV]`` log decay per head, ``[B, T, HV, K]`` per key channel (KDA; ``-inf``
        resets that channel), or None (plain DeltaNet).
      scale: read scale, default ``K ** -0.5``.
      initial_state: ``[B, HV, K, V]`` (zeros if None).
      segment_ids: ``[B, T]`` int; the state is reset to zero before the first token of every new
        segment (``initial_state`` reaches only the first one).
      mode: ``"chunked"`` or ``"recurrent"``.
      chunk_size: ``C``; ``T`` need not be a multiple: the tail is padded with
        ``q = k = v = 0, beta = 0, g = 0`` (the state is unchanged) and the output sliced back.
        None: 32 on CPU, 64 on GPU and TPU (the platform compiled for;
        :func:`memjax.memory.chunking.delta_chunk_size`).
      impl: the chunk-to-chunk state pass of ``"chunked"``: ``"auto" | "xla" | "pallas" |
        "pallas_tpu"`` (:mod:`memjax.kernels.chunk_pass`); per-key-channel ``g`` refuses
        ``"pallas"`` (the GPU kernel carries scalar chunk decays). With ``"pallas_tpu"``, a
        per-head (or no) gate and no ``seq_axis``, the whole chunked pass runs as one fused Mosaic
        kernel each way (:mod:`memjax.memory.delta_kernel`).
      interpret: run the Pallas kernel in interpret mode (CPU tests); only with ``impl="pallas"``
        or ``"pallas_tpu"``.
      seq_axis: sequence parallelism (:mod:`memjax.memory.sequence_parallel`): call inside
        ``jax.shard_map`` with time split over this mesh axis; the inputs are this device's
        slice, ``initial_state`` the state before the whole sequence; returns this slice's
        outputs and the whole sequence's final state. The chunk pass then carries ``K`` extra
        value columns (the ``K x K`` map from the incoming state); with per-key-channel ``g``
        the channel-wise core's own pass does (:func:`memjax.memory.sequence_parallel.sharded_columns`).
        Chunked mode only.

    Returns:
      ``(o [B, T, HV, V]`` in q's dtype, ``final_state [B, HV, K, V]`` float32, or float64 for
      float64 inputs). Dtypes follow :mod:`memjax.memory.contract`: q, k, v stay in their dtype
      for the matmuls (float32 accumulation); beta, decays, the UT system's solve and the state
      are float32 / float64.
    """
    vector = getattr(g, "ndim", None) == 4
    chunk_size = delta_chunk_size(chunk_size)
    if vector:  # (first: impl="pallas" exists only for per-head decays)
        check_channel_options("delta_rule", impl)
    b, t, h, dk, dv = check_matrix_memory("delta_rule", q, k, v, gates={"beta": beta, "g": g}, required=("beta",),
                                          initial_state=initial_state, segment_ids=segment_ids, scale=scale,
                                          mode=mode, modes=MODES, chunk_size=chunk_size, impl=impl,
                                          seq_axis=seq_axis, vector_gates=("g",), grouped=True)
    hv = v.shape[2]
    out_dtype = output_dtype(q)
    acc = state_dtype(q, k, v, beta, g, initial_state)
    md = operand_dtype(q, k, v)
    scale = resolve_scale(scale, dk)
    q, k, v = (x.astype(md) for x in (q, k, v))  # (a no-op unless q, k, v differ in dtype)
    if hv != h:  # grouped value heads: every value head gets its group's q and k
        q, k = (jnp.repeat(x, hv // h, axis=2) for x in (q, k))
    beta = beta.astype(acc)
    g = None if g is None else g.astype(acc)
    s0 = jnp.zeros((b, hv, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
    # A non-finite token poisons only itself and the rest of its document (memjax.memory.nonfinite),
    # across shards under seq_axis.
    writes = nonfinite.either(nonfinite.bad(k, 3), nonfinite.bad(v, 3), nonfinite.bad(beta, 3),
                              nonfinite.bad(g, 3, gate=True))
    mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.running(writes, segment_ids, axis_name=seq_axis))
    fused = mode == "chunked" and seq_axis is None
    kernel = delta_kernel(impl, (b, t, hv, dk), dv, md, chunk_size, interpret) if fused and not vector else None
    # (KDA: channel_delta takes the fused kernel on these same terms)
    vector_kernel = kda_kernel(impl, (b, t, hv, dk), dv, md, chunk_size, interpret) if fused and vector else None
    beta = nonfinite.finite_or_zero(beta)
    if kernel is None and vector_kernel is None:  # (the fused kernels read a non-finite q, k, v as 0 themselves)
        q, k, v = (nonfinite.finite_or_zero(x) for x in (q, k, v))  # mask: [B, T, HV]
    if vector_kernel is None:  # (the per-channel fused kernel reads NaN / +inf gates as 0 itself)
        g = nonfinite.finite_gate(g)
    if kernel is not None:  # the whole chunked pass in one Mosaic kernel each way (the state in VMEM)
        o, s = chunked_delta_kernel(q, k, v, beta, g, segment_resets(segment_ids), s0, scale, chunk_size, kernel)
    elif vector_kernel is not None:  # KDA in one Mosaic kernel each way; it forms beta k and beta v itself
        o, s = chunked_kda_kernel(q, k, v, beta, g, segment_resets(segment_ids), s0, scale, chunk_size,
                                  vector_kernel)
    elif vector:  # KDA: the channel-wise core with erase vector beta k and write value beta v
        u, erase = times_rows(v.astype(acc), beta), times_rows(k.astype(acc), beta)
        run = lambda u, s0: channel_delta(q, k, u, erase, g, s0, segment_ids, scale, mode=mode,
                                          chunk_size=chunk_size, impl=impl, interpret=interpret)
        if seq_axis is None:
            o, s = run(u, s0)
        else:  # the K x K map from the incoming state rides along as dk extra value columns
            o, s = sharded_columns(lambda start: run(extend_columns(u, dk), start), s0, segment_ids,
                                   axis_name=seq_axis)
    elif mode == "recurrent":
        o, s = _recurrent(q, k, v, beta, g, s0, segment_resets(segment_ids), scale, out_dtype)
    else:
        o, s = _chunked(q, k, v, beta, g, s0, segment_ids, scale, chunk_size, impl=impl, interpret=interpret,
                        seq_axis=seq_axis)
    return nonfinite.poison_outputs(o.astype(out_dtype), s, mask, seq_axis)


def _recurrent(q, k, v, beta, g, s0, resets, scale, out_dtype):
    """Token-by-token scan; inputs enter in their dtype, each token is promoted inside the step."""
    acc = s0.dtype

    def step(s, inp):
        qt, kt, vt, bt, gt, rt = inp
        qt, kt, vt = (x.astype(acc) for x in (qt, kt, vt))
        if gt is not None:
            s = s * jnp.exp(gt)[..., None, None]
        if rt is not None:
            s = jnp.where(rt[:, None, None, None], 0.0, s)
        pred = jnp.einsum("bhk,bhkv->bhv", kt, s)
        s = s + kt[..., :, None] * (bt[..., None] * (vt - pred))[..., None, :]
        return s, (jnp.einsum("bhk,bhkv->bhv", qt, s) * scale).astype(out_dtype)

    tm = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
    s, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(beta), tm(g), tm(resets)))
    return jnp.swapaxes(o, 0, 1), s


def _chunked(q, k, v, beta, g, s0, segment_ids, scale, chunk_size, *, impl, interpret, seq_axis=None):
    b, t, h, _ = q.shape
    c = chunk_size
    qc, kc, vc = (to_head_chunks(x, c) for x in (q, k, v))  # [B, H, N, C, .]
    n = qc.shape[2]
    bc = to_head_chunks(beta, c)  # [B, H, N, C]
    gc = None if g is None else to_chunks(pad_time(g, c), c)
    resets = None if segment_ids is None else to_chunks(sequence_resets(pad_time(segment_ids, c, mode="edge"), seq_axis), c)
    acc, md = s0.dtype, q.dtype
    dec = chunk_decays(gc, resets, (b, n, c, h), acc).heads_major()
    gamma = dec.from_start  # [B, H, N, C]
    # (Per-row scalings by times_rows: its transpose sums each row as a dot, which XLA:CPU runs
    # several times faster than autodiff's broadcast multiply-then-reduce; memjax.memory.chunk_products.)

    # UT transform: [U, W] = (I + L)^{-1} diag(beta) [V, diag(gamma) K]. L and its inverse in
    # `acc`; the inverse and the right-hand side go back to the input dtype for the matmul, and so
    # do U and W, the chunk pass's operands (flash-linear-attention's practice).
    # (unit_lower_inverse reads only the strictly lower part, so no mask is needed here.)
    kk = jnp.einsum("bhnik,bhnjk->bhnij", kc, kc, preferred_element_type=acc)
    inv = unit_lower_inverse(times_rows(kk * dec.matrix, bc))
    rhs = times_rows(jnp.concatenate([vc.astype(acc), times_rows(kc.astype(acc), gamma)], axis=-1), bc)
    uw = jnp.einsum("bhnij,bhnjx->bhnix", inv.astype(md), rhs.astype(md), preferred_element_type=acc).astype(md)
    u, w = uw[..., : vc.shape[-1]], uw[..., vc.shape[-1]:]

    # The chunk pass: delta = U - W S, O = scale (diag(gamma) Q S + (Q K^T * D) delta).
    scores = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc, preferred_element_type=acc) * dec.matrix * scale
    qg = times_rows(qc, gamma * scale)
    ke = times_rows(kc, dec.to_end)
    o, s = sharded_chunk_recurrence(qg, scores.astype(md), u, ke, dec.chunk, s0, w=w,  # (qg, ke: md already)
                                    axis_name=seq_axis, impl=impl, interpret=interpret)
    return from_head_chunks(o, t), s
