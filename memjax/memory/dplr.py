"""Diagonal-plus-low-rank (DPLR) transitions: the generalised delta rule of RWKV-7, as one pure function.

Recurrence (per batch and head; ``S_t in R^{K x V}``, float32 state)::

    S_t = (diag(exp g_t) + b_t a_t^T) S_{t-1} + k_t v_t^T
        = diag(exp g_t) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
    o_t = scale * S_t^T q_t

``g_t <= 0`` is a per-key-channel log decay (``[B, T, H, K]``, or per head ``[B, T, H]``). The
rank-one term reads the state *before* the decay. RWKV-7 (Peng et al. 2025, "RWKV-7 Goose with
Expressive Dynamic State Evolution") uses ``a = -kappa_hat``, ``b = kappa_hat * a_gate`` with a unit
``kappa_hat`` and ``a_gate in (0, 1)``: the transition ``diag(w) - (kappa_hat * a_gate) kappa_hat^T``
is then a contraction-like, generalised Householder map with a per-channel decay; the (gated) delta
rule is the special case ``a = -beta k``, ``b = k`` (with ``beta`` also on the write). Any ``a``,
``b`` are accepted; the forms agree exactly (round-off only) whatever they are, but the state grows
without bound when the transitions expand.

Forms:
  - ``"recurrent"``: token-by-token ``lax.scan`` (also the decoding form).
  - ``"chunked"``: chunkwise parallel, WY representation of the in-chunk transition product
    (after flash-linear-attention's ``chunk_dplr_delta_rule``, derived afresh for this layout).
    Within a chunk with incoming state ``S`` (local positions ``i = 0 .. C-1``), ``G_i`` the
    inclusive cumulative log decay per channel, ``Ga_i = G_{i-1}`` (``G_{-1} = 0``), the rows
    ``x_i = a_i^T S_{i-1}`` of the rank-one reads solve the unit lower-triangular system::

        x = A~ S + L_ab x + L_ak V,       A~_i = a_i * exp(Ga_i)
        L_ab[i, j] = sum_c a_ic b_jc exp(Ga_ic - G_jc),   L_ak likewise with k_j   (j < i)

    so ``x = W S + U`` with ``W = (I - L_ab)^{-1} A~`` and ``U = (I - L_ab)^{-1} L_ak V`` (the
    WY factors; the inverse by :func:`memjax.memory.ut_transform.unit_lower_inverse`, matmul-based
    forward substitution, no LAPACK call). Then, with ``P_qb[i, j] = sum_c q_ic b_jc
    exp(G_ic - G_jc)`` and ``P_qk`` likewise (``j <= i``), ``Q~_i = q_i * exp(G_i)`` and
    ``B~_j, K~_j = b_j, k_j * exp(G_{C-1} - G_j)``::

        O      = scale * ((Q~ + P_qb W) S + P_qb U + P_qk V)
        S_next = (diag(exp G_{C-1}) + B~^T W) S + B~^T U + K~^T V  =  M S + h

    Everything but ``S_next = M S + h`` (one ``[K, K] x [K, V]`` product per chunk, a ``lax.scan``
    carrying only the ``[B, H, K, V]`` state) is computed for all chunks at once, and the outputs
    read the saved chunk states afterwards. The ``K x K`` chunk transition ``M`` is why
    :func:`memjax.kernels.chunk_pass.chunk_recurrence` (diagonal decay plus ``ke^T (u - w S)``)
    is not used: its write ``ke^T delta`` cannot hold both ``B~^T x`` and ``K~^T V``.

    Decays stay in log space: every exponent is ``G_i - G_j`` (or ``Ga_i - G_j``) with ``j`` not
    after ``i``, so ``<= 0``. The scores are built as in :func:`memjax.memory.linear.linear_attention`'s
    per-channel form: sub-chunks of ``s <= 16`` positions, pairs inside a sub-chunk by an explicit
    masked ``[s, s, K]`` exponential, pairs across sub-chunks factorised through the last position
    of the previous sub-chunk (both factors ``<= 1``). Masks are applied before each ``exp`` and
    after it (no overflow, no NaN gradient). For tame gates (per chunk and channel
    ``sum |g| <= TAME_SPAN log(float max)``, ~44 in float32: the usual RWKV-7 decays at ``C = 64``)
    a ``lax.cond`` takes instead one matmul per score matrix through the chunk start,
    ``[x_i exp(gx_i)] . [y_j exp(-G_j)]`` (as :mod:`memjax.memory.linear`'s factored scores; both
    factors are normal floats there), and the hierarchical form stays the fallback for strong,
    ``-inf`` or non-finite decays. Segment starts (and ``exp(g) == 0``) restart the
    cumulative sums (:func:`memjax.memory.chunking.channel_decays`; the rank-one read at a segment
    start sees a zero state, like RWKV-6's bonus read).

Dtypes (:mod:`memjax.memory.contract`): ``q, k, v, a, b`` enter the score matmuls in their dtype
with float32 accumulation; decays, the triangular inverse, the WY factors, the chunk transitions
``M, h`` and the state are float32 (float64 for float64 inputs). Unlike the delta rule, the WY
factors are *not* rounded back to bf16: ``M = diag + B~^T W`` is a product of up to ``C``
transitions, whose rounding would compound from chunk to chunk.

Speed (CPU, jit, B = 1, H = 4, K = V = 64, T = 4096, float32, forward + backward): the factored
tame way made the chunked form ~2.3x faster than the hierarchical scores alone (same-minute
measurement on a heavily loaded 2-core machine; ``benchmarks/bench_chunked_vs_recurrent.py``
``--ops dplr_delta_rule``). The chunk-to-chunk pass ``S -> M S + h`` has a hand-written backward
(:func:`_affine_pass`: one matmul per chunk in the reverse scan, ``dM`` batched over all chunks),
~9% less CPU time for the whole forward + backward than autodiff of the scan (same-minute medians
of 3, loaded machine).

Sequence parallelism (``seq_axis``, chunked mode): the update is affine in the state and its map
``prod_t (diag(exp g_t) + b_t a_t^T)`` acts alike on every value column, so each shard runs the
chunked pass with ``K`` extra zero value columns started from the identity, which carry that
``K x K`` map and its read (:func:`memjax.memory.sequence_parallel.sharded_columns`).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from memjax.kernels.manual_axes import common_varying
from memjax.memory import nonfinite
from memjax.memory.chunking import (
    ChannelDecays,
    channel_decays,
    delta_chunk_size,
    from_head_chunks,
    masked_exp,
    pad_time,
    segment_cumsum_matrix,
    to_chunks,
    tame_limit,
    to_head_chunks,
)
from memjax.memory.contract import (
    check_floating,
    check_matrix_memory,
    check_shape,
    operand_dtype,
    output_dtype,
    resolve_scale,
    state_dtype,
)
from memjax.memory.segments import segment_resets
from memjax.memory.sequence_parallel import extend_columns, sharded_columns
from memjax.memory.ut_transform import unit_lower_inverse

MODES = ("chunked", "recurrent")


def dplr_delta_rule(q: jax.Array, k: jax.Array, v: jax.Array, a: jax.Array, b: jax.Array, g: jax.Array | None,
                    *, scale: float | None = None, initial_state: jax.Array | None = None,
                    segment_ids: jax.Array | None = None, mode: str = "chunked", chunk_size: int | None = None,
                    seq_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Diagonal-plus-low-rank delta rule ``S_t = (diag(exp g_t) + b_t a_t^T) S_{t-1} + k_t v_t^T``,
    ``o_t = scale * S_t^T q_t`` (see the module docstring).

    Args:
      q, k: ``[B, T, H, K]`` (RWKV-7: receptance and key); v: ``[B, T, H, V]``.
      a, b: ``[B, T, H, K]``, the rank-one part of the transition (RWKV-7: ``a = -kappa_hat``,
        ``b = kappa_hat * a_gate``).
      g: ``[B, T, H, K]`` log decay per key channel or ``[B, T, H]`` per head (``<= 0``; ``-inf``
        zeroes that channel's diagonal part), or None (no decay).
      scale: read scale, default ``K ** -0.5`` (RWKV-7 uses 1).
      initial_state: ``[B, H, K, V]`` (zeros if None).
      segment_ids: ``[B, T]`` int, packed documents: the state is reset to zero before the first
        token of every new segment, i.e. before both its rank-one read and its write
        (``initial_state`` reaches only the first one).
      mode: ``"chunked"`` or ``"recurrent"``.
      chunk_size: ``C`` for ``"chunked"``; ``T`` need not be a multiple (the tail is padded with
        zeros, which leave the state unchanged, and the output sliced back). None: 32 on CPU, 64
        on GPU and TPU (:func:`memjax.memory.chunking.delta_chunk_size`).
      seq_axis: sequence parallelism (chunked mode; :mod:`memjax.memory.sequence_parallel`): call
        inside ``jax.shard_map`` with time split over this mesh axis; the inputs are this device's
        slice, ``initial_state`` the state before the whole sequence; returns this slice's outputs
        and the whole sequence's final state (see the module docstring).

    Returns:
      ``(o [B, T, H, V]`` in q's dtype, ``final_state [B, H, K, V]`` float32, or float64 for
      float64 inputs).
    """
    fn = "dplr_delta_rule"
    chunk_size = delta_chunk_size(chunk_size)
    bsz, t, h, dk, dv = check_matrix_memory(fn, q, k, v, gates={"g": g}, initial_state=initial_state,
                                            segment_ids=segment_ids, scale=scale, mode=mode, modes=MODES,
                                            chunk_size=chunk_size, seq_axis=seq_axis, vector_gates=("g",))
    for name, x in (("a", a), ("b", b)):
        check_shape(fn, name, x, (bsz, t, h, dk), "[B, T, H, K]")
        check_floating(fn, name, x)
    out_dtype = output_dtype(q)
    acc = state_dtype(q, k, v, a, b, g, initial_state)
    md = operand_dtype(q, k, v, a, b)
    scale = resolve_scale(scale, dk)
    q, k, v, a, b = (x.astype(md) for x in (q, k, v, a, b))
    g = jnp.zeros((bsz, t, h, 1), acc) if g is None else (g if g.ndim == 4 else g[..., None]).astype(acc)
    s0 = jnp.zeros((bsz, h, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
    # A non-finite token poisons only itself and the rest of its document (memjax.memory.nonfinite),
    # across shards under seq_axis.
    writes = nonfinite.either(*(nonfinite.bad(x, 3) for x in (k, v, a, b)), nonfinite.bad(g, 3, gate=True))
    mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.running(writes, segment_ids, axis_name=seq_axis))
    q, k, v, a, b = (nonfinite.finite_or_zero(x) for x in (q, k, v, a, b))  # mask: [B, T, H]
    g = nonfinite.finite_gate(g)
    if mode == "recurrent":
        o, s = _recurrent(q, k, v, a, b, g, s0, segment_resets(segment_ids), scale, out_dtype)
    elif seq_axis is None:
        o, s = _chunked(q, k, v, a, b, g, s0, segment_ids, scale, chunk_size)
    else:  # the K x K map from the incoming state rides along as dk extra value columns
        o, s = sharded_columns(lambda start: _chunked(q, k, extend_columns(v, dk), a, b, g, start, segment_ids, scale,
                                                      chunk_size), s0, segment_ids, axis_name=seq_axis)
    return nonfinite.poison_outputs(o.astype(out_dtype), s, mask, seq_axis)


def _recurrent(q, k, v, a, b, g, s0, resets, scale, out_dtype):
    """Token-by-token scan; ``g: [B, T, H, K or 1]``. Each token is promoted to the state's dtype
    inside the step."""
    acc = s0.dtype

    def step(s, inp):
        qt, kt, vt, at, bt, gt, rt = inp
        qt, kt, vt, at, bt = (x.astype(acc) for x in (qt, kt, vt, at, bt))
        if rt is not None:  # a new document: its first read and write see a zero state
            s = jnp.where(rt[:, None, None, None], jnp.zeros((), acc), s)
        x = jnp.einsum("bhk,bhkv->bhv", at, s)  # the rank-one read of S_{t-1}
        s = jnp.exp(gt)[..., None] * s + bt[..., :, None] * x[..., None, :] + kt[..., :, None] * vt[..., None, :]
        return s, (jnp.einsum("bhk,bhkv->bhv", qt, s) * scale).astype(out_dtype)

    tm = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
    s, o = jax.lax.scan(step, s0, tuple(tm(x) for x in (q, k, v, a, b, g, resets)))
    return jnp.swapaxes(o, 0, 1), s


def _decayed_scores(x, gx, rx, ys, G, r, *, strict: bool, md):
    """Decayed, masked scores of queries ``x`` with every key in ``ys``.

    ``x: [B, H, N, C, K]`` with its cumulative log decay and reset count ``gx, rx`` (same shape);
    keys ``ys``: ``[B, H, N, C, K]`` each, whose cumulative log decay and reset count are ``G, r``.
    Returns, per key, ``P[.., i, j] = sum_c x_ic y_jc exp(gx_ic - G_jc)`` (``[B, H, N, C, C]`` in
    ``G``'s dtype) where ``j <= i`` (``j < i`` if ``strict``) and ``rx_ic == r_jc`` (no reset in
    between), else 0.

    Hierarchical, matmuls only above the base: a block of ``2h`` positions splits into halves,
    and every pair (``i`` in the second half, ``j`` in the first) factorises exactly through the
    last position ``p`` of the first half, ``exp(gx_i - G_j) = exp(gx_i - G_p) exp(G_p - G_j)``,
    both exponents ``<= 0`` (``j <= p < i``; the masks ``rx_i == r_p == r_j`` are equivalent to
    ``rx_i == r_j`` because reset counts grow with position). The halves recurse down to blocks of
    odd length ``b0`` (``C / b0`` a power of two; ``b0 = 1`` for ``C = 64``), whose pairs use the
    explicit ``[b0, b0, K]`` masked exponential. About ``C^2 K / 2`` multiply-adds per key, like
    one masked product, and no factor can overflow however strong the decay (the whole-chunk
    factorisation ``exp(gx_i) exp(-G_j)`` overflows float32 once a chunk decays by ~88;
    linear.py's sub-chunks of 16 need ``[16, 16, K]`` element-wise work, which XLA:CPU ran ~3x
    slower here, forward and backward). (Stacking the query sides and keys into one product per
    level crashed XLA:CPU's backward at run time, jax 0.10.2, so each pair is its own product.)
    """
    acc = G.dtype
    c, dk = G.shape[-2:]
    lead = G.shape[:-2]
    out = [jnp.zeros((*lead, c, c), acc) for _ in ys]
    h = c
    while h % 2 == 0:
        h //= 2
        nb = c // (2 * h)
        halves = lambda z: z.reshape(*lead, nb, 2, h, dk)  # [.., block, half, position, K]
        Gb, rb = halves(G), halves(r)
        Gp, rp = Gb[..., 0, -1:, :], rb[..., 0, -1:, :]  # the reference p of each block [.., nb, 1, K]
        y_dec = masked_exp(Gp - Gb[..., 0, :, :], rp == rb[..., 0, :, :])  # [.., nb, h, K]
        x_dec = masked_exp(halves(gx)[..., 1, :, :] - Gp, halves(rx)[..., 1, :, :] == rp)
        xd = (halves(x)[..., 1, :, :] * x_dec).astype(md)
        eye = jnp.eye(nb, dtype=acc)
        for i, y in enumerate(ys):
            yd = (halves(y)[..., 0, :, :] * y_dec).astype(md)
            blk = jnp.einsum("...bik,...bjk->...bij", xd, yd, preferred_element_type=acc)  # [.., nb, h, h]
            full = jnp.einsum("...bij,bd->...bidj", blk, eye)[..., :, None, :, :, None, :]
            # rows in the second half, columns in the first: [.., nb, 2, h, nb, 2, h]
            full = jnp.pad(full, [(0, 0)] * len(lead) + [(0, 0), (1, 0), (0, 0), (0, 0), (0, 1), (0, 0)])
            out[i] = out[i] + full.reshape(*lead, c, c)
    # base blocks of odd length h: explicit masked exponentials
    if h == 1:  # only the pairs i = j, where kept
        if strict:
            return out
        xd = x.astype(acc) * masked_exp(gx - G, rx == r)
        return [o + jnp.sum(xd * y.astype(acc), axis=-1)[..., :, None] * jnp.eye(c, dtype=acc)
                for o, y in zip(out, ys)]
    nb = c // h
    base = lambda z: z.reshape(*lead, nb, h, dk)
    Gb, rb, gxb, rxb = base(G), base(r), base(gx), base(rx)
    tri = jnp.tril(jnp.ones((h, h), bool), -1 if strict else 0)[:, :, None]
    d = masked_exp(gxb[..., :, None, :] - Gb[..., None, :, :], tri & (rxb[..., :, None, :] == rb[..., None, :, :]))
    eye = jnp.eye(nb, dtype=acc)
    for i, y in enumerate(ys):
        diag = jnp.einsum("...ik,...jk,...ijk->...ij", base(x).astype(acc), base(y).astype(acc), d)
        out[i] = out[i] + jnp.einsum("...aij,ab->...aibj", diag, eye).reshape(*lead, c, c)
    return out


def _is_tame(gt: jax.Array, acc) -> jax.Array:
    """Whether the chunked gates ``gt [B, N, C, H, K]`` take the factored way: per chunk and
    channel ``sum |g| <= TAME_SPAN * log(float max)``. That bounds every cumulative sum ``|G|``,
    ``|Ga|`` in the chunk (restarts included), so ``exp(+-G)`` and the product of two of them are
    normal floats; it also rules out full decays (``exp(g) == 0``) and ``-inf`` / NaN gates (an
    infinite or NaN sum), so the only resets are segment starts. A bool scalar."""
    limit = tame_limit(acc)
    return jnp.all(jnp.sum(jnp.abs(gt), axis=2) <= limit)


def _tame_decays(gt: jax.Array, seg: jax.Array | None) -> ChannelDecays:
    """:func:`memjax.memory.chunking.uniform_channel_decays` (read before the update) of chunked
    gates ``gt [B, N, C, H, K]`` with no full decay, returned heads-major (``G, Ga [B, H, N, C, K]``,
    reset counts ``r, ra [B, 1, N, C, 1]``). The cumulative sums are one batched
    ``[C, C] x [C, H K]`` product per chunk in the time-major layout (leading batch axes, no
    transposed operand; measured ~10% of the whole backward pass when taken heads-major), and
    only ``G`` is moved heads-major."""
    b, n, c, h, dk = gt.shape
    m = jnp.broadcast_to(segment_cumsum_matrix(seg, c, gt.dtype), (b, n, c, c))
    G = jnp.einsum("bnij,bnjx->bnix", m, gt.reshape(b, n, c, h * dk)).reshape(b, n, c, h, dk)
    G = jnp.moveaxis(G, 3, 1)  # [B, H, N, C, K]
    shift = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(1, 0), (0, 0)])[..., :-1, :]
    if seg is None:
        r = jnp.zeros((1, 1, 1, c, 1), jnp.int32)
        return ChannelDecays(G, r, shift(G), r)
    sg = seg[:, None, :, :, None]  # [B, 1, N, C, 1]
    r = jnp.cumsum(sg.astype(jnp.int32), axis=3)
    return ChannelDecays(G, r, shift(G), shift(r) + sg.astype(jnp.int32))


