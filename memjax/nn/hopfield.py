"""Hopfield layer with learned stored patterns (a key-value memory), alias ``H``.

Per head ``h`` the block stores ``N`` learned patterns ``X_h [N, K]`` with associated values
``Y_h [N, K]`` and retrieves with the modern Hopfield update (Ramsauer et al. 2020,
:func:`memjax.memory.hopfield.hopfield_retrieval`)::

    xi_0     = L2(x W_q)_h                         (state pattern per head)
    xi_{s+1} = softmax(beta_h xi_s L2(X_h)^T) L2(X_h)    for s < steps - 1
    o_h      = softmax(beta_h xi_{steps-1} L2(X_h)^T) Y_h
    y        = (RMSNorm(o) * SiLU(x W_gate)) W_o

Queries and patterns are L2-normalised, so ``beta_h = exp(log_beta_h)`` (learned, initialised to
``beta_init``, default ``sqrt(K)``) alone sets how sharp the retrieval is. The block is
position-wise (no state across tokens): the context form of Hopfield retrieval over past tokens
is causal softmax attention with ``beta`` as the inverse temperature, i.e. the ``attention`` block.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.hopfield import hopfield_retrieval
from memjax.nn.block import Block, position_wise_result
from memjax.nn.layers import Linear, RMSNorm, l2_normalize, param
from memjax.nn.registry import register_block
from memjax.nn.validate import check_heads, check_nonnegative, check_positive


@register_block("hopfield", aliases=("H",))
class HopfieldLayer(Block):
    """Position-wise Hopfield retrieval from learned patterns, ``[B, T, d_model] -> [B, T, d_model]``.

    Args:
      d_model: model width.
      num_heads, head_dim: heads and the head dim ``K`` (``None``: ``d_model // num_heads``).
      num_patterns: stored patterns ``N`` per head.
      steps: Hopfield update steps (the last one reads the values).
      beta_init: initial inverse temperature; 0: ``sqrt(head_dim)``.
      norm_eps: epsilon of the output RMSNorm.
      dtype: compute dtype (parameters stay float32).

    Decoding cache: :class:`memjax.nn.cache.NoCache` (no state across tokens).
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, num_patterns: int = 64,
                 steps: int = 1, beta_init: float = 0.0, norm_eps: float = 1e-6, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.h, self.dk = check_heads("HopfieldLayer", d_model, num_heads, head_dim)
        check_positive("HopfieldLayer", num_patterns=num_patterns, steps=steps)
        check_nonnegative("HopfieldLayer", beta_init=beta_init)
        self.steps = steps
        d, h, dk, n = d_model, self.h, self.dk, num_patterns
        dt = jnp.dtype(dtype)
        self.wq = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.patterns = param(rngs, nnx.initializers.normal(1.0), (h, n, dk), ("heads", "memory_slots", "kv"))
        self.values = param(rngs, nnx.initializers.normal(1.0), (h, n, dk), ("heads", "memory_slots", "kv"))
        beta0 = beta_init or math.sqrt(dk)
        self.log_beta = param(rngs, lambda k, s, t: jnp.full(s, math.log(beta0), t), (h,), ("heads",))
        self.o_norm = RMSNorm(dk, rngs=rngs, eps=norm_eps, axes=("kv",))
        self.wg = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wo = Linear(h * dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache=None):
        b, t, _ = x.shape
        xi = l2_normalize(self.wq(x).reshape(b, t, self.h, self.dk))
        xi = jnp.swapaxes(xi, 1, 2)  # [B, H, T, K] against patterns [H, N, K]
        beta = jnp.exp(self.log_beta[...])[:, None]  # [H, 1], broadcast to [B, H, T]
        pats = l2_normalize(self.patterns[...]).astype(xi.dtype)
        o = hopfield_retrieval(xi, pats, beta=beta, steps=self.steps, values=self.values[...].astype(xi.dtype))
        o = self.o_norm(jnp.swapaxes(o, 1, 2))
        o = o * jax.nn.silu(self.wg(x)).reshape(b, t, self.h, self.dk).astype(o.dtype)
        return position_wise_result(self.wo(o.reshape(b, t, self.h * self.dk)), cache)
