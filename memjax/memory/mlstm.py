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
    per row by ``m_i = max(b_i + m_prev, max_j D_ij)``; between chunks a ``lax.scan`` carries
    ``(C~, n~, m)`` (each chunk's own contribution is formed in parallel with its own stabiliser,
    the scan only rescales and adds). ``O(T L (K + V))`` work, ``T / L`` sequential steps.

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

from memjax.memory import nonfinite
from memjax.memory.contract import (check_chunk_size, check_gate, check_mode, check_qkv, check_scale,
                                    check_segment_ids, check_seq_axis, check_state, operand_dtype, output_dtype,
                                    resolve_scale, state_dtype)
from memjax.memory.sequence_parallel import fold_states, sequence_resets

MODES = ("chunked", "recurrent")

__all__ = ["MLSTMState", "MODES", "empty_state", "mlstm"]


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
          scale: float | None = None, seq_axis: str | None = None) -> tuple[jax.Array, MLSTMState]:
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

    out_dtype = output_dtype(q)
    cd = state_dtype(q, k, v, i, f, initial_state)
    scale = resolve_scale(scale, dk)

    # (memjax.memory.nonfinite; across shards under seq_axis)
    writes = nonfinite.either(nonfinite.bad(k, 3), nonfinite.bad(v, 3), nonfinite.bad(i, 3),
                              nonfinite.bad(f, 3))
    mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.running(writes, segment_ids, axis_name=seq_axis))
    q, k, v, i, f = (nonfinite.finite_or_zero(x) for x in (q, k, v, i, f))

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


def _pad_time(x, pad, value=0, mode="constant"):
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    if mode == "edge":
        return jnp.pad(x, widths, mode="edge")
    return jnp.pad(x, widths, constant_values=value)


def _chunked(q, k, v, ig, log_f, state, resets, scale, cd, L):
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

    qc, kc, vc = heads_chunks(q.astype(opd)), heads_chunks(k.astype(opd)), heads_chunks(v.astype(opd))
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
    carries = jnp.moveaxis(d_last == d_prev, 0, 1)  # [NC, B]: the state before the chunk reaches its end

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
    final, before = jax.lax.scan(step, state, (carries, cm(total), cm(c_loc), cm(n_loc), cm(m_loc)))
    c_prev, n_prev, m_prev = (jnp.moveaxis(x, 0, 2) for x in before)  # [B, H, NC, ...]

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
    num = num + inter[..., None] * jnp.einsum("bhcik,bhckv->bhciv", qc, c_prev.astype(opd),
                                              preferred_element_type=cd)
    den = den + inter * jnp.einsum("bhcik,bhck->bhci", qc.astype(cd), n_prev)
    y = _read(num, den, ms)  # [B, H, NC, L, V]
    y = jnp.moveaxis(y, 1, 3).reshape(b, nc * L, h, dv)[:, :t]
    return y, final


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
