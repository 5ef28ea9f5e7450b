"""RWKV-7 "Goose" time mixing (Peng et al. 2025, "RWKV-7 Goose with Expressive Dynamic State
Evolution") on the diagonal-plus-low-rank delta rule (:func:`memjax.memory.dplr.dplr_delta_rule`).

With ``x'`` the previous token's input (zero at a document start) and ``dx = x' - x``::

    m_* = x + dx * mu_*                                   * in (r, w, k, v, a, g)   (token shift)
    r, k, v = m_r W_r, m_k W_k, m_v W_v                   [B, T, H, K]
    g       = -e^{-1/2} sigmoid(w_0 + tanh(m_w W_1) W_2)  log decay per channel, in (-e^{-1/2}, 0)
    a_gate  = sigmoid(a_0 + m_a A_1 A_2)                  in-context learning rate, (0, 1)
    gate    = sigmoid(m_g G_1) G_2                        output gate (a LoRA)
    kappa   = normalize(k * k_k) per head                 the removal key
    k       = k * (1 + (a_gate - 1) * k_a)                the replacement key
    S_t     = (diag(exp g_t) - (kappa_t * a_gate_t) kappa_t^T) S_{t-1} + k_t v_t^T
    o_t     = S_t^T r_t                                   (dplr_delta_rule with a = -kappa, b = kappa * a_gate,
                                                           scale 1)
    y       = ((GroupNorm_H(o) + (sum_K r * k * r_k) v) * gate) W_o

i.e. the paper's ``w = exp(-e^{-1/2} sigmoid(.))`` decay (RWKV-LM's ``-softplus(-.) - 0.5`` soft
clamp), the bonus ``((r * k * r_k).sum per head) * v`` and a per-head GroupNorm. The channel mix is
the model's ``F`` MLP block.

Left out: the value residual across layers (``v = lerp(v, v_first, sigmoid(LoRA))`` with the first
layer's values ``v_first``) needs the previous layer's values, which a standalone block does not
have; each block here uses its own ``v``. The layer-dependent initialisation of RWKV-LM is taken at
mid depth, the first matrices of the LoRAs start small and random instead of zero (so every path
is data-dependent from the start), and ``W_o`` starts like the other projections instead of zero.

Decoding cache: :class:`memjax.nn.vector_gated.RWKV6Cache` (the same content: the last token's input
``[B, d_model]`` for the token shift and the state ``[B, H, K, K]`` float32). A call with a cache
runs the chunked form for ``T > 1`` (prefill) and the recurrent form for ``T = 1``.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.dplr import MODES, dplr_delta_rule
from memjax.nn.associative import decoding_mode
from memjax.nn.block import Block
from memjax.nn.layers import Linear, l2_normalize, param, token_shift
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.validate import check_choice, check_heads, check_no_segments, check_positive
from memjax.nn.vector_gated import RWKV6Cache

_MIX = ("r", "w", "k", "v", "a", "g")  # the six token-shift interpolations
_MIX_POWER = (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)  # RWKV-LM: mu_* = 1 - (i / C) ** (power * (1 - depth))


def _lora_rank(d_model: int, factor: float, power: float) -> int:
    """RWKV-LM's LoRA widths: ``max(32, round(factor * d^power / 32) * 32)``."""
    return max(32, int(round(factor * d_model ** power / 32)) * 32)


def _small_uniform(key, shape, dtype):
    return jax.random.uniform(key, shape, dtype, -1e-2, 1e-2)


