"""Causal softmax attention block with RoPE, grouped KV heads, optional sliding window and KV cache."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from memjax.memory.attention import IMPLS as ATTENTION_IMPLS
from memjax.memory.attention import causal_attention, rope
from memjax.memory.ring_attention import ring_attention
from memjax.memory.segments import positions
from memjax.nn.block import Block
from memjax.nn.cache import KVCache, WindowKVCache
from memjax.nn.layers import Linear, RMSNorm
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.validate import check_choice, check_heads, check_positive


@register_block("attention", aliases=("A",))
class Attention(Block):
    """``o = softmax(q k^T / sqrt(K) + mask) v`` over RoPE-rotated q, k; ``[B, T, d_model] -> [B, T, d_model]``.

    Args:
      d_model: model width.
      num_heads: query heads; ``head_dim`` defaults to ``d_model // num_heads``.
      num_kv_heads: key/value heads (``None`` or 0: ``num_heads``; fewer: grouped-query attention).
      window: 0 for full causal attention; ``w > 0`` lets each query see the last ``w`` tokens.
      qk_norm: RMSNorm on q and k per head.
      impl: training forward, ``"auto"``, ``"xla"``, ``"cudnn"`` or ``"chunked"``
        (:mod:`memjax.memory.attention`).
      seq_axis: mesh axis that time is split over in training (sequence parallelism): ring
        attention (:func:`memjax.memory.ring_attention.ring_attention`; the block keeps the
        contiguous layout of the memories, the ring re-lays it out zig-zag itself); ``impl``
        then does not apply. ``None``: never.

    Decoding cache: :class:`memjax.nn.cache.KVCache` of ``[B, max_length, Hkv, K]``; with a
    ``window``, :class:`memjax.nn.cache.WindowKVCache` of ``[B, window, Hkv, K]`` (O(window)
    whatever the decode length). A long prompt's prefill goes through ``impl="auto"``, which
    takes the O(T)-memory chunked form past ``CHUNKED_MIN_LENGTH``.
    """

    stateful = True

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 num_kv_heads: int | None = None, window: int = 0, qk_norm: bool = False, impl: str = "auto",
                 rope_theta: float = 10000.0, norm_eps: float = 1e-6, dtype=jnp.float32, seq_axis: str | None = None,
                 rngs: nnx.Rngs):
        self.h, self.dk = check_heads("Attention", d_model, num_heads, head_dim)
        self.hkv = num_kv_heads or num_heads
        if self.h % self.hkv:
            raise ValueError(f"Attention: num_kv_heads ({self.hkv}) must divide num_heads ({self.h})")
        if window < 0:
            raise ValueError(f"Attention: window must be >= 0 (0: full causal attention), got {window}")
        check_choice("Attention", "impl", impl, ATTENTION_IMPLS)
        check_positive("Attention", rope_theta=rope_theta)
        self.window, self.theta, self.impl, self.seq_axis = window, rope_theta, impl, seq_axis
        dt = jnp.dtype(dtype)
        self.wq = Linear(d_model, self.h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d_model, self.hkv * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d_model, self.hkv * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wo = Linear(self.h * self.dk, d_model, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.q_norm = RMSNorm(self.dk, rngs=rngs, eps=norm_eps, axes=("kv",)) if qk_norm else None
        self.k_norm = RMSNorm(self.dk, rngs=rngs, eps=norm_eps, axes=("kv",)) if qk_norm else None

    def _qkv(self, x, pos):
        b, t, _ = x.shape
        q = self.wq(x).reshape(b, t, self.h, self.dk)
        k = self.wk(x).reshape(b, t, self.hkv, self.dk)
        v = self.wv(x).reshape(b, t, self.hkv, self.dk)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope(q, pos, self.theta), rope(k, pos, self.theta), v

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: KVCache | None = None):
        b, t, _ = x.shape
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("Attention: segment_ids are not supported with a decoding cache")
            q_pos = cache.positions(t)
            q, k, v = self._qkv(x, q_pos)
            if isinstance(cache, WindowKVCache):  # the last `window` keys and then the new ones
                cache, k_all, v_all, k_pos, valid = cache.update(k, v)
            else:
                cache, k_pos, valid = cache.update(k, v)
                k_all, v_all = cache.k, cache.v
            o = causal_attention(q, k_all, v_all, window=self.window, q_positions=q_pos, k_positions=k_pos,
                                 k_valid=valid)
            return self.wo(o.reshape(b, t, self.h * self.dk)), cache
        # RoPE positions restart at each packed document (global positions: computed before any
        # sequence sharding)
        q, k, v = self._qkv(x, positions(b, t, segment_ids))
        # (cuDNN takes no packed segments: with segment_ids, "cudnn" raises and "auto" does not pick it)
        o, _ = over_sequence(self._attend, dict(q=q, k=k, v=v, segment_ids=segment_ids), {}, axis=self.seq_axis)
        return self.wo(o.reshape(b, t, self.h * self.dk))

    def _attend(self, q, k, v, segment_ids, seq_axis):
        """``(o, 0)``: attention of the whole sequence, or of this shard by ring attention."""
        if seq_axis is None:
            o = causal_attention(q, k, v, segment_ids=segment_ids, window=self.window, impl=self.impl)
        else:
            o = ring_attention(q, k, v, seq_axis=seq_axis, segment_ids=segment_ids, window=self.window)
        return o, jnp.zeros((), o.dtype)

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        if self.window > 0:  # a ring of the last `window` rotated keys and values: O(window)
            return WindowKVCache.init(batch_size, self.window, self.hkv, self.dk, self.wk.dtype)
        return KVCache.init(batch_size, max_length, self.hkv, self.dk, self.wk.dtype)
