"""The xLSTM matrix memory (mLSTM; Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory").

Per batch and head (``C_t in R^{K x V}``, ``n_t in R^K``; ``i_t, f_t`` scalar pre-activations)::

    C_t = sigmoid(f_t) C_{t-1} + exp(i_t) k'_t v_t^T        k'_t = scale * k_t  (scale = K ** -0.5)
    n_t = sigmoid(f_t) n_{t-1} + exp(i_t) k'_t
    h_t = C_t^T q_t / max(|n_t^T q_t|, 1)

The exponential input gate would overflow, so the state is kept *stabilised*: with the log
forget gate ``log f_t = log_sigmoid(f_t)`` (computed as such, never as ``log(sigmoid(.))``)::

    m_t = max(log f_t + m_{t-1}, i_t)
    C~_t = exp(log f_t + m_{t-1} - m_t) C~_{t-1} + exp(i_t - m_t) k'_t v_t^T      (n~ alike)
    h_t = C~_t^T q_t / max(|n~_t^T q_t|, exp(-m_t))

so ``C~_t = exp(-m_t) C_t`` and every exponent is ``<= 0`` (``i = 50`` or ``1e4`` is fine). The
output does not depend on which ``m`` is used (the ``exp(-m)`` cancels), so ``m`` is computed
under ``stop_gradient``: exact, and the backward pass never differentiates a ``max``. (Only a
loss that reads the returned ``m`` itself gets no gradient through it.)

State: ``(C, n, m)`` = :class:`MLSTMState` ``(C [B, H, K, V], n [B, H, K], m [B, H])``, float32
(float64 for float64 inputs), the stabilised ``C~, n~`` and their log scale ``m``.

**Empty-state convention**: an empty memory is ``(0, 0, m = -inf)``: the state before ``t = 0``
when ``initial_state is None``, and what a segment start resets to. With ``m = -inf`` the first
token's ``m_t = i_t`` exactly (no phantom term), which makes the chunked form's per-row
stabiliser a plain max over the tokens of the document. ``(0, 0, 0)`` (or any finite ``m`` with
zero ``C, n``) is an equally valid empty state with the same outputs; the final ``m`` is finite
whenever the sequence's last document has a finite ``i``.

Forms, one result:
  - ``"recurrent"``: token-by-token ``lax.scan`` (the decoding form).
  - ``"chunked"`` (training): chunks of ``L`` tokens (the "mLSTM kernels" / xLSTM-7B
    chunkwise form). Within a chunk the quadratic form with log-space cumulative forget gates
    ``b_i = sum_{s <= i} log f_s`` and weights ``D_ij = b_i - b_j + i_j`` (``j <= i``), stabilised
    per row by ``m_i = max(b_i + m_prev, max_j D_ij)``; each chunk's own contribution is formed
    in parallel with its own stabiliser, and the states before the chunks are a decay-weighted sum
    of those contributions, one matmul over the chunk index with no loop (:func:`_mix_chunks`:
    log weights ``m_loc_j + sum_{j < l <= e} log phi_l``, the stabiliser their row max, exactly
    what a chunk-to-chunk ``lax.scan`` carrying ``(C~, n~, m)`` computes) on accelerators, the scan
    on CPUs (:func:`mix_default`). ``O(T L (K + V) + (T / L)^2 K V)`` work. (Issue 17 item 4: the
    scan's carry goes through HBM at every chunk.)

Packed sequences: ``segment_ids [B, T]``; the state is reset to the empty state where the id
changes (``initial_state`` reaches only the first document).

Sequence parallelism (``seq_axis``, chunked mode; :mod:`memjax.memory.sequence_parallel`): the
state update is affine in ``(C, n)`` (the map from the incoming state is the scalar
``prod sigmoid(f)`` since the shard's last document start), but the read's normaliser
``max(|n^T q|, 1)`` is not linear in it. So each shard runs its chunked pass from the empty state,
the shards fold their final states in the stabilised form (``m = max(log phi + m_in, m_loc)``, as
the chunk-to-chunk scan does), and each shard runs its pass again from its incoming state: twice
the local work, one ``all_gather`` of ``B H (K V + K + 2)`` numbers per shard.

Non-finite inputs (:mod:`memjax.memory.nonfinite`): a NaN / inf in ``k``, ``v``, ``i`` or ``f``
poisons that head's outputs to the end of its document, in ``q`` only that token's output.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from memjax.kernels.chunk_pass import as_operand
from memjax.kernels.platform import target_platform
from memjax.memory import nonfinite
from memjax.memory.chunking import chunk_span_sums
from memjax.memory.contract import (check_chunk_size, check_gate, check_impl, check_mode, check_qkv, check_scale,
                                    check_segment_ids, check_seq_axis, check_state, operand_dtype, output_dtype,
                                    resolve_scale, state_dtype)
from memjax.memory.mlstm_kernel import chunked_mlstm_kernel, mlstm_kernel
from memjax.memory.sequence_parallel import fold_states, sequence_resets

MODES = ("chunked", "recurrent")

__all__ = ["MODES", "MLSTMState", "empty_state", "mix_default", "mlstm"]


class MLSTMState(NamedTuple):
    """The stabilised mLSTM state: ``C~ [B, H, K, V]``, ``n~ [B, H, K]``, ``m [B, H]`` (float32)."""

    C: jax.Array
    n: jax.Array
    m: jax.Array


def empty_state(batch: int, heads: int, dk: int, dv: int, dtype=jnp.float32) -> MLSTMState:
    """The empty memory ``(0, 0, -inf)`` (see the module docstring)."""
    return MLSTMState(jnp.zeros((batch, heads, dk, dv), dtype), jnp.zeros((batch, heads, dk), dtype),
                      jnp.full((batch, heads), -jnp.inf, dtype))


def _finite_or_zero(m):
    """``m`` with ``-inf`` (an empty state's scale) replaced by 0: what an exponent subtracts."""
    return jnp.where(jnp.isneginf(m), jnp.zeros((), m.dtype), m)


def _read(num, den, m):
    """``num / max(|den|, exp(-m))`` with ``num [..., V]``, ``den, m [...]``.

    The divisor is floored at the smallest normal float (it only matters past ``m ~ 87`` in
    float32, where ``exp(-m)`` underflows: a padded or all-zero query would divide 0 by 0), and
    the quotient is differentiated as ``(dnum - out * ddenom) / denom``: JAX's own rule forms
    ``denom ** 2``, which underflows to 0 for ``denom < 1e-19`` (``m > 44``) and gives NaN."""
    floor = jnp.finfo(den.dtype).tiny
    denom = jnp.maximum(jnp.maximum(jnp.abs(den), jnp.exp(-m)), floor)
    return _quotient(num, denom[..., None])


@jax.custom_jvp
def _quotient(num, denom):
    return num / denom


@_quotient.defjvp
def _quotient_jvp(primals, tangents):
    (num, denom), (dnum, ddenom) = primals, tangents
    out = num / denom
    return out, (dnum - out * ddenom) / denom


def mlstm(q: jax.Array, k: jax.Array, v: jax.Array, i: jax.Array, f: jax.Array, *, initial_state=None,
          segment_ids: jax.Array | None = None, mode: str = "chunked", chunk_size: int = 64,
          scale: float | None = None, impl: str = "auto", interpret: bool | None = None,
          seq_axis: str | None = None) -> tuple[jax.Array, MLSTMState]:
    """The mLSTM memory (see the module docstring for the equations and conventions).

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      i, f: ``[B, T, H]`` pre-activations of the input gate (``exp(i)``) and the forget gate
        (``sigmoid(f)``, used as ``log_sigmoid(f)``).
      initial_state: ``(C [B, H, K, V], n [B, H, K], m [B, H])``, the stabilised state before
        ``t = 0`` (e.g. a previous call's final state); None: the empty state ``(0, 0, -inf)``.
      segment_ids: ``[B, T]`` int; the state resets to the empty state where the id changes.
      mode: ``"chunked"`` or ``"recurrent"``.
      chunk_size: chunk length of the chunked form (``T`` need not be a multiple).
      scale: scalar multiplying ``k`` (the write), default ``K ** -0.5``.
      impl: ``"auto" | "xla" | "pallas_tpu"``: ``"pallas_tpu"`` runs the whole chunked pass (no
        ``seq_axis``) as one fused Mosaic kernel each way
        (:mod:`memjax.kernels.mlstm_fused_pallas_tpu`); ``"auto"`` takes it only on a TPU where it
        has passed its hardware tests, else the XLA form.
      interpret: run the Pallas kernel in interpret mode (CPU tests).
      seq_axis: sequence parallelism (chunked mode; see the module docstring): call inside
        ``jax.shard_map`` with time split over this mesh axis; the inputs are this device's slice,
        ``initial_state`` the state before the whole sequence; returns this slice's outputs and the
        whole sequence's final state. Non-finite inputs poison the single-device positions.

    Returns ``(h [B, T, H, V]`` in q's dtype, :class:`MLSTMState` ``(C, n, m))``.
    """
    fn = "mlstm"
    check_mode(fn, mode, MODES)
    check_chunk_size(fn, chunk_size)
    check_scale(fn, scale)
    b, t, h, dk, dv = check_qkv(fn, q, k, v)
    check_gate(fn, "i", i, (b, t, h), required=True)
    check_gate(fn, "f", f, (b, t, h), required=True)
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 3:
            raise ValueError(f"{fn}: initial_state must be a (C, n, m) triple, got {type(initial_state).__name__}")
        check_state(fn, initial_state[0], (b, h, dk, dv), "[B, H, K, V]", name="initial_state C")
        check_state(fn, initial_state[1], (b, h, dk), "[B, H, K]", name="initial_state n")
        check_state(fn, initial_state[2], (b, h), "[B, H]", name="initial_state m")
    check_segment_ids(fn, segment_ids, (b, t))
    check_seq_axis(fn, seq_axis, mode, ("chunked",))
    check_impl(fn, impl)
    if impl == "pallas":
        raise ValueError(f"{fn}: impl='pallas' (the GPU chunk-pass kernel) is not available for the mLSTM; "
                         "use 'auto', 'xla' or 'pallas_tpu'")

    out_dtype = output_dtype(q)
    cd = state_dtype(q, k, v, i, f, initial_state)
    scale = resolve_scale(scale, dk)

    # (memjax.memory.nonfinite; across shards under seq_axis)
    writes = nonfinite.either(nonfinite.bad(k, 3), nonfinite.bad(v, 3), nonfinite.bad(i, 3),
                              nonfinite.bad(f, 3))
    mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.running(writes, segment_ids, axis_name=seq_axis))
    # q, k, v: the chunked form zeroes their non-finite entries after its chunk reshape, where the
    # select fuses into the matmuls that read them (a sanitised copy here is written and read again)
    i, f = (nonfinite.finite_or_zero(x) for x in (i, f))
    if mode == "recurrent":
        q, k, v = (nonfinite.finite_or_zero(x) for x in (q, k, v))

    log_f = jax.nn.log_sigmoid(f.astype(cd))
    ig = i.astype(cd)
    if initial_state is None:
        state = empty_state(b, h, dk, dv, cd)
    else:
        state = MLSTMState(*(x.astype(cd) for x in initial_state))
    resets = sequence_resets(segment_ids, seq_axis)  # (a shard's first token too, under seq_axis)
    if mode == "recurrent":
        y, final = _recurrent(q, k, v, ig, log_f, state, resets, scale, cd)
    elif seq_axis is None:
        kernel = mlstm_kernel(impl, (b, t, h, dk), dv, operand_dtype(q, k, v), chunk_size, interpret)
        if kernel is not None:  # the whole chunked pass in one Mosaic kernel each way (the state in VMEM)
            y, (c_f, n_f, m_f) = chunked_mlstm_kernel(q, k, v, ig, log_f, *state, resets, scale, chunk_size, kernel)
            final = MLSTMState(c_f, n_f, m_f)
        else:
            y, final = _chunked(q, k, v, ig, log_f, state, resets, scale, cd, min(chunk_size, t))
    else:
        y, final = _sharded(q, k, v, ig, log_f, state, resets, scale, cd, min(chunk_size, t), seq_axis)
    return nonfinite.poison_outputs(y.astype(out_dtype), final, mask, seq_axis)


