"""Small building blocks shared by every family: projections with logical axes, RMSNorm, short conv.

Parameters carry ``logical_axes`` metadata (e.g. ``("embed", "mlp")``); the rules in
``config.mesh.rules`` map those names to mesh axes (see ``memjax.model.sharding``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def dtype_of(name: str):
    return jnp.dtype(name)


def param(rngs: nnx.Rngs, init, shape, axes, dtype=jnp.float32) -> nnx.Param:
    """An ``nnx.Param`` initialised with ``init(key, shape, dtype)`` carrying logical axis names."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=tuple(axes))


class Linear(nnx.Module):
    """``y = x W (+ b)``; ``W: [d_in, d_out]`` with logical axes ``axes``. Computes in ``dtype``."""

    def __init__(self, d_in: int, d_out: int, axes=("embed", "mlp"), *, rngs: nnx.Rngs,
                 use_bias: bool = False, dtype=jnp.float32, init=None, param_dtype=jnp.float32):
        init = init or nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = param(rngs, init, (d_in, d_out), axes, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (d_out,), axes[1:], param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale``, statistics in float32."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, axes=("embed",)):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def segment_start_mask(segment_ids: jax.Array | None, shift: int) -> jax.Array | None:
    """``[B, T]`` bool: True where position ``t - shift`` belongs to the same segment as ``t``."""
    if segment_ids is None:
        return None
    prev = jnp.pad(segment_ids, ((0, 0), (shift, 0)), constant_values=-1)[:, : segment_ids.shape[1]]
    return prev == segment_ids


class ShortConv(nnx.Module):
    """Causal depthwise 1-D convolution over time, ``y_t = sum_i w_i * x_{t-i}`` (width ``W``).

    Used before q/k/v in DeltaNet-style and Mamba-style blocks. With ``segment_ids`` the
    window never reaches into a previous document. Decoding state: the last ``W - 1`` inputs.
    """

    def __init__(self, dim: int, width: int = 4, *, rngs: nnx.Rngs, axes=("mlp",)):
        if width < 1:
            raise ValueError(f"conv width must be >= 1, got {width}")
        self.width = width
        self.weight = param(rngs, nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                                     in_axis=0, out_axis=1),
                            (width, dim), ("conv", *axes))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        w = self.weight[...].astype(x.dtype)  # w[0] multiplies x_t, w[i] multiplies x_{t-i}
        y = x * w[0]
        for i in range(1, self.width):
            shifted = jnp.pad(x, ((0, 0), (i, 0), (0, 0)))[:, : x.shape[1]]
            same = segment_start_mask(segment_ids, i)
            if same is not None:
                shifted = jnp.where(same[..., None], shifted, 0)
            y = y + shifted * w[i]
        return y

    def init_state(self, batch_size: int, dim: int, dtype=jnp.float32) -> jax.Array:
        return jnp.zeros((batch_size, self.width - 1, dim), dtype)

    def step(self, x: jax.Array, state: jax.Array):
        """``x: [B, D]``, ``state: [B, W-1, D]`` (oldest first) -> ``(y [B, D], state)``."""
        w = self.weight[...].astype(x.dtype)
        window = jnp.concatenate([state.astype(x.dtype), x[:, None, :]], axis=1)  # [B, W, D], newest last
        y = jnp.einsum("bwd,wd->bd", window, w[::-1])
        return y, window[:, 1:].astype(state.dtype)

    def prefill_state(self, x: jax.Array) -> jax.Array:
        """Decoding state after consuming ``x: [B, T, D]`` from a zero state."""
        pad = jnp.pad(x, ((0, 0), (self.width - 1, 0), (0, 0)))
        return pad[:, pad.shape[1] - (self.width - 1):]


def positions_in_segment(segment_ids):
    """Index of each token within its packed document, ``[B, T]``."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx
