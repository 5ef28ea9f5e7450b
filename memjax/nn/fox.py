"""Forgetting Transformer attention (FoX, Lin et al. 2025): softmax attention with a forget gate.

Per query head ``h`` and token ``t`` a scalar gate ``f_t = sigmoid(x_t W_f + b_f)`` decays the
weight of older keys: ``o_t = sum_s softmax_s(q_t . k_s / sqrt(K) + log(f_{s+1} ... f_t)) v_s``,
i.e. the logits get ``D_ts = G_t - G_s`` with ``G = cumsum(log f)``
(:func:`memjax.memory.attention.causal_attention`'s ``forget_gate``). With the gate, position
information comes from the decay and FoX uses no RoPE by default. This is the basic FoX layer;
the "Pro" extras (output gate, output norm, key/value shift) are not included (``qk_norm`` is).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.attention import causal_attention
from memjax.memory.segments import positions
from memjax.nn.attention import Attention
from memjax.nn.cache import ForgetKVCache
from memjax.nn.layers import Linear, param
from memjax.nn.registry import register_block


@register_block("fox", aliases=("FoX",))
class ForgettingAttention(Attention):
    """FoX attention, ``[B, T, d_model] -> [B, T, d_model]``: :class:`memjax.nn.Attention` plus a
    per-head forget gate ``g = log_sigmoid(x W_f + b_f): [B, T, H]`` (float32) added to the logits
    as ``D_ts = sum_{s < l <= t} g_l``.

    Args (beyond :class:`memjax.nn.Attention`'s):

    - ``rope``: rotate q, k with RoPE as well (FoX's default, and this one's, is no RoPE).
    - ``fgate_bias_init``: initial ``b_f``; 0 (the paper's default for its data-dependent gate) makes
      the gate start near ``sigmoid(0) = 0.5``; larger values (e.g. 3 to 6) start it near 1,
      i.e. close to plain attention.

    ``impl="cudnn"`` passes the decay to cuDNN as a dense bias; ``"auto"`` uses XLA.
    Decoding cache: :class:`memjax.nn.cache.ForgetKVCache` (keys, values and each key's ``G``).
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 num_kv_heads: int | None = None, window: int = 0, qk_norm: bool = False, impl: str = "auto",
                 rope: bool = False, fgate_bias_init: float = 0.0, rope_theta: float = 10000.0,
                 norm_eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv_heads, window=window,
                         qk_norm=qk_norm, impl=impl, rope_theta=rope_theta, norm_eps=norm_eps, dtype=dtype,
                         rngs=rngs)
        self.use_rope = bool(rope)
        # float32 gate projection: d_model x H is cheap, and its logits feed a cumulative sum
        self.wf = Linear(d_model, self.h, ("embed", "heads"), rngs=rngs, dtype=jnp.float32)
        self.bf = param(rngs, nnx.initializers.constant(float(fgate_bias_init)), (self.h,), ("heads",))

    def _qkv(self, x, pos):
        if self.use_rope:
            return super()._qkv(x, pos)
        b, t, _ = x.shape
        q = self.wq(x).reshape(b, t, self.h, self.dk)
        k = self.wk(x).reshape(b, t, self.hkv, self.dk)
        v = self.wv(x).reshape(b, t, self.hkv, self.dk)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def log_forget_gate(self, x: jax.Array) -> jax.Array:
        """``g = log_sigmoid(x W_f + b_f)``: ``[B, T, H]`` float32, ``<= 0``."""
        return jax.nn.log_sigmoid(self.wf(x) + self.bf[...])

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: ForgetKVCache | None = None):
        b, t, _ = x.shape
        g = self.log_forget_gate(x)
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("ForgettingAttention: segment_ids are not supported with a decoding cache")
            q_pos = cache.positions(t)
            q, k, v = self._qkv(x, q_pos)
            cache, k_pos, valid, q_cum = cache.update(k, v, g)
            o = causal_attention(q, cache.k, cache.v, window=self.window, q_positions=q_pos, k_positions=k_pos,
                                 k_valid=valid, q_gate_cumsum=q_cum, k_gate_cumsum=cache.gate_cumsum)
            return self.wo(o.reshape(b, t, self.h * self.dk)), cache
        q, k, v = self._qkv(x, positions(b, t, segment_ids))
        o = causal_attention(q, k, v, segment_ids=segment_ids, window=self.window, forget_gate=g, impl=self.impl)
        return self.wo(o.reshape(b, t, self.h * self.dk))

    def init_cache(self, batch_size: int, max_length: int) -> ForgetKVCache:
        return ForgetKVCache.init(batch_size, max_length, self.hkv, self.dk, self.h, self.wk.dtype)

