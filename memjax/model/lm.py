"""Decoder-only language model assembled from a block pattern.

``x_0 = E[tokens]``; for each block ``b_i`` of ``cfg.pattern``: ``x_i = x_{i-1} + b_i(RMSNorm(x_{i-1}))``;
``logits = RMSNorm(x_L) E^T`` (tied) or ``RMSNorm(x_L) W_out``. The model knows blocks only
through the registry, so each memory family adds block types without touching this file.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ModelConfig, options_from_dict
from memjax.model.sharding import constrain
from memjax.nn.layers import RMSNorm, batched_init, param
from memjax.nn.registry import get_block


class LM(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        # All parameters are drawn batched when the block below ends (see batched_init: one
        # threefry hash per parameter made XLA:GPU compile the initialiser for minutes).
        with batched_init():
            self._build(cfg, rngs)

    def _build(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, v = cfg.d_model, cfg.vocab_size
        self.d_model = d
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.embed = param(rngs, nnx.initializers.normal(1.0), (v, d), ("vocab", "embed"))
        shared: dict = {}  # resources blocks share across layers (e.g. one memory value pool)
        blocks, norms = [], []
        for i, name in enumerate(cfg.block_names()):
            cls = get_block(name)
            opts = options_from_dict(cls.Options, cfg.blocks.get(name, {}), f"model.blocks.{name}")
            blocks.append(cls(cfg, opts, layer=i, shared=shared, rngs=rngs))
            norms.append(RMSNorm(d, rngs=rngs, eps=cfg.norm_eps))
        self.blocks = nnx.List(blocks)
        self.norms = nnx.List(norms)
        self.final_norm = RMSNorm(d, rngs=rngs, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else param(
            rngs, nnx.initializers.normal(d ** -0.5), (d, v), ("embed", "vocab"))

    def _embed(self, tokens):
        # Unit-variance embeddings scaled by sqrt(d)^-1 keep the residual stream O(1) at init.
        x = jnp.take(self.embed[...], tokens, axis=0) * (self.d_model ** -0.5)
        return x.astype(self.compute_dtype)

    def _logits(self, x):
        x = self.final_norm(x)
        w = self.embed[...].T * (self.d_model ** -0.5) if self.head is None else self.head[...]
        return jnp.dot(x.astype(self.compute_dtype), w.astype(self.compute_dtype),
                       preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """``tokens: [B, T] int`` -> ``logits: [B, T, vocab] float32``."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        x = constrain(self._embed(tokens), ("batch", "length", "embed"))
        for norm, block in zip(self.norms, self.blocks):
            x = x + block(norm(x), segment_ids=segment_ids, tokens=tokens).astype(x.dtype)
            x = constrain(x, ("batch", "length", "embed"))
        return self._logits(x)

    # ------------------------------------------------------------------ decoding

    def init_state(self, batch_size: int, max_len: int) -> list:
        return [b.init_state(batch_size, max_len) for b in self.blocks]

    def prefill(self, tokens: jax.Array, state: list):
        """Run a prompt ``[B, T]`` from ``state`` with each block's chunked form; returns (logits, state)."""
        x = self._embed(tokens)
        new = []
        for norm, block, st in zip(self.norms, self.blocks, state):
            y, st = block.prefill(norm(x), st, tokens=tokens)
            x = x + y.astype(x.dtype)
            new.append(st)
        return self._logits(x), new

    def step(self, token: jax.Array, state: list):
        """One token ``[B]`` with each block's recurrent form; returns (logits [B, vocab], state)."""
        x = self._embed(token)
        new = []
        for norm, block, st in zip(self.norms, self.blocks, state):
            y, st = block.step(norm(x), st, token=token)
            x = x + y.astype(x.dtype)
            new.append(st)
        return self._logits(x), new