def _factored_scores(qc, kc, ac, bc, dec, md):
    """``(P_qb, P_qk, L_ab, L_ak)`` of :func:`_decayed_scores` for tame gates (:func:`_is_tame`),
    each one matmul per chunk through the chunk start as the reference point::

        sum_c x_ic y_jc exp(gx_ic - G_jc) = sum_c [x_ic exp(gx_ic)] [y_jc exp(-G_jc)]

    (``gx = G`` for q, ``Ga`` for a). Every ``|G|, |Ga| <= ~44`` (float32), so both factors are
    normal floats and every product is finite. The reference is causal (a row's factor depends on
    no later gate). Pairs ``j > i`` (``j >= i`` for the strict ``L``) and pairs in different
    segments (``dec``'s reset counts, shared by all channels here) are selected away after the
    product; their finite values never reach a kept entry or a gradient."""
    G, r, Ga, ra = dec
    acc = G.dtype
    c = qc.shape[3]
    en = jnp.exp(-G)
    qf, af = ((x * jnp.exp(e)).astype(md) for x, e in ((qc, G), (ac, Ga)))
    bf, kf = ((y * en).astype(md) for y in (bc, kc))
    mm = lambda x, y: jnp.einsum("...ik,...jk->...ij", x, y, preferred_element_type=acc)
    same = lambda rx: rx[..., :, None, 0] == r[..., None, :, 0]  # [B, 1, N, C, C]
    keep = jnp.tril(jnp.ones((c, c), bool)) & same(r)
    keep_strict = jnp.tril(jnp.ones((c, c), bool), -1) & same(ra)
    zero = jnp.zeros((), acc)
    return (jnp.where(keep, mm(qf, bf), zero), jnp.where(keep, mm(qf, kf), zero),
            jnp.where(keep_strict, mm(af, bf), zero), jnp.where(keep_strict, mm(af, kf), zero))


