"""Pallas (Mosaic) kernels for the *whole* chunked pass of scalar-decay linear attention on a TPU:
the intra-chunk work and the chunk-to-chunk state pass in one kernel, forward and backward, the
``[K, V]`` state in VMEM from the first chunk to the last.

Recurrence and chunked form as in :mod:`memjax.memory.linear_vjp` (per batch and head;
``S_n`` the state before chunk ``n``, ``G`` the cumulative log decay within the chunk restarted
at every reset, ``r`` the number of resets up to each position of the chunk)::

    mask_ij = [j <= i] [r_i = r_j]      D_ij = exp(G_i - G_j)         (on the mask, else 0)
    alpha_i = exp(G_i) [r_i = 0]       beta_j = exp(G_last - G_j) [r_j = r_last]      a = exp(G_last) [r_last = 0]
    O_n     = scale (alpha Q_n) S_n + scale ((Q_n K_n^T) * D) V_n
    S_{n+1} = a S_n + (beta K_n)^T V_n

and the backward over ``H_n`` (the cotangent of ``S_{n+1}``), chunk ``N-1`` down to ``0``::

    P  = scale (Q K^T) * D             dP = scale (dO V^T) * D
    dV = P^T dO + (beta K) H_n         dQ = scale alpha (dO S_n^T) + dP K        dK = beta (V H_n^T) + dP^T Q
    H_{n-1} = a H_n + scale (alpha Q)^T dO           dL/dLambda = q . dq - k . dk   (per position)

(the gate's gradient is a reverse cumulative sum of ``dL/dLambda``, done by the caller).

Why (issue 17 item 3 / 4): every XLA form of the chunked pass sends the float32 state through
HBM at each chunk (a scan carry, or a stack of per-chunk states), ~1.07 GB a pass at ``B=8
T=4096 H=16 K=V=128``; here HBM sees each input block read once and each output written once.
The forward reads q, k, v, the gates and writes o (and, for the backward, the chunk-start
states in the operand dtype); the backward reads q, k, v, dO, the gates and those states and
writes dq, dk, dv and ``dL/dLambda``.

Layout (:mod:`memjax.kernels.fused_chunk_tpu`): the ``[B, T, H, D]`` inputs and outputs are
read and written in place in blocks of ``nb * C`` time rows by ``hb`` heads by the whole ``D``;
gates and reset flags travel as ``[B, H, N, 1, C]`` rows. Grid ``(B, H / hb, N / nb)``, the
chunk axis innermost and sequential ("arbitrary"), ``nb`` chunks per step walked by an unrolled
loop, the ``hb`` heads' ``[K, V]`` states in one float32 VMEM scratch buffer.

Dtypes: q, k, v keep their dtype as matmul operands (bf16 in, bf16 operands, float32
accumulation); the state and its cotangent are float32 (float64 in interpret mode for float64
inputs) and rounded to the operand dtype only as a matmul operand, like every path here.
Non-finite entries of q, k, v are read as 0 (a select before any product) and get a zero
gradient.

Status: compiled through Mosaic for v5p / v5e compile-only devices from a CPU host and tested
in interpret mode (``tests/test_linear_fused_tpu.py``); never run on a TPU.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl

from memjax.kernels.chunk_pass_pallas_tpu import VMEM_BUDGET
from memjax.kernels.fused_chunk_tpu import (NN, NT, TN, ChunkDecays, HeadLayout, dot, fits, forward_outputs,
                                            from_heads, gate_rows, geometry, head_block, launch, load_chunk, nbytes,
                                            out_bytes, tile_bytes, to_heads, write_final)

__all__ = ["forward", "backward", "supports", "head_block", "CHUNKS_PER_STEP"]

# Chunks per grid step (not timed on hardware): a grid step costs ~0.35 us of pipeline overhead,
# about one chunk's matmuls for one head at C = 64, K = V = 128; the step's blocks stay a few MiB.
CHUNKS_PER_STEP = 4


def _chunk_qkv(q_ref, k_ref, v_ref, w_ref, j, rows, dec, hb, acc, flat):
    """One chunk's q, k (``[hb, C, K]``, broadcast from one shared head), v (``[hb, C, V]``, times its
    per-token factor ``w`` when given), and what the backward needs of them: the finiteness
    masks of q, k (``[1 or hb, C, K]``) and of the raw v, the raw v and the factor column.
    ``flat = (d of q and k, d of v)``: the head dim of each flat ``[rows, hb d]`` block, or None."""
    (q, q_ok), (k, k_ok), (x, x_ok) = (load_chunk(ref, rows, acc, d)
                                       for ref, d in ((q_ref, flat[0]), (k_ref, flat[0]), (v_ref, flat[1])))
    q, k = (jnp.broadcast_to(y, (hb,) + y.shape[1:]) for y in (q, k))
    w = None if w_ref is None else dec.as_col(w_ref[:, j].astype(acc))  # [hb, C, 1]
    v = x if w is None else x * w
    return q, k, v, (q_ok, k_ok, x_ok, x, w)


def _fwd_kernel(*refs, nb, c, scale, save_states, scaled, flat):
    # inputs (q, k, v, g, z, [w], s0), NaN buffers aliased to the outputs when poisoned, outputs
    # (o, s_final, [states]), the state scratch
    q_ref, k_ref, v_ref, g_ref, z_ref = refs[:5]
    w_ref = refs[5] if scaled else None
    s0_ref = refs[5 + scaled]
    o_ref, sf_ref, st_ref, s_ref = forward_outputs(refs, s0_ref, save_states)
    acc, md = s_ref.dtype, q_ref.dtype
    hb = s_ref.shape[0]
    s = s_ref[...]  # [hb, K, V]
    for j in range(nb):  # unrolled: static, aligned row offsets
        rows = pl.ds(j * c, c)
        dec = ChunkDecays(g_ref[:, j], z_ref[:, j], c, acc)
        q, k, v, _ = _chunk_qkv(q_ref, k_ref, v_ref, w_ref, j, rows, dec, hb, acc, flat)
        qm, km, vm = q.astype(md), k.astype(md), v.astype(md)
        p = dec.intra(dot(qm, km, NT, acc), scale).astype(md)
        qg = (q * (dec.alpha * scale)).astype(md)
        ke = (k * dec.beta).astype(md)
        sm = s.astype(md)
        if save_states:
            st_ref[:, j] = sm.astype(st_ref.dtype)
        o = dot(qg, sm, NN, acc) + dot(p, vm, NN, acc)
        o_ref[rows] = from_heads(o, flat[1] is not None).astype(o_ref.dtype)
        s = dec.a * s + dot(ke, vm, TN, acc)
    s_ref[...] = s
    write_final(sf_ref, s)


def _bwd_kernel(*refs, nb, c, scale, shared, scaled, flat):
    # inputs (q, k, v, do, g, z, [w], states, dsf, last), NaN buffers when poisoned, outputs
    # (dq, dk, dv, dg, [dw], ds0), scratch (the state's cotangent, the decay gradient's carry)
    q_ref, k_ref, v_ref, do_ref, g_ref, z_ref = refs[:6]
    w_ref = refs[6] if scaled else None
    st_ref, dsf_ref, last_ref = refs[6 + scaled:9 + scaled]
    nout = 6 if scaled else 5
    dq_ref, dk_ref, dv_ref, dg_ref = refs[-2 - nout:-2 - nout + 4]
    dw_ref = refs[-4] if scaled else None
    ds0_ref, h_ref, carry_ref = refs[-3:]
    acc, md = h_ref.dtype, q_ref.dtype
    hb = h_ref.shape[0]
    step = pl.program_id(2)  # the index maps walk the chunk blocks last to first

    @pl.when(step == 0)
    def _():
        h_ref[...] = dsf_ref[...].astype(acc)
        carry_ref[...] = last_ref[...].astype(acc)  # <dS_T, S_T>: the final state's share of dL/dLambda_T

    h, carry = h_ref[...], carry_ref[...]  # [hb, K, V], [hb, 1, 1]
    zero = jnp.zeros((), acc)
    for j in reversed(range(nb)):  # and each block's chunks last to first
        rows = pl.ds(j * c, c)
        dec = ChunkDecays(g_ref[:, j], z_ref[:, j], c, acc)
        q, k, v, (q_ok, k_ok, x_ok, x, w) = _chunk_qkv(q_ref, k_ref, v_ref, w_ref, j, rows, dec, hb, acc, flat)
        do = to_heads(do_ref[rows], flat[1]).astype(md)
        qm, km, vm = q.astype(md), k.astype(md), v.astype(md)
        s, hm = st_ref[:, j].astype(md), h.astype(md)
        p = dec.intra(dot(qm, km, NT, acc), scale).astype(md)
        dp = dec.intra(dot(do, vm, NT, acc), scale).astype(md)
        ke = (k * dec.beta).astype(md)
        dv = dot(p, do, TN, acc) + dot(ke, hm, NN, acc)
        dq = dot(do, s, NT, acc) * (dec.alpha * scale) + dot(dp, km, NN, acc)
        dk = dot(vm, hm, NT, acc) * dec.beta + dot(dp, qm, TN, acc)
        dlam = (jnp.sum(qm.astype(acc) * dq, axis=2, keepdims=True)
                - jnp.sum(km.astype(acc) * dk, axis=2, keepdims=True))  # [hb, C, 1]
        dg, carry = dec.gate_grad(dlam, carry)
        dg_ref[:, j] = dec.as_row(dg).astype(dg_ref.dtype)
        if scaled:  # v = x w: dx = dv w, dw = x . dv
            dw_ref[:, j] = dec.as_row(jnp.sum(x * dv, axis=2, keepdims=True)).astype(dw_ref.dtype)
            dv = dv * w
        if shared:  # one q / k head for the block: its gradient sums the heads' (partial: the caller sums blocks)
            dq, dk = jnp.sum(dq, axis=0, keepdims=True), jnp.sum(dk, axis=0, keepdims=True)
        for ref, ok, d, fd in zip((dq_ref, dk_ref, dv_ref), (q_ok, k_ok, x_ok), (dq, dk, dv), (flat[0], flat[0], flat[1])):
            d = jnp.where(ok, d, zero)
            if shared and ref is not dv_ref:
                ref[rows, :] = d[0].astype(ref.dtype)
            else:
                ref[rows] = from_heads(d, fd is not None).astype(ref.dtype)
        qg = (q * (dec.alpha * scale)).astype(md)
        h = dec.a * h + dot(qg, do, TN, acc)
    h_ref[...] = h
    carry_ref[...] = carry
    write_final(ds0_ref, h)


# ----------------------------------------------------------------------------- layout and launch




def forward(q, k, v, g, resets, s0, scale: float, chunk_size: int, *, w=None, save_states: bool, interpret: bool,
            chunks: int = CHUNKS_PER_STEP, poison: bool = False):
    """The fused forward pass.

    Args:
      q, k: ``[B, T, H, K]``, or ``[B, T, 1, K]`` shared by every head (Mamba-2's one group);
        v: ``[B, T, H, V]`` (``T`` a multiple of ``chunk_size``); all read in place.
      g: ``[B, T, H]`` finite log decays (a full decay passed as a reset with ``g = 0``), or None.
      resets: ``[B, T, H]`` bool, the state is zeroed before token ``t``'s update, or None.
      s0: ``[B, H, K, V]`` initial state in the accumulation dtype.
      w: ``[B, T, H]`` finite per-token factor of v (the write is ``w_t v_t``: Mamba-2's ``dt x``), or None.
      save_states: also return the chunk-start states ``[B, H, N, K, V]`` in q's dtype.
      chunks: chunks per grid step (the largest divisor of ``N`` at most this, cut to fit VMEM).
      poison (tests): outputs start as NaN, so a value the kernel never writes shows.

    Returns ``(o [B, T, H, V]`` in q's dtype, ``S_N`` in s0's dtype, states or None)``.
    """
    c = chunk_size
    b, t, h, dk, dv, n, hb, nb, shared = geometry(q, v, c, chunks, vmem_bytes, VMEM_BUDGET, shared_qk=True)
    acc = s0.dtype
    steps = n // nb
    # (one shared q / k head, Mamba-2's B / C: only v and o take the flat view)
    lay = HeadLayout(hb, dv if shared else dk, dv, nb, c, steps, reverse=False)
    sp = lay.sp
    qk = sp.shared(dk) if shared else lay.seq(dk)
    qk_view = (lambda x: x) if shared else lay.view  # noqa: E731
    rows = gate_rows(g, resets, (b, n, c, h), acc)
    scaled = w is not None
    inputs = [qk_view(q), qk_view(k), lay.view(v), *rows] + (
        [gate_rows(w, None, (b, n, c, h), acc)[0]] if scaled else []) + [s0]
    specs = [qk, qk, lay.seq(dv), sp.rows(), sp.rows()] + ([sp.rows()] if scaled else []) + [sp.state(dk, dv)]
    outs = [(lay.seq_shape((b, t, h, dv)), q.dtype, lay.seq(dv)), ((b, h, dk, dv), acc, sp.state(dk, dv))]
    if save_states:
        outs.append(((b, h, n, dk, dv), q.dtype, sp.states(dk, dv)))
    flops = 2 * b * h * t * (c * dk + c * dv + 2 * dk * dv)
    cost = pl.CostEstimate(flops=flops, transcendentals=b * h * n * (c * c + 2 * c),
                           bytes_accessed=nbytes(*inputs) + out_bytes(outs))
    kernel = functools.partial(_fwd_kernel, nb=nb, c=c, scale=float(scale), save_states=save_states, scaled=scaled,
                               flat=(None if shared else lay.d, lay.d))
    res = launch(kernel, "linear_fused_fwd_tpu", inputs, specs, outs, (b, h // hb, steps),
                  [((hb, dk, dv), acc)], interpret, poison, cost)
    return lay.unview(res[0]), res[1], (res[2] if save_states else None)


def backward(q, k, v, do, g, resets, states, dsf, last, scale: float, chunk_size: int, *, w=None, interpret: bool,
             chunks: int = CHUNKS_PER_STEP, poison: bool = False):
    """The fused backward pass.

    Args: as :func:`forward`, plus ``do [B, T, H, V]`` the output's cotangent, ``states`` as
    :func:`forward` saved them, ``dsf [B, H, K, V]`` the final state's cotangent and ``last [B, H]``
    ``= <dS_T, S_T>`` (the final state's share of the decay's gradient).

    Returns ``(dq, dk`` (q's shape), ``dv`` in q's dtype, ``dg [B, T, H]``, ``dS_0 [B, H, K, V]``
    and ``dw [B, T, H]`` (None without ``w``) in dsf's dtype)``; ``dg`` is 0 at resets (and
    meaningless where the caller passed no gate).
    """
    c = chunk_size
    b, t, h, dk, dv, n, hb, nb, shared = geometry(q, v, c, chunks, vmem_bytes, VMEM_BUDGET, shared_qk=True)
    acc = dsf.dtype
    steps = n // nb
    lay = HeadLayout(hb, dv if shared else dk, dv, nb, c, steps, reverse=True)
    sp = lay.sp
    qk = sp.shared(dk) if shared else lay.seq(dk)
    qk_view = (lambda x: x) if shared else lay.view  # noqa: E731
    scaled = w is not None
    inputs = [qk_view(q), qk_view(k), lay.view(v), lay.view(do.astype(q.dtype)),
              *gate_rows(g, resets, (b, n, c, h), acc)] + (
        [gate_rows(w, None, (b, n, c, h), acc)[0]] if scaled else []) + [states, dsf, last.astype(acc)[..., None, None]]
    specs = [qk, qk, lay.seq(dv), lay.seq(dv), sp.rows(), sp.rows()] + ([sp.rows()] if scaled else []) + [
        sp.states(dk, dv), sp.state(dk, dv), sp.per_head()]
    qk_out = (((b, h // hb, t, dk), acc, sp.partial(dk)),) * 2 if shared else (
        (lay.seq_shape(q.shape), q.dtype, lay.seq(dk)), (lay.seq_shape(k.shape), q.dtype, lay.seq(dk)))
    outs = [*qk_out, (lay.seq_shape(v.shape), q.dtype, lay.seq(dv)), ((b, h, n, 1, c), acc, sp.rows())] + (
        [((b, h, n, 1, c), acc, sp.rows())] if scaled else []) + [((b, h, dk, dv), acc, sp.state(dk, dv))]
    flops = 2 * b * h * t * (2 * c * dk + 2 * c * dv + 4 * dk * dv)
    cost = pl.CostEstimate(flops=flops, transcendentals=b * h * n * (c * c + 2 * c),
                           bytes_accessed=nbytes(*inputs) + out_bytes(outs))
    kernel = functools.partial(_bwd_kernel, nb=nb, c=c, scale=float(scale), shared=shared, scaled=scaled,
                               flat=(None if shared else lay.d, lay.d))
    res = launch(kernel, "linear_fused_bwd_tpu", inputs, specs, outs, (b, h // hb, steps),
                  [((hb, dk, dv), acc), ((hb, 1, 1), acc)], interpret, poison, cost)
    dq, dk_, dv_, dg = res[:4]
    ds0 = res[-1]
    if not shared:
        dq, dk_ = lay.unview(dq), lay.unview(dk_)
    dv_ = lay.unview(dv_)
    if shared:  # sum the head blocks' partial sums: [B, H / hb, T, K] -> [B, T, 1, K]
        dq, dk_ = (jnp.sum(x, axis=1)[:, :, None].astype(q.dtype) for x in (dq, dk_))
    rows = lambda x: jnp.moveaxis(x[:, :, :, 0], 1, 3).reshape(b, t, h)  # noqa: E731  [B, H, N, 1, C] -> [B, T, H]
    return dq, dk_, dv_, rows(dg), ds0, (rows(res[4]) if scaled else None)


# ----------------------------------------------------------------------------- VMEM and support


def vmem_bytes(c: int, hb: int, k: int, v: int, itemsize: int, nb: int) -> int:
    """An upper estimate of the VMEM of the larger (backward) kernel with ``hb`` heads and ``nb``
    chunks per step: every block double-buffered by the pipeline, the state scratch, and one
    chunk's float32 temporaries (``[hb, C, C]`` scores and decays, the ``[hb, C, .]`` products)."""
    f32 = 4
    rows = nb * c
    seq = hb * (2 * tile_bytes(rows, k, itemsize) + 2 * tile_bytes(rows, v, itemsize))  # q, k, v, do
    gates = 2 * hb * nb * tile_bytes(1, c, f32) + hb * tile_bytes(1, 1, f32)
    states = hb * nb * tile_bytes(k, v, itemsize)
    outs = hb * (2 * tile_bytes(rows, k, itemsize) + tile_bytes(rows, v, itemsize)) + hb * nb * tile_bytes(1, c, f32)
    state = hb * tile_bytes(k, v, f32)
    temps = hb * (8 * tile_bytes(c, c, f32) + 10 * tile_bytes(c, max(k, v), f32))
    return 2 * (seq + gates + states + outs + 2 * state) + state + temps




def supports(shape, dtype, backend: str) -> bool:
    """``shape = (B, T, H, K, V, C)``: a TPU; float32 or bfloat16 (Mosaic rejects float16 loads
    on v5); ``C``, ``K``, ``V`` multiples of 8; one chunk per step of ``head_block(H)`` heads
    within the 12 MiB VMEM budget."""
    return fits(shape, dtype, backend, vmem_bytes, VMEM_BUDGET)
