"""GDN-2: the delta rule with channel-wise decay, erase and write gates, and the chunked core it
shares with Kimi Delta Attention (:func:`memjax.memory.delta.delta_rule` with a per-key-channel ``g``).

Recurrence (per batch and value head; ``S_t in R^{K x V}``; ``g_t <= 0`` a log decay per key
channel, ``b_t in R^K`` an erase gate, ``w_t in R^V`` a write gate, usually ``sigmoid(.)``)::

    S'_t = diag(exp g_t) S_{t-1}                    (decay each key channel)
    e_t  = S'_t^T (b_t * k_t)                       (what the gated key reads back: the part to erase)
    S_t  = S'_t + k_t (w_t * v_t - e_t)^T           (erase it, write the gated value)
    o_t  = scale * S_t^T q_t

i.e. ``S_t = (I - k_t (b_t * k_t)^T) diag(exp g_t) S_{t-1} + k_t (w_t * v_t)^T``. With
``b_t = w_t = beta_t 1`` this is Kimi Delta Attention (KDA: Kimi team 2025, "Kimi Linear: An
Expressive, Efficient Attention Architecture"), ``S_t = S'_t + k_t (beta_t (v_t - S'_t^T k_t))^T``,
and with a per-head ``g`` the gated delta rule (Yang, Kautz, Hatamizadeh 2024). GDN-2 decouples
the erase strength per key channel from the write strength per value channel.

The shared core (:func:`channel_delta`) is this recurrence with a general erase vector
``a_t`` (``= b_t * k_t``) and write value ``u_t`` (``= w_t * v_t``)::

    S'_t = diag(exp g_t) S_{t-1};   S_t = S'_t + k_t (u_t - S'_t^T a_t)^T;   o_t = scale S_t^T q_t

Chunked form (chunks of ``C`` positions; ``G_i`` the cumulative log decay within the chunk up to
and including ``i``, per channel; ``S`` the state entering the chunk). The corrections
``delta_j = u_j - S'_j^T a_j`` solve the unit lower-triangular system (the UT transform of the
delta rule, with per-channel decays)::

    (I + L) delta = U - A_gamma S,   L_ij = sum_c a_ic k_jc exp(G_ic - G_jc)  (j < i),
    A_gamma = rows exp(G_i) * a_i

so ``delta = T U - T A_gamma S`` with ``T = (I + L)^{-1}``, and::

    O      = scale (diag-per-row(exp G_i) Q S + P delta),   P_ij = sum_c q_ic k_jc exp(G_ic - G_jc)  (j <= i)
    S_next = diag(exp G_{C-1}) S + sum_j diag(exp(G_{C-1} - G_j)) k_j delta_j^T

Two ways to it, one result up to round-off, chosen at run time for the whole call (``_routed``: a
``custom_vjp`` whose forward and backward each pick the way with a ``lax.cond``):

  - *tame* gates (the usual training case: per chunk and key channel a total decay
    ``sum |g| <= TAME_SPAN * log(float max)``, about 44 in float32, so no full decay either):
    :func:`memjax.memory.gdn2_fast.tame_chunked`. ``P`` and ``L`` factor through the chunk start,
    ``[q_i exp(G_i)] [k_j exp(-G_j)]^T`` (both factors normal floats), two plain matmuls per chunk;
    the only resets are segment starts, so the cumulative sums are ``[C, C]`` matmuls; and the
    chunk pass has its own reverse pass (:func:`memjax.memory.gdn2_fast.lean_chunk_recurrence`).
    Measured (CPU, T = 4096, B = 1, H = 4, K = V = 64, C = 64, forward + backward, a loaded
    machine): about 0.6x the CPU time of the general way.
  - otherwise (strong decays, ``g = -inf`` resets of single channels): the general way below,
    safe for any decay.

In the general way ``P`` and ``L`` are gated-linear-attention scores with per-channel decays
(:func:`decayed_scores`: blocks halved recursively, pairs across two halves factorised through the first half's last
position, pairs inside blocks of ``<= 4`` positions in the explicit ``[s, s, K]`` form with the
exponent masked before the ``exp``), so every exponent is ``<= 0`` and nothing overflows however
strong the decay. ``T`` comes from
:func:`memjax.memory.ut_transform.unit_lower_inverse`; the chunk-to-chunk pass is
:func:`memjax.kernels.chunk_pass.chunk_recurrence` with ``u = T U``, ``w = T A_gamma`` and a
per-channel chunk decay (XLA ``lax.scan``; the GPU Pallas kernel takes scalar decays only). Resets
(segment starts, or ``g = -inf`` in a channel) restart the cumulative sums and mask every term that
crosses them, as in :func:`memjax.memory.chunking.channel_decays`.

Forms: ``"chunked"`` (training; O(T C) intra-chunk work, O(T / C) sequential steps, no per-token
state) and ``"recurrent"`` (token-by-token ``lax.scan``; also the decoding form).

Sequence parallelism (``seq_axis``, chunked mode): the update is affine in the state and its map
``prod_t (I - k_t a_t^T) diag(exp g_t)`` acts alike on every value column, so each shard runs this
chunked pass with ``K`` extra zero value columns started from the identity, which carry that
``K x K`` map and its read (:func:`memjax.memory.sequence_parallel.sharded_columns`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.kernels.chunk_pass import chunk_recurrence
from memjax.memory import nonfinite
from memjax.memory.chunking import (channel_decays, delta_chunk_size, from_head_chunks, masked_exp, pad_time,
                                    tame_limit, to_chunks, to_head_chunks)
from memjax.memory.contract import (check_gate, check_matrix_memory, check_vector_gate, operand_dtype, output_dtype,
                                    resolve_scale, state_dtype)
from memjax.memory.gdn2_fast import tame_chunked
from memjax.memory.kda_kernel import chunked_kda_kernel, kda_kernel
from memjax.memory.segments import segment_resets
from memjax.memory.sequence_parallel import extend_columns, sharded_columns
from memjax.memory.ut_transform import unit_lower_inverse

MODES = ("chunked", "recurrent")


def gdn2(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, b: jax.Array, w: jax.Array, *,
         scale: float | None = None, initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
         mode: str = "chunked", chunk_size: int | None = None, impl: str = "auto", interpret: bool | None = None,
         seq_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """GDN-2 (channel-wise erase and write gates); see the module docstring for the equations.

    Args:
      q, k: ``[B, T, H, K]`` (callers L2-normalise k: then ``I - k (b * k)^T`` has eigenvalues
        ``1`` and ``1 - sum_c b_c k_c^2``, in ``(0, 1)`` for ``b in (0, 1)``).
      v: ``[B, T, HV, V]``, ``HV`` a multiple of ``H`` (grouped value heads: value head ``j`` uses
        q/k head ``j // (HV / H)``; usually ``HV = H``).
      g: ``[B, T, HV, K]`` log decay per key channel (``<= 0``; ``-inf`` resets that channel), or
        ``[B, T, HV]`` per head.
      b: ``[B, T, HV, K]`` erase gate (``sigmoid(.)``; ``2 sigmoid(.)`` lets the transition's
        eigenvalue go negative, as ``beta`` in :func:`memjax.memory.delta.delta_rule`).
      w: ``[B, T, HV, V]`` write gate (``sigmoid(.)``).
      scale: read scale, default ``K ** -0.5``.
      initial_state: ``[B, HV, K, V]`` (zeros if None).
      segment_ids: ``[B, T]`` int; the state is reset to zero before the first token of every new
        segment (``initial_state`` reaches only the first one).
      mode: ``"chunked"`` or ``"recurrent"``.
      chunk_size: ``C``; ``T`` need not be a multiple (the tail is padded with zeros, which leave
        the state unchanged, and the output sliced back). None: 32 on CPU, 64 on GPU and TPU
        (:func:`memjax.memory.chunking.delta_chunk_size`).
      impl: the chunk-to-chunk pass (:mod:`memjax.kernels.chunk_pass`); ``"pallas"`` (the GPU
        kernel) is refused: it carries scalar chunk decays.
      interpret: passed to the chunk pass (a Pallas kernel in interpret mode, CPU tests).
      seq_axis: sequence parallelism (chunked mode; :mod:`memjax.memory.sequence_parallel`): call
        inside ``jax.shard_map`` with time split over this mesh axis; the inputs are this device's
        slice, ``initial_state`` the state before the whole sequence; returns this slice's outputs
        and the whole sequence's final state (see the module docstring).

    Returns:
      ``(o [B, T, HV, V]`` in q's dtype, ``final_state [B, HV, K, V]`` float32, or float64 for
      float64 inputs). Dtypes follow :mod:`memjax.memory.contract`.
    """
    fn = "gdn2"
    chunk_size = delta_chunk_size(chunk_size)
    check_channel_options(fn, impl)
    bsz, t, h, dk, dv = check_matrix_memory(fn, q, k, v, gates={}, initial_state=initial_state,
                                            segment_ids=segment_ids, scale=scale, mode=mode, modes=MODES,
                                            chunk_size=chunk_size, impl=impl, seq_axis=seq_axis, grouped=True)
    hv = v.shape[2]
    check_vector_gate(fn, "g", g, bsz, t, hv, dk, required=True)
    check_gate(fn, "b", b, (bsz, t, hv, dk), "[B, T, HV, K]", required=True)
    check_gate(fn, "w", w, (bsz, t, hv, dv), "[B, T, HV, V]", required=True)
    out_dtype = output_dtype(q)
    acc = state_dtype(q, k, v, g, b, w, initial_state)
    md = operand_dtype(q, k, v)
    q, k, v = (x.astype(md) for x in (q, k, v))
    if hv != h:  # grouped value heads: every value head gets its group's q and k
        q, k = (jnp.repeat(x, hv // h, axis=2) for x in (q, k))
    b_in, w_in = b, w  # (the fused kernel reads the gates in their own dtype)
    g, b, w = (x.astype(acc) for x in (g, b, w))
    s0 = jnp.zeros((bsz, hv, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
    # A non-finite token poisons only itself and the rest of its document (memjax.memory.nonfinite),
    # across shards under seq_axis.
    writes = nonfinite.either(nonfinite.bad(k, 3), nonfinite.bad(v, 3), nonfinite.bad(b, 3),
                              nonfinite.bad(w, 3), nonfinite.bad(g, 3, gate=True))
    mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.running(writes, segment_ids, axis_name=seq_axis))
    kernel = kda_kernel(impl, (bsz, t, hv, dk), dv, md, chunk_size, interpret) \
        if mode == "chunked" and seq_axis is None and g.ndim == 4 else None
    if kernel is not None:  # one Mosaic kernel each way: it reads non-finite q, k, v, b, w (and NaN / +inf
        # gates) as 0 and forms b * k, w * v itself
        o, s = chunked_kda_kernel(q, k, v, b_in, g, segment_resets(segment_ids), s0, resolve_scale(scale, dk),
                                  chunk_size, kernel, w=w_in)
        return nonfinite.poison_outputs(o.astype(out_dtype), s, mask, seq_axis)
    g = nonfinite.finite_gate(g)
    q, k, v, b, w = (nonfinite.finite_or_zero(x) for x in (q, k, v, b, w))  # mask: [B, T, HV]
    u, erase = w * v.astype(acc), b * k.astype(acc)
    run = lambda u, s0: channel_delta(q, k, u, erase, g, s0, segment_ids, resolve_scale(scale, dk), mode=mode,
                                      chunk_size=chunk_size, impl=impl, interpret=interpret)
    if seq_axis is None:
        o, s = run(u, s0)
    else:  # the K x K map from the incoming state rides along as dk extra value columns
        o, s = sharded_columns(lambda start: run(extend_columns(u, dk), start), s0, segment_ids, axis_name=seq_axis)
    return nonfinite.poison_outputs(o.astype(out_dtype), s, mask, seq_axis)


def check_channel_options(fn: str, impl: str) -> None:
    """The option the channel-wise core does not take: ``impl="pallas"``."""
    if impl == "pallas":
        raise ValueError(f"{fn}: impl='pallas' is not available with per-key-channel decays (the Pallas chunk pass "
                         "carries a scalar decay per chunk); use impl='auto' or 'xla'")


# ----------------------------------------------------------------------------- the shared core


def channel_delta(q, k, u, a, g, s0, segment_ids, scale, *, mode: str, chunk_size: int, impl: str = "auto",
                  interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """The core ``S'_t = diag(exp g_t) S_{t-1}``, ``S_t = S'_t + k_t (u_t - S'_t^T a_t)^T``,
    ``o_t = scale S_t^T q_t`` on validated, finite inputs (see the module docstring).

    Args:
      q, k: ``[B, T, H, K]`` in the operand dtype (grouped heads already repeated to ``H = HV``).
      u: ``[B, T, H, V]`` write values, a: ``[B, T, H, K]`` erase vectors (float32 / float64).
      g: ``[B, T, H, K]`` or ``[B, T, H]`` log decays, or None.
      s0: ``[B, H, K, V]`` initial state (its dtype is the accumulation dtype).
      segment_ids: ``[B, T]`` or None.  scale: read scale.

    Returns:
      ``(o [B, T, H, V]`` in q's dtype, ``S_T [B, H, K, V]`` in s0's dtype).
    """
    if mode == "recurrent":
        return _recurrent(q, k, u, a, g, s0, segment_resets(segment_ids), scale, q.dtype)
    kernel = kda_kernel(impl, q.shape, u.shape[-1], q.dtype, chunk_size, interpret) \
        if g is not None and g.ndim == 4 else None
    if kernel is not None:  # the whole chunked pass in one Mosaic kernel each way (the state in VMEM)
        return chunked_kda_kernel(q, k, u, a, g, segment_resets(segment_ids), s0, scale, chunk_size, kernel)
    return _chunked(q, k, u, a, g, s0, segment_ids, scale, chunk_size, impl=impl, interpret=interpret)


def _recurrent(q, k, u, a, g, s0, resets, scale, out_dtype):
    """Token-by-token scan; each token is promoted to the state's dtype inside the step."""
    acc = s0.dtype

    def step(s, inp):
        qt, kt, ut, at, gt, rt = inp
        if gt is not None:  # per head [B, H] or per key channel [B, H, K]
            s = s * (jnp.exp(gt)[..., None, None] if gt.ndim == 2 else jnp.exp(gt)[..., :, None])
        if rt is not None:
            s = jnp.where(rt[:, None, None, None], 0.0, s)
        erase = jnp.einsum("bhk,bhkv->bhv", at, s)
        s = s + kt.astype(acc)[..., :, None] * (ut - erase)[..., None, :]
        return s, (jnp.einsum("bhk,bhkv->bhv", qt.astype(acc), s) * scale).astype(out_dtype)

    tm = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
    s, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(u), tm(a), tm(g), tm(resets)))
    return jnp.swapaxes(o, 0, 1), s


BASE_BLOCK = 4  # blocks of at most this many positions use the explicit [s, s, K] decays (measured on CPU:
#                 4 and 2 equal, 8 1.3x and 16 2.2x slower forward + backward at C = 64, K = 64)


def decayed_scores(xs: tuple, kc, G, r, *, md, acc, base: int = BASE_BLOCK) -> list:
    """For each ``x`` of ``xs``: ``P_ij = sum_c x_ic k_jc exp(G_ic - G_jc)`` for ``j <= i`` in the
    same reset run (``r_i == r_j`` per channel), else 0, within each block of positions.

    ``x, kc: [..., n, s, K]``; ``G, r: [..., n, s, Kg]`` (``Kg = K`` or 1; for a chunk stack
    ``n = N`` chunks of ``s = C`` positions, :class:`memjax.memory.chunking.ChannelDecays`'s write
    side); returns ``[..., n, s, s]`` in ``acc``. The decay factors depend on ``G`` and ``r`` only
    and are formed once for all ``xs`` (here ``q`` and the erase vectors).

    Recursive halving: a block of ``s > base`` (even) positions splits into halves; pairs within a
    half recurse, pairs across (``i`` in the second half, ``j`` in the first) factorise through the
    first half's last position ``p``: ``exp(G_i - G_j) = exp(G_i - G_p) exp(G_p - G_j)`` with
    ``j <= p < i``, so both exponents are ``<= 0`` however strong the decay, and the block is one
    matmul over channels in the operand dtype ``md``. Blocks of ``<= base`` positions (or an odd
    number) use the explicit ``[s, s, Kg]`` factors, the exponent masked to ``j <= i`` before the
    ``exp``. Elementwise work per position: ``2 K`` exponentials per level plus ``base K`` at the
    bottom (the flat form, :mod:`memjax.memory.linear`'s sub-chunks, needs ``(s + C / s) K``).
    """
    s = kc.shape[-2]
    if s <= base or s % 2:
        tri = jnp.tril(jnp.ones((s, s), bool))[:, :, None]
        d = masked_exp(G[..., :, None, :] - G[..., None, :, :], tri & (r[..., :, None, :] == r[..., None, :, :]))
        if d.shape[-1] == 1:
            return [jnp.einsum("...ik,...jk->...ij", x.astype(md), kc, preferred_element_type=acc) * d[..., 0]
                    for x in xs]
        return [jnp.einsum("...ik,...jk,...ijk->...ij", x.astype(acc), kc.astype(acc), d) for x in xs]
    h = s // 2
    lead = kc.shape[:-2]
    split = lambda y: y.reshape(*y.shape[:-3], 2 * y.shape[-3], h, y.shape[-1])  # halves as blocks
    inner = decayed_scores(tuple(split(x) for x in xs), split(kc), split(G), split(r), md=md, acc=acc, base=base)
    Gp, rp = G[..., h - 1:h, :], r[..., h - 1:h, :]  # the first half's last position
    qfac = masked_exp(G[..., h:, :] - Gp, r[..., h:, :] == rp)  # [..., n, h, Kg]
    kf = (kc[..., :h, :] * masked_exp(Gp - G[..., :h, :], r[..., :h, :] == rp)).astype(md)
    out = []
    for x, a in zip(xs, inner):
        a = a.reshape(*lead, 2, h, h)  # the two halves' own scores
        cross = jnp.einsum("...ik,...jk->...ij", (x[..., h:, :] * qfac).astype(md), kf, preferred_element_type=acc)
        top = jnp.concatenate([a[..., 0, :, :], jnp.zeros_like(cross)], axis=-1)
        bottom = jnp.concatenate([cross, a[..., 1, :, :]], axis=-1)
        out.append(jnp.concatenate([top, bottom], axis=-2))
    return out


