"""State-space sequence memories: diagonal SSM (S4D / S5) and selective SSM (Mamba-2 SSD).

**Diagonal SSM** (time invariant; Gu et al. 2022 "S4D", Smith et al. 2023 "S5"). Per channel ``h``
with ``N`` diagonal modes (complex or real)::

    Abar = exp(dt A),  Bbar = (Abar - 1) / A * B          (zero-order hold)
    s_t = Abar * s_{t-1} + Bbar x_t,   y_t = Re(sum_n C_n s_{t,n}) + D x_t

Forms: ``"conv"`` (the kernel ``K_l = Re(sum_n C_n Abar_n^l Bbar_n)`` is built once and applied
with an FFT: O(T log T)), ``"chunked"`` (the same kernel as a masked ``[C, C]`` Toeplitz matmul per
chunk plus one state-passing step per chunk; takes ``segment_ids``), ``"scan"``
(``jax.lax.associative_scan``: O(log T) depth, one state per token) and ``"recurrent"``
(``lax.scan``; the decoding form).

**Selective SSM, Mamba-2 SSD** (Dao & Gu 2024, "Transformers are SSMs"). Per head ``h`` (scalar
``A_h < 0``), ``P`` channels, ``N`` state dims; ``B``, ``C`` shared by ``H / G`` heads of a group::

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T           (state [P, N])
    y_t = h_t C_t + D x_t

Forms: ``"chunked"`` (the SSD block decomposition, matmul based) and ``"recurrent"``.

The shared helper :func:`memjax.memory.linear_scan.linear_scan` runs ``h_t = a_t h_{t-1} + b_t``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.memory.linear_scan import linear_scan  # noqa: F401  (also part of this module's API)
from memjax.kernels.chunk_pass import as_operand
from memjax.memory.chunking import from_chunks, from_head_chunks, pad_time, to_chunks, to_head_chunks
from memjax.memory import nonfinite
from memjax.memory.contract import (check_chunk_size, check_floating, check_gate, check_impl, check_mode,
                                    check_segment_ids, check_seq_axis, check_sequence, check_shape, check_state,
                                    operand_dtype, output_dtype, state_dtype)
from memjax.memory.chunk_products import head_chunk_decays, repeat_groups, times_rows
from memjax.memory.linear_vjp import chunked_scalar_decay, fused_kernel
from memjax.memory.segments import segment_resets
from memjax.memory.sequence_parallel import sequence_resets, sharded_chunk_recurrence, sharded_linear_scan

DIAG_MODES = ("conv", "chunked", "scan", "recurrent")
SELECTIVE_MODES = ("chunked", "recurrent")


# ----------------------------------------------------------------------------- diagonal SSM


def _phi1(z):
    """``(exp(z) - 1) / z`` with the limit 1 at ``z = 0`` (finite value and gradient there)."""
    small = jnp.abs(z) < 1e-4
    zs = jnp.where(small, jnp.ones_like(z), z)
    return jnp.where(small, 1.0 + z / 2 + z * z / 6, jnp.expm1(zs) / zs)


def diagonal_ssm(x: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, dt: jax.Array, *,
                 D: jax.Array | None = None, initial_state: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, mode: str = "conv",
                 chunk_size: int = 64, seq_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Diagonal linear time-invariant SSM (S4D / S5), ZOH-discretised, per channel.

    Args:
      x: ``[batch, T, H]`` real input, ``H`` independent channels.
      A: ``[H, N]`` continuous-time eigenvalues, real or complex (``Re(A) < 0`` for stability;
        see :mod:`memjax.memory.reparam` and :mod:`memjax.memory.hippo` for initialisers).
      B, C: ``[H, N]`` real or complex.
      dt: ``[H]`` positive step sizes.
      D: ``[H]`` skip connection or None.
      initial_state: ``[batch, H, N]`` state before ``t = 0`` (zeros if None).
      segment_ids: ``[batch, T]`` int (all forms but ``"conv"``): the state is reset to zero before
        the first token of each new segment. ``"conv"`` rejects it (a reset breaks time invariance,
        so the output is no longer one convolution); use ``"chunked"`` for packed data.
      mode: ``"conv"``, ``"chunked"``, ``"scan"`` or ``"recurrent"``; all give the same result.
      chunk_size: ``C`` for ``"chunked"`` (capped at ``T``). ``T`` need not be a multiple: the tail
        is padded with ``x = 0`` (and the last segment id), the output sliced, and the final state
        read at position ``T - 1``, not at the padded end (the padding still decays the state).
      seq_axis: sequence parallelism (:mod:`memjax.memory.sequence_parallel`): call inside
        ``jax.shard_map`` with time split over this mesh axis; the inputs are this device's
        slice, ``initial_state`` the state before the whole sequence; returns this slice's
        outputs and the whole sequence's final state. ``"scan"`` mode only.

    ``"conv"``: ``y = K * x + Re(sum_n C_n Abar_n^{t+1} s_{-1,n})`` with the kernel from the
    Vandermonde matrix ``Abar^l = exp(l dt A)`` (no repeated powers); the final state is the
    contraction ``s_{T-1} = Abar^T s_{-1} + sum_l Abar^{T-1-l} Bbar x_l``, so the conv form also
    chains and decodes. The FFT has length ``2T`` (no wrap-around).

    ``"chunked"``: within a chunk of ``C`` tokens with carried-in state ``S`` and ``r_i`` the number
    of resets in ``[0, i]`` (chunk positions)::

        y_i   = sum_{j <= i, r_j = r_i} K_{i-j} x_j + [r_i = 0] Re(sum_n C_n Abar_n^(i+1) S_n)
        S'    = [r_{C-1} = 0] Abar^C S + Bbar sum_{j: r_j = r_{C-1}} Abar^(C-1-j) x_j

    i.e. a ``[C, C]`` Toeplitz matrix ``K_{i-j}`` (kernel ``[H, C]`` computed once, indexed, masked
    by causality and segment), one matmul for the state's read-out and one for the chunk's write,
    and a ``lax.scan`` over chunks for ``S``. Powers are ``Abar^l = exp(l dt A)`` with
    ``0 <= l <= C``, so nothing grows (``|Abar| <= 1``) and no per-token state is formed. Without
    ``segment_ids`` the Toeplitz matrix is shared by the batch (one dense matmul; ``C = 64`` is
    fast); with them the masked matrix is ``[batch, T/C, H, C, C]``, i.e. ``C`` numbers per token
    and channel, so smaller chunks (``C = 16``) are faster for packed data.

    Returns:
      ``(y [batch, T, H]`` in x's dtype, ``final_state [batch, H, N]``): the state is complex when
      any of ``A, B, C, initial_state`` is complex, real otherwise; float32 / complex64 precision
      (float64 / complex128 for float64 inputs). ``"chunked"`` keeps x in its dtype for its
      matmuls (float32 accumulation; :mod:`memjax.memory.contract`); ``"conv"`` (the FFT),
      ``"scan"`` and ``"recurrent"`` (element-wise updates of the state) work at the state's
      precision.
    """
    fn = "diagonal_ssm"
    check_mode(fn, mode, DIAG_MODES)
    check_chunk_size(fn, chunk_size)
    b, t, h = check_sequence(fn, "x", x, "[batch, T, H]")
    n = check_shape(fn, "A", A, (h, None), "[H, N]")[1]
    check_floating(fn, "A", A, complex_ok=True)
    for name, v in (("B", B), ("C", C)):
        check_shape(fn, name, v, (h, n), "[H, N]")
        check_floating(fn, name, v, complex_ok=True)
    check_gate(fn, "dt", dt, (h,), "[H]", required=True)
    check_gate(fn, "D", D, (h,), "[H]")
    check_state(fn, initial_state, (b, h, n), "[batch, H, N]", complex_ok=True)
    check_segment_ids(fn, segment_ids, (b, t), "[batch, T]")
    if segment_ids is not None and mode == "conv":
        raise ValueError(f"{fn}: segment_ids are not supported with mode='conv' (resets break time "
                         "invariance); use mode='chunked', 'scan' or 'recurrent'")
    check_seq_axis(fn, seq_axis, mode, ("scan",))

    # A non-finite input poisons its channel from that token to the end of its document
    # (memjax.memory.nonfinite; across shards under seq_axis); the parameters are not per token and
    # are left alone.
    mask = nonfinite.running(~jnp.isfinite(x), segment_ids, axis_name=seq_axis)
    x = nonfinite.finite_or_zero(x)
    rd = state_dtype(x, A, B, C, dt, initial_state)
    is_complex = any(v is not None and jnp.iscomplexobj(v) for v in (A, B, C, initial_state))
    sd = jnp.result_type(rd, jnp.complex64) if is_complex else rd
    out_dtype = output_dtype(x)
    xf = x.astype(rd)
    A, B, C = A.astype(sd), B.astype(sd), C.astype(sd)
    dtA = dt.astype(rd)[:, None] * A  # [H, N]
    Abar = jnp.exp(dtA)
    Bbar = B * dt.astype(rd)[:, None] * _phi1(dtA)
    if mode == "conv":
        y, s = _diag_conv(xf, dtA, Abar, Bbar, C, None if initial_state is None else initial_state.astype(sd))
    elif mode == "chunked":
        s0 = jnp.zeros((b, h, n), sd) if initial_state is None else initial_state.astype(sd)
        y, s = _diag_chunked(x, dtA, Bbar, C, s0, segment_ids, chunk_size)  # x in its dtype for the matmuls
    else:
        s0 = jnp.zeros((b, h, n), sd) if initial_state is None else initial_state.astype(sd)
        resets = sequence_resets(segment_ids, seq_axis)
        if mode == "scan":
            a = jnp.broadcast_to(Abar, (b, t, h, n))
            if resets is not None:
                a = jnp.where(resets[:, :, None, None], 0, a)
            if seq_axis is None:
                states = linear_scan(a, Bbar * xf[..., None].astype(sd), s0, axis=1)
                s = states[:, -1]
            else:
                states, s = sharded_linear_scan(a, Bbar * xf[..., None].astype(sd), s0, axis_name=seq_axis)
            y = _real(jnp.einsum("bthn,hn->bth", states, C))
        else:
            y, s = _diag_recurrent(xf, Abar, Bbar, C, s0, resets)
    if D is not None:
        y = y + D.astype(rd) * xf
    return nonfinite.poison_outputs(y.astype(out_dtype), s, mask, seq_axis)


