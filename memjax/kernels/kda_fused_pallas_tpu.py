"""Pallas (Mosaic) kernels for the *whole* chunked pass of the channel-wise delta rule on a TPU
(Kimi Delta Attention, GDN-2): a decay per key channel, then a delta update with an erase vector
``a`` and a write value ``u``; forward and backward in one kernel each, the ``[K, V]`` state in
VMEM from the first chunk to the last.

Recurrence (per batch and head; ``g_t in R^K`` log decays, ``-inf`` resetting that channel; KDA
is ``a = beta k``, ``u = beta v``, GDN-2 ``a = b * k``, ``u = w * v``)::

    S'_t = diag(exp g_t) S_{t-1}       S_t = S'_t + k_t (u_t - S'_t^T a_t)^T       o_t = scale S_t^T q_t

with the state zeroed before token ``t``'s update at a segment start. Within a chunk, with ``S``
the state before it and the per-channel factors of :class:`memjax.kernels.gla_fused_pallas_tpu.ChannelChunk`
(``alpha_i = exp(P_i)`` from the chunk start, ``D_ij = exp(P_i - P_j)`` within a segment,
``e_j = exp(P_last - P_j)``, ``A = exp(P_last)``; every exponent ``<= 0``)::

    L_ij = sum_c a_ic k_jc D_ijc  (j < i)        P_ij = scale sum_c q_ic k_jc D_ijc  (j <= i)
    Delta = (I + L)^{-1} (U - (alpha * A_erase) S)
    O     = scale (alpha * Q) S + P Delta        S' = diag(A) S + (e * K)^T Delta

``L`` and ``P`` are never formed whole: the chunk is cut into sub-chunks of ``s = 16`` positions
and ``Delta`` solved by block forward substitution, ``Delta_a = X_aa (r_a - sum_{b < a} L_ab
Delta_b)`` with ``X_aa = (I + L_aa)^{-1}`` (the Neumann product of
:func:`memjax.kernels.delta_fused_pallas_tpu.neumann_inverse`, ``[s, s]``). A diagonal block uses
the explicit ``[s, s, K]`` factor ``D``; the blocks left of sub-chunk ``a`` are one matmul, the
rows times ``exp(P_i - P_r)`` and the keys ``j <= r`` times ``exp(P_r - P_j)`` (``r`` the position
before ``a``; both factors ``<= 1``, so no decay overflows: the factorisation through the chunk
start, ``a exp(P)`` times ``k exp(-P)``, would).

Backward, chunk ``N-1`` down to ``0``, with ``H`` the cotangent of ``S'``::

    dDelta = P^T dO + (e * K) H          Y = (I + L)^{-T} dDelta   (block back substitution)
    dU = Y      d(alpha * A_erase) = -Y S^T      dP = dO Delta^T      dL = -Y Delta^T
    dS = diag(A) H + scale (alpha * Q)^T dO - (alpha * A_erase)^T Y

``dq, da, dk`` through the same blocks, and the decay's gradient by the identity that holds
because ``g`` enters only through ``q_i exp(G_i)``, ``a_i exp(G_i)`` and ``k_j exp(-G_j)``
(``G`` the cumulative log decay; the final state adds ``<dS_T, S_T>`` at the last position):
``dL/dG_i = q_i dq_i + a_i da_i - k_i dk_i`` per channel, summed from each position to the end
of its segment (a segmented scan carried across chunks, as the GLA kernel does), 0 at resets.

KDA passes ``beta`` as ``[B, H, N, 1, C]`` rows instead of ``a``, and ``v`` as ``u``: the kernels
form ``beta k`` and ``beta v`` in VMEM and chain their gradients to ``k``, ``v`` and ``beta``
(``dbeta_t = <da_t, k_t> + <du_t, v_t>``), so neither product nor its gradient goes through HBM.

Layout and dtypes as :mod:`memjax.kernels.fused_chunk_tpu`: q, k, a, u and the ``[B, T, H, K]``
gates are read in place; q, k, a, u, ``Delta`` are matmul operands in their dtype with float32
accumulation; decays, ``L``, its inverse blocks and the state stay float32. Non-finite q, k, a,
u entries are read as 0 and get a zero gradient.

Status: compiled through Mosaic for v5p / v5e compile-only devices from a CPU host and tested
in interpret mode (``tests/test_kda_fused_tpu.py``); never run on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from memjax.kernels.delta_fused_pallas_tpu import neumann_inverse
from memjax.kernels.fused_chunk_tpu import (NN, NT, TN, HeadLayout, column_as_row, dot, fits, forward_outputs,
                                            from_heads, gate_rows, geometry, launch, load_chunk,
                                            masked_exp, nbytes, out_bytes, row_as_column, start_from, to_heads,
                                            write_final)
from memjax.kernels.gla_fused_pallas_tpu import ChannelChunk, channel_vmem_bytes, diag_scores, sub_chunk

__all__ = ["forward", "backward", "supports", "CHUNKS_PER_STEP"]

# One chunk per grid step, as the GLA kernel (its sub-chunk factors plus the delta rule's
# per-sub-chunk solves keep many temporaries alive), and a 64 MiB scoped-VMEM limit: with 12 heads
# in a block (H = 12 is not a multiple of 8, so the block holds them all) Mosaic allocated 40.0 MiB
# for the backward at K = V = 128 (compile-only v5p; 8 heads fit under 32 MiB). v5e, v5p and v6e
# cores have 95-128 MiB of VMEM; Mosaic refuses, at compile time, a kernel that would not fit.
CHUNKS_PER_STEP = 1
VMEM_LIMIT = 64 * 2 ** 20
VMEM_BUDGET = 56 * 2 ** 20


def _iota2(s):
    i = jax.lax.broadcasted_iota(jnp.int32, (1, s, s), 1)
    j = jax.lax.broadcasted_iota(jnp.int32, (1, s, s), 2)
    return i, j


class _Chunk:
    """One chunk's forward quantities for ``hb`` heads (module docstring), recomputed by the
    backward: per query sub-chunk ``(lo, hi, alpha_a, kf_a, e_aa)`` factors, the inverse diagonal
    blocks ``x``, the left-of-diagonal key operand ``k * kf_a`` and row operands, and ``Delta``
    per sub-chunk (in the operand dtype)."""

    def __init__(self, q, k, ea, u, ch, sm, s, scale, md, acc):
        zero = jnp.zeros((), acc)
        i, j = _iota2(s)
        self.strict, self.causal, self.eye = i > j, i >= j, i == j
        causal4 = (jax.lax.broadcasted_iota(jnp.int32, (1, s, s, 1), 1)
                   >= jax.lax.broadcasted_iota(jnp.int32, (1, s, s, 1), 2))  # (a 3-d mask cannot be reshaped in Mosaic)
        P, R = ch.P, ch.R
        read_a = dot((ea * ch.alpha).astype(md), sm, NN, acc)  # (alpha * A_erase) S
        self.read_q = dot((q * ch.alpha * scale).astype(md), sm, NN, acc)  # scale (alpha * Q) S
        self.blocks, self.x, self.deltas, self.kfk, self.qf, self.af = [], [], [], [], [], []
        for a in range(ch.c // s):
            lo, hi = a * s, (a + 1) * s
            Pa, Ra = P[:, lo:hi], R[:, lo:hi]
            ok = causal4 & (Ra[:, :, None, :] == Ra[:, None, :, :])
            e_aa = masked_exp(Pa[:, :, None, :] - Pa[:, None, :, :], ok)  # [hb, s, s, K]
            l_aa = jnp.where(self.strict, diag_scores(ea[:, lo:hi], k[:, lo:hi], e_aa), zero)
            x_aa = neumann_inverse(l_aa, self.eye, acc)
            r = u[:, lo:hi] - read_a[:, lo:hi]
            alpha_a = kf = kfk = qf = af = None  # (the first sub-chunk has no keys to its left)
            if lo:
                p_r, r_r = P[:, lo - 1:lo], R[:, lo - 1:lo]
                alpha_a = masked_exp(Pa - p_r, Ra == r_r)  # [hb, s, K]
                kf = masked_exp(p_r - P[:, :lo], R[:, :lo] == r_r)  # [hb, lo, K]
                kfk = (k[:, :lo] * kf).astype(md)
                qf, af = (q[:, lo:hi] * alpha_a).astype(md), (ea[:, lo:hi] * alpha_a).astype(md)
                prev = _rows(self.deltas)  # Delta of the sub-chunks before a: [hb, lo, V]
                r = r - dot(dot(af, kfk, NT, acc).astype(md), prev, NN, acc)
            self.kfk.append(kfk)
            self.qf.append(qf)
            self.af.append(af)
            self.blocks.append((lo, hi, alpha_a, kf, e_aa))
            self.x.append(x_aa)
            self.deltas.append(dot(x_aa.astype(md), r.astype(md), NN, acc).astype(md))
        self.dm = _rows(self.deltas)  # [hb, C, V]

    def output(self, q, k, scale, md, acc):
        """``O [hb, C, V]`` (module docstring), sub-chunk by sub-chunk."""
        parts = []
        for a, (lo, hi, _, _, e_aa) in enumerate(self.blocks):
            o_a = self.read_q[:, lo:hi] + dot((diag_scores(q[:, lo:hi], k[:, lo:hi], e_aa) * scale).astype(md),
                                              self.deltas[a], NN, acc)
            if lo:
                sc = dot(self.qf[a], self.kfk[a], NT, acc) * scale
                o_a = o_a + dot(sc.astype(md), self.dm[:, :lo], NN, acc)
            parts.append(o_a)
        return _rows(parts)


def _rows(parts):
    """Sub-chunk pieces ``[hb, s, D]`` stacked along positions (sublanes)."""
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


# How the erase vectors and write values reach the kernels (``mode``):
#   "vectors"   a = erase vectors [B, T, H, K], u = write values [B, T, H, V], read as they are;
#   "strengths" a = beta as [B, H, N, 1, C] rows, u = v: erase beta k, write beta v (KDA);
#   "gates"     a = b [B, T, H, K], u = v, w [B, T, H, V]: erase b * k, write w * v (GDN-2).
# The last two form the products in VMEM, so neither they nor their gradients go through HBM.
MODES = ("vectors", "strengths", "gates")


def _inputs(refs, mode, n_rest):
    """``(q, k, a, u, w or None, *rest_of_the_inputs)`` refs of a kernel whose inputs start with
    ``q, k, a, u`` (then ``w`` in mode "gates") and continue with ``n_rest`` more."""
    n = 5 if mode == "gates" else 4
    head = list(refs[:n]) + ([] if mode == "gates" else [None])
    return head + list(refs[n:n + n_rest]), refs[n + n_rest:]


def _load(q_ref, k_ref, a_ref, u_ref, w_ref, j, c, acc, mode, flat_d):
    """Chunk ``j``'s ``[(q, ok), (k, ok), (erase, ok), (u, ok)]`` as ``[hb, C, D]`` (non-finite
    entries 0, ``ok`` where the read operand was finite) and what the backward needs to chain the
    erase's and the write's gradients (None in mode "vectors"): ``(scale_a, scale_u, v, ok_a,
    ok_u)`` with ``erase = scale_a * k``, ``u = scale_u * v`` (``scale_a = scale_u = beta [hb, C,
    1]`` for "strengths", ``b`` and ``w`` for "gates")."""
    rows = pl.ds(j * c, c)
    q, k, u = (load_chunk(ref, rows, acc, flat_d) for ref in (q_ref, k_ref, u_ref))
    if mode == "vectors":
        return [q, k, load_chunk(a_ref, rows, acc, flat_d), u], None
    if mode == "strengths":
        beta = row_as_column(a_ref[:, j].astype(acc))
        sa, su, ok_a, ok_u = beta, beta, None, None
    else:
        (sa, ok_a), (su, ok_u) = load_chunk(a_ref, rows, acc, flat_d), load_chunk(w_ref, rows, acc, flat_d)
    return [q, k, (k[0] * sa, k[1]), (u[0] * su, u[1])], (sa, su, u[0], ok_a, ok_u)


def _fwd_kernel(*refs, nb, c, s, scale, save_states, mode, flat_d):
    (q_ref, k_ref, a_ref, u_ref, w_ref, g_ref, z_ref, s0_ref), rest = _inputs(refs, mode, 3)
    o_ref, sf_ref, st_ref, s_ref = forward_outputs(rest, s0_ref, save_states)
    acc, md = s_ref.dtype, q_ref.dtype
    state = s_ref[...]  # [hb, K, V]
    for j in range(nb):
        rows = pl.ds(j * c, c)
        ((q, _), (k, _), (ea, _), (u, _)), _ = _load(q_ref, k_ref, a_ref, u_ref, w_ref, j, c, acc, mode, flat_d)
        ch = ChannelChunk(to_heads(g_ref[rows], flat_d), z_ref[:, j], c, acc)
        sm = state.astype(md)
        if save_states:
            st_ref[:, j] = sm.astype(st_ref.dtype)
        fw = _Chunk(q, k, ea, u, ch, sm, s, scale, md, acc)
        o_ref[rows] = from_heads(fw.output(q, k, scale, md, acc), flat_d is not None).astype(o_ref.dtype)
        state = ch.decay_col() * state + dot((k * ch.to_end).astype(md), fw.dm, TN, acc)
    s_ref[...] = state
    write_final(sf_ref, state)


def _bwd_kernel(*refs, nb, c, s, scale, mode, flat_d):
    (q_ref, k_ref, a_ref, u_ref, w_ref, do_ref, g_ref, z_ref, st_ref, dsf_ref, last_ref), rest = _inputs(refs, mode, 6)
    # (outputs dq, dk, da, du, [dw], dg, dS_0, then the two scratch buffers; NaN buffers come before when poisoned)
    outs = rest[-9:] if mode == "gates" else rest[-8:]
    dq_ref, dk_ref, da_ref, du_ref = outs[:4]
    dw_ref = outs[4] if mode == "gates" else None
    dg_ref, ds0_ref, h_ref, carry_ref = outs[-4:]
    acc, md = h_ref.dtype, q_ref.dtype
    # (the index maps walk the chunk blocks last to first; the carry starts as <dS_T, S_T> per key
    # channel: the final state's share of the decay's gradient)
    start_from((h_ref, dsf_ref), (carry_ref, last_ref))
    h, carry = h_ref[...], carry_ref[...]  # [hb, K, V], [hb, 1, K]
    zero = jnp.zeros((), acc)
    for j in reversed(range(nb)):
        rows = pl.ds(j * c, c)
        loaded, scaled = _load(q_ref, k_ref, a_ref, u_ref, w_ref, j, c, acc, mode, flat_d)
        (q, _), (k, _), (ea, _), (u, _) = loaded
        do = to_heads(do_ref[rows], flat_d).astype(md)
        ch = ChannelChunk(to_heads(g_ref[rows], flat_d), z_ref[:, j], c, acc)
        sm, hm = st_ref[:, j].astype(md), h.astype(md)
        fw = _Chunk(q, k, ea, u, ch, sm, s, scale, md, acc)
        ke = (k * ch.to_end).astype(md)
        nsub = len(fw.blocks)

        # dDelta = P^T dO + (e K) H, then Y = (I + L)^{-T} dDelta by back substitution
        dd_state = dot(ke, hm, NN, acc)
        dd = [dd_state[:, lo:hi] for lo, hi, *_ in fw.blocks]
        for a, (lo, hi, _, _, e_aa) in enumerate(fw.blocks):
            do_a = do[:, lo:hi]
            p_aa = diag_scores(q[:, lo:hi], k[:, lo:hi], e_aa) * scale
            dd[a] = dd[a] + dot(p_aa.astype(md), do_a, TN, acc)
            if lo:
                sc = (dot(fw.qf[a], fw.kfk[a], NT, acc) * scale).astype(md)  # [hb, s, lo]
                back = dot(sc, do_a, TN, acc)  # [hb, lo, V]
                for b in range(a):
                    dd[b] = dd[b] + back[:, b * s:(b + 1) * s]
        ys = [None] * nsub
        for a in reversed(range(nsub)):
            lo = fw.blocks[a][0]
            ys[a] = dot(fw.x[a].astype(md), dd[a].astype(md), TN, acc)  # X_aa^T (dDelta_a - ...)
            if lo:
                l_off = dot(fw.af[a], fw.kfk[a], NT, acc).astype(md)  # [hb, s, lo]
                back = dot(l_off, ys[a].astype(md), TN, acc)  # L_a,<a^T Y_a: [hb, lo, V]
                for b in range(a):
                    dd[b] = dd[b] - back[:, b * s:(b + 1) * s]
        y = _rows(ys)
        ym = y.astype(md)

        # the state's read, erase and write
        dq = dot(do, sm, NT, acc) * ch.alpha * scale
        da = -dot(ym, sm, NT, acc) * ch.alpha
        dk = dot(fw.dm, hm, NT, acc) * ch.to_end
        dq_parts, da_parts = [], []
        dk_parts = [jnp.zeros_like(k[:, lo:hi]) for lo, hi, *_ in fw.blocks]
        for a, (lo, hi, alpha_a, kf, e_aa) in enumerate(fw.blocks):
            qa, ka, ea_a, do_a, d_a = q[:, lo:hi], k[:, lo:hi], ea[:, lo:hi], do[:, lo:hi], fw.deltas[a]
            y_a = ym[:, lo:hi]
            d_sc = jnp.where(fw.causal, dot(do_a, d_a, NT, acc) * scale, zero)  # dP_aa
            d_l = jnp.where(fw.strict, -dot(y_a, d_a, NT, acc), zero)  # dL_aa
            dq_a = jnp.sum(d_sc[:, :, :, None] * ka[:, None, :, :] * e_aa, axis=2)
            da_a = jnp.sum(d_l[:, :, :, None] * ka[:, None, :, :] * e_aa, axis=2)
            dk_parts[a] = dk_parts[a] + jnp.sum(
                (d_sc[:, :, :, None] * qa[:, :, None, :] + d_l[:, :, :, None] * ea_a[:, :, None, :]) * e_aa, axis=1)
            if lo:
                prev = fw.dm[:, :lo]
                dpr = (dot(do_a, prev, NT, acc) * scale).astype(md)  # dP_a,<a: [hb, s, lo]
                dlr = (-dot(y_a, prev, NT, acc)).astype(md)  # dL_a,<a
                dq_a = dq_a + dot(dpr, fw.kfk[a], NN, acc) * alpha_a
                da_a = da_a + dot(dlr, fw.kfk[a], NN, acc) * alpha_a
                dkf = (dot(dpr, fw.qf[a], TN, acc) + dot(dlr, fw.af[a], TN, acc)) * kf  # [hb, lo, K]
                for b in range(a):
                    dk_parts[b] = dk_parts[b] + dkf[:, b * s:(b + 1) * s]
            dq_parts.append(dq_a)
            da_parts.append(da_a)
        dq, da, dk = dq + _rows(dq_parts), da + _rows(da_parts), dk + _rows(dk_parts)

        # the decay's gradient: dL/dG = q dq + a da - k dk per channel, summed to the end of each segment
        dg, carry = ch.gate_grad(q * dq + ea * da - k * dk, carry)
        dg_ref[rows] = from_heads(dg, flat_d is not None).astype(dg_ref.dtype)
        if scaled is None:
            for ref, (_, ok), d in zip((dq_ref, dk_ref, da_ref, du_ref), loaded, (dq, dk, da, y)):
                ref[rows] = from_heads(jnp.where(ok, d, zero), flat_d is not None).astype(ref.dtype)
        else:  # erase sa * k, write su * v: chain the erase's and the write's gradients to k, v and the scales
            sa, su, v, ok_a, ok_u = scaled
            if mode == "strengths":  # dbeta = <da, k> + <du, v> per token, written as a row
                db = jnp.sum(da * k, axis=2, keepdims=True) + jnp.sum(y * v, axis=2, keepdims=True)  # [hb, C, 1]
                da_ref[:, j] = column_as_row(db).astype(da_ref.dtype)
            else:
                for ref, ok, d in ((da_ref, ok_a, da * k), (dw_ref, ok_u, y * v)):
                    ref[rows] = from_heads(jnp.where(ok, d, zero), flat_d is not None).astype(ref.dtype)
            for ref, (_, ok), d in zip((dq_ref, dk_ref, du_ref), (loaded[0], loaded[1], loaded[3]),
                                       (dq, dk + sa * da, su * y)):
                ref[rows] = from_heads(jnp.where(ok, d, zero), flat_d is not None).astype(ref.dtype)
        h = (ch.decay_col() * h + dot((q * ch.alpha * scale).astype(md), do, TN, acc)
             - dot((ea * ch.alpha).astype(md), ym, TN, acc))
    h_ref[...] = h
    carry_ref[...] = carry
    write_final(ds0_ref, h)


def _flops(b, h, t, c, dk, dv):
    s = sub_chunk(c)
    # per position: left-of-diagonal L and P (c/2 keys, K each) and their products with Delta (V),
    # the diagonal blocks (s K for L and P, s V), the state's read, erase and write (3 K V)
    return 2 * b * h * t * (c * (dk + dv) + 3 * s * (dk + dv) + 3 * dk * dv)


def _exps(b, h, t, c, dk):
    """``exp`` count of one pass: per position and key channel, the diagonal block's ``s`` factors,
    the left keys' ``(C / s - 1) / 2`` on average, the row factor, and the chunk's decay factors."""
    s = sub_chunk(c)
    return b * h * t * dk * (s + (c // s + 7) // 2)


def forward(q, k, a, u, g, seg_starts, s0, scale: float, chunk_size: int, *, save_states: bool, interpret: bool,
            w=None, chunks: int = CHUNKS_PER_STEP, poison: bool = False):
    """The fused forward pass.

    Args:
      q, k: ``[B, T, H, K]``, u: ``[B, T, H, V]``, in one dtype, ``T`` a multiple of
        ``chunk_size``, read in place. ``u`` is the write values, or with per-token strengths or
        ``w``, the values ``v`` they scale.
      a: ``[B, T, H, K]`` erase vectors in that dtype; or ``[B, T, H]`` finite per-token strengths
        ``beta`` in the accumulation dtype: the erase vectors are then ``beta k`` and the write
        values ``beta u`` (KDA); or, with ``w``, the erase gate ``b [B, T, H, K]`` (any float
        dtype): erase ``b * k``. The products are formed in the kernel (``MODES``).
      w: None, or the write gate ``[B, T, H, V]`` (any float dtype): write ``w * u`` (GDN-2).
      g: ``[B, T, H, K]`` float32 log decays, ``<= 0`` or ``-inf`` (a reset of that channel); NaN and
        ``+inf`` read as 0, with a zero gradient.
      seg_starts: ``[B, T, H]`` bool, every channel's state zeroed before token ``t``'s update, or None.
      s0: ``[B, H, K, V]`` initial state in the accumulation dtype.
      save_states: also return the chunk-start states ``[B, H, N, K, V]`` in q's dtype.
      poison (tests): outputs start as NaN, so a value the kernel never writes shows.

    Returns ``(o [B, T, H, V]`` in q's dtype, ``S_N`` in s0's dtype, states or None)``.
    """
    c = chunk_size
    b, t, h, dk, dv, n, hb, nb, _ = geometry(q, u, c, chunks, vmem_bytes, VMEM_BUDGET)
    acc = s0.dtype
    steps = n // nb
    lay = HeadLayout(hb, dk, dv, nb, c, steps, reverse=False)
    sp = lay.sp
    mode, erase, erase_spec, extra, extra_specs = _erase_operands(a, w, (b, n, c, h), acc, lay, dk, dv)
    inputs = [lay.view(q), lay.view(k), erase, lay.view(u), *extra, lay.view(g.astype(acc)),
              gate_rows(None, seg_starts, (b, n, c, h), acc)[1], s0]
    specs = [lay.seq(dk), lay.seq(dk), erase_spec, lay.seq(dv), *extra_specs, lay.seq(dk), sp.rows(),
             sp.state(dk, dv)]
    outs = [(lay.seq_shape((b, t, h, dv)), q.dtype, lay.seq(dv)), ((b, h, dk, dv), acc, sp.state(dk, dv))]
    if save_states:
        outs.append(((b, h, n, dk, dv), q.dtype, sp.states(dk, dv)))
    cost = pl.CostEstimate(flops=_flops(b, h, t, c, dk, dv), transcendentals=_exps(b, h, t, c, dk),
                           bytes_accessed=nbytes(*inputs) + out_bytes(outs))
    kernel = functools.partial(_fwd_kernel, nb=nb, c=c, s=sub_chunk(c), scale=float(scale), save_states=save_states,
                               mode=mode, flat_d=lay.d)
    res = launch(kernel, "kda_fused_fwd_tpu", inputs, specs, outs, (b, h // hb, steps), [((hb, dk, dv), acc)],
                 interpret, poison, cost, vmem_limit=VMEM_LIMIT)
    return lay.unview(res[0]), res[1], (res[2] if save_states else None)


def backward(q, k, a, u, do, g, seg_starts, states, dsf, last, scale: float, chunk_size: int, *, interpret: bool,
             w=None, chunks: int = CHUNKS_PER_STEP, poison: bool = False):
    """The fused backward pass: ``(dq, dk, da, du`` in q's dtype, ``dg [B, T, H, K]`` and
    ``dS_0 [B, H, K, V]`` in dsf's dtype)``; ``states`` as :func:`forward` saved them, ``do`` the
    output's cotangent, ``dsf`` the final state's and ``last [B, H, K] = sum_v dS_T * S_T`` (the
    final state's share of the decay's gradient). ``dg`` is 0 at resets. With strengths ``a =
    beta [B, T, H]`` (:func:`forward`), ``da`` is ``dbeta [B, T, H]`` in dsf's dtype; with gates
    ``(a, w) = (b, w)``, ``da = db`` and a ``dw`` follows ``du``, both in their gate's dtype; in
    both, ``dk`` and ``du`` include the paths through the erase vectors and write values."""
    c = chunk_size
    b, t, h, dk, dv, n, hb, nb, _ = geometry(q, u, c, chunks, vmem_bytes, VMEM_BUDGET)
    acc = dsf.dtype
    steps = n // nb
    lay = HeadLayout(hb, dk, dv, nb, c, steps, reverse=True)
    sp = lay.sp
    per_head = pl.BlockSpec((pl.Squeezed(), hb, 1, dk), lambda bb, gg, i: (bb, gg, 0, 0))
    mode, erase, erase_spec, extra, extra_specs = _erase_operands(a, w, (b, n, c, h), acc, lay, dk, dv)
    inputs = [lay.view(q), lay.view(k), erase, lay.view(u), *extra, lay.view(do.astype(q.dtype)),
              lay.view(g.astype(acc)), gate_rows(None, seg_starts, (b, n, c, h), acc)[1], states,
              dsf, last.astype(acc)[:, :, None, :]]
    specs = [lay.seq(dk), lay.seq(dk), erase_spec, lay.seq(dv), *extra_specs, lay.seq(dv), lay.seq(dk), sp.rows(),
             sp.states(dk, dv), sp.state(dk, dv), per_head]
    seq_k, seq_v = lay.seq_shape((b, t, h, dk)), lay.seq_shape((b, t, h, dv))
    d_erase = {"strengths": ((b, h, n, 1, c), acc, sp.rows()), "gates": (seq_k, a.dtype, lay.seq(dk)),
               "vectors": (seq_k, q.dtype, lay.seq(dk))}[mode]
    d_write = [(seq_v, w.dtype, lay.seq(dv))] if mode == "gates" else []
    outs = [(seq_k, q.dtype, lay.seq(dk)), (seq_k, q.dtype, lay.seq(dk)), d_erase,
            (seq_v, q.dtype, lay.seq(dv)), *d_write, (seq_k, acc, lay.seq(dk)),
            ((b, h, dk, dv), acc, sp.state(dk, dv))]
    cost = pl.CostEstimate(flops=2 * _flops(b, h, t, c, dk, dv),
                           transcendentals=_exps(b, h, t, c, dk), bytes_accessed=nbytes(*inputs) + out_bytes(outs))
    kernel = functools.partial(_bwd_kernel, nb=nb, c=c, s=sub_chunk(c), scale=float(scale), mode=mode,
                               flat_d=lay.d)
    launched = launch(kernel, "kda_fused_bwd_tpu", inputs, specs, outs, (b, h // hb, steps),
                      [((hb, dk, dv), acc), ((hb, 1, dk), acc)], interpret, poison, cost, vmem_limit=VMEM_LIMIT)
    res = [x if i == 2 and mode == "strengths" else lay.unview(x) for i, x in enumerate(launched[:-1])]
    res.append(launched[-1])  # dS_0
    if mode == "strengths":  # [B, H, N, 1, C] rows -> [B, T, H]
        res[2] = jnp.moveaxis(res[2][:, :, :, 0], 1, 3).reshape(b, t, h)
    return tuple(res)


def _erase_operands(a, w, shape, acc, lay, dk, dv):
    """``(mode, erase operand, its BlockSpec, [w], [its BlockSpec])``: erase vectors or the gate
    ``b`` ``[B, T, H, K]`` in place, or strengths ``[B, T, H]`` as ``[B, H, N, 1, C]`` rows
    (``shape = (B, N, C, H)``), laid out as ``lay`` says."""
    if w is not None:
        if a.ndim != 4:
            raise ValueError(f"the fused KDA kernel takes the write gate w with an erase gate b [B, T, H, K], "
                             f"got shape {a.shape}")
        return "gates", lay.view(a), lay.seq(dk), [lay.view(w)], [lay.seq(dv)]
    if a.ndim == 3:
        return "strengths", gate_rows(a, None, shape, acc)[0], lay.sp.rows(), [], []
    return "vectors", lay.view(a), lay.seq(dk), [], []


def vmem_bytes(c: int, hb: int, k: int, v: int, itemsize: int, nb: int) -> int:
    """An estimate of the VMEM of the larger (backward) kernel, as the GLA kernel's
    (:func:`memjax.kernels.gla_fused_pallas_tpu.channel_vmem_bytes`) with three K-wide inputs
    (q, k, a) and about 32 ``[hb, C, max(K, V)]`` temporaries."""
    return channel_vmem_bytes(c, hb, k, v, itemsize, nb, k_blocks=3, wide_temps=32)


def supports(shape, dtype, backend: str) -> bool:
    """``shape = (B, T, H, K, V, C)``: a TPU; float32 or bfloat16; ``C``, ``K``, ``V`` multiples of
    8; one chunk per step of ``head_block(H)`` heads within the 56 MiB VMEM budget."""
    return fits(shape, dtype, backend, vmem_bytes, VMEM_BUDGET)