def _chunked(q, k, u, a, g, s0, segment_ids, scale, chunk_size, *, impl, interpret):
    bsz, t, h, _ = q.shape
    c = chunk_size
    acc = s0.dtype
    qc, kc, uc, ac = (to_head_chunks(x, c) for x in (q, k, u, a))  # [B, H, N, C, .]
    if g is None:
        g = jnp.zeros((bsz, t, h, 1), acc)
    elif g.ndim == 3:
        g = g[..., None]
    gc = to_head_chunks(g, c)  # [B, H, N, C, Kg]; the padded tail has g = 0
    seg = None if segment_ids is None else to_chunks(segment_resets(pad_time(segment_ids, c, mode="edge")), c)

    # Two ways, one result up to round-off, chosen at run time for the whole call, as
    # memjax.memory.linear's per-channel GLA does. Tame gates (_is_tame: no full decay and a
    # moderate total decay per chunk and channel, the usual training case): the scores P and L
    # factor through the chunk start (memjax.memory.gdn2_fast.tame_chunked: plain matmuls, a
    # lean chunk pass). Otherwise (strong or -inf decays): _general_chunked, every exponent
    # <= 0, safe for any decay. _routed picks the way in its forward and again in its backward.
    o, s = _routed(impl, interpret, _is_tame(gc, acc), qc, kc, uc, ac, gc, s0, jnp.asarray(scale, acc), seg)
    return from_head_chunks(o, t), s