def _real(z):
    return jnp.real(z) if jnp.iscomplexobj(z) else z


def _diag_recurrent(x, Abar, Bbar, C, s0, resets):
    def step(s, inp):
        xt, rt = inp
        if rt is not None:
            s = jnp.where(rt[:, None, None], 0, s)
        s = Abar * s + Bbar * xt[..., None]
        return s, _real(jnp.einsum("bhn,hn->bh", s, C))

    rs = None if resets is None else jnp.swapaxes(resets, 0, 1)
    s, y = jax.lax.scan(step, s0, (jnp.swapaxes(x, 0, 1), rs))
    return jnp.swapaxes(y, 0, 1), s


def _diag_conv(x, dtA, Abar, Bbar, C, s0):
    b, t, h = x.shape
    powers = jnp.exp(dtA[..., None] * jnp.arange(t, dtype=x.dtype))  # [H, N, T]: Abar^l, no repeated products
    K = _real(jnp.einsum("hn,hnl->hl", C * Bbar, powers))  # [H, T]
    nfft = 2 * t  # linear, not circular, convolution
    y = jnp.fft.irfft(jnp.fft.rfft(x, nfft, axis=1) * jnp.fft.rfft(K.T, nfft, axis=0)[None], nfft, axis=1)[:, :t]
    # Final state: sum_l Abar^(T-1-l) Bbar x_l (+ Abar^T s0); with s0 its read C Abar^(t+1) s0 joins y.
    s = Bbar * jnp.einsum("blh,hnl->bhn", x.astype(powers.dtype), powers[..., ::-1])
    if s0 is not None:
        y = y + _real(jnp.einsum("hn,hnl,bhn->blh", C * Abar, powers, s0))
        s = s + jnp.exp(dtA * t) * s0
    return y, s


