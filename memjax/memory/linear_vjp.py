"""Chunked linear attention with a per-head scalar decay (or none), with a hand-written VJP that
moves few HBM bytes.

Recurrence (per batch and head; ``S_t in R^{K x V}``; Katharopoulos et al. 2020, and with a
scalar ``g`` RetNet / Lightning Attention / simple GLA, Yang et al. 2024)::

    S_t = exp(g_t) S_{t-1} + k_t v_t^T          o_t = scale * S_t^T q_t

with the state zeroed before token ``t``'s update where ``resets[t]`` (a segment start, or a full
decay ``exp(g_t) = 0``).

Chunked form (chunks of ``C`` tokens, ``S_n`` the state before chunk ``n``, ``G`` the cumulative
``g`` within the chunk, restarted at every reset; every factor below is masked to zero across a
reset, and every exponent is ``<= 0``)::

    D_ij = exp(G_i - G_j) [j <= i]     alpha_i = exp(G_i)     beta_j = exp(G_last - G_j)     a_n = exp(G_last)
    O_n     = scale * (alpha Q_n) S_n + scale * ((Q_n K_n^T) * D) V_n
    S_{n+1} = a_n S_n + (beta K_n)^T V_n

Why a custom VJP (issue 17 item 4): under JAX's autodiff of the chunk scan the program keeps the
per-chunk writes ``(beta K_n)^T V_n`` as a float32 ``[B, H, N, K, V]`` stack and the states
before every chunk in float32, and its backward forms more of them (XLA's TPU cost model: 5.8x the
input + output bytes forward, 9.4x forward + backward at ``B=8 T=4096 H=16 K=V=128`` bf16, with
the caveat below).
Here the forward saves only its inputs, the gates and the chunk-start states in the operand
dtype (bf16 for bf16 inputs: what the output matmul reads anyway), and the backward is itself a
reverse chunked pass, over the state's cotangent ``dS``::

    H_n  = dS_{n+1}:  H_{N-1} = dS_final,  H_{n-1} = a_n H_n + scale (alpha Q_n)^T dO_n,  dS_0 = H_{-1}
    dV_n = P_n^T dO_n + (beta K_n) H_n                         P_n = scale (Q_n K_n^T) * D
    dQ_n = scale alpha (dO_n S_n^T) + dP_n K_n                 dP_n = scale (dO_n V_n^T) * D
    dK_n = beta (V_n H_n^T) + dP_n^T Q_n

and the decay's gradient needs no ``[C, C]`` or state-sized product of its own: with
``Lambda_t = sum_{s <= t} g_s``, every term of ``o_t`` carries ``exp(Lambda_t - Lambda_s)`` and
every term of the final state ``exp(Lambda_T - Lambda_s)``, so (the gradient identity
flash-linear-attention uses for its scalar gates)::

    dL/dLambda_t = q_t . dq_t - k_t . dk_t  (+ <dS_T, S_T> at t = T)
    dg_s         = sum_{t >= s, same segment} dL/dLambda_t       (0 at a reset: g there multiplies a zeroed state)

Three ways to run the chunks, one result up to round-off:

  - ``fused=True`` (TPUs): one ``lax.scan`` step per chunk does all of that chunk's work,
    forward (scores, output, state update) and backward (the reverse pass above, with the
    gradients of q, k, v). The inputs are read in place (a reshape, no transposed or sanitised
    copy), the state is the scan carry, and the outputs are written chunk by chunk into
    ``[B, T, H, .]`` buffers: no ``[B, H, N, K, V]`` stack of per-chunk writes is ever formed.
  - ``fused=False``: the chunks' parallel work as batched matmuls over all chunks, and the
    chunk-start states with no loop at all (``mix=True``, the default) or by a scan that only
    carries the state (``mix=False``). With a per-head decay the states before the chunks are a
    lower-triangular, decay-weighted sum of the chunks' own writes ``dS_m = (beta K_m)^T V_m``,
    a batched matmul over the chunk index (``N + 1`` items: ``S_0`` first)::

        S_n = W[n-1, -1] S_0 + sum_{m < n} W[n-1, m] dS_m        W[e, m] = exp(sum_{m < l <= e} log a_l)  (m <= e)

    with ``log a_l = -inf`` for a chunk holding a reset (the weight is then exactly 0), each
    exponent its own sum of the chunk log decays between ``m`` and ``e`` (a reverse cumulative
    sum per row, every term ``<= 0``; not a difference of whole-sequence prefix sums, which would
    lose float32 digits after a long stretch of strong decay), masked before the ``exp``. The
    backward pass's ``H_m`` is the transpose: ``H_m = sum_{e >= m} W[e, m] Y_e`` with ``Y_e`` the
    cotangent reaching the state after chunk ``e`` (``scale (alpha Q_{e+1})^T dO_{e+1}``, or
    ``dS_final`` for the last). The scan's carry went through HBM at every chunk (XLA:TPU: a
    float32 ``[B, H, K, V]`` read and written per chunk, ~1.07 GB per pass at ``B=8 T=4096 H=16
    K=V=128``, chunk 64); the mixing reads the ``dS`` stack once and writes the states once.
    The per-chunk writes enter the mixing in the operand dtype (bf16 for bf16 inputs: one
    rounding, as the stored states get anyway), the mixing accumulates in float32 and the
    initial state (or ``dS_final``) is added in float32.

  - ``kernel=("pallas_tpu", interpret)``: the fused form as two Mosaic kernels
    (:mod:`memjax.kernels.linear_fused_pallas_tpu`), the state (and the backward's ``H_n`` and the
    decay gradient's running sum) in VMEM, the gate sums formed in the kernel: HBM sees each
    input read once and each output written once, plus the chunk-start states in the operand
    dtype (:func:`fused_kernel` decides when).

:func:`fused_default` picks by platform (fused on TPUs only, and there only with a gate: without
one the batched form with the mixing moves fewer bytes). A caveat on how the bytes were measured:
XLA's cost model (``benchmarks/tpu_cost.py``) counts a while loop's body once, not once per
iteration (checked: a 64-step scan over a 134 MB stack reports 10 MB), so any scan-based form
reads low there unless corrected (the ``corrected ratio`` of that benchmark adds the missing
iterations); the mixing has no loop to correct.

Dtypes: q, k, v keep their dtype as matmul operands (bf16 inputs: bf16 operands, float32
accumulation); decays, the carried state and its cotangent stay float32 (float64 for float64
inputs); the chunk-start states and ``H_n`` are stored in the operand dtype for the matmuls that
read them (as :func:`memjax.kernels.chunk_pass.as_operand` rounds them). Non-finite entries of
q, k, v are read as 0 where they are read (a ``where`` before any product; no sanitised copy is
written) and get a zero gradient; the caller poisons the outputs (:mod:`memjax.memory.nonfinite`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.kernels import linear_fused_pallas_tpu as fused_tpu
from memjax.kernels.chunk_pass import as_operand, fused_choice
from memjax.kernels.manual_axes import over_batch
from memjax.kernels.platform import target_platform
from memjax.memory import nonfinite
from memjax.memory.chunking import chunk_span_sums, from_chunks, masked_exp, pad_time, to_chunks
from memjax.memory.segments import segment_cumsum

__all__ = ["chunked_scalar_decay", "fused_default", "fused_kernel"]


def fused_kernel(impl: str, q_shape, v_dim: int, dtype, chunk_size: int,
                 interpret: bool | None) -> tuple[str, bool] | None:
    """The ``kernel`` argument of :func:`chunked_scalar_decay` for a call with ``impl``
    (:func:`memjax.kernels.chunk_pass.fused_choice` with the fused kernel's ``supports``)."""
    return fused_choice(impl, q_shape, v_dim, dtype, chunk_size, interpret, fused_tpu.supports)


def fused_default() -> bool:
    """Whether the chunked pass of a *gated* call runs fused (one scan step per chunk doing all of
    its work) on the target platform: on TPUs, where its case is HBM bytes (see the module
    docstring). Without a gate the batched form with the loop-free state pass moves fewer bytes
    on TPUs too (:func:`chunked_scalar_decay` picks it). On GPUs the batched form stays the
    default, being the one whose speed was measured on an H100 (the fused one has not run on a
    GPU yet); XLA:CPU runs the batched form faster."""
    return target_platform() == "tpu"


def chunked_scalar_decay(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None, resets: jax.Array | None,
                         s0: jax.Array, scale: float, chunk_size: int, *,
                         fused: bool | None = None, mix: bool = True,
                         kernel: tuple[str, bool] | None = None,
                         w: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The chunked form of the module docstring, differentiated by its hand-written VJP.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``; one floating dtype. Non-finite entries are read
        as 0 and get a zero gradient (the caller poisons the outputs: :mod:`memjax.memory.nonfinite`).
      g: ``[B, T, H]`` log decays in the state's dtype, finite (a full decay is passed as a reset
        with ``g = 0`` there), or None (no decay).
      resets: ``[B, T, H]`` or ``[B, T]`` bool, the state is zeroed before token ``t``'s update
        where True (``t = 0`` too: then ``s0`` is dropped), or None.
      s0: ``[B, H, K, V]`` initial state, float32 or float64 (the accumulation dtype).
      scale: read scale. chunk_size: ``C``; ``T`` is padded to a multiple with zeros.
      fused: one scan step per chunk doing all its work (True) or batched matmuls over all chunks
        (False); see the module docstring. None: :func:`fused_default` with a gate, batched
        without one.
      mix: in the batched form, the chunk-start states (and the backward pass's state cotangents)
        as one matmul over the chunk index, no loop (True), or by a scan that carries the state
        (False). One result up to round-off.
      kernel: ``("pallas_tpu", interpret)`` runs forward and backward as the fused Mosaic kernels
        of :mod:`memjax.kernels.linear_fused_pallas_tpu` (the whole chunked pass in one kernel,
        the state in VMEM; ``fused`` and ``mix`` are then unused), None the XLA forms.
      w: ``[B, T, H]`` finite per-token factor of the values (the write is ``k_t (w_t v_t)^T``:
        Mamba-2's ``dt_t x_t``), or None. With it q and k may have one head shared by all of v's
        (``[B, T, 1, K]``: Mamba-2 with one group). The kernel applies both in VMEM; the XLA forms
        take ``w v`` and the repeated heads as inputs.

    Returns ``(o [B, T, H, V]`` in q's dtype, ``S_T [B, H, K, V]`` in s0's dtype).
    """
    b, t, _, _ = q.shape
    h = v.shape[2]
    if kernel is None and w is not None:  # the XLA forms: the product and the repeat by autodiff
        v = (v * w[..., None].astype(v.dtype)).astype(v.dtype)
        w = None
    if kernel is None and q.shape[2] != h:
        q, k = (jnp.repeat(x, h // x.shape[2], axis=2) for x in (q, k))
    if fused is None:  # (XLA's TPU cost model at B=8 T=4096 H=16 K=V=128, bf16: without a gate the
        # batched form with the mixing moves 5.7x its io forward, 9.2x forward + backward, the fused
        # one 6.6x / 9.5x; with a scalar gate the fused one 7.6x / 12.0x, the batched 8.0x / 13.2x)
        fused = g is not None and fused_default()
    # time-major chunks [B, N, C, H, .]: a reshape of the inputs (no transposed copy)
    chunks = lambda x: None if x is None else to_chunks(pad_time(x, chunk_size), chunk_size)
    if resets is not None:  # padded with False: the tail starts no segment
        resets = resets if resets.ndim == 3 else jnp.broadcast_to(resets[..., None], (b, t, h))
    # g padded with 0 and q = k = v = 0: the tail leaves the state unchanged
    core = lambda *xs: _core(*xs, float(scale), bool(fused), bool(mix), kernel)  # noqa: E731
    if kernel is not None:  # a Mosaic call in a sharded program runs per device (shard_map over the batch)
        core = over_batch(core, b, check_vma=not kernel[1])
    o, s = core(chunks(q), chunks(k), chunks(v), chunks(g), chunks(resets), chunks(w), s0)
    return from_chunks(o)[:, :t], s


def _gate_sums(gc, rc, dtype):
    """``(G, r)`` ``[B, N, C, H]``: the cumulative ``g`` within each chunk, restarted at every
    reset, and the number of resets up to each position (None where there is no gate / no
    reset)."""
    if gc is None and rc is None:
        return None, None
    g = jnp.zeros(rc.shape, dtype) if gc is None else gc.astype(dtype)
    if rc is None:
        return jnp.cumsum(g, axis=2), None
    # restarted at every reset: a sum never mixes two segments' gates (nor their round-off)
    return segment_cumsum(g, rc, axis=2), jnp.cumsum(rc.astype(jnp.int32), axis=2)


class _Decays:
    """The masked decay factors of a chunk (or a stack of chunks) from its ``(G, r)``
    (:func:`_gate_sums`; ``[..., C]``): ``D [..., C, C]``, ``alpha``, ``beta [..., C]`` and
    ``a [...]``; None stands for ones (no gate and no reset)."""

    def __init__(self, G, r, c):
        causal = jnp.tril(jnp.ones((c, c), bool))
        self.mask = causal if r is None else causal & (r[..., :, None] == r[..., None, :])
        if G is None:
            self.D = self.alpha = self.beta = self.a = self.log_a = None
            return
        r = jnp.zeros(G.shape, jnp.int32) if r is None else r
        self.D = masked_exp(G[..., :, None] - G[..., None, :], self.mask)
        self.alpha = masked_exp(G, r == 0)
        self.beta = masked_exp(G[..., -1:] - G, r == r[..., -1:])
        self.a = masked_exp(G[..., -1], r[..., -1] == 0)
        # log a: -inf for a chunk holding a reset (the state before it does not reach its end)
        self.log_a = jnp.where(r[..., -1] == 0, G[..., -1], -jnp.inf)

    def intra(self, x, scale):
        """``scale * x * D`` for scores ``x [..., C, C]``: exact zeros outside the mask (the select
        comes after the product, so no value outside it reaches a kept entry or a gradient)."""
        return jnp.where(self.mask, x * (scale if self.D is None else self.D * scale), 0.0)

    @staticmethod
    def weigh(x, w):
        """``x [..., C, D]`` times a per-position factor ``w [..., C]`` (None: ones)."""
        return x if w is None else x * w[..., None]

    def decay(self, s):
        """``a * s`` for states ``s [..., K, V]``."""
        return s if self.a is None else self.a[..., None, None] * s


def _finite(*xs):
    return tuple(nonfinite.finite_or_zero(x) for x in xs)


def _finite_grad(x, dx):
    """``dx`` with zeros where ``x`` is not finite (the input was read as 0 there)."""
    return jnp.where(jnp.isfinite(x), dx, jnp.zeros((), dx.dtype))


def _chunk_major(x):
    return None if x is None else jnp.moveaxis(x, 2, 0)


def _heads_major(x):
    return None if x is None else jnp.moveaxis(x, 0, 2)


# ----------------------------------------------------------------------------- fused (accelerators)
# One lax.scan step per chunk does all of that chunk's work: the chunk's q, k, v slices are read
# once, the state stays the scan carry, and only the output (and, for the backward, the state in
# the operand dtype) is written.


def _heads(x):
    """A time-major chunk ``[B, C, H, D]`` (or ``[B, C, H]``) as heads-major ``[B, H, C, D]``."""
    return None if x is None else jnp.swapaxes(x, 1, 2)


def _put(buf, n, x):
    """``buf [B, N, C, H, D]`` with chunk ``n`` set to the heads-major ``x [B, H, C, D]``."""
    return jax.lax.dynamic_update_index_in_dim(buf, jnp.swapaxes(x, 1, 2).astype(buf.dtype), n, axis=1)


def _fused_forward(qt, kt, vt, G, r, s0, scale, save_states):
    """``qt, kt, vt [B, N, C, H, .]`` (time-major chunks: a reshape of the inputs, no copy); the
    output is written chunk by chunk into its ``[B, N, C, H, V]`` buffer (no transposed copy)."""
    acc, md = s0.dtype, qt.dtype
    b, n, c, h, _ = qt.shape

    def step(carry, inp):
        s, o_buf = carry
        i, q, k, v, G_n, r_n = inp
        q, k, v = _finite(*(_heads(x) for x in (q, k, v)))
        dec = _Decays(_heads(G_n), _heads(r_n), c)
        p = dec.intra(jnp.einsum("bhik,bhjk->bhij", q, k, preferred_element_type=acc), scale).astype(md)
        qg = (_Decays.weigh(q.astype(acc), dec.alpha) * scale).astype(md)
        ke = _Decays.weigh(k.astype(acc), dec.beta).astype(md)
        o = (jnp.einsum("bhck,bhkv->bhcv", qg, as_operand(s, qg), preferred_element_type=acc)
             + jnp.einsum("bhij,bhjv->bhiv", p, v, preferred_element_type=acc))
        s_next = dec.decay(s) + jnp.einsum("bhck,bhcv->bhkv", ke, v, preferred_element_type=acc)
        return (s_next, _put(o_buf, i, o)), (as_operand(s, qg) if save_states else None)

    o_buf = jnp.zeros((b, n, c, h, vt.shape[-1]), md)
    xs = (jnp.arange(n),) + tuple(None if x is None else jnp.moveaxis(x, 1, 0) for x in (qt, kt, vt, G, r))
    (final, o), states = jax.lax.scan(step, (s0, o_buf), xs)
    return o, final, states  # states: [N, B, H, K, V] (chunk-major, as the backward scan reads them)


def _chunk_grads(q, k, v, do, s, h, dec, scale, acc, round_state_terms=False):
    """``dq, dk, dv`` of chunks (the module docstring's equations), for one chunk (``[B, H, C, .]``)
    or all of them (``[B, H, N, C, .]``): ``s`` the states before the chunks, ``h`` the cotangents
    of the states after them, both in the operand dtype; q, k, v already sanitised.
    ``round_state_terms``: the state terms (matmuls with ``s`` or ``h``) are rounded to the operand
    dtype before they are added to the intra-chunk terms: over all chunks at once XLA writes one of
    the two products of each sum to HBM, and a bf16 one is half the bytes of a float32 one (the
    gradients are stored in the operand dtype anyway)."""
    md = q.dtype
    part = (lambda x: as_operand(x, q).astype(acc)) if round_state_terms else (lambda x: x)
    p = dec.intra(jnp.einsum("...ik,...jk->...ij", q, k, preferred_element_type=acc), scale).astype(md)
    dp = dec.intra(jnp.einsum("...iv,...jv->...ij", do, v, preferred_element_type=acc), scale).astype(md)
    ke = _Decays.weigh(k.astype(acc), dec.beta).astype(md)
    dv = (jnp.einsum("...ij,...iv->...jv", p, do, preferred_element_type=acc)
          + part(jnp.einsum("...jk,...kv->...jv", ke, h, preferred_element_type=acc)))
    dq = (part(_Decays.weigh(jnp.einsum("...iv,...kv->...ik", do, s, preferred_element_type=acc), dec.alpha) * scale)
          + jnp.einsum("...ij,...jk->...ik", dp, k, preferred_element_type=acc))
    dk = (part(_Decays.weigh(jnp.einsum("...jv,...kv->...jk", v, h, preferred_element_type=acc), dec.beta))
          + jnp.einsum("...ij,...ik->...jk", dp, q, preferred_element_type=acc))
    return dq, dk, dv


def _fused_backward(qt, kt, vt, do, G, r, states, dsf, scale, gated):
    acc, md = dsf.dtype, qt.dtype
    n, c = qt.shape[1:3]

    def step(carry, inp):  # hc: the cotangent of the state after this chunk
        hc, dq_buf, dk_buf, dv_buf = carry
        i, q_raw, k_raw, v_raw, do_n, s_n, G_n, r_n = inp
        q_raw, k_raw, v_raw, do_n = (_heads(x) for x in (q_raw, k_raw, v_raw, do_n))
        q, k, v = _finite(q_raw, k_raw, v_raw)
        dec = _Decays(_heads(G_n), _heads(r_n), c)
        hm = as_operand(hc, q)
        qg = (_Decays.weigh(q.astype(acc), dec.alpha) * scale).astype(md)
        dq, dk, dv = _chunk_grads(q, k, v, do_n, s_n, hm, dec, scale, acc)
        dlam = _dlam(q, k, dq, dk) if gated else None  # [B, H, C]
        h_prev = dec.decay(hc) + jnp.einsum("bhck,bhcv->bhkv", qg, do_n, preferred_element_type=acc)
        bufs = (_put(dq_buf, i, _finite_grad(q_raw, dq)), _put(dk_buf, i, _finite_grad(k_raw, dk)),
                _put(dv_buf, i, _finite_grad(v_raw, dv)))
        return (h_prev,) + bufs, dlam

    bufs = tuple(jnp.zeros(x.shape, md) for x in (qt, kt, vt))
    xs = (jnp.arange(n),) + tuple(None if x is None else jnp.moveaxis(x, 1, 0) for x in (qt, kt, vt, do)) + (
        states,) + tuple(None if x is None else jnp.moveaxis(x, 1, 0) for x in (G, r))
    (ds0, dq, dk, dv), dlam = jax.lax.scan(step, (dsf,) + bufs, xs, reverse=True)
    dlam = None if dlam is None else jnp.moveaxis(dlam, 0, 1)  # [N, B, H, C] -> [B, N, H, C]
    return dq, dk, dv, dlam, ds0


# ----------------------------------------------------------------------------- batched (XLA:CPU)
# The chunks' parallel work as batched matmuls over all chunks, the scan carrying only the state:
# XLA:CPU runs one large batched matmul much faster than a scan of small ones.


def _scan_states(keys, vals, dec, s0, *, reverse):
    """``(stack [B, H, N, K, V]`` in keys' dtype, final)`` of ``S <- a_n S + keys_n^T vals_n`` over the
    chunks (``reverse``: from the last), the stack holding the carry *before* each chunk's update,
    rounded like a matmul operand."""
    acc = s0.dtype
    ds = jnp.einsum("bhnck,bhncv->bhnkv", keys, as_operand(vals, keys), preferred_element_type=acc)
    a = jnp.ones(ds.shape[:3], acc) if dec.a is None else dec.a

    def step(s, inp):
        ds_n, a_n = inp
        return a_n[..., None, None] * s + ds_n, as_operand(s, keys)

    final, stack = jax.lax.scan(step, s0, (_chunk_major(ds), _chunk_major(a)), reverse=reverse)
    return _heads_major(stack), final


def _chunk_mixing(dec, shape, acc):
    """``W [B, H, N + 1, N + 1]``: the weight of the state term ``X_m`` (``X_{-1} = S_0``, ``X_m`` chunk
    ``m``'s own write for ``m >= 0``) in the state after chunk ``e`` (``S_{e+1}``), stored at
    ``[e + 1, m + 1]``::

        W[e, m] = prod_{m < l <= e} a_l = exp(sum_{m < l <= e} log a_l)      (m <= e; 0 above the diagonal)

    with ``log a_l = -inf`` for a chunk holding a reset (its weight is then exactly 0). Each
    exponent is its own sum of the chunks' log decays between ``m`` and ``e`` (a reverse cumulative
    sum along each row, every term ``<= 0``), not a difference of two prefix sums over the whole
    sequence, so a weight near 1 stays exact after a long stretch of strong decays."""
    la = jnp.zeros(shape, acc) if dec.log_a is None else jnp.broadcast_to(dec.log_a.astype(acc), shape)
    span, lower = chunk_span_sums(la)
    return masked_exp(span, lower)


def _mix_states(keys, vals, w, s0, *, reverse, round_terms=True):
    """What :func:`_scan_states` returns, with no loop: the states before every chunk (or, ``reverse``,
    the cotangents after every chunk) as one batched matmul over the chunk index with the weights
    ``w`` of :func:`_chunk_mixing`. Forward: ``S_n = W[n-1, -1] S_0 + sum_{m < n} W[n-1, m] dS_m``;
    reverse (the transpose): ``H_m = sum_{e >= m} W[e, m] Y_e`` with ``Y_e`` the cotangent reaching
    the state after chunk ``e`` (chunk ``e + 1``'s read, or the final state's), and ``dS_0 = H_{-1}``.
    The per-chunk terms ``keys_n^T vals_n`` accumulate in float32 and enter the mixing matmul in
    the operand dtype (bf16 for bf16 inputs: one rounding, as the stacked states get anyway); the
    mixing accumulates in float32; ``s0`` (the initial state, or the final state's cotangent) is
    added in float32. ``round_terms=False`` keeps the per-chunk terms in float32 (a gated call's
    gradients: the gate's ``dL/dLambda = q.dq - k.dk`` is a difference of large terms, and a
    second rounding of the states measured its bf16 error 4.7e-3 -> 7.6e-3).
    Returns ``(stack [B, H, N, K, V]`` in keys' dtype, the other end's state)``."""
    acc = s0.dtype
    n = keys.shape[2]
    ds = jnp.einsum("bhnck,bhncv->bhnkv", keys, as_operand(vals, keys), preferred_element_type=acc)
    ds = as_operand(ds, keys) if round_terms else ds
    wm = w.astype(acc)
    mix = lambda ww, x: jnp.einsum("bhem,bhmkv->bhekv", ww, x.astype(acc), preferred_element_type=acc)
    if not reverse:
        stack = mix(wm[:, :, :n, 1:], ds) + wm[:, :, :n, 0, None, None] * s0[:, :, None]
        end = mix(wm[:, :, n:, 1:], ds)[:, :, 0] + wm[:, :, n, 0, None, None] * s0
        return as_operand(stack, keys), end
    # Y_e for e = -1 .. N-2 is chunk e+1's term ds[e + 1]; Y_{N-1} is s0 (the final state's cotangent)
    wt = jnp.swapaxes(wm, -1, -2)  # [m, e]
    # (wt[:, :, 1:, 0] = W[-1, m >= 0] = 0: chunk 0's term reaches no H_m, m >= 0; the whole ds
    # stack is read instead of a sliced copy)
    stack = mix(wt[:, :, 1:, :n], ds) + wt[:, :, 1:, n, None, None] * s0[:, :, None]
    end = mix(wt[:, :, :1, :n], ds)[:, :, 0] + wt[:, :, 0, n, None, None] * s0
    return as_operand(stack, keys), end


def _batched_forward(qt, kt, vt, G, r, s0, scale, mix, gated):
    acc, md = s0.dtype, qt.dtype
    qc, kc, vc = _finite(*(_heads_major_chunks(x) for x in (qt, kt, vt)))
    dec = _Decays(_heads_major_chunks(G), _heads_major_chunks(r), qc.shape[3])
    p = dec.intra(jnp.einsum("bhnik,bhnjk->bhnij", qc, kc, preferred_element_type=acc), scale).astype(md)
    ke = _Decays.weigh(kc.astype(acc), dec.beta).astype(md)
    if mix:
        states, final = _mix_states(ke, vc, _chunk_mixing(dec, qc.shape[:3], acc), s0, reverse=False,
                                    round_terms=not gated)
    else:
        states, final = _scan_states(ke, vc, dec, s0, reverse=False)
    qg = (_Decays.weigh(qc.astype(acc), dec.alpha) * scale).astype(md)
    # The inter-chunk part is rounded to the operand dtype before the sum (for bf16 inputs a bf16
    # intermediate instead of a float32 one: half its HBM bytes; the output is bf16 anyway).
    inter = as_operand(jnp.einsum("bhnck,bhnkv->bhncv", qg, states, preferred_element_type=acc), qg)
    o = inter.astype(acc) + jnp.einsum("bhnij,bhnjv->bhniv", p, vc, preferred_element_type=acc)
    return _time_major_chunks(o.astype(md)), final, states


def _batched_backward(qt, kt, vt, do, G, r, states, dsf, scale, gated, mix):
    acc, md = dsf.dtype, qt.dtype
    q_raw, k_raw, v_raw, do = (_heads_major_chunks(x) for x in (qt, kt, vt, do))
    qc, kc, vc = _finite(q_raw, k_raw, v_raw)
    dec = _Decays(_heads_major_chunks(G), _heads_major_chunks(r), qc.shape[3])
    qg = (_Decays.weigh(qc.astype(acc), dec.alpha) * scale).astype(md)
    if mix:
        hs, ds0 = _mix_states(qg, do, _chunk_mixing(dec, qc.shape[:3], acc), dsf, reverse=True,
                              round_terms=not gated)
    else:
        hs, ds0 = _scan_states(qg, do, dec, dsf, reverse=True)  # H_n, and dS_0
    # (rounding the state terms costs the gate's gradient digits: dL/dLambda = q.dq - k.dk is a
    # difference of large terms; measured bf16 error of dg 4.7e-3 -> 7.8e-3; so only without a gate)
    dq, dk, dv = _chunk_grads(qc, kc, vc, do, states, hs, dec, scale, acc, round_state_terms=not gated)
    dlam = _dlam(qc, kc, dq, dk) if gated else None  # [B, H, N, C]
    grads = (_finite_grad(q_raw, dq), _finite_grad(k_raw, dk), _finite_grad(v_raw, dv))
    return tuple(_time_major_chunks(x.astype(md)) for x in grads) + (
        None if dlam is None else jnp.moveaxis(dlam, 1, 2), ds0)  # dlam: [B, N, H, C]


def _heads_major_chunks(x):
    """``[B, N, C, H, ...] -> [B, H, N, C, ...]``."""
    return None if x is None else jnp.moveaxis(x, 3, 1)


def _time_major_chunks(x):
    """``[B, H, N, C, ...] -> [B, N, C, H, ...]``."""
    return jnp.moveaxis(x, 1, 3)


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _core(qc, kc, vc, gc, rc, wc, s0, scale, fused, mix, kernel):
    return _core_fwd(qc, kc, vc, gc, rc, wc, s0, scale, fused, mix, kernel, save_states=False)[0]


def _unchunk(x):
    """``[B, N, C, H, D] -> [B, T, H, D]`` (a reshape of leading dims: no copy on any backend)."""
    b, n, c = x.shape[:3]
    return x.reshape((b, n * c) + x.shape[3:])


def _core_fwd(qc, kc, vc, gc, rc, wc, s0, scale, fused, mix, kernel, save_states=True):
    if kernel is not None:  # (the kernel forms the within-chunk gate sums itself)
        q, k, v, g, r, w = (None if x is None else _unchunk(x) for x in (qc, kc, vc, gc, rc, wc))
        o, final, states = fused_tpu.forward(q, k, v, g, r, s0, scale, qc.shape[2], w=w, save_states=save_states,
                                             interpret=kernel[1])
        return (o.reshape(vc.shape), final), (qc, kc, vc, gc, rc, wc, states, final)
    G, r = _gate_sums(gc, rc, s0.dtype)
    if fused:
        o, final, states = _fused_forward(qc, kc, vc, G, r, s0, scale, save_states)
    else:
        o, final, states = _batched_forward(qc, kc, vc, G, r, s0, scale, mix, gc is not None)
    return (o, final), (qc, kc, vc, gc, rc, wc, states, final)


def _core_bwd(scale, fused, mix, kernel, res, cts):
    qc, kc, vc, gc, rc, wc, states, final = res
    do, dsf = cts
    acc, md = final.dtype, qc.dtype
    gated = gc is not None
    last = jnp.sum(dsf.astype(acc) * final, axis=(-2, -1))  # <dS_T, S_T>
    if kernel is not None:  # (the kernel sums the decay's gradient itself)
        q, k, v, do_, g, r, w = (None if x is None else _unchunk(x) for x in (qc, kc, vc, do.astype(md), gc, rc, wc))
        dq, dk, dv, dg, ds0, dw = fused_tpu.backward(q, k, v, do_, g, r, states, dsf.astype(acc), last, scale,
                                                     qc.shape[2], w=w, interpret=kernel[1])
        dg = dg.reshape(gc.shape).astype(gc.dtype) if gated else None
        dw = None if wc is None else dw.reshape(wc.shape).astype(wc.dtype)
        return dq.reshape(qc.shape), dk.reshape(kc.shape), dv.reshape(vc.shape), dg, None, dw, ds0
    G, r = _gate_sums(gc, rc, acc)
    args = (qc, kc, vc, do.astype(md), G, r, states, dsf.astype(acc), scale, gated)
    if fused:
        dq, dk, dv, dlam, ds0 = _fused_backward(*args)
    else:
        dq, dk, dv, dlam, ds0 = _batched_backward(*args, mix)
    dg = None if not gated else _gate_gradient(dlam, rc, last)
    return dq, dk, dv, dg, None, None, ds0


def _dlam(q, k, dq, dk):
    """``dL/dLambda = q . dq - k . dk`` per position (module docstring)."""
    acc = dq.dtype
    return jnp.sum(q.astype(acc) * dq, axis=-1) - jnp.sum(k.astype(acc) * dk, axis=-1)


def _gate_gradient(dlam, rc, last):
    """``dg [B, N, C, H]`` from ``dL/dLambda`` (``dlam [B, N, H, C]``; ``+ last = <dS_T, S_T>`` at the
    last position), summed from each token to the end of its segment, 0 at a reset (module
    docstring)."""
    acc = dlam.dtype
    b, n, h, c = dlam.shape
    dlam = jnp.swapaxes(dlam, 2, 3).reshape(b, n * c, h).at[:, -1].add(last)
    rev = jnp.flip(dlam, axis=1)
    if rc is None:
        return jnp.flip(jnp.cumsum(rev, axis=1), axis=1).reshape(b, n, c, h)
    r = rc.reshape(b, n * c, h)
    # going backwards, the sum restarts at the token before each reset
    ends = jnp.concatenate([r[:, 1:], jnp.zeros_like(r[:, :1])], axis=1)
    dg = jnp.flip(segment_cumsum(rev, jnp.flip(ends, axis=1), axis=1), axis=1)
    return jnp.where(r, jnp.zeros((), acc), dg).reshape(b, n, c, h)


_core.defvjp(_core_fwd, _core_bwd)
