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

So both forms, the chunked UT-transform one and the token loop (also the decoding form), the
non-finite guard (:mod:`memjax.memory.nonfinite`: a bad key / value / beta of any sub-step poisons
the token and the rest of its document, a bad query only its token) and the dtype rules
(:mod:`memjax.memory.contract`) are the delta rule's. Cost: the chunked form does ``n_h`` times
the delta rule's work on a ``T``-token sequence (the ``n_h - 1`` zero queries of each token are
read too, and the ``[C n_h, C n_h]`` intra-chunk matrices are ``n_h^2`` times larger); the
recurrent form takes ``T n_h`` steps. Measured on CPU (T = 4096, n_h = 2, B = 1, H = 4,
K = V = 64, forward + backward): the chunked form's profile is that of the delta rule on an
8192-step sequence with chunk 128, op for op and in time, and 16, 32 or 64 tokens per chunk
make no difference, so its speed-up over the recurrent form is the delta rule's at ``T n_h``
(``benchmarks/bench_chunked_vs_recurrent.py``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.memory.contract import (check_chunk_size, check_floating, check_gate, check_impl, check_mode,
                                    check_scale, check_segment_ids, check_seq_axis, check_sequence, check_shape,
                                    check_state)
from memjax.memory.delta import MODES, delta_rule


def delta_product(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, g: jax.Array | None = None, *,
                  scale: float | None = None, initial_state: jax.Array | None = None,
                  segment_ids: jax.Array | None = None, mode: str = "chunked", chunk_size: int = 64,
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
      chunk_size: tokens per chunk (the delta rule underneath runs chunks of
        ``chunk_size * n_h`` sub-steps); ``T`` need not be a multiple.
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

    def steps(x):  # [B, T, n_h, ...] -> [B, T n_h, ...], sub-steps in order
        return x.reshape(b, t * nh, *x.shape[3:])

    def on_sub_step(x, j):  # [B, T, ...] -> [B, T n_h, ...], x on sub-step j, zeros elsewhere
        parts = [x if i == j else jnp.zeros_like(x) for i in range(nh)]
        return steps(jnp.stack(parts, axis=2))

    o, s = delta_rule(on_sub_step(q, nh - 1), steps(k), steps(v), steps(beta),
                      g=None if g is None else on_sub_step(g, 0),
                      scale=dk ** -0.5 if scale is None else scale, initial_state=initial_state,
                      segment_ids=None if segment_ids is None else jnp.repeat(segment_ids, nh, axis=1),
                      mode=mode, chunk_size=chunk_size * nh, impl=impl, seq_axis=seq_axis)
    return o[:, nh - 1::nh], s