# ----------------------------------------------------------------------------- recurrent


def _recurrent(q, k, v, ig, log_f, state, resets, scale, cd):
    b, t, h, dk = q.shape

    def step(carry, xs):
        c, n, m = carry
        qt, kt, vt, it, ft, rt = xs
        if rt is not None:
            c = jnp.where(rt[:, None, None, None], 0.0, c)
            n = jnp.where(rt[:, None, None], 0.0, n)
            m = jnp.where(rt[:, None], -jnp.inf, m)
        m_new = jax.lax.stop_gradient(jnp.maximum(ft + m, it))
        ms = _finite_or_zero(m_new)
        decay = jnp.exp(ft + m - ms)  # 0 for an empty state (m = -inf)
        write = jnp.exp(it - ms) * scale
        kt, vt, qt = kt.astype(cd), vt.astype(cd), qt.astype(cd)
        c = decay[..., None, None] * c + (write[..., None] * kt)[..., :, None] * vt[..., None, :]
        n = decay[..., None] * n + write[..., None] * kt
        num = jnp.einsum("bhkv,bhk->bhv", c, qt)
        den = jnp.einsum("bhk,bhk->bh", n, qt)
        return MLSTMState(c, n, m_new), _read(num, den, ms)

    tm = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)  # noqa: E731
    final, y = jax.lax.scan(step, state, (tm(q), tm(k), tm(v), tm(ig), tm(log_f), tm(resets)))
    return jnp.swapaxes(y, 0, 1), final