def _carried(qc, ac, bc, kc, dec):
    """The decays that link a chunk to its neighbours: ``q_i`` and ``a_i`` times the decay since
    the chunk start (how they see the carried-in state), ``b_j``, ``k_j`` times the decay to the
    chunk end (their weight in the chunk's final state) and the whole chunk's decay
    ``[B, H, N, K]``."""
    G, r, Ga, ra = dec
    last = lambda z: z[..., -1:, :]
    q_dec = qc * masked_exp(G, r == 0)  # the carried-in state as seen by q_i ...
    a_dec = ac * masked_exp(Ga, ra == 0)  # ... and by the rank-one read a_i
    to_end = masked_exp(last(G) - G, r == last(r))  # write j's weight in the chunk's final state
    decay = masked_exp(G[..., -1, :], r[..., -1, :] == 0)
    return q_dec, a_dec, bc * to_end, kc * to_end, jnp.broadcast_to(decay, G.shape[:3] + G.shape[-1:])


def _chunked(q, k, v, a, b, g, s0, segment_ids, scale, c):
    """The chunked WY form (module docstring); ``g: [B, T, H, K or 1]``."""
    t, dk = q.shape[1], q.shape[-1]
    acc, md = s0.dtype, q.dtype
    qc, kc, vc, ac, bc = (to_head_chunks(x, c) for x in (q, k, v, a, b))  # [B, H, N, C, .]
    gt = to_chunks(pad_time(jnp.broadcast_to(g, (*g.shape[:3], dk)), c), c)  # [B, N, C, H, K]; the tail has g = 0
    seg = None if segment_ids is None else to_chunks(segment_resets(pad_time(segment_ids, c, mode="edge")), c)
    # Two ways to the intra-chunk factors, one result up to round-off (as in
    # memjax.memory.linear's per-channel form). The tame way covers the usual gates: no full
    # decay, so the only resets are segment starts, shared by all channels (the cumulative sums
    # are one [C, C] matmul per chunk), and a total decay per chunk and channel of at most
    # TAME_SPAN log(float max) (~44 in float32), so every score matrix is one matmul of factors
    # through the chunk start (_factored_scores). Otherwise (strong or -inf decays) the general
    # way: per-channel resets and the hierarchical _decayed_scores, safe for any decay. The tame
    # way runs outside the lax.cond on gates zeroed when not tame (XLA:CPU runs ops inside a
    # conditional markedly slower, and zeroed gates keep it and its gradients finite); the
    # general way is rematerialised so that the cond's residuals stay its inputs.
    tame = _is_tame(gt, acc)
    dec = _tame_decays(jnp.where(tame, gt, jnp.zeros((), acc)), seg)
    fast = _factored_scores(qc, kc, ac, bc, dec, md) + _carried(qc, ac, bc, kc, dec)

    def general():
        # G, r: inclusive cumulative log decay and reset count (the q side and every write);
        # Ga, ra: those the rank-one read of S_{i-1} sees (shifted by one, a segment start included).
        dec = channel_decays(jnp.moveaxis(gt, 3, 1), seg, acc, read_before_update=True)
        G, r, Ga, ra = dec
        p_qb, p_qk = _decayed_scores(qc, G, r, (bc, kc), G, r, strict=False, md=md)
        l_ab, l_ak = _decayed_scores(ac, Ga, ra, (bc, kc), G, r, strict=True, md=md)
        return (p_qb, p_qk, l_ab, l_ak) + _carried(qc, ac, bc, kc, dec)

    p_qb, p_qk, l_ab, l_ak, q_dec, a_dec, b_end, k_end, decay = jax.lax.cond(tame, lambda: fast,
                                                                             jax.checkpoint(general))

    # WY factors: x = W S + U, (I - L_ab) [W, U] = [A~, L_ak V]
    vf = vc.astype(acc)
    inv = unit_lower_inverse(-l_ab)
    w = jnp.einsum("...ij,...jk->...ik", inv, a_dec.astype(acc))  # [B, H, N, C, K]
    u = jnp.einsum("...ij,...jv->...iv", inv, jnp.einsum("...ij,...jv->...iv", l_ak, vf))  # [B, H, N, C, V]
    # the chunk's affine map S -> M S + h, and the outputs' O = Mq S + oc
    trans = decay[..., :, None] * jnp.eye(dk, dtype=acc) + jnp.einsum("...ck,...cj->...kj", b_end.astype(acc), w)
    h = (jnp.einsum("...ck,...cv->...kv", b_end.astype(acc), u)
         + jnp.einsum("...ck,...cv->...kv", k_end, vc, preferred_element_type=acc))
    mq = scale * (q_dec.astype(acc) + jnp.einsum("...ij,...jk->...ik", p_qb, w))
    oc = scale * (jnp.einsum("...ij,...jv->...iv", p_qb, u) + jnp.einsum("...ij,...jv->...iv", p_qk, vf))

    chunk_major = lambda z: jnp.moveaxis(z, 2, 0)
    s, s_in = _affine_pass(chunk_major(trans), chunk_major(h), s0)
    o = jnp.einsum("bhnck,bhnkv->bhncv", mq, jnp.moveaxis(s_in, 0, 2)) + oc
    return from_head_chunks(o, t), s