# The route as a custom_vjp rather than autodiff of a lax.cond over the two ways: autodiff of a
# cond makes the forward cond return the residuals of both branches (copies under XLA:CPU, which
# also runs ops inside a conditional markedly slower than at the top level) and transposes both.
# Here the tame way runs at the top level in both passes, its residuals saved by jax.vjp, and
# each cond returns only outputs or gradients; the general way keeps no residuals beyond the
# inputs (its backward recomputes its forward, as jax.checkpoint did). Where the gates are not
# tame the tame way runs on zeroed gates and the conds discard its results. Measured (CPU time,
# T = 4096, B = 1, H = 4, K = V = 64, C = 64, forward + backward of the chunk core, a loaded
# machine): about 0.9x that of autodiff of the cond.


def _tame_way(impl, interpret, tame, seg):
    # (zeroed gates where they are not tame: finite factors exp(+-G) = 1, so finite results, which
    # the conds of _routed then discard)
    off = lambda x: jnp.where(tame, x, jnp.zeros((), x.dtype))
    return lambda qc, kc, uc, ac, gc, s0, scale: tame_chunked(qc, kc, uc, ac, off(gc), s0, seg, scale, impl=impl,
                                                              interpret=interpret)


def _general_way(impl, interpret, seg):
    return lambda qc, kc, uc, ac, gc, s0, scale: _general_chunked(qc, kc, uc, ac, gc, s0, seg, scale, impl=impl,
                                                                  interpret=interpret)


