"""Token-indexed memory blocks: ``ngram_mem`` (Engram) and ``stem_ffn`` (STEM).

``ngram_mem`` (alias ``N``)
    Hashed n-gram memory (:mod:`memjax.memory.ngram_memory`): the last ``n`` token ids
    (``n = 2..max_ngram``) index ``heads`` tables per order; the rows are concatenated into
    ``e`` and gated into the residual stream,
    ``y = g * (e W_v)``, ``g = sigmoid(sign(s) sqrt(|s|))``, ``s = <RMSNorm(e W_k), RMSNorm(x)> / sqrt(d)``.
    Needs ``tokens``; decoding keeps the last ``max_ngram - 1`` token ids as state. The
    dilated short convolution of the Engram paper is not included (add a conv block in
    the pattern if wanted). ``one_bucket=True`` is the 1-bucket control.
``stem_ffn`` (alias ``T``)
    STEM ("Scaling Transformers with Embedding Modules"): the gated FFN's up-projection
    ``x W_u`` is replaced by a per-layer embedding of the current token,
    ``y = (silu(x W_g) * E[token]) W_d``; position-wise, no routing.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ConfigError
from memjax.memory.ngram_memory import context_gate, make_hash_params, ngram_hashes, ngram_lookup
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, param
from memjax.nn.registry import register_block


def _need_tokens(tokens, name):
    if tokens is None:
        raise ValueError(f"the {name} block is indexed by token ids: call it with tokens=[B, T] (the model does)")


@register_block("ngram_mem", aliases=("N",))
class NgramMemory(Block):
    """Engram-style hashed n-gram memory with a context gate."""

    @dataclasses.dataclass
    class Options:
        max_ngram: int = 3  # orders 2..max_ngram
        heads: int = 2  # hash heads (tables) per order
        table_size: int = 4099  # rows per table: the smallest distinct primes >= this
        embed_dim: int = 0  # width of one table row; 0: d_model // (num tables)
        seed: int = 0  # hash multipliers come from (seed, layer)
        one_bucket: bool = False  # control: every n-gram reads one row per table
        pad_id: int = 0  # id used before the start of a sequence / document

        def validate(self, m, where):
            if self.max_ngram < 2:
                raise ConfigError(f"config key '{where}.max_ngram' must be >= 2, got {self.max_ngram}")
            for key in ("heads", "table_size"):
                if getattr(self, key) < 1:
                    raise ConfigError(f"config key '{where}.{key}' must be >= 1, got {getattr(self, key)}")
            if self.embed_dim < 0:
                raise ConfigError(f"config key '{where}.embed_dim' must be >= 0, got {self.embed_dim}")

    stateful = True

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        self.hp = make_hash_params(max_ngram=opts.max_ngram, heads=opts.heads, table_size=max(opts.table_size, 2),
                                   layer=layer, seed=opts.seed, pad_id=opts.pad_id, one_bucket=opts.one_bucket)
        h = self.hp.num_heads
        e = opts.embed_dim or max(cfg.d_model // h, 1)
        d = cfg.d_model
        self.dtype = jnp.dtype(cfg.compute_dtype)
        # Row counts are sums of primes (not divisible by mesh sizes), so the table is
        # sharded (if at all) along its width only.
        self.table = param(rngs, nnx.initializers.normal(1.0), (self.hp.total_rows, e), (None, "memory_dim"))
        self.w_k = Linear(h * e, d, ("mlp", "embed"), rngs=rngs, dtype=self.dtype)
        self.w_v = Linear(h * e, d, ("mlp", "embed"), rngs=rngs, dtype=self.dtype)
        self.k_norm = RMSNorm(d, rngs=rngs)
        self.h_norm = RMSNorm(d, rngs=rngs)

    def _apply(self, x, hashes):
        e = ngram_lookup(self.table[...], hashes, self.hp).astype(self.dtype)
        g = context_gate(self.k_norm(self.w_k(e)), self.h_norm(x))
        return (g.astype(self.dtype) * self.w_v(e)).astype(x.dtype)

    def __call__(self, x, *, segment_ids=None, tokens=None):
        _need_tokens(tokens, "ngram_mem")
        return self._apply(x, ngram_hashes(tokens, self.hp, segment_ids=segment_ids))

    def init_state(self, batch_size: int, max_len: int):
        return {"context": jnp.full((batch_size, self.hp.max_ngram - 1), self.hp.pad_id, jnp.int32)}

    def prefill(self, x, state, *, tokens=None):
        _need_tokens(tokens, "ngram_mem")
        ctx = state["context"]
        y = self._apply(x, ngram_hashes(tokens, self.hp, context=ctx))
        full = jnp.concatenate([ctx, tokens.astype(jnp.int32)], axis=1)
        return y, {"context": full[:, full.shape[1] - ctx.shape[1]:]}

    def step(self, x, state, *, token=None):
        if token is None:
            raise ValueError("the ngram_mem block needs token=[B] in step()")
        y, state = self.prefill(x[:, None, :], state, tokens=token[:, None])
        return y[:, 0], state


@register_block("stem_ffn", aliases=("T",))
class STEMFFN(Block):
    """STEM FFN: ``y = (silu(x W_g) * E_layer[token]) W_d`` with ``E_layer: [vocab, hidden]``."""

    @dataclasses.dataclass
    class Options:
        hidden: int = 0  # 0: model.mlp_hidden (default 4 * d_model)

        def validate(self, m, where):
            if self.hidden < 0:
                raise ConfigError(f"config key '{where}.hidden' must be >= 0, got {self.hidden}")

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        f = opts.hidden or cfg.resolved_mlp_hidden
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.vocab = cfg.vocab_size
        # Unit-variance rows: the same scale as x W_u for an RMS-normalised x.
        self.embed = param(rngs, nnx.initializers.normal(1.0), (cfg.vocab_size, f), ("vocab", "mlp"))
        self.gate = Linear(cfg.d_model, f, ("embed", "mlp"), rngs=rngs, dtype=self.dtype)
        self.down = Linear(f, cfg.d_model, ("mlp", "embed"), rngs=rngs, dtype=self.dtype)

    def __call__(self, x, *, segment_ids=None, tokens=None):
        _need_tokens(tokens, "stem_ffn")
        if tokens.shape != x.shape[:2]:
            raise ValueError(f"tokens must be [B, T] = {x.shape[:2]}, got {tokens.shape}")
        up = jnp.take(self.embed[...], tokens, axis=0, mode="clip").astype(self.dtype)
        return self.down(jax.nn.silu(self.gate(x)) * up).astype(x.dtype)
