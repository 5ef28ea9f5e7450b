"""Token-indexed memory blocks: ``ngram_mem`` (Engram) and ``stem_ffn`` (STEM).

``ngram_mem`` (alias ``N``)
    Hashed n-gram memory (:mod:`memjax.memory.ngram_memory`): the last ``n`` token ids
    (``n = 2..max_ngram``) index ``heads`` tables per order; the rows are concatenated into
    ``e`` and gated into the residual stream,
    ``y = g * (e W_v)``, ``g = sigmoid(sign(s) sqrt(|s|))``, ``s = <RMSNorm(e W_k), RMSNorm(x)> / sqrt(d)``.
    Needs ``tokens``; its decoding cache :class:`NgramCache` keeps the last ``max_ngram - 1``
    token ids. Takes ``layer`` (the hash multipliers differ per layer), so it is not
    scannable. The dilated short convolution of the Engram paper is not included (add a conv block in
    the pattern if wanted). Two controls for whether gains come from memorising n-grams:
    ``one_bucket=True`` (every n-gram reads one row per table) and ``random_ids=True`` (the hash
    of content-free position ids, ``1 + position within the document``, replaces the n-gram
    hash: same tables, gate and sparsity, no token content; the cache then keeps position ids).
    They are exclusive.
``stem_ffn`` (alias ``T``)
    STEM ("Scaling Transformers with Embedding Modules"): the gated FFN's up-projection
    ``x W_u`` is replaced by a per-layer embedding of the current token,
    ``y = (silu(x W_g) * E[token]) W_d``; position-wise, no routing (decoding cache
    :class:`memjax.nn.cache.NoCache`), but ``tokens`` are needed in every call.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.ngram_memory import (
    context_gate,
    make_hash_params,
    ngram_hashes,
    ngram_ids,
    ngram_lookup,
)
from memjax.nn.block import Block, position_wise_result
from memjax.nn.layers import Linear, RMSNorm, param
from memjax.nn.registry import register_block
from memjax.nn.validate import (
    check_no_segments,
    check_nonnegative,
    check_positive,
    check_range,
)


def _need_tokens(block, tokens, x):
    if tokens is None:
        raise ValueError(f"{block}: the block is indexed by token ids: call it with tokens=[B, T] (the model does)")
    if tokens.shape != x.shape[:2]:
        raise ValueError(f"{block}: tokens must be [B, T] = {x.shape[:2]}, got {tokens.shape}")


class NgramCache(NamedTuple):
    """Decoding cache of :class:`NgramMemory`: ``context: int32 [B, max_ngram - 1]``, the last token
    ids seen, oldest first (``pad_id`` before the start); with ``random_ids`` the last position
    ids (``0`` before the start)."""

    context: jax.Array


@register_block("ngram_mem", aliases=("N",))
class NgramMemory(Block):
    """Engram-style hashed n-gram memory with a context gate, ``[B, T, d_model] -> [B, T, d_model]``.

    ``e = concat_{n, head} T_{n, head}[hash_{n, head}(tokens_{t-n+1..t})]``,
    ``y = sigmoid(sign(s) sqrt(|s|)) * (e W_v)`` with ``s = <RMSNorm(e W_k), RMSNorm(x)> / sqrt(d_model)``.

    Args:
      d_model: model width.
      max_ngram: orders ``2..max_ngram``.
      heads: hash heads (tables) per order.
      table_size: rows per table: the smallest distinct primes ``>= table_size``.
      embed_dim: width of one table row; 0: ``d_model // (number of tables)``.
      seed: hash multipliers come from ``(seed, layer)``.
      one_bucket: control: every n-gram reads one row per table.
      random_ids: control: hash content-free position ids (``1 + position within the document``)
        instead of the tokens; exclusive with ``one_bucket``.
      pad_id: id used before the start of a sequence / document.
      layer: the block's index in the model (its hash multipliers).
      dtype: compute dtype (parameters stay float32).
    """

    stateful = True
    scannable = False  # the hash depends on ``layer``

    def __init__(self, d_model: int, *, max_ngram: int = 3, heads: int = 2, table_size: int = 4099,
                 embed_dim: int = 0, seed: int = 0, one_bucket: bool = False, random_ids: bool = False,
                 pad_id: int = 0, layer: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
        name = "NgramMemory"
        check_positive(name, d_model=d_model, heads=heads, table_size=table_size)
        if max_ngram < 2:
            raise ValueError(f"{name}: max_ngram must be >= 2 (orders 2..max_ngram), got {max_ngram}")
        check_nonnegative(name, embed_dim=embed_dim)
        check_range(name, "pad_id", pad_id, 0, 2 ** 32, high_open=True)
        if one_bucket and random_ids:
            raise ValueError(f"{name}: one_bucket and random_ids are exclusive controls (one_bucket already "
                             "ignores the ids)")
        self.hp = make_hash_params(max_ngram=max_ngram, heads=heads, table_size=max(table_size, 2), layer=layer,
                                   seed=seed, pad_id=pad_id, one_bucket=one_bucket, random_ids=random_ids)
        h = self.hp.num_heads
        e = embed_dim or max(d_model // h, 1)
        d = d_model
        self.dtype = jnp.dtype(dtype)
        # Row counts are sums of primes (not divisible by mesh sizes), so the table is
        # sharded (if at all) along its width only. A token reads one row per table, so the table
        # trains as the product-key value tables do (``optim.memory_values_lr``: its own constant
        # learning rate, no weight decay, when set).
        self.table = param(rngs, nnx.initializers.normal(1.0), (self.hp.total_rows, e), (None, "memory_dim"),
                           optim_group="memory_values")
        self.w_k = Linear(h * e, d, ("mlp", "embed"), rngs=rngs, dtype=self.dtype)
        self.w_v = Linear(h * e, d, ("mlp", "embed"), rngs=rngs, dtype=self.dtype)
        self.k_norm = RMSNorm(d, rngs=rngs)
        self.h_norm = RMSNorm(d, rngs=rngs)

    def _apply(self, x, hashes):
        e = ngram_lookup(self.table[...], hashes, self.hp).astype(self.dtype)
        g = context_gate(self.k_norm(self.w_k(e)), self.h_norm(x))
        return (g.astype(self.dtype) * self.w_v(e)).astype(x.dtype)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: NgramCache | None = None):
        """``x: [B, T, d_model]``, ``tokens: int [B, T]`` -> ``y``, or ``(y, cache)`` with a cache."""
        _need_tokens("NgramMemory", tokens, x)
        if cache is None:
            return self._apply(x, ngram_hashes(tokens, self.hp, segment_ids=segment_ids))
        check_no_segments("NgramMemory", segment_ids)
        ctx = cache.context
        y = self._apply(x, ngram_hashes(tokens, self.hp, context=ctx))
        ids = ngram_ids(tokens, self.hp, context=ctx)  # the tokens, or position ids (random_ids)
        full = jnp.concatenate([ctx, ids.astype(ctx.dtype)], axis=1)
        return y, NgramCache(full[:, full.shape[1] - ctx.shape[1]:])

    def init_cache(self, batch_size: int, max_length: int) -> NgramCache:
        """``pad_id`` context, ``0`` with ``random_ids`` (``max_length`` unused)."""
        pad = 0 if self.hp.random_ids else self.hp.pad_id
        return NgramCache(jnp.full((batch_size, self.hp.max_ngram - 1), pad, jnp.int32))


@register_block("stem_ffn", aliases=("T",))
class STEMFFN(Block):
    """STEM FFN: ``y = (silu(x W_g) * E[token]) W_d`` with ``E: [vocab_size, hidden]``.

    Args:
      d_model: model width.
      hidden: FFN width; 0: ``mlp_hidden`` (``None`` or 0: ``4 * d_model``).
      vocab_size: rows of ``E`` (token ids are clipped into ``[0, vocab_size)``).
      mlp_hidden: the model's MLP width, the default of ``hidden``.
      dtype: compute dtype (parameters stay float32).
    """

    def __init__(self, d_model: int, *, hidden: int = 0, vocab_size: int = 256, mlp_hidden: int | None = None,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        check_nonnegative("STEMFFN", hidden=hidden)
        check_positive("STEMFFN", d_model=d_model, vocab_size=vocab_size)
        f = hidden or mlp_hidden or 4 * d_model
        self.dtype = jnp.dtype(dtype)
        self.vocab = vocab_size
        # Unit-variance rows: the same scale as x W_u for an RMS-normalised x.
        self.embed = param(rngs, nnx.initializers.normal(1.0), (vocab_size, f), ("vocab", "mlp"))
        self.gate = Linear(d_model, f, ("embed", "mlp"), rngs=rngs, dtype=self.dtype)
        self.down = Linear(f, d_model, ("mlp", "embed"), rngs=rngs, dtype=self.dtype)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache=None):
        """``x: [B, T, d_model]``, ``tokens: int [B, T]`` -> ``y`` (or ``(y, cache)``)."""
        _need_tokens("STEMFFN", tokens, x)
        up = jnp.take(self.embed[...], tokens, axis=0, mode="clip").astype(self.dtype)
        return position_wise_result(self.down(jax.nn.silu(self.gate(x)) * up).astype(x.dtype), cache)
