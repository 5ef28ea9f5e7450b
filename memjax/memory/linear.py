"""Linear attention and gated (decaying) linear attention as one pure function.

Recurrence (per batch and head; ``S_t in R^{K x V}``, ``g_t <= 0`` a log decay)::

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T          o_t = scale * S_t^T q_t

``g = None`` is plain linear attention (Katharopoulos et al. 2020); a per-head scalar ``g`` is
RetNet / Lightning Attention / simple GLA / Mamba-2-style gating; a per-key-channel
``g: [B, T, H, K]`` is GLA (Yang et al. 2024) and HGRN2: ``S_t = diag(exp g_t) S_{t-1} + k_t v_t^T``.
With ``bonus = u`` (RWKV-6 "Finch", Peng et al. 2024) the read comes *before* the update and
sees the current token through ``u``::

    o_t = scale * (S_{t-1} + diag(u) k_t v_t^T)^T q_t          S_t = diag(exp g_t) S_{t-1} + k_t v_t^T

Feature maps (elu+1, Based's Taylor map, ...) are applied to q and k by the caller
(:mod:`memjax.memory.feature_maps`).

Chunked form with per-channel decays (and with ``bonus``): the decays stay in log space, as
cumulative sums ``G`` within the chunk (``Gq`` on the read side), restarted at every reset, and
the chunk pass (:func:`memjax.kernels.chunk_pass`) carries the state between chunks. The
intra-chunk scores ``sum_k q_ik k_jk exp(Gq_ik - G_jk)`` take one of two routes, chosen at run
time for the whole call (``lax.cond``; one result up to round-off):

  - *tame* gates (the usual training case): no full decay (``exp(g) > 0``, so resets are only
    segment starts, shared by all channels) and per chunk and channel a total decay
    ``sum |g| <= TAME_SPAN * log(float max)`` (about 44 in float32). Then every ``|G| <= 44`` and
    the scores factor through the chunk start as one matmul,
    ``[q_ik exp(Gq_ik)] [k_jk exp(-G_jk)]``, both factors normal floats, the cumulative sums are
    one ``[C, C]`` matmul per chunk (:func:`memjax.memory.chunking.uniform_channel_decays`), and
    the cost is that of the per-head-decay form.
  - otherwise (strong decays, ``g = -inf`` resets of single channels): the sub-chunk algorithm,
    safe for any decay. A chunk is split into sub-chunks of ``s <= 16`` positions; the score of
    query ``i`` in sub-chunk ``a`` with key ``j`` of an earlier sub-chunk factorises through the
    reference point ``p`` = the last position of sub-chunk ``a - 1``::

        sum_k q_ik k_jk exp(G_ik - G_jk) = sum_k [q_ik exp(G_ik - G_pk)] [k_jk exp(G_pk - G_jk)]

    and both exponents are ``<= 0`` because ``j <= p < i`` (flash-linear-attention's secondary
    chunking, with the reference at the boundary instead of inside the sub-chunk, so neither
    factor can overflow however strong the decay); these blocks are matmuls. Pairs within one
    sub-chunk use the explicit ``[s, s, K]`` form ``exp(G_ik - G_jk)`` with the exponent masked to
    ``j <= i`` before the ``exp``: ``O(T s K)`` extra memory instead of ``O(T C K)``. (Dividing
    ``q`` and ``k`` by ``exp(G)`` at the chunk start without a bound, the textbook form,
    overflows for strong decays.)

Measured (CPU, T = 4096, B = 1, H = 4, K = V = 64, forward + backward): the tame route runs
within ~1.5x of the per-head-decay form; the sub-chunk route is several times slower
(``benchmarks/bench_chunked_vs_recurrent.py``). Grouped value heads (``HV`` a multiple of
``H``) repeat q and k over each group.

Three forms, one result:
  - ``"chunked"`` (training): chunks of ``C`` positions; within a chunk a masked ``C x C`` product
    with decay ``exp(G_i - G_j)``, between chunks one state update per chunk
    (:func:`memjax.kernels.chunk_pass`: a ``lax.scan``, or one Pallas kernel with
    ``impl="pallas"``). O(T C) work for the intra part, O(T/C) sequential steps, no per-token state.
    With a per-head (or no) decay and the XLA pass on one device, the chunked form is
    :func:`memjax.memory.linear_vjp.chunked_scalar_decay`: a hand-written VJP that saves only the
    inputs and the chunk-start states and runs the backward as a reverse chunked pass (fewer HBM
    bytes than JAX's autodiff of the chunk scan), where the chunk-start states are one matmul over
    the chunk index instead of a scan (except for a gated call on a TPU, which runs the fused
    per-chunk scan: fewer bytes there). With ``impl="pallas_tpu"`` the per-head form is the same
    custom VJP run by the fused Mosaic kernels of :mod:`memjax.kernels.linear_fused_pallas_tpu`
    (the intra-chunk work and the state pass in one kernel each way, the state in VMEM: XLA's
    TPU cost model puts it at 2.6x its inputs + outputs forward, 3.1x forward + backward, against
    5.7x / 9.2x for the XLA form, at B=8 T=4096 H=16 K=V=128 bf16); shapes that kernel does not
    take run the state-pass kernel. With ``seq_axis``, the state-pass Pallas kernels or a traced
    ``scale`` the per-head form goes through :func:`memjax.kernels.chunk_pass` under autodiff.
  - ``"recurrent"``: token-by-token ``lax.scan`` (also the decoding form).
  - ``"parallel"``: the quadratic ``T x T`` form (one chunk covering the whole sequence); its
    decays use the cumulative ``g`` over the whole sequence, so for very long, strongly decaying
    sequences in float32 prefer ``"chunked"``.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from memjax.kernels.chunk_pass import chunk_recurrence, runs_xla
from memjax.memory.chunking import (ChannelDecays, channel_decays, chunk_decays, from_head_chunks, masked_exp,
                                    pad_time, tame_limit, to_chunks, to_head_chunks,
                                    uniform_channel_decays)
from memjax.memory import nonfinite
from memjax.memory.gla_kernel import chunked_gla_kernel, gla_kernel
from memjax.memory.linear_vjp import chunked_scalar_decay, fused_kernel
from memjax.memory.contract import (check_floating, check_matrix_memory, operand_dtype, output_dtype,
                                    resolve_scale, shape_of, state_dtype)
from memjax.memory.segments import full_decays_as_resets, segment_resets
from memjax.memory.sequence_parallel import (extend_columns, sequence_resets, sharded_chunk_recurrence,
                                             sharded_columns)

MODES = ("chunked", "recurrent", "parallel")


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, g: jax.Array | None = None,
                     bonus: jax.Array | None = None, scale: float | None = None, initial_state: jax.Array | None = None,
                     segment_ids: jax.Array | None = None, mode: str = "chunked",
                     chunk_size: int = 64, impl: str = "auto",
                     interpret: bool | None = None, seq_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(Gated) linear attention ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``.

    With a per-key-channel ``g`` the decay is ``diag(exp g_t)``; with ``bonus = u`` the read comes
    first: ``o_t = scale * (S_{t-1} + diag(u) k_t v_t^T)^T q_t``, then
    ``S_t = diag(exp g_t) S_{t-1} + k_t v_t^T`` (RWKV-6).

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]`` with ``HV`` a multiple of ``H`` (usually
        ``HV = H``; else value head ``j`` reads and writes with q/k head ``j // (HV / H)``).
      g: ``[B, T, HV]`` log decay per head, ``[B, T, HV, K]`` per key channel (``<= 0`` for a
        contraction; ``-inf`` resets that head / channel), or None (no decay).
      bonus: ``u: [H, K]`` (or ``[HV, K]``) weight of the current token's own write in its read
        (RWKV-6's ``time_faaaa``); None: the read follows the update (GLA).
      scale: read scale, default ``K ** -0.5``.
      initial_state: ``[B, HV, K, V]`` state before ``t = 0`` (zeros if None).
      segment_ids: ``[B, T]`` int, packed documents: where the id changes the state is reset to
        zero before that token's update (``initial_state`` therefore only reaches the first one).
      mode: ``"chunked"``, ``"recurrent"`` or ``"parallel"`` (see the module docstring).
      chunk_size: ``C`` for ``"chunked"``. ``T`` need not be a multiple: the tail is padded with
        ``k = v = q = 0`` and ``g = 0`` (the state is unchanged) and the output sliced back.
      impl: ``"auto" | "xla" | "pallas" | "pallas_tpu"`` (:mod:`memjax.kernels.chunk_pass`):
        the chunk-to-chunk state pass, or with ``"pallas_tpu"`` (no bonus, no ``seq_axis``) the whole
        chunked pass in one fused Mosaic kernel each way (a per-head or no decay:
        :mod:`memjax.kernels.linear_fused_pallas_tpu`; per key channel:
        :mod:`memjax.kernels.gla_fused_pallas_tpu`).
      interpret: run the Pallas kernel in interpret mode (CPU tests); only with ``impl="pallas"``
        or ``"pallas_tpu"``.
      seq_axis: sequence parallelism (:mod:`memjax.memory.sequence_parallel`): call inside
        ``jax.shard_map`` with time split over this mesh axis; the inputs are this device's
        slice of the sequence, ``initial_state`` the state before the whole sequence. Returns
        this slice's outputs and the whole sequence's final state. Chunked / parallel modes. With
        per-key-channel ``g`` or ``bonus`` the local pass carries ``K`` extra value columns (the
        map from the incoming state; :func:`memjax.memory.sequence_parallel.sharded_columns`).

    Returns:
      ``(o [B, T, H, V]`` in q's dtype, ``final_state [B, H, K, V]`` float32, or float64 for
      float64 inputs). Dtypes follow :mod:`memjax.memory.contract`: q, k, v stay in their dtype
      for the matmuls (float32 accumulation); decays and the state are float32 / float64.
    """
    fn = "linear_attention"
    b, t, h, dk, dv = check_matrix_memory(fn, q, k, v, gates={"g": g}, initial_state=initial_state,
                                          segment_ids=segment_ids, scale=scale, mode=mode, modes=MODES,
                                          chunk_size=chunk_size, impl=impl, seq_axis=seq_axis,
                                          vector_gates=("g",), grouped=True)
    hv = v.shape[2]
    if bonus is not None:
        if shape_of(bonus) not in ((h, dk), (hv, dk)):
            raise ValueError(f"{fn}: bonus must have shape [H, K] = ({h}, {dk})"
                             + (f" or [HV, K] = ({hv}, {dk})" if hv != h else "") + f", got {shape_of(bonus)}")
        check_floating(fn, "bonus", bonus)
    vector = g is not None and g.ndim == 4
    out_dtype = output_dtype(q)
    acc = state_dtype(q, k, v, g, initial_state, bonus)
    md = operand_dtype(q, k, v)
    scale = resolve_scale(scale, dk)
    q, k, v = (x.astype(md) for x in (q, k, v))  # (a no-op unless q, k, v differ in dtype)
    if hv != h:  # grouped value heads: every value head gets its group's q and k
        q, k = (jnp.repeat(x, hv // h, axis=2) for x in (q, k))
    if bonus is not None:
        bonus = jnp.repeat(bonus, hv // bonus.shape[0], axis=0).astype(acc)  # [HV, K]
    g = None if g is None else g.astype(acc)
    s0 = jnp.zeros((b, hv, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
    # A non-finite token poisons only itself and the rest of its document (memjax.memory.nonfinite),
    # across shards under seq_axis.
    writes = nonfinite.either(nonfinite.bad(k, 3), nonfinite.bad(v, 3), nonfinite.bad(g, 3, gate=True))
    mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.running(writes, segment_ids, axis_name=seq_axis))
    # mask: [B, T, HV]. The per-head chunked form zeroes the non-finite entries of q, k, v after
    # its chunk reshape (_finite_chunks), where XLA fuses the select into the matmuls that read
    # them; a sanitised [B, T, H, K] copy here is written and read again (~800 MB forward at B=8
    # T=4096 H=16 K=V=128 bf16 on a TPU, by XLA's cost model: benchmarks/tpu_cost.py). (The
    # per-channel form measured no better that way, its backward with impl="pallas_tpu" 3% worse.)
    kernel = gla_kernel(impl, (b, t, hv, dk), dv, md, chunk_size, interpret) \
        if mode == "chunked" and vector and bonus is None and seq_axis is None else None
    if kernel is None:  # (the per-channel fused kernel reads NaN / +inf gates as 0 itself: no [B, T, H, K] copy)
        g = nonfinite.finite_gate(g)
    if kernel is None and (mode == "recurrent" or vector or bonus is not None):
        q, k, v = (nonfinite.finite_or_zero(x) for x in (q, k, v))
    if kernel is not None:  # (the fused kernels read a non-finite q, k, v as 0 themselves: no sanitised copy)
        o, s = chunked_gla_kernel(q, k, v, g, segment_resets(segment_ids), s0, scale, chunk_size, kernel)
    elif mode == "recurrent":
        o, s = _recurrent(q, k, v, g, bonus, s0, segment_resets(segment_ids), scale, out_dtype)
    elif vector or bonus is not None:
        c = t if mode == "parallel" else chunk_size
        run = lambda v, s0: _chunked_channels(q, k, v, g, bonus, s0, segment_ids, scale, c, impl=impl,
                                              interpret=interpret)
        if seq_axis is None:
            o, s = run(v, s0)
        else:  # the incoming state's map rides along as dk extra value columns (sequence_parallel)
            o, s = sharded_columns(lambda start: run(extend_columns(v, dk), start), s0, segment_ids,
                                   axis_name=seq_axis)
    else:
        o, s = _chunked(q, k, v, g, s0, segment_ids, scale, t if mode == "parallel" else chunk_size,
                        impl=impl, interpret=interpret, seq_axis=seq_axis)
    return nonfinite.poison_outputs(o.astype(out_dtype), s, mask, seq_axis)


def _recurrent(q, k, v, g, u, s0, resets, scale, out_dtype):
    """Token-by-token scan; the inputs enter it in their dtype and each token is promoted to the
    state's dtype inside the step (products of two bf16 numbers are exact in float32).
    ``g``: ``[B, T, H]`` or ``[B, T, H, K]``; ``u``: the bonus ``[H, K]`` or None."""
    acc = s0.dtype

    def decay(s, gt):  # diag(exp g_t) S: per head [B, H] or per key channel [B, H, K]
        return s * (jnp.exp(gt)[..., None, None] if gt.ndim == 2 else jnp.exp(gt)[..., :, None])

    def step(s, inp):
        qt, kt, vt, gt, rt = inp
        kv = kt.astype(acc)[..., :, None] * vt.astype(acc)[..., None, :]
        read = lambda m: (jnp.einsum("bhk,bhkv->bhv", qt.astype(acc), m) * scale).astype(out_dtype)
        if u is None:  # decay, reset, write, then read
            if gt is not None:
                s = decay(s, gt)
            if rt is not None:
                s = jnp.where(rt[:, None, None, None], 0.0, s)
            s = s + kv
            return s, read(s)
        # RWKV-6: a new document starts from zero before its first read; read, then decay and write
        if rt is not None:
            s = jnp.where(rt[:, None, None, None], 0.0, s)
        o = read(s + u[..., :, None] * kv)
        if gt is not None:
            s = decay(s, gt)
        return s + kv, o

    tm = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)  # time-major for scan
    s, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(g), tm(resets)))
    return jnp.swapaxes(o, 0, 1), s


def _chunked(q, k, v, g, s0, segment_ids, scale, chunk_size, *, impl, interpret, seq_axis=None):
    b, t, h, dk = q.shape
    c = chunk_size
    shape = (b, h, -(-t // c), c, dk, v.shape[-1])
    fixed_scale = not isinstance(scale, jax.Array)
    if seq_axis is None and fixed_scale and runs_xla(impl, shape, v.dtype, interpret):
        # The XLA pass on one device with a fixed scale: the custom VJP of memjax.memory.linear_vjp
        # (fewer HBM bytes). A traced scale (differentiated) and sequence parallelism keep the
        # autodiff path below.
        return _chunked_xla(q, k, v, g, s0, segment_ids, scale, c)
    kernel = fused_kernel(impl, q.shape, v.shape[-1], v.dtype, c, interpret) if seq_axis is None and fixed_scale \
        else None
    if kernel is not None:  # the whole chunked pass in one Mosaic kernel (the state in VMEM)
        return _chunked_xla(q, k, v, g, s0, segment_ids, scale, c, kernel=kernel)
    qc, kc, vc = _finite_chunks(c, q, k, v)  # [B, H, N, C, .]
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


def _chunked_xla(q, k, v, g, s0, segment_ids, scale, chunk_size, kernel=None):
    """The per-head chunked form by :func:`memjax.memory.linear_vjp.chunked_scalar_decay` (which reads
    non-finite entries of q, k, v as 0, where it reads them, so no sanitised copy is written), a
    full decay (``exp(g) == 0``, e.g. ``-inf``) turned into a reset of that head with ``g = 0``,
    exactly the recurrent form's ``exp(g) S = 0`` without an ``-inf`` in any sum."""
    g, resets = full_decays_as_resets(g, segment_resets(segment_ids))
    return chunked_scalar_decay(q, k, v, g, resets, s0, scale, chunk_size, kernel=kernel)


def _finite_chunks(chunk_size: int, *xs: jax.Array) -> tuple[jax.Array, ...]:
    """``[B, T, H, D] -> [B, H, N, C, D]`` (:func:`to_head_chunks`) with every NaN / inf entry zeroed
    (:func:`memjax.memory.nonfinite.finite_or_zero`), in that order: the select on the chunked
    view fuses into each consumer's operand read instead of being written as a copy."""
    return tuple(nonfinite.finite_or_zero(to_head_chunks(x, chunk_size)) for x in xs)


def _sub_chunk(c: int, most: int = 16) -> int:
    """The largest divisor of ``c`` that is at most ``most`` (the sub-chunk length)."""
    return max(d for d in range(1, min(c, most) + 1) if c % d == 0)


def _chunked_channels(q, k, v, g, u, s0, segment_ids, scale, chunk_size, *, impl, interpret):
    """The chunked form with per-key-channel decays ``g [B, T, H, K]`` (or per head / None,
    broadcast over channels) and an optional bonus ``u [H, K]`` (see the module docstring)."""
    b, t, h, dk = q.shape
    c = chunk_size
    acc = s0.dtype
    md = q.dtype
    qc, kc, vc = (to_head_chunks(x, c) for x in (q, k, v))  # [B, H, N, C, .]
    if g is None:
        g = jnp.zeros((b, t, h, 1), acc)
    elif g.ndim == 3:
        g = g[..., None]
    gc = to_head_chunks(g, c)  # [B, H, N, C, Kg]; the padded tail has g = 0
    seg = None if segment_ids is None else to_chunks(segment_resets(pad_time(segment_ids, c, mode="edge")), c)
    rbu = u is not None

    # Two ways to the chunk pass's operands, one result up to round-off. The tame way covers
    # the usual training gates: no full decay, so the only resets are segment starts, shared by
    # all channels (the cumulative sums are one [C, C] matmul per chunk), and a moderate total
    # decay per chunk, so the intra-chunk scores are one factored matmul (_factored_scores).
    # Otherwise (strong or -inf decays) the general way: per-channel resets and the sub-chunk
    # algorithm, safe for any decay. The tame way is computed outside the lax.cond, on gates
    # zeroed when they are not tame (so that it stays finite, and so do its gradients, which are
    # then zero), because XLA:CPU runs the ops inside a conditional markedly slower than at the
    # top level (measured ~1.6x CPU time for this forward pass); the cond returns it as is or
    # runs the general way. The general way is rematerialised (jax.checkpoint): under autodiff a
    # cond returns the residuals of both branches, the one taken filling the other's with
    # zeros, and this keeps them to the shared inputs instead of the [.., s, s, K] tensors.
    tame = _is_tame(gc, acc)
    dec = uniform_channel_decays(jnp.where(tame, gc, jnp.zeros((), acc)), seg, acc, read_before_update=rbu)
    fast = _carried(qc, kc, dec, scale) + (_factored_scores(qc, kc, dec, u, md),)

    def general():
        dec = channel_decays(gc, seg, acc, read_before_update=rbu)
        return _carried(qc, kc, dec, scale) + (_sub_chunk_scores(qc, kc, dec, u, md),)

    qg, ke, a, p = jax.lax.cond(tame, lambda: fast, jax.checkpoint(general))
    o, st = chunk_recurrence(qg.astype(md), (p * scale).astype(md), vc, ke.astype(md), a, s0, impl=impl,
                             interpret=interpret)
    return from_head_chunks(o, t), st


def _is_tame(gc: jax.Array, acc) -> jax.Array:
    """Whether the chunked gates ``gc [B, H, N, C, Kg]`` take the factored branch: no full decay
    (``exp(g) == 0``, a per-channel reset) and, per chunk and channel, a total decay of at most
    ``TAME_SPAN * log(float max)`` (then every cumulative sum in the chunk, read or write side,
    is at most that in magnitude, and ``exp(+-G)`` and products of two of them stay far inside
    the float range, with no subnormal factor).
    A bool scalar; False for non-finite sums."""
    limit = tame_limit(acc)
    # sum |g| over the chunk bounds every |G| and |Gq| in it, restarts included; it also rules out
    # full decays (each |g| <= limit, so exp(g) > 0) and -inf (an infinite sum)
    return jnp.all(jnp.sum(jnp.abs(gc.astype(acc)), axis=3) <= limit)


def _carried(qc, kc, dec: ChannelDecays, scale):
    """The chunk pass's factors: queries weighted by the decay since the chunk start, keys by the
    decay to its end, the state by the whole chunk's decay (``[B, H, N, Kg]``; a scalar per
    chunk when ``Kg = 1``, which keeps the Pallas pass usable)."""
    G, r, Gq, rq = dec
    qg = qc * (masked_exp(Gq, rq == 0) * scale)
    ke = kc * masked_exp(G[..., -1:, :] - G, r == r[..., -1:, :])
    a = masked_exp(G[..., -1, :], r[..., -1, :] == 0)  # [B, H, N, Kg]
    a = a[..., 0] if a.shape[-1] == 1 else a
    return qg, ke, a


def _factored_scores(qc, kc, dec, u, md):
    """Intra-chunk scores ``[B, H, N, C, C]`` (before ``scale``) as one matmul per chunk, for tame
    gates (:func:`_is_tame`), through the chunk start as the reference point::

        sum_k q_ik k_jk exp(Gq_ik - G_jk) = sum_k [q_ik exp(Gq_ik)] [k_jk exp(-G_jk)]

    Every ``|G|`` is at most the chunk's total ``sum |g| <= TAME_SPAN log(float max)`` (about 44 in
    float32), so both factors are normal floats and every product is finite. The reference is
    causal (a query's factor depends on no later gate), so a later token never changes an
    earlier score. Pairs ``j > i`` (``j >= i`` with the bonus) and pairs in different segments
    are selected away after the product (their value, up to ``exp(span)`` times ``|q||k|``,
    never reaches a kept entry or a gradient); the bonus adds ``sum_k q_ik u_k k_ik`` on the
    diagonal."""
    G, r, Gq, rq = dec
    acc = G.dtype
    c = qc.shape[3]
    qf = (qc * jnp.exp(Gq)).astype(md)
    kf = (kc * jnp.exp(-G)).astype(md)
    scores = jnp.einsum("...ik,...jk->...ij", qf, kf, preferred_element_type=acc)
    causal = jnp.tril(jnp.ones((c, c), bool), -1 if u is not None else 0)
    keep = causal & (rq[..., :, None, 0] == r[..., None, :, 0])  # r, rq: shared by all channels here
    p = jnp.where(keep, scores, 0.0)
    if u is not None:  # the current token's own write, weighted by u instead of a decay
        own = jnp.einsum("bhnik,bhnik,hk->bhni", qc.astype(acc), kc.astype(acc), u)
        p = p + jnp.eye(c, dtype=acc) * own[..., None]
    return p


def _sub_chunk_scores(qc, kc, dec, u, md):
    """Intra-chunk scores ``[B, H, N, C, C]`` (before ``scale``) of the sub-chunk algorithm (module
    docstring): safe for any decay, ``O(T s K)`` element-wise work for the diagonal sub-chunks."""
    G, r, Gq, rq = dec
    acc = G.dtype
    c = qc.shape[3]
    # Sub-chunks of s positions (m per chunk).
    s = _sub_chunk(c)
    m = c // s
    sub = lambda x: x.reshape(*x.shape[:3], m, s, x.shape[-1])  # [B, H, N, m, s, .]
    qs, ks, Gs, rs, Gqs, rqs = (sub(x) for x in (qc, kc, G, r, Gq, rq))
    # (1) within a sub-chunk: exp(Gq_i - G_j), the exponent masked to j <= i (j < i with the bonus)
    tri = jnp.tril(jnp.ones((s, s), bool), -1 if u is not None else 0)[:, :, None]
    same = rqs[..., :, None, :] == rs[..., None, :, :]  # [B, H, N, m, s, s, Kg]
    d = masked_exp(Gqs[..., :, None, :] - Gs[..., None, :, :], tri & same)
    if u is not None:  # the current token's own write, weighted by u instead of a decay
        d = d + jnp.eye(s, dtype=acc)[:, :, None] * u[None, :, None, None, None, None, :]
    if d.shape[-1] == 1:
        diag = jnp.einsum("...ik,...jk->...ij", qs, ks, preferred_element_type=acc) * d[..., 0]
    else:
        diag = jnp.einsum("...ik,...jk,...ijk->...ij", qs.astype(acc), ks.astype(acc), d)
    # (2) across sub-chunks: factorised through the reference p = a * s - 1 (sub-chunk a >= 1)
    ref = lambda x: jnp.pad(x[..., :-1, -1, :], [(0, 0)] * 3 + [(1, 0), (0, 0)])  # [B, H, N, m, Kg]
    Gp, rp = ref(Gs), ref(rs)
    qr = qs * masked_exp(Gqs - Gp[..., None, :], rqs == rp[..., None, :])  # [B, H, N, m, s, K]
    before = (jnp.arange(c)[None, :] < (jnp.arange(m) * s)[:, None])[:, :, None]  # [m, C, 1]: j < a s
    kmask = before & (rp[..., :, None, :] == r[..., None, :, :])
    kr = kc[..., None, :, :] * masked_exp(Gp[..., :, None, :] - G[..., None, :, :], kmask)  # [B, H, N, m, C, K]
    off = jnp.einsum("...aik,...ajk->...aij", qr.astype(md), kr.astype(md), preferred_element_type=acc)
    p = off.reshape(*off.shape[:3], c, c) + jnp.einsum(
        "...aij,ab->...aibj", diag, jnp.eye(m, dtype=acc)).reshape(*diag.shape[:3], c, c)
    return p
