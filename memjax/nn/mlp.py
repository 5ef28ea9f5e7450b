"""Gated MLP (SwiGLU): ``y = (silu(x W_g) * (x W_u)) W_d``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.nn.block import Block
from memjax.nn.layers import Linear
from memjax.nn.registry import register_block


@register_block("mlp", aliases=("F",))
class GatedMLP(Block):
    """Position-wise channel mixer; hidden width ``model.mlp_hidden`` (default ``4 * d_model``)."""

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        d, f, dt = cfg.d_model, cfg.resolved_mlp_hidden, jnp.dtype(cfg.compute_dtype)
        self.gate = Linear(d, f, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.up = Linear(d, f, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.down = Linear(f, d, ("mlp", "embed"), rngs=rngs, dtype=dt)

    def __call__(self, x, *, segment_ids=None, tokens=None):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
