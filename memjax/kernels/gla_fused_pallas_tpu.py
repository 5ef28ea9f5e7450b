"""Pallas (Mosaic) kernels for the *whole* chunked pass of linear attention with a decay per key
channel (GLA, HGRN2) on a TPU: forward and backward in one kernel each, the ``[K, V]`` state in
VMEM from the first chunk to the last.

Recurrence (per batch and head; ``g_t in R^K`` log decays, ``-inf`` resetting that channel)::

    S_t = diag(exp g_t) S_{t-1} + k_t v_t^T          o_t = scale * S_t^T q_t

with the state zeroed before token ``t``'s update at a segment start. Within a chunk, ``P`` is
the cumulative ``g`` per channel (``-inf`` entries counted as 0) and ``R`` the number of resets
per channel so far (a segment start counts in every channel); two positions of one channel are
in the same segment iff their ``R`` agree, and since every ``g <= 0``, ``P_i - P_j <= 0`` for
``j <= i``: every exponent below is ``<= 0``, masked before the ``exp``::

    O_i  = scale (q_i * exp(P_i) [R_i = 0]) S + scale sum_{j <= i} (sum_k q_ik k_jk exp(P_ik - P_jk) [R_ik = R_jk]) v_j
    S'   = diag(exp(P_last) [R_last = 0]) S + (K * exp(P_last - P) [R = R_last])^T V

The intra-chunk scores are computed in sub-chunks of ``s = 16`` positions without ever forming
an ``exp`` of a positive number: for a query sub-chunk ``a`` and a key sub-chunk ``b < a``, with
``r`` the last position before ``a`` and ``e`` the last of ``b``,
``exp(P_i - P_j) = exp(P_i - P_r) exp(P_r - P_e) exp(P_e - P_j)``, three factors ``<= 1`` (each
masked to one segment), so the block is one ``[s, K] x [K, s]`` matmul; the diagonal blocks use
the explicit ``[s, s, K]`` factor. (A factorisation through the chunk start, ``q exp(P)`` times
``k exp(-P)``, overflows for strong decays.)

Backward over ``H`` (the cotangent of ``S'``), chunk ``N-1`` down to ``0``: the same blocks
transposed give ``dq, dk, dv``, the state's cotangent is ``diag(a) H + scale (q exp(P))^T dO``,
and the decay's gradient per channel is the identity flash-linear-attention uses for GLA,
``dL/dP_ik = q_ik dq_ik - k_ik dk_ik`` (plus ``<dS_T, S_T>`` row ``k`` at the sequence's last
position), summed from each position to the end of its segment (a segmented scan in VMEM,
carried across chunks), 0 at resets.

Layout as :mod:`memjax.kernels.fused_chunk_tpu`: q, k, v and the ``[B, T, H, K]`` gates are read
in place (``[nb C, hb, D]`` blocks); segment starts travel as ``[B, H, N, 1, C]`` rows. Within-chunk
prefix sums are Hillis-Steele scans with ``pltpu.roll`` (exact float32 adds, no matmul with a
0/1 matrix that a TPU would run at bf16 precision). Dtypes as the other fused kernels: q, k, v
are matmul operands in their dtype with float32 accumulation, decays and the state float32.

Status: compiled through Mosaic for v5p / v5e compile-only devices from a CPU host and tested
in interpret mode (``tests/test_gla_fused_tpu.py``); never run on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from memjax.kernels.fused_chunk_tpu import (NN, NT, TN, HeadLayout, dot, fits, forward_outputs, from_heads, gate_rows,
                                            geometry, launch, load_chunk, masked_exp, nbytes, out_bytes,
                                            row_as_column, start_from, tile_bytes, to_heads, write_final)

__all__ = ["forward", "backward", "supports", "sub_chunk", "ChannelChunk", "channel_vmem_bytes", "segmented_scan",
           "diag_scores", "CHUNKS_PER_STEP"]

# One chunk per grid step, and a 48 MiB scoped-VMEM limit: the backward's unrolled sub-chunk
# blocks ([hb, s, s, K] float32 factors and products) keep many temporaries alive; at two chunks
# per step Mosaic allocated 35.0 MiB for the backward (K = V = 128, chunk 64, 8 heads, bf16) and
# refused it under a 32 MiB limit. v5e, v5p and v6e cores have 95-128 MiB of VMEM; Mosaic refuses,
# at compile time, a kernel that would not fit.
CHUNKS_PER_STEP = 1
VMEM_LIMIT = 48 * 2 ** 20
# (the estimate below over the limit's 48 MiB less a margin: at 12 heads in one block, K = V = 128,
# it says 44.0 MiB and Mosaic allocated 31.5 MiB for the backward; 6 heads at K = V = 256, 53.4
# estimated, compiled within the 48 MiB limit too)
VMEM_BUDGET = 46 * 2 ** 20
# vmem_bytes' block-by-block sum times this: Mosaic's measured allocation at two chunks per step
# (35.0 MiB) over the sum (19.6 MiB).
_TEMP_FACTOR = 1.8
SUB = 16


def sub_chunk(c: int) -> int:
    """Sub-chunk length: 16, or the whole chunk when it is not a multiple of 16."""
    return SUB if c % SUB == 0 else c


def segmented_scan(x, same, reverse=False):
    """Inclusive prefix sums of ``x [hb, C, K]`` along positions (axis 1), restricted to runs
    where ``same(i, j)`` holds for the pair's endpoints (``None``: no restriction); ``reverse``
    sums from each position to the end. Hillis-Steele with ``pltpu.roll``: exact adds."""
    c = x.shape[1]
    i = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    zero = jnp.zeros((), x.dtype)
    d = 1
    while d < c:
        if reverse:  # x_i += x_{i + d}
            other, ok = pltpu.roll(x, c - d, 1), i < c - d
        else:  # x_i += x_{i - d}
            other, ok = pltpu.roll(x, d, 1), i >= d
        if same is not None:
            ok = ok & same(d)
        x = x + jnp.where(ok, other, zero)
        d *= 2
    return x


class ChannelChunk:
    """One chunk's per-channel decay quantities for ``hb`` heads (module docstring) from its raw
    gates ``g [hb, C, K]`` (``-inf``: a reset of that channel) and segment starts ``z [hb, 1, C]``."""

    def __init__(self, g, z_row, c, acc):
        zero = jnp.zeros((), acc)
        z_col = row_as_column(z_row.astype(acc))  # [hb, C, 1]
        g = g.astype(acc)
        # NaN and +inf read as 0 (memjax.memory.nonfinite.finite_gate, here rather than as a copy of
        # the [B, T, H, K] gates in HBM; they get no gradient); -inf is a reset of that channel
        self.g_bad = jnp.logical_not((g == g) & (g < jnp.inf))
        full = g == -jnp.inf
        g0 = jnp.where(full | self.g_bad, zero, g)
        self.z = (z_col > 0) | full  # [hb, C, K]: the state row is zeroed before this position
        self.R = segmented_scan(self.z.astype(acc), None)
        self.P = segmented_scan(g0, None)
        self.c = c
        self.p_last, self.r_last = self.P[:, c - 1:], self.R[:, c - 1:]  # [hb, 1, K]
        self.alpha = masked_exp(self.P, self.R == 0)  # decay from the chunk start
        self.to_end = masked_exp(self.p_last - self.P, self.R == self.r_last)
        self.a = masked_exp(self.p_last, self.r_last == 0)  # [hb, 1, K]

    def decay_col(self):
        """The chunk's decay ``a`` as a column ``[hb, K, 1]`` (a lane reduction of the diagonal:
        exact), to scale the state's rows."""
        k = self.a.shape[-1]
        eye = (jax.lax.broadcasted_iota(jnp.int32, (1, k, k), 1) == jax.lax.broadcasted_iota(jnp.int32, (1, k, k), 2))
        return jnp.sum(jnp.where(eye, self.a, jnp.zeros((), self.a.dtype)), axis=2, keepdims=True)

    def gate_grad(self, dlam, carry):
        """``(dg [hb, C, K], carry)``: ``dg_s = sum_{t >= s, same segment} dL/dP_t`` per channel
        over this chunk plus ``carry [hb, 1, K]`` (that sum from the next chunk's start), 0 at
        resets; the new carry is ``dg`` at the chunk's first position."""
        r, c = self.R, self.c
        dg = segmented_scan(dlam, lambda d: pltpu.roll(r, c - d, 1) == r, reverse=True)
        dg = dg + jnp.where(r == self.r_last, carry, jnp.zeros((), dlam.dtype))
        dg = jnp.where(self.z, jnp.zeros((), dlam.dtype), dg)
        # (the carry to the chunk before keeps a sanitised gate's share: the gate read as 0 there)
        return jnp.where(self.g_bad, jnp.zeros((), dlam.dtype), dg), dg[:, :1]

    def blocks(self, s):
        """For each query sub-chunk ``a``: ``(lo, hi, alpha_a, [(b, lo_b, hi_b, beta_b * m_ab), ...],
        E_aa)`` (module docstring): ``alpha_a [hb, s, K]`` the decay from the position before ``a``,
        ``beta_b * m_ab [hb, s, K]`` the key factor of block ``(a, b)``, ``E_aa [hb, s, s, K]`` the
        diagonal block's masked factor."""
        P, R = self.P, self.R
        out = []
        for a in range(self.c // s):
            lo, hi = a * s, (a + 1) * s
            Pa, Ra = P[:, lo:hi], R[:, lo:hi]
            causal = (jax.lax.broadcasted_iota(jnp.int32, (1, s, s, 1), 1)
                      >= jax.lax.broadcasted_iota(jnp.int32, (1, s, s, 1), 2))
            ok = causal & (Ra[:, :, None, :] == Ra[:, None, :, :])
            e_aa = masked_exp(Pa[:, :, None, :] - Pa[:, None, :, :], ok)
            keys = []
            alpha_a = None
            if a > 0:
                p_r, r_r = P[:, lo - 1:lo], R[:, lo - 1:lo]
                alpha_a = masked_exp(Pa - p_r, Ra == r_r)
                for b in range(a):
                    lb, hb_ = b * s, (b + 1) * s
                    p_e, r_e = P[:, hb_ - 1:hb_], R[:, hb_ - 1:hb_]
                    beta_b = masked_exp(p_e - P[:, lb:hb_], R[:, lb:hb_] == r_e)
                    m_ab = masked_exp(p_r - p_e, r_r == r_e)
                    keys.append((lb, hb_, beta_b * m_ab))
            out.append((lo, hi, alpha_a, keys, e_aa))
        return out


def diag_scores(q, k, e):
    """``sum_k q_ik k_jk e_ijk``: ``[hb, s, K] x [hb, s, K] x [hb, s, s, K] -> [hb, s, s]``."""
    return jnp.sum(q[:, :, None, :] * k[:, None, :, :] * e, axis=3)


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, z_ref, s0_ref, *rest, nb, c, s, scale, save_states, flat_d):
    o_ref, sf_ref, st_ref, s_ref = forward_outputs(rest, s0_ref, save_states)
    acc, md = s_ref.dtype, q_ref.dtype
    state = s_ref[...]  # [hb, K, V]
    for j in range(nb):
        rows = pl.ds(j * c, c)
        (q, _), (k, _), (v, _) = (load_chunk(ref, rows, acc, flat_d) for ref in (q_ref, k_ref, v_ref))
        ch = ChannelChunk(to_heads(g_ref[rows], flat_d), z_ref[:, j], c, acc)
        sm = state.astype(md)
        if save_states:
            st_ref[:, j] = sm.astype(st_ref.dtype)
        vm = v.astype(md)
        qg = (q * ch.alpha * scale).astype(md)
        read = dot(qg, sm, NN, acc)  # [hb, C, V]
        parts = []
        for lo, hi, alpha_a, keys, e_aa in ch.blocks(s):
            qa, ka = q[:, lo:hi], k[:, lo:hi]
            o_a = read[:, lo:hi] + dot((diag_scores(qa, ka, e_aa) * scale).astype(md), vm[:, lo:hi], NN, acc)
            if keys:
                qa_f = (qa * alpha_a).astype(md)
                for lb, hb_, kf in keys:
                    sc = dot(qa_f, (k[:, lb:hb_] * kf).astype(md), NT, acc) * scale
                    o_a = o_a + dot(sc.astype(md), vm[:, lb:hb_], NN, acc)
            parts.append(o_a)
        o = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        o_ref[rows] = from_heads(o, flat_d is not None).astype(o_ref.dtype)
        state = ch.decay_col() * state + dot((k * ch.to_end).astype(md), vm, TN, acc)
    s_ref[...] = state
    write_final(sf_ref, state)


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, g_ref, z_ref, st_ref, dsf_ref, last_ref, *rest, nb, c, s, scale, flat_d):
    dq_ref, dk_ref, dv_ref, dg_ref, ds0_ref, h_ref, carry_ref = rest[-7:]  # (after NaN buffers when poisoned)
    acc, md = h_ref.dtype, q_ref.dtype
    # (the index maps walk the chunk blocks last to first; the carry starts as <dS_T, S_T> per key
    # channel: the final state's share of the decay's gradient)
    start_from((h_ref, dsf_ref), (carry_ref, last_ref))
    h, carry = h_ref[...], carry_ref[...]  # [hb, K, V], [hb, 1, K]
    zero = jnp.zeros((), acc)
    for j in reversed(range(nb)):
        rows = pl.ds(j * c, c)
        (q, q_ok), (k, k_ok), (v, v_ok) = (load_chunk(ref, rows, acc, flat_d) for ref in (q_ref, k_ref, v_ref))
        do = to_heads(do_ref[rows], flat_d).astype(md)
        ch = ChannelChunk(to_heads(g_ref[rows], flat_d), z_ref[:, j], c, acc)
        sm, hm, vm = st_ref[:, j].astype(md), h.astype(md), v.astype(md)
        ke = (k * ch.to_end).astype(md)
        dq = dot(do, sm, NT, acc) * ch.alpha * scale  # the read of the incoming state
        dk = dot(vm, hm, NT, acc) * ch.to_end  # the write into the outgoing state
        dv = dot(ke, hm, NN, acc)
        dq_parts = []
        blocks = ch.blocks(s)
        # per query sub-chunk a: its own rows of dq; contributions to dk, dv of every b <= a
        dk_acc = [jnp.zeros_like(k[:, lo:hi]) for lo, hi, *_ in blocks]
        dv_acc = [jnp.zeros_like(dv[:, lo:hi]) for lo, hi, *_ in blocks]
        for ai, (lo, hi, alpha_a, keys, e_aa) in enumerate(blocks):
            qa, ka, do_a = q[:, lo:hi], k[:, lo:hi], do[:, lo:hi]
            d_sc = dot(do_a, vm[:, lo:hi], NT, acc) * scale  # [hb, s, s] (d of the diagonal scores)
            causal = (jax.lax.broadcasted_iota(jnp.int32, (1, hi - lo, hi - lo), 1)
                      >= jax.lax.broadcasted_iota(jnp.int32, (1, hi - lo, hi - lo), 2))
            d_sc = jnp.where(causal, d_sc, zero)
            sc = diag_scores(qa, ka, e_aa) * scale
            dq_a = jnp.sum(d_sc[:, :, :, None] * ka[:, None, :, :] * e_aa, axis=2)
            dk_acc[ai] = dk_acc[ai] + jnp.sum(d_sc[:, :, :, None] * qa[:, :, None, :] * e_aa, axis=1)
            dv_acc[ai] = dv_acc[ai] + dot(sc.astype(md), do_a, TN, acc)
            if keys:
                qa_f = qa * alpha_a
                qa_fm = qa_f.astype(md)
                dq_f = jnp.zeros_like(qa)
                for bi, (lb, hb_, kf) in enumerate(keys):
                    kb_f = (k[:, lb:hb_] * kf).astype(md)
                    sc_b = dot(qa_fm, kb_f, NT, acc) * scale
                    d_b = dot(do_a, vm[:, lb:hb_], NT, acc) * scale  # [hb, s, s]
                    dm_b = d_b.astype(md)
                    dq_f = dq_f + dot(dm_b, kb_f, NN, acc)
                    dk_acc[bi] = dk_acc[bi] + dot(dm_b, qa_fm, TN, acc) * kf
                    dv_acc[bi] = dv_acc[bi] + dot(sc_b.astype(md), do_a, TN, acc)
                dq_a = dq_a + dq_f * alpha_a
            dq_parts.append(dq_a)
        cat = lambda xs: jnp.concatenate(xs, axis=1) if len(xs) > 1 else xs[0]  # noqa: E731
        dq = dq + cat(dq_parts)
        dk = dk + cat(dk_acc)
        dv = dv + cat(dv_acc)
        # the decay's gradient: dL/dP = q dq - k dk per channel, summed to the end of each segment
        dg, carry = ch.gate_grad(q * dq - k * dk, carry)
        dg_ref[rows] = from_heads(dg, flat_d is not None).astype(dg_ref.dtype)
        for ref, ok, d in zip((dq_ref, dk_ref, dv_ref), (q_ok, k_ok, v_ok), (dq, dk, dv)):
            ref[rows] = from_heads(jnp.where(ok, d, zero), flat_d is not None).astype(ref.dtype)
        h = ch.decay_col() * h + dot((q * ch.alpha * scale).astype(md), do, TN, acc)
    h_ref[...] = h
    carry_ref[...] = carry
    write_final(ds0_ref, h)




