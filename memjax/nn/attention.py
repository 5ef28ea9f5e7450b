"""Causal softmax attention block with RoPE, grouped KV heads, optional sliding window and KV cache."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ConfigError
from memjax.memory.attention import IMPLS as ATTENTION_IMPLS
from memjax.memory.attention import causal_attention, rope
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, positions_in_segment
from memjax.nn.registry import register_block


@register_block("attention", aliases=("A",))
class Attention(Block):
    """``o = softmax(q k^T / sqrt(K) + mask) v`` over RoPE-rotated q, k; heads split from ``d_model``.

    Decoding keeps a KV cache ``[B, max_len, Hkv, K]`` and the number of tokens seen.
    """

    @dataclasses.dataclass
    class Options:
        num_kv_heads: int = 0  # 0: same as model.num_heads (multi-head); fewer: grouped-query
        window: int = 0  # 0: full causal attention; > 0: sliding window of this many tokens
        qk_norm: bool = False
        impl: str = "auto"  # training forward: "auto", "xla" or "cudnn" (decoding uses XLA; memjax.memory.attention)

        def validate(self, m, where):
            kv = self.num_kv_heads or m.num_heads
            if m.num_heads % kv:
                raise ConfigError(f"config key '{where}.num_kv_heads' ({kv}) must divide model.num_heads ({m.num_heads})")
            if self.window < 0:
                raise ConfigError(f"config key '{where}.window' must be >= 0, got {self.window}")
            if self.impl not in ATTENTION_IMPLS:
                raise ConfigError(f"config key '{where}.impl' must be one of {ATTENTION_IMPLS}, got {self.impl!r}")

    stateful = True

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        self.h, self.hkv = cfg.num_heads, opts.num_kv_heads or cfg.num_heads
        self.dk = cfg.resolved_head_dim
        self.window, self.theta = opts.window, cfg.rope_theta
        self.impl = opts.impl
        dt = jnp.dtype(cfg.compute_dtype)
        d = cfg.d_model
        self.wq = Linear(d, self.h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d, self.hkv * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, self.hkv * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wo = Linear(self.h * self.dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.q_norm = RMSNorm(self.dk, rngs=rngs, axes=("kv",)) if opts.qk_norm else None
        self.k_norm = RMSNorm(self.dk, rngs=rngs, axes=("kv",)) if opts.qk_norm else None

    def _qkv(self, x, positions):
        b, t, _ = x.shape
        q = self.wq(x).reshape(b, t, self.h, self.dk)
        k = self.wk(x).reshape(b, t, self.hkv, self.dk)
        v = self.wv(x).reshape(b, t, self.hkv, self.dk)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope(q, positions, self.theta), rope(k, positions, self.theta), v

    def __call__(self, x, *, segment_ids=None, tokens=None):
        b, t, _ = x.shape
        if segment_ids is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        else:  # RoPE positions restart at each packed document
            positions = positions_in_segment(segment_ids)
        q, k, v = self._qkv(x, positions)
        # (cuDNN takes no packed segments: with segment_ids, "cudnn" raises and "auto" uses XLA)
        o = causal_attention(q, k, v, segment_ids=segment_ids, window=self.window, impl=self.impl)
        return self.wo(o.reshape(b, t, self.h * self.dk))

    def init_state(self, batch_size: int, max_len: int):
        shape = (batch_size, max_len, self.hkv, self.dk)
        return {"k": jnp.zeros(shape, self.wk.dtype), "v": jnp.zeros(shape, self.wv.dtype),
                "pos": jnp.zeros((), jnp.int32)}

    def prefill(self, x, state, *, tokens=None):
        b, t, _ = x.shape
        pos0 = state["pos"]
        positions = pos0 + jnp.broadcast_to(jnp.arange(t), (b, t))
        q, k, v = self._qkv(x, positions)
        kc = jax.lax.dynamic_update_slice(state["k"], k.astype(state["k"].dtype), (0, pos0, 0, 0))
        vc = jax.lax.dynamic_update_slice(state["v"], v.astype(state["v"].dtype), (0, pos0, 0, 0))
        max_len = kc.shape[1]
        k_pos = jnp.broadcast_to(jnp.arange(max_len), (b, max_len))
        o = causal_attention(q, kc, vc, window=self.window, q_positions=positions, k_positions=k_pos,
                             k_valid=k_pos < pos0 + t)
        y = self.wo(o.reshape(b, t, self.h * self.dk))
        return y, {"k": kc, "v": vc, "pos": pos0 + t}

    def step(self, x, state, *, token=None):
        y, state = self.prefill(x[:, None, :], state)
        return y[:, 0], state