@register_block("rwkv7", aliases=("R7",))
class RWKV7(Block):
    """RWKV-7 time mixing (see the module docstring for the equations).

    Args:
      d_model: model width (= ``num_heads * head_dim``; keys and values both ``head_dim``).
      decay_rank, a_rank, gate_rank: LoRA widths of the decay, the in-context learning rate and the
        output gate (None: RWKV-LM's formulas, 32 or more).
      chunk_size, mode: the memory's form (:func:`memjax.memory.dplr.dplr_delta_rule`; chunk_size
        None: its default, 32 on CPU and 64 on GPU / TPU).
      norm_eps: GroupNorm epsilon (RWKV-7: ``64e-5``). dtype: compute dtype (the state is float32).
      seq_axis: mesh axis that time is split over in training (``None``: no sequence parallelism).
    """

    stateful = True

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 decay_rank: int | None = None, a_rank: int | None = None, gate_rank: int | None = None,
                 chunk_size: int | None = None, mode: str = "chunked", norm_eps: float = 64e-5, dtype=jnp.float32,
                 seq_axis: str | None = None, rngs: nnx.Rngs):
        name = type(self).__name__
        self.h, self.dk = check_heads(name, d_model, num_heads, head_dim)
        if self.h * self.dk != d_model:
            raise ValueError(f"{name}: num_heads * head_dim must equal d_model, got {self.h} * {self.dk} != {d_model}")
        decay_rank = _lora_rank(d_model, 1.8, 0.5) if decay_rank is None else decay_rank
        a_rank = _lora_rank(d_model, 1.8, 0.5) if a_rank is None else a_rank
        gate_rank = _lora_rank(d_model, 0.6, 0.8) if gate_rank is None else gate_rank
        check_positive(name, decay_rank=decay_rank, a_rank=a_rank, gate_rank=gate_rank,
                       norm_eps=norm_eps)
        check_choice(name, "mode", mode, MODES)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size, self.mode, self.eps, self.seq_axis = chunk_size, mode, float(norm_eps), seq_axis
        self.dtype = jnp.dtype(dtype)
        d, h, dt = d_model, self.h, self.dtype
        depth = 0.5  # RWKV-LM's layer-dependent ramps, taken at mid depth
        ddd = jnp.arange(d, dtype=jnp.float32) / d
        self.mu = param(rngs, lambda key, shape, dtype: jnp.stack(
            [1.0 - ddd ** (p * (1 - depth)) for p in _MIX_POWER]).astype(dtype), (len(_MIX), d), (None, "embed"))
        n = jnp.arange(d, dtype=jnp.float32) / max(d - 1, 1)
        # decay speed -7 + 5 n^(0.85 + sqrt(depth)), + 0.5 for the soft clamp: slow to fast channels
        self.w0 = param(rngs, lambda key, shape, dtype: (-6.5 + 5.0 * n ** (0.85 + depth ** 0.5)).astype(dtype),
                        (d,), ("embed",))
        ortho = nnx.initializers.orthogonal(scale=0.1)
        self.w1 = param(rngs, _small_uniform, (d, decay_rank), ("embed", None))
        self.w2 = param(rngs, ortho, (decay_rank, d), (None, "embed"))
        self.a0 = param(rngs, nnx.initializers.zeros, (d,), ("embed",))
        self.a1 = param(rngs, _small_uniform, (d, a_rank), ("embed", None))
        self.a2 = param(rngs, ortho, (a_rank, d), (None, "embed"))
        self.g1 = param(rngs, _small_uniform, (d, gate_rank), ("embed", None))
        self.g2 = param(rngs, ortho, (gate_rank, d), (None, "embed"))
        self.k_k = param(rngs, nnx.initializers.constant(0.85), (d,), ("embed",))
        self.k_a = param(rngs, nnx.initializers.ones, (d,), ("embed",))
        self.r_k = param(rngs, nnx.initializers.zeros, (h, self.dk), ("heads", None))
        self.wr = Linear(d, d, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d, d, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, d, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wo = Linear(d, d, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.gn_scale = param(rngs, nnx.initializers.ones, (d,), ("heads",))
        self.gn_bias = param(rngs, nnx.initializers.zeros, (d,), ("heads",))

    def _time_mix(self, x, prev):
        """``(r, k, v, a, b, g, gate)``: the memory's inputs ``[B, T, H, K]`` (``g`` float32) and the
        output gate ``[B, T, d]``."""
        b, t, d = x.shape
        xf = x.astype(jnp.float32)
        dxf = (prev - x).astype(jnp.float32)
        mu = self.mu[...]
        m = {name: xf + dxf * mu[i] for i, name in enumerate(_MIX)}
        split = lambda y: y.reshape(b, t, self.h, self.dk)
        r = split(self.wr(m["r"].astype(self.dtype)))
        k = split(self.wk(m["k"].astype(self.dtype)))
        v = split(self.wv(m["v"].astype(self.dtype)))
        z = self.w0[...] + jnp.tanh(m["w"] @ self.w1[...]) @ self.w2[...]
        g = -math.exp(-0.5) * jax.nn.sigmoid(z)  # log decay in (-e^{-1/2}, 0)
        a_gate = split(jax.nn.sigmoid(self.a0[...] + (m["a"] @ self.a1[...]) @ self.a2[...]))
        gate = jax.nn.sigmoid(m["g"] @ self.g1[...]) @ self.g2[...]
        kf = k.astype(jnp.float32)
        heads = lambda p: p[...].reshape(self.h, self.dk)
        kappa = l2_normalize(kf * heads(self.k_k))
        kf = kf * (1 + (a_gate - 1) * heads(self.k_a))
        return (r, kf.astype(self.dtype), v, (-kappa).astype(self.dtype), (kappa * a_gate).astype(self.dtype),
                split(g), gate)

    def _output(self, o, r, k, v, gate):
        b, t = o.shape[:2]
        of = o.astype(jnp.float32)
        mean = of.mean(-1, keepdims=True)
        of = (of - mean) * jax.lax.rsqrt(((of - mean) ** 2).mean(-1, keepdims=True) + self.eps)
        of = of * self.gn_scale[...].reshape(self.h, self.dk) + self.gn_bias[...].reshape(self.h, self.dk)
        bonus = jnp.sum(r.astype(jnp.float32) * k.astype(jnp.float32) * self.r_k[...], -1, keepdims=True)
        of = of + bonus * v.astype(jnp.float32)
        return self.wo((of.reshape(b, t, -1) * gate).astype(self.dtype))

    def _memory(self, r, k, v, a, b, g, *, initial_state=None, segment_ids=None, mode=None, seq_axis=None):
        return dplr_delta_rule(r, k, v, a, b, g, scale=1.0, initial_state=initial_state, segment_ids=segment_ids,
                               mode=mode or self.mode, chunk_size=self.chunk_size, seq_axis=seq_axis)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: RWKV6Cache | None = None):
        """``x: [B, T, d_model]`` -> ``y``, or ``(y, cache)`` with a cache."""
        if cache is not None:
            check_no_segments(type(self).__name__, segment_ids)
        x = x.astype(self.dtype)
        prev = token_shift(x, segment_ids, None if cache is None else cache.shift)
        r, k, v, a, b, g, gate = self._time_mix(x, prev)
        if cache is None:
            # (time split over mesh axis seq_axis, if given)
            o, _ = over_sequence(self._memory, dict(r=r, k=k, v=v, a=a, b=b, g=g, segment_ids=segment_ids), {},
                                 axis=self.seq_axis, enabled=self.mode == "chunked")
            return self._output(o, r, k, v, gate)
        o, mem = self._memory(r, k, v, a, b, g, initial_state=cache.memory, mode=decoding_mode(x))
        return self._output(o, r, k, v, gate), RWKV6Cache(x[:, -1], mem.astype(jnp.float32))

    def init_cache(self, batch_size: int, max_length: int) -> RWKV6Cache:
        return RWKV6Cache(jnp.zeros((batch_size, self.h * self.dk), self.dtype),
                          jnp.zeros((batch_size, self.h, self.dk, self.dk), jnp.float32))