def _re_dot(spec, a, b):
    """``Re(einsum(spec, a, b))`` as real matmuls (half the work of a complex product)."""
    if jnp.iscomplexobj(a) and jnp.iscomplexobj(b):
        return jnp.einsum(spec, a.real, b.real) - jnp.einsum(spec, a.imag, b.imag)
    return _real(jnp.einsum(spec, a, b))


def _real_dot(spec, x, w, acc):
    """``einsum(spec, x, w)`` for real ``x`` and real or complex ``w``, without casting ``x`` to
    complex; ``x`` keeps its dtype (``w``'s parts are rounded to it when it is 16-bit, as the
    decayed keys of the chunked linear attention) and the products accumulate in ``acc``."""
    dot = lambda part: jnp.einsum(spec, x, as_operand(part, x), preferred_element_type=acc)
    if jnp.iscomplexobj(w):
        return jax.lax.complex(dot(w.real), dot(w.imag))
    return dot(w)


def _diag_chunked(x, dtA, Bbar, C, s0, segment_ids, chunk_size):
    """``x`` in its dtype (the matmul operand); kernel, powers and state in float32 / complex64
    (float64 / complex128 for float64 inputs). Returns ``y`` in that real precision."""
    b, t, h = x.shape
    rd = _real(dtA).dtype
    c = min(chunk_size, t)  # a chunk longer than the sequence would only be padding
    nz = -(-t // c)
    last = t - (nz - 1) * c  # real positions in the last chunk, 1..c
    powers = jnp.exp(jnp.arange(c + 1, dtype=rd)[:, None, None] * dtA)  # [c+1, H, N]: Abar^l
    K = _re_dot("hn,lhn->hl", C * Bbar, powers[:c])  # [H, c]
    lag = jnp.arange(c)[:, None] - jnp.arange(c)[None, :]
    toeplitz = jnp.where(lag >= 0, K[:, jnp.maximum(lag, 0)], 0)  # [H, c, c]: K_{i-j}, causal
    xc = to_chunks(pad_time(x, c), c)  # [b, nz, c, H]; padded x = 0 writes nothing
    if segment_ids is None:
        y = jnp.einsum("hij,bzjh->bzih", as_operand(toeplitz, xc), xc, preferred_element_type=rd)
        first = tail = keep = None
    else:
        # Edge padding starts no segment, so the padded tail shares the last real position's r.
        r = jnp.cumsum(to_chunks(segment_resets(pad_time(segment_ids, c, mode="edge")), c), axis=2)
        same = r[..., :, None] == r[..., None, :]  # [b, nz, c, c]
        masked = jnp.where(same[:, :, None], toeplitz, 0)
        y = jnp.einsum("bzhij,bzjh->bzih", as_operand(masked, xc), xc, preferred_element_type=rd)
        first = r == 0  # no reset in [0, i]: the carried-in state is still visible at i
        tail = r == r[..., -1:]  # in the chunk's last segment: part of the state it hands on
        keep = r[..., -1] == 0  # no reset in the chunk: the carried-in state survives it
        xc = jnp.where(tail[..., None], xc, 0)  # only the last segment writes the outgoing state

    def write(xs, length):  # Bbar sum_j Abar^(length-1-j) x_j over the first `length` positions
        return Bbar * _real_dot("...jh,jhn->...hn", xs[..., :length, :], powers[:length][::-1], rd)

    def carry(s, inp):
        ds, kz = inp
        s = powers[c] * (s if kz is None else jnp.where(kz[:, None, None], s, 0))
        return s + ds, s + ds

    tm = lambda v: None if v is None else jnp.moveaxis(v, 1, 0)
    # Over all chunks but the last: the last one's write is cut at t - 1 below.
    s_last, s_mid = jax.lax.scan(carry, s0, (tm(write(xc[:, :-1], c)), tm(None if keep is None else keep[:, :-1])))
    s_in = jnp.concatenate([s0[:, None], jnp.moveaxis(s_mid, 0, 1)], axis=1)  # [b, nz, H, N] entering each chunk
    y_state = _re_dot("ihn,bzhn->bzih", C * powers[1:], s_in)
    y = y + (y_state if first is None else jnp.where(first[..., None], y_state, 0))
    # The final state is read at t - 1, which need not be the padded chunk's end.
    s_keep = s_last if keep is None else jnp.where(keep[:, -1, None, None], s_last, 0)
    s = powers[last] * s_keep + write(xc[:, -1], last)
    return from_chunks(y)[:, :t], s


# ----------------------------------------------------------------------------- selective SSM (SSD)


def selective_scan(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                   D: jax.Array | None = None, initial_state: jax.Array | None = None,
                   segment_ids: jax.Array | None = None, mode: str = "chunked",
                   chunk_size: int = 64, impl: str = "auto",
                   interpret: bool | None = None, seq_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Mamba-2 selective SSM (SSD): ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = h_t C_t + D x_t``.

    Args:
      x: ``[batch, T, H, P]`` inputs (``H`` heads of ``P`` channels).
      dt: ``[batch, T, H]`` positive step sizes (after softplus); ``dt_t A`` is the log decay.
      A: ``[H]`` negative scalars (``-exp(A_log)`` in Mamba-2).
      B, C: ``[batch, T, G, N]`` input / output projections, ``H % G == 0``; heads
        ``g * H/G .. (g+1) * H/G - 1`` share group ``g`` (Mamba-2's ``repeat(B, "g n -> (g r) n")``).
      D: ``[H]`` skip connection or None.
      initial_state: ``[batch, H, P, N]`` state before ``t = 0`` (zeros if None).
      segment_ids: ``[batch, T]`` int, packed documents: the state is reset to zero before the
        first token of each new segment (``initial_state`` thus only reaches the first).
      mode: ``"chunked"`` or ``"recurrent"``.
      chunk_size: ``C`` for ``"chunked"``. ``T`` need not be a multiple: the tail is padded with
        ``x = dt = 0`` (decay ``exp(0) = 1``, no write: the state is unchanged) and the output sliced.
      impl: the chunk-to-chunk state pass of ``"chunked"``: ``"auto" | "xla" | "pallas" |
        "pallas_tpu"`` (:mod:`memjax.kernels.chunk_pass`, with ``K = N`` and ``V = P``); with
        ``"pallas_tpu"`` and one group or one per head, the whole chunked pass in one fused Mosaic
        kernel (:mod:`memjax.kernels.linear_fused_pallas_tpu`: ``dt x`` formed in VMEM, one
        group's B and C read once for all heads).
      interpret: run the Pallas kernel in interpret mode (CPU tests); only with ``impl="pallas"``
        or ``"pallas_tpu"``.
      seq_axis: sequence parallelism (:mod:`memjax.memory.sequence_parallel`): call inside
        ``jax.shard_map`` with time split over this mesh axis; the inputs are this device's
        slice, ``initial_state`` the state before the whole sequence; returns this slice's
        outputs and the whole sequence's final state. Chunked mode only.

    ``"chunked"`` is the SSD block decomposition: with ``G_i`` the in-chunk cumulative ``dt A``,
    ``L_ij = exp(G_i - G_j)`` for ``i >= j`` (masked to ``-inf`` *before* the exp, so no large
    cumulative sum is ever exponentiated), intra-chunk ``y = (C B^T * L) (dt x)`` as matmuls,
    each chunk's contribution to the state ``sum_j exp(G_last - G_j) dt_j x_j B_j^T``, and one
    state-passing step per chunk (:func:`memjax.kernels.chunk_pass`). No per-token state is
    stored.

    Returns ``(y [batch, T, H, P]`` in x's dtype, ``final_state [batch, H, P, N]`` float32, or
    float64 for float64 inputs). Dtypes follow :mod:`memjax.memory.contract`: x, B, C stay in
    their dtype for the matmuls (float32 accumulation); dt, A, the decays and the state are
    float32 (float64 for float64 inputs).
    """
    fn = "selective_scan"
    check_mode(fn, mode, SELECTIVE_MODES)
    check_chunk_size(fn, chunk_size)
    check_impl(fn, impl)
    b, t, h, p = check_sequence(fn, "x", x, "[batch, T, H, P]")
    check_gate(fn, "dt", dt, (b, t, h), "[batch, T, H]", required=True)
    check_gate(fn, "A", A, (h,), "[H]", required=True)
    g, n = check_shape(fn, "B", B, (b, t, None, None), "[batch, T, G, N]")[2:]
    check_floating(fn, "B", B)
    check_shape(fn, "C", C, (b, t, g, n), "[batch, T, G, N]")
    check_floating(fn, "C", C)
    if g == 0 or h % g:
        raise ValueError(f"{fn}: the number of heads H = {h} (x.shape[2]) must be divisible by the "
                         f"number of groups G = {g} (B.shape[2])")
    check_gate(fn, "D", D, (h,), "[H]")
    check_state(fn, initial_state, (b, h, p, n), "[batch, H, P, N]")
    check_segment_ids(fn, segment_ids, (b, t), "[batch, T]")
    check_seq_axis(fn, seq_axis, mode, ("chunked",))

    out_dtype = output_dtype(x)
    acc = state_dtype(x, dt, A, B, C, initial_state)
    md = operand_dtype(x, B, C)
    x, B, C = (v.astype(md) for v in (x, B, C))  # (a no-op unless x, B, C differ in dtype)
    dt, A = dt.astype(acc), A.astype(acc)
    s0 = jnp.zeros((b, h, p, n), acc) if initial_state is None else initial_state.astype(acc)
    # A non-finite token poisons only itself and the rest of its document (memjax.memory.nonfinite),
    # across shards under seq_axis.
    heads = lambda m: jnp.repeat(m, h // g, axis=2)  # [batch, T, G] -> [batch, T, H]
    writes = nonfinite.either(nonfinite.bad(x, 3), nonfinite.bad(dt, 3), heads(nonfinite.bad(B, 3)))
    mask = nonfinite.either(heads(nonfinite.bad(C, 3)), nonfinite.running(writes, segment_ids, axis_name=seq_axis))
    kernel = fused_kernel(impl, (b, t, h, n), p, md, chunk_size, interpret) \
        if mode == "chunked" and seq_axis is None and g in (1, h) else None
    dt = nonfinite.finite_or_zero(dt)
    if kernel is not None:  # the fused Mosaic kernel reads a non-finite x, B, C as 0 itself (no sanitised copy)
        y, s = _ssd_fused(x, dt, A, B, C, s0, segment_ids, chunk_size, kernel)
    else:
        x, B, C = (nonfinite.finite_or_zero(v) for v in (x, B, C))
        if mode == "recurrent":
            y, s = _ssd_recurrent(x, dt, A, B, C, s0, segment_resets(segment_ids))
        else:
            y, s = _ssd_chunked(x, dt, A, B, C, s0, segment_ids, chunk_size, impl=impl, interpret=interpret,
                                seq_axis=seq_axis)
    if D is not None:
        y = y.astype(acc) + D.astype(acc)[:, None] * nonfinite.finite_or_zero(x)
    return nonfinite.poison_outputs(y.astype(out_dtype), s, mask, seq_axis)


def _ssd_recurrent(x, dt, A, B, C, s0, resets):
    """Token-by-token scan; x, B, C enter in their dtype and are promoted inside the step."""
    h, g = x.shape[2], B.shape[2]
    acc = s0.dtype
    heads = lambda v: jnp.repeat(v, h // g, axis=1)  # [batch, G, N] -> [batch, H, N]

    def step(s, inp):
        xt, dtt, Bt, Ct, rt = inp
        xt, Bt, Ct = (v.astype(acc) for v in (xt, Bt, Ct))
        s = s * jnp.exp(dtt * A)[..., None, None]
        if rt is not None:
            s = jnp.where(rt[:, None, None, None], 0, s)
        s = s + (dtt[..., None] * xt)[..., :, None] * heads(Bt)[..., None, :]
        return s, jnp.einsum("bhpn,bhn->bhp", s, heads(Ct))

    tm = lambda v: None if v is None else jnp.swapaxes(v, 0, 1)
    s, y = jax.lax.scan(step, s0, (tm(x), tm(dt), tm(B), tm(C), tm(resets)))
    return jnp.swapaxes(y, 0, 1), s


def _ssd_fused(x, dt, A, B, C, s0, segment_ids, c, kernel):
    """SSD as linear attention with ``q = C``, ``k = B``, ``v = dt x``, ``g = dt A``, scale 1 and the
    state transposed (``[N, P]``), run by the fused Mosaic kernels
    (:func:`memjax.memory.linear_vjp.chunked_scalar_decay` with ``kernel``): ``dt x`` is formed in
    VMEM and one group's B, C are read once for all heads, so nothing the size of x is written
    besides y."""
    y, s = chunked_scalar_decay(C, B, x, dt * A, segment_resets(segment_ids), jnp.swapaxes(s0, -1, -2), 1.0, c,
                                kernel=kernel, w=dt)
    return y, jnp.swapaxes(s, -1, -2)


def _ssd_chunked(x, dt, A, B, C, s0, segment_ids, c, *, impl, interpret, seq_axis=None):
    t, h = x.shape[1:3]
    r = h // B.shape[2]  # heads per group
    acc, md = s0.dtype, x.dtype
    u = to_head_chunks(times_rows(x, dt), c)  # [b, H, Z, C, P]: the write, dt_t x_t (in x's dtype)
    Bc, Cc = to_head_chunks(B, c), to_head_chunks(C, c)  # [b, G, Z, C, N]
    # Padded entries of dt A are 0: no decay. Edge padding of the ids starts no segment.
    seg = None if segment_ids is None else to_chunks(sequence_resets(pad_time(segment_ids, c, mode="edge"), seq_axis), c)
    dec = head_chunk_decays(to_head_chunks(dt * A, c), seg, acc)

    # In linear-attention terms: q = C, k = B, v = dt x, state [N, P]. C B^T once per group, in
    # the inputs' dtype with `acc` accumulation; the decayed factors go back to that dtype as
    # operands of the chunk pass (see memjax.memory.contract). The group -> heads repeats, the
    # row scalings and the decay matrix have hand-written transposes (repeat_groups, times_rows,
    # pair_decays): autodiff's multiply-then-reduce there was most of XLA:CPU's backward time.
    scores = repeat_groups(jnp.einsum("bgzin,bgzjn->bgzij", Cc, Bc, preferred_element_type=acc), r) * dec.matrix
    qg = times_rows(repeat_groups(Cc, r), dec.from_start)
    ke = times_rows(repeat_groups(Bc, r), dec.to_end)
    y, s = sharded_chunk_recurrence(qg, scores.astype(md), u, ke, dec.chunk,
                                    jnp.swapaxes(s0, -1, -2), axis_name=seq_axis, impl=impl, interpret=interpret)
    return from_head_chunks(y, t), jnp.swapaxes(s, -1, -2)