def _flops(b, h, t, c, dk, dv):
    s = sub_chunk(c)
    return 2 * b * h * t * (c // 2 * (dk + dv) + s * dk + 2 * dk * dv)


def forward(q, k, v, g, seg_starts, s0, scale: float, chunk_size: int, *, save_states: bool, interpret: bool,
            chunks: int = CHUNKS_PER_STEP, poison: bool = False):
    """The fused forward pass.

    Args:
      q, k, g: ``[B, T, H, K]`` (``g`` float32 log decays, ``<= 0`` or ``-inf``: a reset of that
        channel; NaN and ``+inf`` read as 0, with a zero gradient); v: ``[B, T, H, V]`` (``T`` a multiple of ``chunk_size``), all read in place.
      seg_starts: ``[B, T, H]`` bool, every channel's state zeroed before token ``t``'s update, or None.
      s0: ``[B, H, K, V]`` initial state in the accumulation dtype.
      save_states: also return the chunk-start states ``[B, H, N, K, V]`` in q's dtype.
      poison (tests): outputs start as NaN, so a value the kernel never writes shows.

    Returns ``(o [B, T, H, V]`` in q's dtype, ``S_N`` in s0's dtype, states or None)``.
    """
    c = chunk_size
    b, t, h, dk, dv, n, hb, nb, _ = geometry(q, v, c, chunks, vmem_bytes, VMEM_BUDGET)
    acc = s0.dtype
    steps = n // nb
    lay = HeadLayout(hb, dk, dv, nb, c, steps, reverse=False)
    sp = lay.sp
    inputs = [lay.view(q), lay.view(k), lay.view(v), lay.view(g.astype(acc)),
              gate_rows(None, seg_starts, (b, n, c, h), acc)[1], s0]
    specs = [lay.seq(dk), lay.seq(dk), lay.seq(dv), lay.seq(dk), sp.rows(), sp.state(dk, dv)]
    outs = [(lay.seq_shape((b, t, h, dv)), q.dtype, lay.seq(dv)), ((b, h, dk, dv), acc, sp.state(dk, dv))]
    if save_states:
        outs.append(((b, h, n, dk, dv), q.dtype, sp.states(dk, dv)))
    cost = pl.CostEstimate(flops=_flops(b, h, t, c, dk, dv), transcendentals=b * h * t * dk * (sub_chunk(c) + 4),
                           bytes_accessed=nbytes(*inputs) + out_bytes(outs))
    kernel = functools.partial(_fwd_kernel, nb=nb, c=c, s=sub_chunk(c), scale=float(scale), save_states=save_states,
                               flat_d=lay.d)
    res = launch(kernel, "gla_fused_fwd_tpu", inputs, specs, outs, (b, h // hb, steps), [((hb, dk, dv), acc)],
                 interpret, poison, cost, vmem_limit=VMEM_LIMIT)
    return lay.unview(res[0]), res[1], (res[2] if save_states else None)


def backward(q, k, v, do, g, seg_starts, states, dsf, last, scale: float, chunk_size: int, *, interpret: bool,
             chunks: int = CHUNKS_PER_STEP, poison: bool = False):
    """The fused backward pass: ``(dq, dk, dv`` in q's dtype, ``dg [B, T, H, K]`` and
    ``dS_0 [B, H, K, V]`` in dsf's dtype)``; ``states`` as :func:`forward` saved them, ``do`` the
    output's cotangent, ``dsf`` the final state's and ``last [B, H, K] = sum_v dS_T * S_T`` (the
    final state's share of the decay's gradient). ``dg`` is 0 at resets."""
    c = chunk_size
    b, t, h, dk, dv, n, hb, nb, _ = geometry(q, v, c, chunks, vmem_bytes, VMEM_BUDGET)
    acc = dsf.dtype
    steps = n // nb
    lay = HeadLayout(hb, dk, dv, nb, c, steps, reverse=True)
    sp = lay.sp
    per_head = pl.BlockSpec((pl.Squeezed(), hb, 1, dk), lambda bb, gg, i: (bb, gg, 0, 0))
    inputs = [lay.view(q), lay.view(k), lay.view(v), lay.view(do.astype(q.dtype)), lay.view(g.astype(acc)),
              gate_rows(None, seg_starts, (b, n, c, h), acc)[1], states, dsf, last.astype(acc)[:, :, None, :]]
    specs = [lay.seq(dk), lay.seq(dk), lay.seq(dv), lay.seq(dv), lay.seq(dk), sp.rows(), sp.states(dk, dv),
             sp.state(dk, dv), per_head]
    seq_k, seq_v = lay.seq_shape(q.shape), lay.seq_shape(v.shape)
    outs = [(seq_k, q.dtype, lay.seq(dk)), (seq_k, q.dtype, lay.seq(dk)), (seq_v, q.dtype, lay.seq(dv)),
            (seq_k, acc, lay.seq(dk)), ((b, h, dk, dv), acc, sp.state(dk, dv))]
    cost = pl.CostEstimate(flops=2 * _flops(b, h, t, c, dk, dv), transcendentals=b * h * t * dk * (sub_chunk(c) + 4),
                           bytes_accessed=nbytes(*inputs) + out_bytes(outs))
    kernel = functools.partial(_bwd_kernel, nb=nb, c=c, s=sub_chunk(c), scale=float(scale), flat_d=lay.d)
    res = launch(kernel, "gla_fused_bwd_tpu", inputs, specs, outs, (b, h // hb, steps),
                 [((hb, dk, dv), acc), ((hb, 1, dk), acc)], interpret, poison, cost, vmem_limit=VMEM_LIMIT)
    return (*(lay.unview(x) for x in res[:4]), res[4])


def vmem_bytes(c: int, hb: int, k: int, v: int, itemsize: int, nb: int) -> int:
    """An estimate of the VMEM of the larger (backward) kernel: every block double-buffered, the
    state scratch, and one chunk's float32 temporaries (the ``[hb, s, s, K]`` factors of a query
    sub-chunk and about 24 ``[hb, C, max(K, V)]`` arrays), scaled to Mosaic's measured allocation."""
    return channel_vmem_bytes(c, hb, k, v, itemsize, nb, k_blocks=2, wide_temps=24)


def channel_vmem_bytes(c: int, hb: int, k: int, v: int, itemsize: int, nb: int, *, k_blocks: int,
                       wide_temps: int) -> int:
    """The VMEM estimate of a per-channel-decay kernel's backward (this one's, and the KDA
    kernel's): ``k_blocks`` ``[rows, hb, K]`` sequence inputs (and as many gradients) besides the
    float32 gate, two V-wide inputs and one V-wide gradient, the chunk-start states, and
    ``wide_temps`` float32 ``[hb, C, max(K, V)]`` temporaries beside the sub-chunk factors."""
    f32 = 4
    rows = nb * c
    s = sub_chunk(c)
    seq = hb * (k_blocks * tile_bytes(rows, k, itemsize) + 2 * tile_bytes(rows, v, itemsize) + tile_bytes(rows, k, f32))
    gates = hb * nb * tile_bytes(1, c, f32)
    states = hb * nb * tile_bytes(k, v, itemsize)
    outs = hb * (k_blocks * tile_bytes(rows, k, itemsize) + tile_bytes(rows, v, itemsize) + tile_bytes(rows, k, f32))
    state = hb * tile_bytes(k, v, f32)
    temps = hb * (4 * s * tile_bytes(s, k, f32) + wide_temps * tile_bytes(c, max(k, v), f32) + tile_bytes(k, k, f32))
    return int(_TEMP_FACTOR * (2 * (seq + gates + states + outs + 2 * state) + state + temps))


def supports(shape, dtype, backend: str) -> bool:
    """``shape = (B, T, H, K, V, C)``: a TPU; float32 or bfloat16; ``C``, ``K``, ``V`` multiples of
    8; one chunk per step of ``head_block(H)`` heads within the 46 MiB VMEM budget."""
    return fits(shape, dtype, backend, vmem_bytes, VMEM_BUDGET)
