"""Pallas (Mosaic) kernels for the *whole* chunked pass of the (gated) delta rule on a TPU: the
UT transform, the intra-chunk work and the chunk-to-chunk state pass in one kernel, forward and
backward, the ``[K, V]`` state in VMEM from the first chunk to the last.

Chunked form as in :mod:`memjax.memory.delta` (per batch and head; ``S`` the state before the
chunk; ``mask_ij = [j <= i]`` within one segment, ``D_ij = exp(G_i - G_j)`` on it, ``gamma_i =
exp(G_i)`` before the chunk's first reset, ``e_j = exp(G_last - G_j)`` in the last segment,
``a = exp(G_last)`` without a reset; ``G`` the cumulative log decay within the chunk restarted
at resets)::

    L  = strict_lower(diag(beta) (K K^T) * D)          X = (I + L)^{-1}
    U  = X diag(beta) V      W = X diag(beta gamma) K      Delta = U - W S
    O  = scale (gamma Q) S + scale ((Q K^T) * D) Delta
    S' = a S + (e K)^T Delta

``X`` is formed with matmuls only: ``N = -L`` is nilpotent, so ``(I - N)^{-1} = sum_{m < C} N^m
= (I + N)(I + N^2)(I + N^4)...``, accumulated as ``X <- X + X P, P <- P^2`` (``2 log2 C - 2``
``[C, C]`` products in float32, on the MXU).

Backward, chunk ``N-1`` down to ``0``, with ``H`` the cotangent of ``S'`` (``P = scale (Q K^T) * D``)::

    dDelta = P^T dO + (e K) H          dS = a H + scale (gamma Q)^T dO - W^T dDelta
    dQ = scale gamma (dO S^T) + (scale (dO Delta^T) * D) K
    dW = -dDelta S^T     d(beta V) = X^T dDelta     d(beta gamma K) = X^T dW
    dX = dDelta (beta V)^T + dW (beta gamma K)^T    dL = -X^T dX X^T  (strictly lower)
    dK = (scale (dO Delta^T) * D)^T Q + e (Delta H^T) + (dL * beta D + (dL * beta D)^T) K + beta gamma d(beta gamma K)

and ``dbeta``, the gradient of the within-chunk decay sums ``dG`` (every factor ``exp(G_i -
G_j)`` gives ``+`` to ``i`` and ``-`` to ``j`` its product with its own cotangent; ``a`` gives
``<H, a S>`` to the last position), summed to ``dg_s = sum_{i >= s, same segment} dG_i``
within the chunk (``G`` restarts at every chunk, so nothing carries across), 0 at resets.

Layout as :mod:`memjax.kernels.fused_chunk_tpu` (in-place ``[B, T, H, D]`` blocks; log decays,
reset flags and ``beta`` as ``[B, H, N, 1, C]`` rows). Dtypes: q, k, v, ``X``, ``U``, ``W`` and
``Delta`` are matmul operands in the input dtype (bf16 for bf16 inputs, as
flash-linear-attention and the XLA form round them), with float32 accumulation; ``L``, its
inverse and the state stay float32. Non-finite q, k, v entries are read as 0 and get a zero
gradient.

Status: compiled through Mosaic for v5p / v5e compile-only devices from a CPU host and tested
in interpret mode (``tests/test_delta_fused_tpu.py``); never run on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from memjax.kernels.fused_chunk_tpu import (NN, NT, TN, ChunkDecays, HeadLayout, dot, fits, forward_outputs,
                                            from_heads, gate_rows, geometry, launch, load_chunk, nbytes, out_bytes,
                                            tile_bytes, to_heads, write_final)

__all__ = ["forward", "backward", "supports", "neumann_inverse", "CHUNKS_PER_STEP"]

# The UT transform's [C, C] temporaries for 8 heads need more than the 16 MiB default scoped VMEM
# of a v5e at C = 64 (the estimate below: 12.6 MiB of buffers at K = V = 128, bf16), so the
# kernels ask for 32 MiB: v5e, v5p and v6e chips have 95-128 MiB of VMEM per core; Mosaic refuses,
# at compile time, a kernel that would not fit.
VMEM_LIMIT = 32 * 2 ** 20
VMEM_BUDGET = 24 * 2 ** 20
# Chunks per grid step (not timed on hardware): the UT transform's ~20 [C, C] products per head
# and chunk outweigh a grid step's ~0.35 us overhead, so a step takes few chunks.
CHUNKS_PER_STEP = 2


def neumann_inverse(lower, eye, acc):
    """``(I + L)^{-1}`` for strictly lower ``L [hb, C, C]`` (module docstring): the Neumann
    series of the nilpotent ``-L`` by repeated squaring; ``eye`` the ``[1, C, C]`` diagonal mask."""
    p = -lower
    x = jnp.where(eye, jnp.ones((), acc), jnp.zeros((), acc)) + p
    span = 2
    while span < lower.shape[-1]:
        p = dot(p, p, NN, acc)
        x = x + dot(x, p, NN, acc)
        span *= 2
    return x


class _Chunk:
    """One chunk's forward quantities for ``hb`` heads (module docstring), recomputed by the
    backward."""

    def __init__(self, q, k, v, b_row, dec, s, scale, c, md, acc):
        self.strict = dec.mask & jnp.logical_not(dec.diag)
        self.b = dec.as_col(b_row.astype(acc))  # [hb, C, 1]
        self.kk = dot(k.astype(md), k.astype(md), NT, acc)
        self.lower = jnp.where(self.strict, self.b * self.kk * dec.D, jnp.zeros((), acc))
        self.x = neumann_inverse(self.lower, dec.diag, acc)
        xm = self.x.astype(md)
        self.xm = xm
        self.rv = (self.b * v).astype(md)
        self.rk_acc = self.b * dec.alpha * k
        self.rk = self.rk_acc.astype(md)
        u = dot(xm, self.rv, NN, acc).astype(md)
        self.w = dot(xm, self.rk, NN, acc).astype(md)
        self.sm = s.astype(md)
        self.dm = (u.astype(acc) - dot(self.w, self.sm, NN, acc)).astype(md)  # Delta = U - W S
        self.p_acc = dec.intra(dot(q.astype(md), k.astype(md), NT, acc), scale)
        self.p = self.p_acc.astype(md)
        self.qg = (q * (dec.alpha * scale)).astype(md)
        self.ke_acc = k * dec.beta
        self.ke = self.ke_acc.astype(md)


def _fwd_kernel(q_ref, k_ref, v_ref, g_ref, z_ref, b_ref, s0_ref, *rest, nb, c, scale, save_states, flat_d):
    o_ref, sf_ref, st_ref, s_ref = forward_outputs(rest, s0_ref, save_states)
    acc, md = s_ref.dtype, q_ref.dtype
    s = s_ref[...]  # [hb, K, V]
    for j in range(nb):
        rows = pl.ds(j * c, c)
        (q, _), (k, _), (v, _) = (load_chunk(ref, rows, acc, flat_d) for ref in (q_ref, k_ref, v_ref))
        dec = ChunkDecays(g_ref[:, j], z_ref[:, j], c, acc)
        ch = _Chunk(q, k, v, b_ref[:, j], dec, s, scale, c, md, acc)
        if save_states:
            st_ref[:, j] = ch.sm.astype(st_ref.dtype)
        o = dot(ch.qg, ch.sm, NN, acc) + dot(ch.p, ch.dm, NN, acc)
        o_ref[rows] = from_heads(o, flat_d is not None).astype(o_ref.dtype)
        s = dec.a * s + dot(ch.ke, ch.dm, TN, acc)
    s_ref[...] = s
    write_final(sf_ref, s)


def _bwd_kernel(q_ref, k_ref, v_ref, do_ref, g_ref, z_ref, b_ref, st_ref, dsf_ref, *rest, nb, c, scale, flat_d):
    dq_ref, dk_ref, dv_ref, db_ref, dg_ref, ds0_ref, h_ref = rest[-7:]  # (after NaN buffers when poisoned)
    acc, md = h_ref.dtype, q_ref.dtype
    step = pl.program_id(2)  # the index maps walk the chunk blocks last to first

    @pl.when(step == 0)
    def _():
        h_ref[...] = dsf_ref[...].astype(acc)

    h = h_ref[...]
    zero = jnp.zeros((), acc)
    rowsum = lambda x: jnp.sum(x, axis=2, keepdims=True)  # noqa: E731  [hb, C, .] -> [hb, C, 1]
    for j in reversed(range(nb)):
        rows = pl.ds(j * c, c)
        (q, q_ok), (k, k_ok), (v, v_ok) = (load_chunk(ref, rows, acc, flat_d) for ref in (q_ref, k_ref, v_ref))
        do = to_heads(do_ref[rows], flat_d).astype(md)
        dec = ChunkDecays(g_ref[:, j], z_ref[:, j], c, acc)
        s = st_ref[:, j].astype(acc)
        ch = _Chunk(q, k, v, b_ref[:, j], dec, s, scale, c, md, acc)
        qm, km, hm = q.astype(md), k.astype(md), h.astype(md)
        colsum = lambda x: dec.as_col(jnp.sum(x, axis=1, keepdims=True))  # noqa: E731  [hb, C, C] -> [hb, C, 1]

        # the read and the state update
        dd = dot(ch.p, do, TN, acc) + dot(ch.ke, hm, NN, acc)  # dDelta
        d_pr = dot(do, ch.dm, NT, acc)  # dO Delta^T (unscaled, unmasked)
        dp = dec.intra(d_pr, scale).astype(md)
        dq_read = dot(do, ch.sm, NT, acc) * (dec.alpha * scale)
        dq = dq_read + dot(dp, km, NN, acc)
        dke = dot(ch.dm, hm, NT, acc)  # d(e K)
        dk = dot(dp, qm, TN, acc) + dke * dec.beta
        ddm = dd.astype(md)
        dw = -dot(ddm, ch.sm, NT, acc)
        h_prev = dec.a * h + dot(ch.qg, do, TN, acc) - dot(ch.w, ddm, TN, acc)

        # the UT transform
        dwm = dw.astype(md)
        d_rv = dot(ch.xm, ddm, TN, acc)
        d_rk = dot(ch.xm, dwm, TN, acc)
        dx = dot(ddm, ch.rv, NT, acc) + dot(dwm, ch.rk, NT, acc)
        dl = -dot(dot(ch.x, dx, TN, acc), ch.x, NT, acc)
        dl = jnp.where(ch.strict, dl, zero)
        dkk = dl * ch.b * dec.D
        dk = dk + dot(dkk, k, NN, acc) + dot(dkk, k, TN, acc) + ch.b * dec.alpha * d_rk
        dv = ch.b * d_rv
        db = rowsum(dl * dec.D * ch.kk) + rowsum(d_rv * v) + rowsum(d_rk * dec.alpha * k)

        # the within-chunk decay sums: + to i, - to j for every exp(G_i - G_j)
        m_read = d_pr * ch.p_acc
        m_ut = dl * ch.lower
        tail = rowsum(dke * ch.ke_acc)
        d_gsum = (rowsum(dq_read * q) + rowsum(m_read) - colsum(m_read) + rowsum(m_ut) - colsum(m_ut)
                  + rowsum(d_rk * ch.rk_acc) - tail)
        last = jnp.sum(tail, axis=1, keepdims=True) + dec.a * jnp.sum(jnp.sum(h * s, axis=2, keepdims=True), axis=1,
                                                                      keepdims=True)  # [hb, 1, 1]
        is_last = jax.lax.broadcasted_iota(jnp.int32, (1, c, 1), 1) == c - 1
        d_gsum = d_gsum + jnp.where(is_last, last, zero)
        dg, _ = dec.gate_grad(d_gsum, zero)

        db_ref[:, j] = dec.as_row(db).astype(db_ref.dtype)
        dg_ref[:, j] = dec.as_row(dg).astype(dg_ref.dtype)
        for ref, ok, d in zip((dq_ref, dk_ref, dv_ref), (q_ok, k_ok, v_ok), (dq, dk, dv)):
            ref[rows] = from_heads(jnp.where(ok, d, zero), flat_d is not None).astype(ref.dtype)
        h = h_prev
    h_ref[...] = h
    write_final(ds0_ref, h)




def _flops(b, h, t, c, dk, dv, backward):
    squarings = 2 * max(0, (c - 1).bit_length() - 1)
    fwd = 2 * b * h * t * (2 * c * dk + 2 * c * dv + squarings * c + 3 * dk * dv)
    return 3 * fwd if backward else fwd


def forward(q, k, v, beta, g, resets, s0, scale: float, chunk_size: int, *, save_states: bool, interpret: bool,
            chunks: int = CHUNKS_PER_STEP, poison: bool = False):
    """The fused forward pass.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (``T`` a multiple of ``chunk_size``), read in place.
      beta: ``[B, T, H]`` finite write strengths.
      g: ``[B, T, H]`` finite log decays (a full decay passed as a reset with ``g = 0``), or None.
      resets: ``[B, T, H]`` bool, the state is zeroed before token ``t``'s update, or None.
      s0: ``[B, H, K, V]`` initial state in the accumulation dtype.
      save_states: also return the chunk-start states ``[B, H, N, K, V]`` in q's dtype.
      chunks: chunks per grid step (the largest divisor of ``N`` at most this, cut to fit VMEM).
      poison (tests): outputs start as NaN, so a value the kernel never writes shows.

    Returns ``(o [B, T, H, V]`` in q's dtype, ``S_N`` in s0's dtype, states or None)``.
    """
    c = chunk_size
    b, t, h, dk, dv, n, hb, nb, _ = geometry(q, v, c, chunks, vmem_bytes, VMEM_BUDGET)
    acc = s0.dtype
    steps = n // nb
    lay = HeadLayout(hb, dk, dv, nb, c, steps, reverse=False)
    sp = lay.sp
    inputs = [lay.view(q), lay.view(k), lay.view(v), *gate_rows(g, resets, (b, n, c, h), acc),
              gate_rows(beta, None, (b, n, c, h), acc)[0], s0]
    specs = [lay.seq(dk), lay.seq(dk), lay.seq(dv), sp.rows(), sp.rows(), sp.rows(), sp.state(dk, dv)]
    outs = [(lay.seq_shape((b, t, h, dv)), q.dtype, lay.seq(dv)), ((b, h, dk, dv), acc, sp.state(dk, dv))]
    if save_states:
        outs.append(((b, h, n, dk, dv), q.dtype, sp.states(dk, dv)))
    cost = pl.CostEstimate(flops=_flops(b, h, t, c, dk, dv, False), transcendentals=b * h * n * (c * c + 2 * c),
                           bytes_accessed=nbytes(*inputs) + out_bytes(outs))
    kernel = functools.partial(_fwd_kernel, nb=nb, c=c, scale=float(scale), save_states=save_states, flat_d=lay.d)
    res = launch(kernel, "delta_fused_fwd_tpu", inputs, specs, outs, (b, h // hb, steps), [((hb, dk, dv), acc)],
                 interpret, poison, cost, vmem_limit=VMEM_LIMIT)
    return lay.unview(res[0]), res[1], (res[2] if save_states else None)


def backward(q, k, v, do, beta, g, resets, states, dsf, scale: float, chunk_size: int, *, interpret: bool,
             chunks: int = CHUNKS_PER_STEP, poison: bool = False):
    """The fused backward pass: ``(dq, dk, dv`` in q's dtype, ``dbeta, dg [B, T, H]`` and
    ``dS_0 [B, H, K, V]`` in dsf's dtype)``; ``states`` as :func:`forward` saved them, ``do`` the
    output's cotangent, ``dsf`` the final state's. ``dg`` is 0 at resets (and meaningless where
    the caller passed no gate)."""
    c = chunk_size
    b, t, h, dk, dv, n, hb, nb, _ = geometry(q, v, c, chunks, vmem_bytes, VMEM_BUDGET)
    acc = dsf.dtype
    steps = n // nb
    lay = HeadLayout(hb, dk, dv, nb, c, steps, reverse=True)
    sp = lay.sp
    inputs = [lay.view(q), lay.view(k), lay.view(v), lay.view(do.astype(q.dtype)),
              *gate_rows(g, resets, (b, n, c, h), acc), gate_rows(beta, None, (b, n, c, h), acc)[0], states, dsf]
    specs = [lay.seq(dk), lay.seq(dk), lay.seq(dv), lay.seq(dv), sp.rows(), sp.rows(), sp.rows(), sp.states(dk, dv),
             sp.state(dk, dv)]
    row = ((b, h, n, 1, c), acc, sp.rows())
    seq_k, seq_v = lay.seq_shape(q.shape), lay.seq_shape(v.shape)
    outs = [(seq_k, q.dtype, lay.seq(dk)), (seq_k, q.dtype, lay.seq(dk)), (seq_v, q.dtype, lay.seq(dv)), row, row,
            ((b, h, dk, dv), acc, sp.state(dk, dv))]
    cost = pl.CostEstimate(flops=_flops(b, h, t, c, dk, dv, True), transcendentals=b * h * n * (c * c + 2 * c),
                           bytes_accessed=nbytes(*inputs) + out_bytes(outs))
    kernel = functools.partial(_bwd_kernel, nb=nb, c=c, scale=float(scale), flat_d=lay.d)
    dq, dk_, dv_, db, dg, ds0 = launch(kernel, "delta_fused_bwd_tpu", inputs, specs, outs, (b, h // hb, steps),
                                       [((hb, dk, dv), acc)], interpret, poison, cost, vmem_limit=VMEM_LIMIT)
    rows = lambda x: jnp.moveaxis(x[:, :, :, 0], 1, 3).reshape(b, t, h)  # noqa: E731  [B, H, N, 1, C] -> [B, T, H]
    return lay.unview(dq), lay.unview(dk_), lay.unview(dv_), rows(db), rows(dg), ds0


def vmem_bytes(c: int, hb: int, k: int, v: int, itemsize: int, nb: int) -> int:
    """An upper estimate of the VMEM of the larger (backward) kernel with ``hb`` heads and ``nb``
    chunks per step: every block double-buffered, the state scratch, and one chunk's float32
    temporaries (about 16 ``[hb, C, C]`` and 14 ``[hb, C, max(K, V)]`` arrays live at once)."""
    f32 = 4
    rows = nb * c
    seq = hb * (2 * tile_bytes(rows, k, itemsize) + 2 * tile_bytes(rows, v, itemsize))  # q, k, v, do
    gates = 3 * hb * nb * tile_bytes(1, c, f32)
    states = hb * nb * tile_bytes(k, v, itemsize)
    outs = (hb * (2 * tile_bytes(rows, k, itemsize) + tile_bytes(rows, v, itemsize))
            + 2 * hb * nb * tile_bytes(1, c, f32))
    state = hb * tile_bytes(k, v, f32)
    temps = hb * (16 * tile_bytes(c, c, f32) + 14 * tile_bytes(c, max(k, v), f32))
    return 2 * (seq + gates + states + outs + 2 * state) + state + temps




def supports(shape, dtype, backend: str) -> bool:
    """``shape = (B, T, H, K, V, C)``: a TPU; float32 or bfloat16; ``C``, ``K``, ``V`` multiples of
    8; one chunk per step of ``head_block(H)`` heads within the 24 MiB VMEM budget."""
    return fits(shape, dtype, backend, vmem_bytes, VMEM_BUDGET)