def _affine_states(trans, h, s0):
    def step(s, inp):
        trans_n, h_n = inp
        return jnp.einsum("bhkj,bhjv->bhkv", trans_n, s) + h_n, s

    return jax.lax.scan(step, s0, (trans, h))


@jax.custom_vjp
def _affine_pass(trans, h, s0):
    """``S_{n+1} = M_n S_n + h_n`` over chunk-major stacks ``trans [N, B, H, K, K]``,
    ``h [N, B, H, K, V]``; returns ``(S_N, S_n [N, B, H, K, V])``. Hand-written backward: a reverse
    scan carrying ``dS`` with one matmul per chunk (``dS_n = M_n^T dS_{n+1} + dS_n^{read}``), and
    ``dM_n = dS_{n+1} S_n^T`` as one batched product over all chunks."""
    return _affine_states(trans, h, s0)


def _affine_pass_fwd(trans, h, s0):
    s, s_in = _affine_states(trans, h, s0)
    return (s, s_in), (trans, s_in)


def _affine_pass_bwd(res, cts):
    trans, s_in = res
    dsf, d_sin = cts

    def step(ds, inp):  # ds = dL/dS_{n+1}
        trans_n, d_sin_n = inp
        return jnp.einsum("bhkj,bhkv->bhjv", trans_n, ds) + d_sin_n, ds

    # (inside shard_map the final state's cotangent must vary like the chunk tensors to be a carry)
    (dsf, *_), _ = common_varying(dsf, trans, d_sin)
    ds0, ds_next = jax.lax.scan(step, dsf, (trans, d_sin), reverse=True)
    return jnp.einsum("nbhkv,nbhjv->nbhkj", ds_next, s_in), ds_next, ds0


_affine_pass.defvjp(_affine_pass_fwd, _affine_pass_bwd)