# (scale is a differentiable argument, not a static one: a caller may pass an array, even a traced one)
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _routed(impl, interpret, tame, qc, kc, uc, ac, gc, s0, scale, seg):
    xs = (qc, kc, uc, ac, gc, s0, scale)
    fast = _tame_way(impl, interpret, tame, seg)(*xs)
    return jax.lax.cond(tame, lambda: fast, lambda: _general_way(impl, interpret, seg)(*xs))


def _routed_fwd(impl, interpret, tame, qc, kc, uc, ac, gc, s0, scale, seg):
    xs = (qc, kc, uc, ac, gc, s0, scale)
    fast, fast_vjp = jax.vjp(_tame_way(impl, interpret, tame, seg), *xs)
    out = jax.lax.cond(tame, lambda: fast, lambda: _general_way(impl, interpret, seg)(*xs))
    return out, (tame, fast_vjp, xs, seg)


def _routed_bwd(impl, interpret, res, ct):
    tame, fast_vjp, xs, seg = res
    grads = fast_vjp(ct)
    general = lambda: jax.vjp(_general_way(impl, interpret, seg), *xs)[1](ct)
    grads = jax.lax.cond(tame, lambda: grads, general)
    return (None, *grads, None)


_routed.defvjp(_routed_fwd, _routed_bwd)


