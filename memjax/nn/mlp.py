"""Gated MLP (SwiGLU): ``y = (silu(x W_g) * (x W_u)) W_d``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.nn.block import Block, position_wise_result
from memjax.nn.layers import Linear
from memjax.nn.registry import register_block


@register_block("mlp", aliases=("F",))
class GatedMLP(Block):
    """Position-wise channel mixer ``[B, T, d_model] -> [B, T, d_model]`` with hidden width
    ``mlp_hidden`` (``None`` or 0: ``4 * d_model``)."""

    def __init__(self, d_model: int, *, mlp_hidden: int | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
        f = mlp_hidden or 4 * d_model
        if d_model < 1 or f < 1:
            raise ValueError(f"GatedMLP: d_model and mlp_hidden must be positive, got {d_model}, {f}")
        dt = jnp.dtype(dtype)
        self.gate = Linear(d_model, f, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.up = Linear(d_model, f, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.down = Linear(f, d_model, ("mlp", "embed"), rngs=rngs, dtype=dt)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache=None):
        return position_wise_result(self.down(jax.nn.silu(self.gate(x)) * self.up(x)), cache)
