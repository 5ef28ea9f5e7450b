"""Modern (continuous) Hopfield retrieval (Ramsauer et al. 2020, "Hopfield Networks is All You Need").

Stored patterns are the rows of ``X: [..., N, D]``; a state (query) pattern ``xi: [..., D]`` is
updated by ``xi_new = X^T softmax(beta X xi)`` (the paper's ``X softmax(beta X^T xi)`` with patterns
as columns). This is the concave-convex step on the energy::

    E(xi) = -lse(beta, X xi) + 0.5 xi^T xi        lse(beta, z) = beta^{-1} log sum_i exp(beta z_i)

(constants ``beta^{-1} log N + M^2 / 2`` dropped), so ``E`` never increases from one step to the
next, and for well-separated patterns and large ``beta`` one step retrieves the stored pattern
nearest to ``xi``. With separate ``values`` (the Hopfield layer / key-value memory form) the last
step reads ``softmax(beta X xi) Y`` instead of ``... X``.

The context form, where the stored patterns are the keys of the past tokens (``mask`` causal)
and ``values`` their values, is exactly causal softmax attention with inverse temperature
``beta`` in place of ``K^{-1/2}``: one step of it equals
``memjax.memory.attention.causal_attention(q, k, v, scale=beta)``.

Shapes: ``xi: [..., Q, D]`` (``Q`` state patterns), ``patterns: [..., N, D]``,
``values: [..., N, V]``; leading dimensions broadcast (e.g. ``[B, H]`` batch and heads, or
shared learned patterns ``[H, N, D]`` against ``[B, H, Q, D]`` queries). ``mask: [..., Q, N]`` bool
(True = pattern visible), ``beta`` a scalar or an array broadcastable to ``[..., Q]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.memory.contract import check_floating


def _check(fn, xi, patterns, values, mask, beta, steps):
    if getattr(xi, "ndim", 0) < 2:
        raise ValueError(f"{fn}: xi must be [..., Q, D], got shape {getattr(xi, 'shape', None)}")
    if getattr(patterns, "ndim", 0) < 2:
        raise ValueError(f"{fn}: patterns must be [..., N, D], got shape {getattr(patterns, 'shape', None)}")
    # (integer inputs would otherwise come back as integers: the result is cast to their dtype)
    for name, x in (("xi", xi), ("patterns", patterns), ("values", values)):
        if x is not None:
            check_floating(fn, name, x)
    if patterns.shape[-1] != xi.shape[-1]:
        raise ValueError(f"{fn}: patterns must be [..., N, D={xi.shape[-1]}] like xi, got {patterns.shape}")
    try:
        lead = jnp.broadcast_shapes(xi.shape[:-2], patterns.shape[:-2])
    except ValueError:
        raise ValueError(f"{fn}: leading dims of xi {xi.shape} and patterns {patterns.shape} "
                         f"do not broadcast") from None
    n, q = patterns.shape[-2], xi.shape[-2]
    if n == 0:
        raise ValueError(f"{fn}: patterns has no stored pattern (N = 0)")
    if values is not None:
        if getattr(values, "ndim", 0) < 2 or values.shape[-2] != n:
            raise ValueError(f"{fn}: values must be [..., N={n}, V], got {getattr(values, 'shape', None)}")
        try:
            lead = jnp.broadcast_shapes(lead, values.shape[:-2])
        except ValueError:
            raise ValueError(f"{fn}: leading dims of values {values.shape} do not broadcast with "
                             f"xi {xi.shape} and patterns {patterns.shape}") from None
    if mask is not None:
        if getattr(mask, "ndim", 0) < 2 or mask.shape[-2:] not in ((q, n), (1, n), (q, 1)):
            raise ValueError(f"{fn}: mask must be [..., Q={q}, N={n}], got {getattr(mask, 'shape', None)}")
        if mask.dtype != jnp.bool_:
            raise ValueError(f"{fn}: mask must be boolean, got dtype {mask.dtype}")
        try:
            jnp.broadcast_shapes(lead + (q, n), mask.shape)
        except ValueError:
            raise ValueError(f"{fn}: mask {mask.shape} does not broadcast to {lead + (q, n)}") from None
    if jnp.ndim(beta) > 0:
        try:
            jnp.broadcast_shapes(lead + (q,), jnp.shape(beta))
        except ValueError:
            raise ValueError(f"{fn}: beta must be a scalar or broadcast to [..., Q] = {lead + (q,)}, "
                             f"got shape {jnp.shape(beta)}") from None
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{fn}: steps must be a positive int, got {steps!r}")


def _logits(xi, patterns, beta, mask):
    cd = jnp.promote_types(jnp.result_type(xi, patterns), jnp.float32)
    beta = jnp.asarray(beta, cd)
    if beta.ndim:
        beta = beta[..., None]
    s = beta * jnp.einsum("...qd,...nd->...qn", xi, patterns, preferred_element_type=cd)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    return s


def _attend(xi, patterns, values, beta, mask):
    s = _logits(xi, patterns, beta, mask)
    # A query that sees no pattern has an all -inf row; give it zero weights, not NaN.
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - jax.lax.stop_gradient(m))
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), jnp.finfo(p.dtype).tiny)
    return jnp.einsum("...qn,...nv->...qv", p.astype(values.dtype), values)


def hopfield_retrieval(xi: jax.Array, patterns: jax.Array, *, beta, steps: int = 1,
                       mask: jax.Array | None = None, values: jax.Array | None = None) -> jax.Array:
    """``steps`` updates ``xi <- softmax(beta xi X^T) X``; with ``values`` the last one reads ``Y``.

    Args:
      xi: ``[..., Q, D]`` state (query) patterns.
      patterns: ``[..., N, D]`` stored patterns ``X`` (rows).
      beta: inverse temperature, scalar or broadcastable to ``[..., Q]``.
      steps: number of update steps (>= 1).
      mask: ``[..., Q, N]`` bool, True where a pattern may be retrieved (e.g. causal).
      values: ``[..., N, V]`` patterns to read out in the last step (default ``patterns``).

    Returns:
      ``[..., Q, D]`` (or ``[..., Q, V]`` with ``values``) in the result dtype of the inputs;
      softmax and accumulation in float32 at least.
    """
    _check("hopfield_retrieval", xi, patterns, values, mask, beta, steps)
    out_dtype = jnp.result_type(xi, patterns) if values is None else jnp.result_type(xi, patterns, values)
    cd = jnp.promote_types(out_dtype, jnp.float32)
    x = xi.astype(cd)
    pat = patterns.astype(cd)
    for _ in range(steps - 1):
        x = _attend(x, pat, pat, beta, mask)
    x = _attend(x, pat, pat if values is None else values.astype(cd), beta, mask)
    return x.astype(out_dtype)


def hopfield_energy(xi: jax.Array, patterns: jax.Array, *, beta, mask: jax.Array | None = None) -> jax.Array:
    """``E(xi) = -beta^{-1} log sum_i exp(beta x_i . xi) + 0.5 xi . xi`` per state pattern, ``[..., Q]``.

    Constants of the paper's energy (``beta^{-1} log N + M^2 / 2``) are left out; they do not
    depend on ``xi``. Shapes as in :func:`hopfield_retrieval`.
    """
    _check("hopfield_energy", xi, patterns, None, mask, beta, 1)
    cd = jnp.promote_types(jnp.result_type(xi, patterns), jnp.float32)
    x = xi.astype(cd)
    s = _logits(x, patterns.astype(cd), beta, mask)
    b = jnp.asarray(beta, cd)
    return -jax.nn.logsumexp(s, axis=-1) / b + 0.5 * jnp.sum(x * x, axis=-1)