def _is_tame(gc: jax.Array, acc) -> jax.Array:
    """Whether the chunked gates ``gc [B, H, N, C, Kg]`` take the factored way: per chunk and
    channel a total decay ``sum |g| <= TAME_SPAN * log(float max)`` (about 44 in float32, 354 in
    float64). That bounds every cumulative sum ``|G|`` in the chunk, so ``exp(+-G)`` and the
    product of two of them are normal floats; it also rules out full decays (each
    ``|g| <= 44``, so ``exp(g) > 0``: the only resets are segment starts) and ``-inf`` (an
    infinite sum). A bool scalar; False for non-finite sums."""
    limit = tame_limit(acc)
    return jnp.all(jnp.sum(jnp.abs(gc), axis=3) <= limit)


def _general_chunked(qc, kc, uc, ac, gc, s0, seg, scale, *, impl, interpret):
    """The chunked form for any gates (module docstring): per-channel resets
    (:func:`memjax.memory.chunking.channel_decays`) and the scores of :func:`decayed_scores`, every
    exponent ``<= 0``; chunk stacks as :func:`memjax.memory.gdn2_fast.tame_chunked` takes them."""
    acc, md = s0.dtype, qc.dtype
    G, r, _, _ = channel_decays(gc, seg, acc)
    live = masked_exp(G, r == 0)  # decay from the chunk start: how the incoming state reaches i
    qg = qc * (live * scale)
    ke = kc * masked_exp(G[..., -1:, :] - G, r == r[..., -1:, :])
    decay = masked_exp(G[..., -1, :], r[..., -1, :] == 0)  # [B, H, N, Kg]
    decay = decay[..., 0] if decay.shape[-1] == 1 else decay

    # P (queries) and L (erase vectors) share the decay factors. L's diagonal (i = j) is computed
    # too and ignored: unit_lower_inverse reads the strictly lower part only.
    p, lower = decayed_scores((qc, ac), kc, G, r, md=md, acc=acc)
    p = p * scale
    # UT transform: [U, W] = (I + L)^{-1} [U, A_gamma]; L and its inverse in `acc`, the matmul
    # operands in the input dtype (as the scalar delta rule and flash-linear-attention do).
    inv = unit_lower_inverse(lower)
    rhs = jnp.concatenate([uc, live * ac], axis=-1)
    uw = jnp.einsum("bhnij,bhnjx->bhnix", inv.astype(md), rhs.astype(md), preferred_element_type=acc).astype(md)
    dv = uc.shape[-1]
    return chunk_recurrence(qg.astype(md), p.astype(md), uw[..., :dv], ke.astype(md), decay, s0, w=uw[..., dv:],
                            impl=impl, interpret=interpret)