# ----------------------------------------------------------------------------- chunked


def mix_default() -> bool:
    """Whether the chunked form finds the states before its chunks by the loop-free mixing
    (:func:`_mix_chunks`) rather than a chunk-to-chunk scan: on accelerators, where the scan's
    carry goes through HBM at every chunk (XLA's TPU cost model at B=8 T=4096 H=16 K=V=128 bf16:
    forward 12.2x -> 10.2x its io, forward + backward 20.2x -> 17.6x, with the other changes of
    that step). XLA:CPU runs the scan faster (measured 7-18% less CPU time for the mixing's
    forward + backward at T=4096, B=1, H=4, K=V=64), so the CPU keeps it."""
    return target_platform() != "cpu"


def _pad_time(x, pad, value=0, mode="constant"):
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    if mode == "edge":
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


def _chunked(q, k, v, ig, log_f, state, resets, scale, cd, L, mix=None):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    nc = -(-t // L)
    pad = nc * L - t
    opd = operand_dtype(q, k, v)
    sg = jax.lax.stop_gradient
    neg = jnp.asarray(-jnp.inf, cd)

    # documents: d counts the resets up to t (0 at t = 0: initial_state belongs to document 0)
    d = jnp.zeros((b, t), jnp.int32) if resets is None else jnp.cumsum(resets, axis=1, dtype=jnp.int32)
    d = _pad_time(d, pad, mode="edge").reshape(b, nc, L)
    valid = (jnp.arange(nc * L) < t).reshape(nc, L)
    d_prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), d[:, :-1, -1]], axis=1)  # [B, NC]

    def heads_chunks(x):  # [B, T, H, ...] -> [B, H, NC, L, ...]
        x = _pad_time(x, pad).reshape(b, nc, L, h, *x.shape[3:])
        return jnp.moveaxis(x, 3, 1)

    qc, kc, vc = (nonfinite.finite_or_zero(heads_chunks(x.astype(opd))) for x in (q, k, v))
    igc, lfc = heads_chunks(ig), heads_chunks(log_f)  # [B, H, NC, L]
    cum = jnp.cumsum(lfc, axis=-1)  # b_i: log forget from the chunk start through token i

    # within-chunk weights D_ij = b_i - b_j + i_j (j <= i, same document)
    causal = jnp.tril(jnp.ones((L, L), bool))
    same = (d[:, :, :, None] == d[:, :, None, :]) & causal & valid[:, None, :]  # [B, NC, L, L]
    dmat = jnp.where(same[:, None], cum[..., :, None] - cum[..., None, :] + igc[..., None, :], neg)

    # each chunk's own contribution to the state at its end, with its own stabiliser m_loc
    total = cum[..., -1]  # [B, H, NC]
    d_last = d[:, :, -1]  # [B, NC]
    in_last = (d == d_last[..., None]) & valid  # [B, NC, L]
    a = jnp.where(in_last[:, None], total[..., None] - cum + igc, neg)  # [B, H, NC, L]
    m_loc = sg(jnp.max(a, axis=-1))
    w = jnp.exp(a - _finite_or_zero(m_loc)[..., None]) * scale  # [B, H, NC, L]
    c_loc = jnp.einsum("bhclk,bhclv->bhckv", (kc * w[..., None]).astype(opd), vc,
                       preferred_element_type=cd)
    n_loc = jnp.einsum("bhcl,bhclk->bhck", w, kc.astype(cd))
    carries = d_last == d_prev  # [B, NC]: the state before the chunk reaches its end

    if mix is None:
        mix = mix_default()
    if mix:
        (c_prev, n_prev, m_prev), final = _mix_chunks(state, carries, total, as_operand(c_loc, qc), n_loc, m_loc,
                                                      opd)
    else:
        def step(carry, xs):
            c, n, m = carry
            ok, tot, cl, nl, ml = xs
            m_e = jnp.where(ok[:, None], tot + m, -jnp.inf)
            m_new = sg(jnp.maximum(m_e, ml))
            ms = _finite_or_zero(m_new)
            fa, fb = jnp.exp(m_e - ms), jnp.exp(ml - ms)
            c_new = fa[..., None, None] * c + fb[..., None, None] * cl
            n_new = fa[..., None] * n + fb[..., None] * nl
            return MLSTMState(c_new, n_new, m_new), carry

        cm = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731  [B, H, NC, ...] -> [NC, B, H, ...]
        final, before = jax.lax.scan(step, state, (jnp.moveaxis(carries, 0, 1), cm(total), cm(c_loc), cm(n_loc),
                                                   cm(m_loc)))
        c_prev, n_prev, m_prev = (jnp.moveaxis(x, 0, 2) for x in before)  # [B, H, NC, ...]
        c_prev = c_prev.astype(opd)

    # rows: the carried state (if token i is still in the chunk's first document) and the chunk
    reach = (d == d_prev[..., None])[:, None]  # [B, 1, NC, L]
    e = jnp.where(reach, cum + m_prev[..., None], neg)  # [B, H, NC, L]
    m_row = sg(jnp.maximum(e, jnp.max(dmat, axis=-1)))
    ms = _finite_or_zero(m_row)
    p = jnp.exp(dmat - ms[..., None]) * scale  # [B, H, NC, L, L]
    s = jnp.einsum("bhcik,bhcjk->bhcij", qc, kc, preferred_element_type=cd) * p
    num = jnp.einsum("bhcij,bhcjv->bhciv", s.astype(opd), vc, preferred_element_type=cd)
    den = jnp.sum(s, axis=-1)
    inter = jnp.exp(e - ms)  # [B, H, NC, L]
    # (the state term rounded to the operand dtype before the sum: XLA writes one of the two
    # products to HBM, and a bf16 one is half the bytes; the output is in that dtype anyway)
    num = num + inter[..., None] * as_operand(jnp.einsum("bhcik,bhckv->bhciv", qc, c_prev, preferred_element_type=cd),
                                              qc).astype(cd)
    den = den + inter * jnp.einsum("bhcik,bhck->bhci", qc.astype(cd), n_prev)
    y = _read(num, den, ms)  # [B, H, NC, L, V]
    y = jnp.moveaxis(y, 1, 3).reshape(b, nc * L, h, dv)[:, :t]
    return y, final


