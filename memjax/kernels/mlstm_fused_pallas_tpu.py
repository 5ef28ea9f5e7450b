"""Pallas (Mosaic) kernels for the *whole* chunked pass of the mLSTM (xLSTM's matrix memory) on a
TPU: forward and backward in one kernel each, the stabilised state ``(C~ [K, V], n~ [K], m)`` in
VMEM from the first chunk to the last.

Recurrence and stabiliser as :mod:`memjax.memory.mlstm` (per batch and head; ``i_t`` the input
gate's pre-activation, ``log f_t = log_sigmoid(f_t)``, ``k' = scale k``)::

    m_t = max(log f_t + m_{t-1}, i_t)
    C~_t = exp(log f_t + m_{t-1} - m_t) C~_{t-1} + exp(i_t - m_t) k'_t v_t^T      (n~ alike)
    h_t = C~_t^T q_t / max(|n~_t^T q_t|, exp(-m_t))

Within a chunk (``b_i`` the cumulative log forget gate from the chunk start, restarted at a
document start; ``(C~, n~, m_p)`` the state before the chunk)::

    E_ij = b_i - b_j + i_j  (j <= i, same document)      e_i = b_i + m_p  (i in the chunk's first document)
    m_i  = max(e_i, max_j E_ij)                            W_ij = exp(E_ij - m_i)   w_i = exp(e_i - m_i)
    num_i = scale sum_j W_ij (q_i . k_j) v_j + w_i C~^T q_i      den_i = scale sum_j W_ij (q_i . k_j) + w_i n~ . q_i
    h_i  = num_i / max(|den_i|, exp(-m_i))

so every exponent is ``<= 0`` (the row's stabiliser is its largest), and the state after the
chunk is ``(eps C~ + scale sum_j o_j k_j v_j^T, eps n~ + scale sum_j o_j k_j, m')`` with
``a_j = b_last - b_j + i_j`` over the last document, ``e' = b_last + m_p`` without a document
start, ``m' = max(e', max_j a_j)``, ``eps = exp(e' - m')``, ``o_j = exp(a_j - m')``: what the
token-by-token recurrence carries. The empty state has ``m = -inf`` (its terms are masked, not
multiplied by ``exp(-inf)``).

Backward: ``m`` is a stabiliser, under ``stop_gradient`` as in the XLA forms (the output does not
depend on it), so every weight's gradient is its log-derivative: ``dE_ij = dP_ij P_ij`` with
``P = scale (Q K^T) * W`` and ``dP_ij = dnum_i . v_j + dden_i``; ``i_j`` gets the column sums,
``b_i`` the row sums minus the column sums, plus the state terms (``e_i``, ``a_j``, ``e'``);
``dlog f_s = sum_{i >= s, same document} db_i`` within the chunk (``b`` restarts at every
chunk: nothing carries across), 0 at document starts. The state's cotangent ``(dC~, dn~)`` runs
from the last chunk to the first; the initial ``m``'s gradient is ``<dC~_0, C~_0> + <dn~_0, n~_0>``
(the caller forms it: ``C~_0, n~_0`` enter only as ``exp(m_0) C~_0``, ``exp(m_0) n~_0``).

Layout as :mod:`memjax.kernels.fused_chunk_tpu`: q, k, v read in place (at ``K = V = 64`` as the
flat ``[B, T, H K]`` view, cut into heads in VMEM: ``HeadLayout``), gates and document
starts as ``[B, H, N, 1, C]`` rows; ``n~`` and ``m`` travel together as ``[B, H, 2, K]`` (row 0
``n~``, row 1 ``m`` on every lane). q, k, v are matmul operands in their dtype with float32
accumulation, the weights and the state float32 (the saved chunk-start ``C~`` in q's dtype).
Non-finite q, k, v entries are read as 0 and get a zero gradient.

Status: compiled through Mosaic for v5p / v5e compile-only devices from a CPU host and tested
in interpret mode (``tests/test_mlstm_fused_tpu.py``); never run on a TPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from memjax.kernels.fused_chunk_tpu import (NN, NT, TN, ChunkDecays, HeadLayout, dot, fits, from_heads, gate_rows,
                                            geometry, launch, load_chunk, masked_exp, nbytes, out_bytes, start_from,
                                            tile_bytes, to_heads, write_final)

__all__ = ["forward", "backward", "supports", "CHUNKS_PER_STEP"]

CHUNKS_PER_STEP = 2
VMEM_LIMIT = 32 * 2 ** 20
VMEM_BUDGET = 24 * 2 ** 20


class _Chunk:
    """One chunk's forward quantities for ``hb`` heads (module docstring), recomputed by the
    backward. ``cs [hb, K, V]`` the state ``C~`` as a matmul operand, ``n [hb, 1, K]``, ``m_p [hb, 1, 1]``."""

    def __init__(self, q, k, v, i_row, dec, cs, n, m_p, scale, md, acc):
        neg = jnp.asarray(-jnp.inf, acc)
        i_row = i_row.astype(acc)
        live = m_p > neg  # the incoming state is not empty
        m0 = jnp.where(live, m_p, jnp.zeros((), acc))
        exps = jnp.where(dec.mask, dec.gc - dec.gr + i_row, neg)  # E [hb, C, C]
        first = (dec.rc == 0) & live  # [hb, C, 1]
        e = jnp.where(first, dec.gc + m0, neg)
        self.m = jnp.maximum(e, jnp.max(exps, axis=2, keepdims=True))  # [hb, C, 1], finite
        self.w = w = masked_exp(exps - self.m, dec.mask)  # W [hb, C, C]
        self.inter = masked_exp(e - self.m, first)  # [hb, C, 1]
        self.p = dot(q.astype(md), k.astype(md), NT, acc) * w * scale  # P [hb, C, C]
        self.read = dot(q.astype(md), cs, NN, acc)  # C~^T q  [hb, C, V]
        self.rn = jnp.sum(q * n, axis=2, keepdims=True)  # n~ . q  [hb, C, 1]
        self.num = dot(self.p.astype(md), v.astype(md), NN, acc) + self.inter * self.read
        self.den = jnp.sum(self.p, axis=2, keepdims=True) + self.inter * self.rn
        self.floor = jnp.maximum(jnp.exp(-self.m), jnp.asarray(jnp.finfo(acc).tiny, acc))
        self.denom = jnp.maximum(jnp.abs(self.den), self.floor)
        self.y = self.num / self.denom
        # the state after the chunk
        same_last = dec.rr == dec.r_last  # [hb, 1, C]: j in the chunk's last document
        a = jnp.where(same_last, dec.g_last - dec.gr + i_row, neg)  # [hb, 1, C]
        whole = (dec.r_last == 0) & live  # [hb, 1, 1]
        e_end = jnp.where(whole, dec.g_last + m0, neg)
        self.m_end = jnp.maximum(e_end, jnp.max(a, axis=2, keepdims=True))  # [hb, 1, 1]
        self.eps = masked_exp(e_end - self.m_end, whole)
        self.o_row = masked_exp(a - self.m_end, same_last) * scale  # [hb, 1, C]
        self.o_col = dec.as_col(self.o_row)  # [hb, C, 1]

    def state_after(self, k, v, c_state, n, md, acc):
        c_new = self.eps * c_state + dot((k * self.o_col).astype(md), v.astype(md), TN, acc)
        n_new = self.eps * n + dot(self.o_row, k, NN, acc)  # [hb, 1, K]
        return c_new, n_new


def _nm(n, m):
    """``n~ [hb, 1, K]`` and ``m [hb, 1, 1]`` as one ``[hb, 2, K]`` block (``m`` on every lane)."""
    return jnp.concatenate([n, jnp.broadcast_to(m, n.shape)], axis=1)


def _fwd_kernel(q_ref, k_ref, v_ref, i_ref, f_ref, z_ref, c0_ref, nm0_ref, *rest, nb, c, scale, save_states, flat_d):
    nout = 5 if save_states else 3  # (outputs after NaN buffers aliased to them when poisoned)
    y_ref, cf_ref, nmf_ref = rest[-2 - nout], rest[-1 - nout], rest[-nout]
    cst_ref, nmst_ref = (rest[-4], rest[-3]) if save_states else (None, None)
    c_ref, nm_ref = rest[-2], rest[-1]
    acc, md = c_ref.dtype, q_ref.dtype
    start_from((c_ref, c0_ref), (nm_ref, nm0_ref))
    c_state, nm = c_ref[...], nm_ref[...]  # [hb, K, V], [hb, 2, K]
    for j in range(nb):
        rows = pl.ds(j * c, c)
        (q, _), (k, _), (v, _) = (load_chunk(ref, rows, acc, flat_d) for ref in (q_ref, k_ref, v_ref))
        dec = ChunkDecays(f_ref[:, j], z_ref[:, j], c, acc)
        cs = c_state.astype(md)
        n, m_p = nm[:, 0:1], jnp.max(nm[:, 1:2], axis=2, keepdims=True)
        if save_states:
            cst_ref[:, j] = cs.astype(cst_ref.dtype)
            nmst_ref[:, j] = nm.astype(nmst_ref.dtype)
        ch = _Chunk(q, k, v, i_ref[:, j], dec, cs, n, m_p, scale, md, acc)
        y_ref[rows] = from_heads(ch.y, flat_d is not None).astype(y_ref.dtype)
        c_state, n = ch.state_after(k, v, c_state, n, md, acc)
        nm = _nm(n, ch.m_end)
    c_ref[...], nm_ref[...] = c_state, nm
    write_final(cf_ref, c_state)
    write_final(nmf_ref, nm)


def _bwd_kernel(q_ref, k_ref, v_ref, dy_ref, i_ref, f_ref, z_ref, cst_ref, nmst_ref, dcf_ref, dnf_ref, *rest, nb, c,
                scale, flat_d):
    dq_ref, dk_ref, dv_ref, di_ref, df_ref, dc0_ref, dn0_ref, hc_ref, hn_ref = rest[-9:]
    acc, md = hc_ref.dtype, q_ref.dtype
    start_from((hc_ref, dcf_ref), (hn_ref, dnf_ref))  # (the index maps walk the chunk blocks last to first)
    hc, hn = hc_ref[...], hn_ref[...]  # the cotangents of the state after the chunk: [hb, K, V], [hb, 1, K]
    zero = jnp.zeros((), acc)
    rowsum = lambda x: jnp.sum(x, axis=2, keepdims=True)  # noqa: E731
    for j in reversed(range(nb)):
        rows = pl.ds(j * c, c)
        loaded = [load_chunk(ref, rows, acc, flat_d) for ref in (q_ref, k_ref, v_ref)]
        (q, _), (k, _), (v, _) = loaded
        dy = to_heads(dy_ref[rows], flat_d).astype(acc)
        dec = ChunkDecays(f_ref[:, j], z_ref[:, j], c, acc)
        cs = cst_ref[:, j].astype(md)
        nm = nmst_ref[:, j].astype(acc)
        n, m_p = nm[:, 0:1], jnp.max(nm[:, 1:2], axis=2, keepdims=True)
        ch = _Chunk(q, k, v, i_ref[:, j], dec, cs, n, m_p, scale, md, acc)

        # the read: y = num / max(|den|, floor)
        dnum = dy / ch.denom
        dden = jnp.where(jnp.abs(ch.den) > ch.floor, -rowsum(dy * ch.y) / ch.denom * jnp.sign(ch.den), zero)
        dnum_m = dnum.astype(md)
        dp = jnp.where(dec.mask, dot(dnum_m, v.astype(md), NT, acc) + dden, zero)  # [hb, C, C]
        ds = dp * ch.p  # dE = dP * P (the log-derivative of each weight)
        dsc = dp * ch.w * scale  # d(q_i . k_j)
        dscm = dsc.astype(md)
        dq = dot(dscm, k.astype(md), NN, acc) + ch.inter * (dot(dnum_m, cs, NT, acc) + dden * n)
        dk = dot(dscm, q.astype(md), TN, acc)
        dv = dot(ch.p.astype(md), dnum_m, TN, acc)
        di_row = jnp.sum(ds, axis=1, keepdims=True)  # [hb, 1, C]: column sums
        db = rowsum(ds) - dec.as_col(di_row) + ch.inter * (rowsum(ch.read * dnum) + ch.rn * dden)

        # the write into the state after the chunk
        hcm = hc.astype(md)
        dkw = (dot(v.astype(md), hcm, NT, acc) + hn) * ch.o_col  # [hb, C, K]
        dvw = dot(k.astype(md), hcm, NN, acc) * ch.o_col
        dk, dv = dk + dkw, dv + dvw
        da = rowsum(k * dkw)  # [hb, C, 1]: d a_j, a_j = b_last - b_j + i_j
        de_end = ch.eps * (jnp.sum(rowsum(hc * cs.astype(acc)), axis=1, keepdims=True) + rowsum(hn * n))
        is_last = jax.lax.broadcasted_iota(jnp.int32, (1, c, 1), 1) == c - 1
        db = db - da + jnp.where(is_last, jnp.sum(da, axis=1, keepdims=True) + de_end, zero)
        di = di_row + dec.as_row(da)
        dlf, _ = dec.gate_grad(db, zero)

        di_ref[:, j] = di.astype(di_ref.dtype)
        df_ref[:, j] = dec.as_row(dlf).astype(df_ref.dtype)
        for ref, (_, ok), d in zip((dq_ref, dk_ref, dv_ref), loaded, (dq, dk, dv)):
            ref[rows] = from_heads(jnp.where(ok, d, zero), flat_d is not None).astype(ref.dtype)
        inter_q = (q * ch.inter).astype(md)
        hc = ch.eps * hc + dot(inter_q, dnum_m, TN, acc)
        hn = ch.eps * hn + dot(dec.as_row(ch.inter * dden), q, NN, acc)
    hc_ref[...], hn_ref[...] = hc, hn
    write_final(dc0_ref, hc)
    write_final(dn0_ref, hn)


def _flops(b, h, t, c, dk, dv, backward):
    fwd = 2 * b * h * t * (c * dk + c * dv + 2 * dk * dv)
    return 3 * fwd if backward else fwd


def forward(q, k, v, i, log_f, resets, c0, nm0, scale: float, chunk_size: int, *, save_states: bool,
            interpret: bool, chunks: int = CHUNKS_PER_STEP, poison: bool = False):
    """The fused forward pass.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (``T`` a multiple of ``chunk_size``), read in place.
      i, log_f: ``[B, T, H]`` finite input-gate pre-activations (``-inf`` on padding) and log
        forget gates.
      resets: ``[B, T, H]`` bool, the state is emptied before token ``t``, or None.
      c0: ``[B, H, K, V]`` and nm0: ``[B, H, 2, K]`` (``n~``, and ``m`` on every lane) the
        incoming state in the accumulation dtype.
      save_states: also return the chunk-start ``C~ [B, H, N, K, V]`` in q's dtype and
        ``(n~, m) [B, H, N, 2, K]``.
      poison (tests): outputs start as NaN, so a value the kernel never writes shows.

    Returns ``(h [B, T, H, V]`` in q's dtype, ``C~_N``, ``(n~, m)_N``, states or None)``.
    """
    c = chunk_size
    b, t, h, dk, dv, n, hb, nb, _ = geometry(q, v, c, chunks, vmem_bytes, VMEM_BUDGET)
    acc = c0.dtype
    steps = n // nb
    lay = HeadLayout(hb, dk, dv, nb, c, steps, reverse=False)
    sp = lay.sp
    f_rows, z_rows = gate_rows(log_f, resets, (b, n, c, h), acc)
    inputs = [lay.view(q), lay.view(k), lay.view(v), gate_rows(i, None, (b, n, c, h), acc)[0], f_rows, z_rows, c0,
              nm0]
    nm_spec = sp.state(2, dk)
    specs = [lay.seq(dk), lay.seq(dk), lay.seq(dv), sp.rows(), sp.rows(), sp.rows(), sp.state(dk, dv), nm_spec]
    outs = [(lay.seq_shape((b, t, h, dv)), q.dtype, lay.seq(dv)), ((b, h, dk, dv), acc, sp.state(dk, dv)),
            ((b, h, 2, dk), acc, nm_spec)]
    if save_states:
        outs += [((b, h, n, dk, dv), q.dtype, sp.states(dk, dv)), ((b, h, n, 2, dk), acc, sp.states(2, dk))]
    cost = pl.CostEstimate(flops=_flops(b, h, t, c, dk, dv, False), transcendentals=b * h * t * (c + 3),
                           bytes_accessed=nbytes(*inputs) + out_bytes(outs))
    kernel = functools.partial(_fwd_kernel, nb=nb, c=c, scale=float(scale), save_states=save_states, flat_d=lay.d)
    res = launch(kernel, "mlstm_fused_fwd_tpu", inputs, specs, outs, (b, h // hb, steps),
                 [((hb, dk, dv), acc), ((hb, 2, dk), acc)], interpret, poison, cost, vmem_limit=VMEM_LIMIT)
    return (lay.unview(res[0]),) + tuple(res[1:3]) + (((res[3], res[4]),) if save_states else (None,))


def backward(q, k, v, dy, i, log_f, resets, c_states, nm_states, dcf, dnf, scale: float, chunk_size: int, *,
             interpret: bool, chunks: int = CHUNKS_PER_STEP, poison: bool = False):
    """The fused backward pass: ``(dq, dk, dv`` in q's dtype, ``di, dlog_f [B, T, H]``, ``dC~_0
    [B, H, K, V]`` and ``dn~_0 [B, H, 1, K]`` in dcf's dtype)``; ``c_states, nm_states`` as
    :func:`forward` saved them, ``dy`` the output's cotangent, ``dcf [B, H, K, V]`` and
    ``dnf [B, H, 1, K]`` the final state's. ``dlog_f`` is 0 at document starts."""
    c = chunk_size
    b, t, h, dk, dv, n, hb, nb, _ = geometry(q, v, c, chunks, vmem_bytes, VMEM_BUDGET)
    acc = dcf.dtype
    steps = n // nb
    lay = HeadLayout(hb, dk, dv, nb, c, steps, reverse=True)
    sp = lay.sp
    f_rows, z_rows = gate_rows(log_f, resets, (b, n, c, h), acc)
    inputs = [lay.view(q), lay.view(k), lay.view(v), lay.view(dy.astype(q.dtype)),
              gate_rows(i, None, (b, n, c, h), acc)[0], f_rows, z_rows, c_states, nm_states, dcf, dnf.astype(acc)]
    specs = [lay.seq(dk), lay.seq(dk), lay.seq(dv), lay.seq(dv), sp.rows(), sp.rows(), sp.rows(), sp.states(dk, dv),
             sp.states(2, dk), sp.state(dk, dv), sp.state(1, dk)]
    row = ((b, h, n, 1, c), acc, sp.rows())
    outs = [(lay.seq_shape(q.shape), q.dtype, lay.seq(dk)), (lay.seq_shape(k.shape), q.dtype, lay.seq(dk)),
            (lay.seq_shape(v.shape), q.dtype, lay.seq(dv)), row, row,
            ((b, h, dk, dv), acc, sp.state(dk, dv)), ((b, h, 1, dk), acc, sp.state(1, dk))]
    cost = pl.CostEstimate(flops=_flops(b, h, t, c, dk, dv, True), transcendentals=b * h * t * (c + 3),
                           bytes_accessed=nbytes(*inputs) + out_bytes(outs))
    kernel = functools.partial(_bwd_kernel, nb=nb, c=c, scale=float(scale), flat_d=lay.d)
    dq, dk_, dv_, di, dlf, dc0, dn0 = launch(kernel, "mlstm_fused_bwd_tpu", inputs, specs, outs, (b, h // hb, steps),
                                             [((hb, dk, dv), acc), ((hb, 1, dk), acc)], interpret, poison, cost,
                                             vmem_limit=VMEM_LIMIT)
    rows = lambda x: jnp.moveaxis(x[:, :, :, 0], 1, 3).reshape(b, t, h)  # noqa: E731  [B, H, N, 1, C] -> [B, T, H]
    return lay.unview(dq), lay.unview(dk_), lay.unview(dv_), rows(di), rows(dlf), dc0, dn0


def vmem_bytes(c: int, hb: int, k: int, v: int, itemsize: int, nb: int) -> int:
    """An upper estimate of the VMEM of the larger (backward) kernel with ``hb`` heads and ``nb``
    chunks per step: every block double-buffered, the state scratch, and one chunk's float32
    temporaries (about 12 ``[hb, C, C]`` and 16 ``[hb, C, max(K, V)]`` arrays live at once)."""
    f32 = 4
    rows = nb * c
    seq = hb * (2 * tile_bytes(rows, k, itemsize) + 2 * tile_bytes(rows, v, itemsize))  # q, k, v, dy
    gates = 3 * hb * nb * tile_bytes(1, c, f32)
    states = hb * nb * (tile_bytes(k, v, itemsize) + tile_bytes(2, k, f32))
    outs = (hb * (2 * tile_bytes(rows, k, itemsize) + tile_bytes(rows, v, itemsize))
            + 2 * hb * nb * tile_bytes(1, c, f32))
    state = hb * (tile_bytes(k, v, f32) + tile_bytes(2, k, f32))
    temps = hb * (12 * tile_bytes(c, c, f32) + 16 * tile_bytes(c, max(k, v), f32))
    return 2 * (seq + gates + states + outs + 2 * state) + state + temps


def supports(shape, dtype, backend: str) -> bool:
    """``shape = (B, T, H, K, V, C)``: a TPU; float32 or bfloat16; ``C``, ``K``, ``V`` multiples of
    8; one chunk per step of ``head_block(H)`` heads within the 24 MiB VMEM budget."""
    return fits(shape, dtype, backend, vmem_bytes, VMEM_BUDGET)
