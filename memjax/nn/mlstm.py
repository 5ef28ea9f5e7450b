"""The xLSTM mLSTM block (Beck et al. 2024, the mLSTM layer of "xLSTM", pre-up-projection form).

Layout (``inner = proj_factor * d_model``, ``H = num_heads`` heads of ``inner / H`` channels)::

    x_m, z = split(x W_up)                                      up-projection, [B, T, inner] each
    c      = SiLU(ShortConv(x_m))                               causal depthwise conv (width 4)
    q, k   = c W_q, c W_k;  v = x_m W_v                         headwise (block-diagonal), [B, T, H, inner / H]
    i, f   = [q, k, v] W_i + b_i,  [q, k, v] W_f + b_f          per-head gate pre-activations
    h      = mlstm(q, k, v, i, f)                               memjax.memory.mlstm (k scaled by K^-1/2)
    h      = RMSNorm_per_head(h) + skip * c                     per-head norm, learnable skip
    y      = (h * SiLU(z)) W_down                               output gate, down-projection

As in xLSTM the gate weights start at zero, the forget-gate biases at ``linspace(3, 6)`` over the
heads (``sigmoid(f)`` from 0.95 to 0.998: long memories at first) and the input-gate biases at
``N(0, 0.1)``. The per-head norm is an RMSNorm over each head's channels with a scale per channel
(xLSTM's multi-head layer norm without centring).

Decoding cache: :class:`MLSTMCache` ``(conv, C, n, m)``: the short conv's window
``[B, conv_width - 1, inner]`` (``None`` with ``conv_width=0``) and the stabilised memory state
(:class:`memjax.memory.mlstm.MLSTMState`, float32; empty: ``(0, 0, m = -inf)``). A call with a
cache runs the chunked form from the cache for ``T > 1`` (prefill) and the recurrent form for
``T = 1``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.mlstm import MODES, empty_state, mlstm
from memjax.nn.block import Block
from memjax.nn.layers import Linear, ShortConv, param
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.validate import check_choice, check_no_segments, check_nonnegative, check_positive


class MLSTMCache(NamedTuple):
    """Decoding cache of :class:`MLSTM`: the short-conv window (or ``None``) and the memory
    state ``C [B, H, K, V]``, ``n [B, H, K]``, ``m [B, H]`` (float32)."""

    conv: jax.Array | None
    C: jax.Array
    n: jax.Array
    m: jax.Array


def forget_bias_init(low: float = 3.0, high: float = 6.0):
    """Biases ``linspace(low, high)`` over the (last) axis: ``sigmoid(f)`` near 1 at init."""

    def init(key, shape, dtype):
        del key
        return jnp.broadcast_to(jnp.linspace(low, high, shape[-1], dtype=dtype), shape)

    return init


@register_block("mlstm", aliases=("mL",))
class MLSTM(Block):
    """xLSTM's mLSTM layer (see the module docstring).

    Args:
      d_model: model width; ``x, y: [B, T, d_model]``.
      num_heads: memory heads; ``proj_factor * d_model`` must be divisible by it.
      proj_factor: up-projection factor (2 in xLSTM).
      conv_width: causal depthwise conv before q, k; 0: none.
      chunk_size: chunk length of the chunked (training / prefill) form.
      mode: training form, ``"chunked"`` or ``"recurrent"`` (same result, slower).
      kernel: the chunked form's ``impl`` (``"auto"``, ``"xla"`` or ``"pallas_tpu"``: the fused
        Mosaic kernel, :func:`memjax.memory.mlstm.mlstm`).
      forget_bias: ``(low, high)`` of the forget-gate bias init (``linspace`` over heads).
      norm_eps: epsilon of the per-head RMSNorm.
      dtype: compute dtype (parameters and the memory state stay float32).
      seq_axis: mesh axis that time is split over in training (``None``: no sequence parallelism;
        :func:`memjax.memory.mlstm.mlstm`'s ``seq_axis``).
    """

    stateful = True

    def __init__(self, d_model: int, *, num_heads: int = 4, proj_factor: float = 2.0, conv_width: int = 4,
                 chunk_size: int = 64, mode: str = "chunked", kernel: str = "auto", forget_bias: tuple = (3.0, 6.0),
                 norm_eps: float = 1e-6, dtype=jnp.float32, seq_axis: str | None = None, rngs: nnx.Rngs):
        name = type(self).__name__
        check_positive(name, d_model=d_model, num_heads=num_heads, proj_factor=proj_factor, chunk_size=chunk_size)
        check_nonnegative(name, conv_width=conv_width)
        check_choice(name, "mode", mode, MODES)
        check_choice(name, "kernel", kernel, ("auto", "xla", "pallas_tpu"))
        inner = int(round(proj_factor * d_model))
        if inner % num_heads:
            raise ValueError(f"{name}: num_heads ({num_heads}) must divide the inner width proj_factor * d_model "
                             f"= {inner}")
        if len(tuple(forget_bias)) != 2:
            raise ValueError(f"{name}: forget_bias must be a (low, high) pair, got {forget_bias!r}")
        self.h, self.dh, self.inner = num_heads, inner // num_heads, inner
        self.chunk_size, self.mode, self.conv_width, self.seq_axis = chunk_size, mode, conv_width, seq_axis
        self.norm_eps, self.kernel = norm_eps, kernel
        dt = jnp.dtype(dtype)
        self.dtype = dt
        d, h = d_model, num_heads
        zeros = nnx.initializers.zeros
        self.w_up = Linear(d, 2 * inner, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.conv = ShortConv(inner, conv_width, rngs=rngs, axes=("heads",)) if conv_width > 0 else None
        headwise = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2)
        self.wq, self.wk, self.wv = (param(rngs, headwise, (h, self.dh, self.dh), ("heads", "kv", "kv"))
                                     for _ in range(3))
        self.wi = Linear(3 * inner, h, ("kv", "heads"), rngs=rngs, dtype=jnp.float32, use_bias=True, init=zeros)
        self.wf = Linear(3 * inner, h, ("kv", "heads"), rngs=rngs, dtype=jnp.float32, use_bias=True, init=zeros)
        self.wi.bias = param(rngs, nnx.initializers.normal(0.1), (h,), ("heads",))
        self.wf.bias = param(rngs, forget_bias_init(*map(float, forget_bias)), (h,), ("heads",))
        self.norm_scale = param(rngs, nnx.initializers.ones, (inner,), ("heads",))
        self.skip = param(rngs, nnx.initializers.ones, (inner,), ("heads",))
        self.w_down = Linear(inner, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    # ------------------------------------------------------------------ pieces

    def _inputs(self, x, segment_ids=None, window=None):
        """``(q, k, v, i, f, c, z, window)``: memory inputs ``[B, T, H, dh]`` / ``[B, T, H]``, the
        conv activation ``c`` and the gate branch ``z`` ``[B, T, inner]``, the new conv window."""
        b, t, _ = x.shape
        x_m, z = jnp.split(self.w_up(x), 2, axis=-1)
        if self.conv is None:
            c = x_m
        elif window is None:
            c = self.conv(x_m, segment_ids)
        else:
            c, window = self.conv(x_m, cache=window)
        c = jax.nn.silu(c)
        q, k, v = (self._headwise(w, y) for w, y in ((self.wq, c), (self.wk, c), (self.wv, x_m)))
        qkv = jnp.concatenate([y.reshape(b, t, self.inner) for y in (q, k, v)], axis=-1).astype(jnp.float32)
        i, f = self.wi(qkv), self.wf(qkv)
        return q, k, v, i, f, c, z, window

    def _headwise(self, w, y):
        """Block-diagonal (per-head) projection of ``y [B, T, inner]`` -> ``[B, T, H, dh]``."""
        b, t, _ = y.shape
        y = y.reshape(b, t, self.h, self.dh).astype(self.dtype)
        return jnp.einsum("bthd,hde->bthe", y, w[...].astype(self.dtype))

    def _output(self, hs, c, z):
        b, t = hs.shape[:2]
        hf = hs.astype(jnp.float32)
        hf = hf * jax.lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + self.norm_eps)
        hf = hf.reshape(b, t, self.inner) * self.norm_scale[...]
        out = hf.astype(self.dtype) + self.skip[...].astype(self.dtype) * c
        return self.w_down(out * jax.nn.silu(z))

    # ------------------------------------------------------------------ Block interface

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: MLSTMCache | None = None):
        """``x: [B, T, d_model]`` -> ``y``, or ``(y, cache)`` with a cache (any ``T >= 1``)."""
        if cache is None:
            q, k, v, i, f, c, z, _ = self._inputs(x, segment_ids)
            memory = lambda seq_axis, **a: mlstm(**a, mode=self.mode, chunk_size=self.chunk_size, impl=self.kernel,
                                                 seq_axis=seq_axis)
            # (time split over mesh axis seq_axis, if given)
            hs, _ = over_sequence(memory, dict(q=q, k=k, v=v, i=i, f=f, segment_ids=segment_ids), {},
                                  axis=self.seq_axis, enabled=self.mode == "chunked")
            return self._output(hs, c, z)
        check_no_segments(type(self).__name__, segment_ids)
        q, k, v, i, f, c, z, window = self._inputs(x, window=cache.conv)
        mode = "chunked" if x.shape[1] > 1 else "recurrent"
        hs, (cm, nm, mm) = mlstm(q, k, v, i, f, initial_state=(cache.C, cache.n, cache.m), mode=mode,
                                 chunk_size=self.chunk_size, impl=self.kernel)
        return self._output(hs, c, z), MLSTMCache(window, cm, nm, mm)

    def init_cache(self, batch_size: int, max_length: int) -> MLSTMCache:
        """A zero conv window and the empty memory ``(0, 0, -inf)`` (``max_length`` is not needed)."""
        window = None if self.conv is None else self.conv.init_cache(batch_size, self.dtype)
        return MLSTMCache(window, *empty_state(batch_size, self.h, self.dh, self.dh))