def _mix_chunks(state: MLSTMState, carries, total, c_loc, n_loc, m_loc, opd):
    """The states before every chunk and the final state, as the chunk-to-chunk scan would carry them,
    with no loop: one matmul over the chunk index (a chunk-level analogue of the intra-chunk form).

    Items ``X_{-1} = (C~_0, n~_0, m_0)`` (the incoming state) and ``X_j = (c_loc_j, n_loc_j, m_loc_j)``
    (chunk ``j``'s own contribution, in its own scale) enter the state after chunk ``e`` with the log
    weight ``E[e, j] = m_j + sum_{j < l <= e} log phi_l`` (``j <= e``), where ``log phi_l`` is chunk ``l``'s
    total log forget gate, ``-inf`` where a document starts in it. The scan's stabiliser is then
    ``m_e = max_j E[e, j]`` (unrolling ``m_e = max(log phi_e + m_{e-1}, m_loc_e)``) and its state
    ``C~_e = sum_j exp(E[e, j] - m_e) C_j`` (under ``stop_gradient`` for ``m`` as there). Each
    exponent's sum runs over only the chunks between ``j`` and ``e`` (a reverse cumulative sum per
    row, every term ``<= 0``), not a difference of prefix sums over the whole sequence.

    ``carries [B, NC]`` bool, ``total, m_loc [B, H, NC]``, ``c_loc [B, H, NC, K, V]`` (in the operand
    dtype for 16-bit inputs: one rounding, as the stored states get anyway; the mixing accumulates
    in float32, the incoming state is added in float32), ``n_loc [B, H, NC, K]``.
    Returns ``((C [B, H, NC, K, V]`` in ``opd``, ``n [B, H, NC, K], m [B, H, NC])`` before each
    chunk, the final :class:`MLSTMState`)``."""
    cd = total.dtype
    nc = total.shape[-1]
    # extended index: position p stands for chunk p - 1 (0: the incoming state); span: sum over j < l <= e
    span, lower = chunk_span_sums(jnp.where(carries[:, None], total, -jnp.inf))
    scales = jnp.concatenate([state.m[..., None], m_loc], axis=-1)  # [B, H, NC + 1]
    live = lower & (span > -jnp.inf) & (scales[..., None, :] > -jnp.inf)
    e = jnp.where(live, span + scales[..., None, :], -jnp.inf)
    m_row = jax.lax.stop_gradient(jnp.max(e, axis=-1))  # [B, H, NC + 1]
    ms = _finite_or_zero(m_row)
    w = jnp.exp(jnp.where(live, e - ms[..., None], -jnp.inf))  # 0 where not live (no gradient through it)
    highest = jax.lax.Precision.HIGHEST  # the state accumulates in float32 (TPUs' default would round to bf16)
    c_loc = c_loc.astype(cd)
    # the states before the chunks (rows 0 .. NC-1, read in the operand dtype) and the final one
    # (row NC, float32) as two products: a slice of one float32 result would be written in full
    mix = lambda rows: (jnp.einsum("bhej,bhjkv->bhekv", w[..., rows, 1:], c_loc, precision=highest)
                        + w[..., rows, 0, None, None] * state.C[:, :, None])
    c_prev, c_final = mix(slice(0, nc)).astype(opd), mix(slice(nc, nc + 1))[:, :, 0]
    n = jnp.einsum("bhej,bhjk->bhek", w[..., 1:], n_loc, precision=highest) + w[..., 0, None] * state.n[:, :, None]
    final = MLSTMState(c_final, n[:, :, -1], m_row[..., -1])
    return (c_prev, n[:, :, :-1], m_row[..., :-1]), final


