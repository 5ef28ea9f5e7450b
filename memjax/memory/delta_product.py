"""Gated DeltaProduct: ``n_h`` delta-rule (Householder) steps per token, as one pure function.

Recurrence (per batch and head; ``S_t in R^{K x V}``, ``beta_{t,j} in (0, 2]``, ``g_t <= 0``)::

    S_{t,0} = exp(g_t) * S_{t-1}                                        (g = None: no decay)
    S_{t,j} = S_{t,j-1} + k_{t,j} (beta_{t,j} (v_{t,j} - S_{t,j-1}^T k_{t,j}))^T,   j = 1 .. n_h
            = (I - beta_{t,j} k_{t,j} k_{t,j}^T) S_{t,j-1} + beta_{t,j} k_{t,j} v_{t,j}^T
    S_t     = S_{t,n_h};   o_t = scale * S_t^T q_t

so the token's transition is ``exp(g_t) prod_j (I - beta_{t,j} k_{t,j} k_{t,j}^T)``, a product of
``n_h`` generalised Householder matrices: rank ``n_h`` instead of DeltaNet's rank 1, which lets
one token apply any orthogonal map for ``n_h = K`` (with ``beta = 2`` and unit keys each factor is
a reflection; ``beta in (0, 2]`` gives eigenvalues in ``[-1, 1]``, Grazzi et al. 2025).
``n_h = 1`` is the (gated) delta rule.

Source: Siems, Carstensen, Zela, Hutter, Pontil, Grazzi 2025, "DeltaProduct: Improving
State-Tracking in Linear RNNs via Householder Products".

Implementation: the recurrence above *is* the delta rule (:func:`memjax.memory.delta.delta_rule`)
on the sequence of length ``T * n_h`` that interleaves the sub-steps, token ``t``'s ``n_h``
sub-steps at positions ``t n_h .. t n_h + n_h - 1``:

  - keys, values and betas are the sub-steps' own (``[B, T, n_h, H, .]`` flattened in order);
  - the decay ``g_t`` sits on the first sub-step, ``0`` (no decay) on the others;
  - the query is ``q_t`` on the last sub-step and ``0`` elsewhere; the output is read there;
  - a segment id repeats ``n_h`` times, so a reset falls on a token's first sub-step;
  - the chunk length is ``chunk_size * n_h`` (``chunk_size`` tokens per chunk).

So the recurrent form (also the decoding form), the non-finite guard (:mod:`memjax.memory.nonfinite`:
a bad key / value / beta of any sub-step poisons the token and the rest of its document, a bad
query only its token) and the dtype rules (:mod:`memjax.memory.contract`) are the delta rule's;
so is the chunked form for ``n_h = 1``, with ``seq_axis`` and with a Pallas chunk pass.

The chunked form for ``n_h >= 2`` (one device, XLA chunk pass) works on chunks of ``C`` *tokens*
holding ``M = C n_h`` sub-steps, with ``G_t`` the cumulative log decay of token ``t`` in the
chunk, ``D_ts = exp(G_t - G_s)`` (``s <= t``, no reset between) and ``t(m)`` the token of
sub-step ``m``. The UT transform is the delta rule's over the ``M`` sub-steps
(``L_mn = beta_m D_{t(m) t(n)} k_m.k_n`` for ``m > n``, ``1`` on the decay inside one token),
``[U, W] = (I + L)^{-1} diag(beta) [V, diag(exp G_t(m)) K]``, ``delta = U - W S``; but the outputs
are read at the ``C`` tokens only::

    o_t    = scale (exp(G_t) q_t^T S + sum_{m: t(m) <= t} D_{t t(m)} (q_t.k_m) delta_m)
    S_next = exp(G_last) S + sum_m D_{last t(m)} k_m delta_m^T

so the score matrix is ``[C, M]``, not the interleaved sequence's ``[M, M]`` (whose ``n_h - 1``
zero queries per token were read too), the decays are per token (no interleaved gates), and the
chunk-to-chunk pass runs chunk-major with a hand-written backward (:func:`_state_pass`). The
default chunk is ``32`` sub-steps (``32 // n_h`` tokens). Measured on CPU (T = 4096, n_h = 2,
B = 1, H = 4, K = V = 64, float32, forward + backward, CPU seconds on a loaded 2-core machine):
the interleaved delta rule with 64 tokens per chunk (the previous default) 0.47-0.51 s, 16 tokens
0.28-0.29 s; this form with 16 tokens 0.26-0.27 s (``benchmarks/bench_chunked_vs_recurrent.py``
``--ops delta_product_nh2``). The recurrent form takes ``T n_h`` steps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.kernels.chunk_pass import as_operand, runs_xla
from memjax.memory import nonfinite
from memjax.memory.chunking import chunk_decays, delta_chunk_size, pad_time, to_chunks
from memjax.memory.contract import (
    check_chunk_size,
    check_floating,
    check_gate,
    check_impl,
    check_mode,
    check_scale,
    check_segment_ids,
    check_seq_axis,
    check_sequence,
    check_shape,
    check_state,
    operand_dtype,
    output_dtype,
    state_dtype,
)
from memjax.memory.delta import MODES, delta_rule
from memjax.memory.segments import segment_resets
from memjax.memory.ut_transform import unit_lower_inverse

def delta_product(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, g: jax.Array | None = None, *,
                  scale: float | None = None, initial_state: jax.Array | None = None,
                  segment_ids: jax.Array | None = None, mode: str = "chunked", chunk_size: int | None = None,
                  impl: str = "auto", seq_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Gated DeltaProduct; see the module docstring for the equations.

    Args:
      q: ``[B, T, H, K]`` queries.
      k: ``[B, T, n_h, H, K]`` the ``n_h`` keys of each token, in the order they are applied
        (callers L2-normalise them: then every factor ``I - beta k k^T`` has norm <= 1 for
        ``beta in (0, 2]``).
      v: ``[B, T, n_h, H, V]`` the values written with them.
      beta: ``[B, T, n_h, H]`` write strengths, ``sigmoid(.)`` in ``(0, 1)`` or ``2 sigmoid(.)``
        in ``(0, 2)`` (negative eigenvalues).
      g: ``[B, T, H]`` log decay applied once per token, before its first sub-step, or None.
      scale: read scale, default ``K ** -0.5``.
      initial_state: ``[B, H, K, V]`` (zeros if None).
      segment_ids: ``[B, T]`` int; the state is reset to zero before the first sub-step of the
        first token of every new segment (``initial_state`` reaches only the first one).
      mode: ``"chunked"`` (training, prefill) or ``"recurrent"`` (token loop; decoding).
      chunk_size: tokens per chunk (a chunk holds ``chunk_size * n_h`` sub-steps); None:
        ``max(1, C // n_h)`` tokens with ``C`` the delta-rule family's default chunk, 32 sub-steps
        on CPU and 64 on GPU and TPU (:func:`memjax.memory.chunking.delta_chunk_size`; on CPU,
        T = 4096, n_h = 2, forward + backward: 32 sub-steps 0.26 s, 64 0.32 s, 128 0.49 s);
        ``T`` need not be a multiple.
      impl: chunk-to-chunk state pass of the chunked form, ``"auto" | "xla" | "pallas"``.
      seq_axis: sequence parallelism as in :func:`memjax.memory.delta.delta_rule` (a token's
        sub-steps never straddle two devices). Chunked mode only.

    Returns:
      ``(o [B, T, H, V]`` in q's dtype, ``final_state [B, H, K, V]`` float32, or float64 for
      float64 inputs).
    """
    fn = "delta_product"
    # Every check here, before any compute, so that errors name delta_product and its shapes.
    check_mode(fn, mode, MODES)
    if chunk_size is not None:
        check_chunk_size(fn, chunk_size)
    check_impl(fn, impl)
    check_scale(fn, scale)
    b, t, h, dk = check_sequence(fn, "q", q, "[B, T, H, K]")
    nh = check_shape(fn, "k", k, (b, t, None, h, dk), "[B, T, n_h, H, K]")[2]
    check_floating(fn, "k", k)
    if nh < 1:
        raise ValueError(f"{fn}: k must have n_h >= 1 keys per token (axis 2), got shape {k.shape}")
    dv = check_shape(fn, "v", v, (b, t, nh, h, None), "[B, T, n_h, H, V]")[4]
    check_floating(fn, "v", v)
    check_gate(fn, "beta", beta, (b, t, nh, h), "[B, T, n_h, H]", required=True)
    check_gate(fn, "g", g, (b, t, h))
    check_state(fn, initial_state, (b, h, dk, dv))
    check_segment_ids(fn, segment_ids, (b, t))
    check_seq_axis(fn, seq_axis, mode, ("chunked",))

    scale = dk ** -0.5 if scale is None else scale
    chunk_size = max(1, delta_chunk_size(None) // nh) if chunk_size is None else chunk_size
    n_chunks = -(-t // chunk_size)
    # n_h >= 2, one device, the XLA chunk pass: the token-chunked form (module docstring). n_h = 1
    # *is* the delta rule, and the kernels and seq_axis take its interleaved sub-step sequence.
    if (nh > 1 and mode == "chunked" and seq_axis is None
            and runs_xla(impl, (b, h, n_chunks, chunk_size * nh, dk, dv), operand_dtype(q, k, v), None)):
        return _direct(q, k, v, beta, g, scale, initial_state, segment_ids, chunk_size)

    def steps(x):  # [B, T, n_h, ...] -> [B, T n_h, ...], sub-steps in order
        return x.reshape(b, t * nh, *x.shape[3:])

    def on_sub_step(x, j):  # [B, T, ...] -> [B, T n_h, ...], x on sub-step j, zeros elsewhere
        parts = [x if i == j else jnp.zeros_like(x) for i in range(nh)]
        return steps(jnp.stack(parts, axis=2))

    o, s = delta_rule(on_sub_step(q, nh - 1), steps(k), steps(v), steps(beta),
                      g=None if g is None else on_sub_step(g, 0),
                      scale=scale, initial_state=initial_state,
                      segment_ids=None if segment_ids is None else jnp.repeat(segment_ids, nh, axis=1),
                      mode=mode, chunk_size=chunk_size * nh, impl=impl, seq_axis=seq_axis)
    return o[:, nh - 1::nh], s


def _direct(q, k, v, beta, g, scale, initial_state, segment_ids, c):
    """The chunked form on tokens: chunks of ``c`` tokens, ``c n_h`` sub-steps each, outputs read
    at the tokens only (the sanitising and poisoning of :func:`memjax.memory.delta.delta_rule`)."""
    b, _, _, h, dk = k.shape
    dv = v.shape[-1]
    out_dtype = output_dtype(q)
    acc = state_dtype(q, k, v, beta, g, initial_state)
    md = operand_dtype(q, k, v)
    q, k, v = (x.astype(md) for x in (q, k, v))
    beta = beta.astype(acc)
    g = None if g is None else g.astype(acc)
    s0 = jnp.zeros((b, h, dk, dv), acc) if initial_state is None else initial_state.astype(acc)
    # a bad key / value / beta of any sub-step is a bad write of its token: [B, T, n_h, H] -> [B, T, H]
    sub_writes = nonfinite.either(nonfinite.bad(k, 4), nonfinite.bad(v, 4), nonfinite.bad(beta, 4))
    writes = nonfinite.either(jnp.any(sub_writes, axis=2), nonfinite.bad(g, 3, gate=True))
    mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.running(writes, segment_ids))
    q, k, v, beta = (nonfinite.finite_or_zero(x) for x in (q, k, v, beta))
    g = nonfinite.finite_gate(g)
    o, s = _chunked(q, k, v, beta, g, s0, segment_ids, scale, c)
    return nonfinite.poison_outputs(o.astype(out_dtype), s, mask)


def _chunk_major(x, size):
    """``[B, T, H, ...] -> [N, B, H, size, ...]``, ``T`` zero-padded to a multiple of ``size``: the
    scan over chunks then slices the leading axis (no transposes around it, forward or backward)."""
    return jnp.moveaxis(jnp.moveaxis(to_chunks(pad_time(x, size), size), 1, 0), 3, 2)


def _chunked(q, k, v, beta, g, s0, segment_ids, scale, c):
    """The token-chunked form (module docstring); inputs sanitised, ``beta, g`` in ``s0``'s dtype."""
    b, t, nh, h, _ = k.shape
    dv = v.shape[-1]
    m = c * nh
    acc, md = s0.dtype, q.dtype
    sub = lambda x: x.reshape(b, t * nh, *x.shape[3:])  # sub-steps in order
    qc = _chunk_major(q, c)  # [N, B, H, C, K]
    kc, vc = (_chunk_major(sub(x), m) for x in (k, v))  # [N, B, H, M, .]
    bc = _chunk_major(sub(beta), m)[..., None]  # [N, B, H, M, 1]
    n = qc.shape[0]
    gc = None if g is None else to_chunks(pad_time(g, c), c)
    resets = None if segment_ids is None else to_chunks(segment_resets(pad_time(segment_ids, c, mode="edge")), c)
    dec = chunk_decays(gc, resets, (b, n, c, h), acc)
    dmat = jnp.swapaxes(dec.matrix, 0, 1)  # [N, B, H, C, C]: token i's read of token j's writes
    start, end = (jnp.transpose(x, (1, 0, 3, 2)) for x in (dec.from_start, dec.to_end))  # [N, B, H, C]
    # per-token factors on [.., C, n_h, .] views of the sub-step tensors (not jnp.repeat: the
    # gradient of a repeat is a windowed reduction that XLA:CPU runs slowly)
    per_token = lambda x, f: (x.reshape(n, b, h, c, nh, x.shape[-1]) * f[..., None, None]).reshape(x.shape)
    # UT transform over the chunk's M sub-steps: L = beta_i D_ij k_i.k_j (i > j; sub-steps of one
    # token have D = 1), [U, W] = (I + L)^{-1} diag(beta) [V, diag(gamma) K]
    kk = jnp.einsum("...ik,...jk->...ij", kc, kc, preferred_element_type=acc)
    lower = bc * (kk.reshape(n, b, h, c, nh, c, nh) * dmat[..., :, None, :, None]).reshape(kk.shape)
    inv = unit_lower_inverse(lower).astype(md)
    mm = lambda x, y: jnp.einsum("...ij,...jx->...ix", x, y.astype(md), preferred_element_type=acc).astype(md)
    u = mm(inv, bc * vc.astype(acc))
    w = mm(inv, bc * per_token(kc, start))
    # reads at the tokens only: scores [C, M] of q_i with every sub-step key of tokens j <= i
    scores = jnp.einsum("...ik,...jk->...ij", qc, kc, preferred_element_type=acc)
    scores = (scores.reshape(n, b, h, c, c, nh) * (dmat * scale)[..., None]).reshape(n, b, h, c, m)
    qg = qc * (start[..., None] * scale)
    ke = per_token(kc, end)
    o, s = _state_pass(qg.astype(md), scores.astype(md), u, w, ke.astype(md), jnp.swapaxes(dec.chunk, 0, 1), s0)
    o = jnp.moveaxis(jnp.moveaxis(o, 2, 3), 0, 1)  # [B, N, C, H, V]
    return o.reshape(b, n * c, h, dv)[:, :t], s


def _chunk_states(u, w, ke, a, s0):
    """The sequential part: ``delta_n = u_n - w_n S_n``, ``S_{n+1} = a_n S_n + ke_n^T delta_n``
    (chunk-major stacks ``[N, B, H, ...]``, ``a: [N, B, H]``). Returns ``(S_N, S_n [N, B, H, K, V],
    delta [N, B, H, M, V])``; only the ``[B, H, K, V]`` state is carried."""
    acc = s0.dtype

    def step(s, inp):
        u_n, w_n, k_n, a_n = inp
        delta = u_n.astype(acc) - jnp.einsum("bhck,bhkv->bhcv", w_n, as_operand(s, w_n), preferred_element_type=acc)
        s_next = a_n[..., None, None] * s + jnp.einsum("bhck,bhcv->bhkv", k_n, as_operand(delta, k_n),
                                                     preferred_element_type=acc)
        return s_next, (s, delta)

    return jax.lax.scan(step, s0, (u, w, ke, a))


def _outputs(qg, p, s_in, delta, acc):
    return (jnp.einsum("...ck,...kv->...cv", qg, as_operand(s_in, qg), preferred_element_type=acc)
            + jnp.einsum("...ij,...jv->...iv", p, as_operand(delta, p), preferred_element_type=acc))


@jax.custom_vjp
def _state_pass(qg, p, u, w, ke, a, s0):
    """:func:`memjax.kernels.chunk_pass.chunk_recurrence` (XLA) for token chunks whose outputs
    read ``C`` tokens but whose corrections are ``M = C n_h`` sub-steps, chunk-major:
    ``qg [N, B, H, C, K]``, ``p [N, B, H, C, M]``, ``u [N, B, H, M, V]``, ``w, ke [N, B, H, M, K]``,
    ``a [N, B, H]``; ``o_n = qg_n S_n + p_n delta_n``. Returns ``(o`` in u's dtype, ``S_N)``.

    Hand-written backward (the formulas of chunk_pass's kernel backward): a reverse scan that
    carries only ``dS`` and does two matmuls per chunk; every other gradient is one batched
    product over all chunks (autodiff of the scan does those inside the loop)."""
    s, (s_in, delta) = _chunk_states(u, w, ke, a, s0)
    return _outputs(qg, p, s_in, delta, s0.dtype).astype(u.dtype), s


def _state_pass_fwd(qg, p, u, w, ke, a, s0):
    s, (s_in, delta) = _chunk_states(u, w, ke, a, s0)
    return (_outputs(qg, p, s_in, delta, s0.dtype).astype(u.dtype), s), (qg, p, u, w, ke, a, s_in, delta)


def _state_pass_bwd(res, cts):
    qg, p, u, w, ke, a, s_in, delta = res
    do, dsf = cts
    acc = s_in.dtype
    do = do.astype(acc)
    # what the outputs send back to every chunk's incoming state and corrections
    d_sin = jnp.einsum("...ck,...cv->...kv", qg.astype(acc), do)
    d_dout = jnp.einsum("...ij,...iv->...jv", p.astype(acc), do)

    def step(ds, inp):  # ds = dL/dS_{n+1}
        dd_out, ds_out, w_n, k_n, a_n = inp
        dd = dd_out + jnp.einsum("bhck,bhkv->bhcv", k_n.astype(acc), ds)  # dL/d delta_n
        ds_prev = a_n[..., None, None] * ds + ds_out - jnp.einsum("bhck,bhcv->bhkv", w_n.astype(acc), dd)
        return ds_prev, (dd, ds)

    ds0, (dd, ds_next) = jax.lax.scan(step, dsf.astype(acc), (d_dout, d_sin, w, ke, a), reverse=True)
    d_qg = jnp.einsum("...cv,...kv->...ck", do, s_in)
    d_p = jnp.einsum("...iv,...jv->...ij", do, delta)
    d_w = -jnp.einsum("...cv,...kv->...ck", dd, s_in)
    d_ke = jnp.einsum("...cv,...kv->...ck", delta, ds_next)
    d_a = jnp.einsum("...kv,...kv->...", ds_next, s_in)
    return (d_qg.astype(qg.dtype), d_p.astype(p.dtype), dd.astype(u.dtype), d_w.astype(w.dtype),
            d_ke.astype(ke.dtype), d_a.astype(a.dtype), ds0.astype(dsf.dtype))


_state_pass.defvjp(_state_pass_fwd, _state_pass_bwd)