# ----------------------------------------------------------------------------- sequence parallel


def _combine(log_phi, s_in: MLSTMState, s_loc: MLSTMState) -> MLSTMState:
    """The state after a shard: ``phi S_in + S_loc`` in the stabilised form (``log_phi [B, H]`` the log
    of the shard's forget-gate product, ``-inf`` when a document starts in it), as the chunk scan."""
    m_e = log_phi + s_in.m
    m_new = jax.lax.stop_gradient(jnp.maximum(m_e, s_loc.m))
    ms = _finite_or_zero(m_new)
    fa, fb = jnp.exp(m_e - ms), jnp.exp(s_loc.m - ms)
    return MLSTMState(fa[..., None, None] * s_in.C + fb[..., None, None] * s_loc.C,
                      fa[..., None] * s_in.n + fb[..., None] * s_loc.n, m_new)


def _sharded(q, k, v, ig, log_f, state, resets, scale, cd, L, axis_name):
    """The chunked form with time split over ``axis_name`` (module docstring): a pass from the empty
    state, the fold of the shards' states, a pass from this shard's incoming state."""
    b, _, h, dk = q.shape
    varying = lambda st: MLSTMState(*(x if axis_name in jax.typeof(x).mat.varying
                                      else jax.lax.pcast(x, (axis_name,), to="varying") for x in st))
    _, s_loc = _chunked(q, k, v, ig, log_f, varying(empty_state(b, h, dk, v.shape[-1], cd)), resets, scale, cd, L)
    log_phi = jnp.sum(log_f, axis=1)  # [B, H]
    if resets is not None:  # a document starts in this shard (its first token included)
        log_phi = jnp.where(jnp.any(resets, axis=1)[:, None], -jnp.inf, log_phi)
    s_in, final = fold_states(state, s_loc, log_phi, _combine, axis_name)
    y, _ = _chunked(q, k, v, ig, log_f, varying(s_in), resets, scale, cd, L)
    return y, final
