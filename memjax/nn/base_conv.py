"""Gated short convolution (Zoology's ``BaseConv``; Arora et al. 2023, "Zoology: Measuring and
Improving Recall in Efficient Language Models"), alias ``C``::

    y = ShortConv(x) * (x W + b)                              [B, T, d_model] -> [B, T, d_model]

a causal depthwise convolution of width ``conv_width`` (Zoology: 3) gated elementwise by a linear
projection. Zoology's MQAR baselines put it in front of attention and its approximations
(``Hybrid([BaseConv, MHA])`` over 2 layers: layer 0 the conv, layer 1 attention with one head), so
the first layer can mix each token with the one before it and the second find a key's value with
a single attention head; ``model.pattern = "C,A"`` is that model. Zoology's module adds its input
back inside the mixer as well; here the model's residual alone does.

Decoding cache: :class:`BaseConvCache`, the conv's last ``conv_width - 1`` inputs.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.nn.block import Block
from memjax.nn.layers import Linear, ShortConv
from memjax.nn.registry import register_block
from memjax.nn.validate import check_no_segments


class BaseConvCache(NamedTuple):
    """Decoding cache of :class:`BaseConv`: the last ``conv_width - 1`` inputs ``conv: [B,
    conv_width - 1, d_model]`` (compute dtype; oldest first)."""

    conv: jax.Array


@register_block("base_conv", aliases=("C",))
class BaseConv(Block):
    """``y = ShortConv(x) * (x W + b)``; ``[B, T, d_model] -> [B, T, d_model]``.

    Args:
      d_model: model width (the conv is depthwise over it).
      conv_width: taps of the causal convolution (``y_t`` sees ``x_{t - conv_width + 1 .. t}``).
      dtype: compute dtype.

    With ``segment_ids`` the window never reaches into a previous document.
    """

    stateful = True

    def __init__(self, d_model: int, *, conv_width: int = 3, dtype=jnp.float32, rngs: nnx.Rngs):
        if conv_width < 1:
            raise ValueError(f"BaseConv: conv_width must be >= 1, got {conv_width}")
        self.dtype = jnp.dtype(dtype)
        self.conv = ShortConv(d_model, conv_width, rngs=rngs)
        self.proj = Linear(d_model, d_model, ("embed", "mlp"), rngs=rngs, use_bias=True, dtype=self.dtype)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: BaseConvCache | None = None):
        xc = x.astype(self.dtype)
        gate = self.proj(xc)
        if cache is None:
            return (self.conv(xc, segment_ids) * gate).astype(x.dtype)
        check_no_segments("BaseConv", segment_ids)
        u, window = self.conv(xc, cache=cache.conv)
        return (u * gate).astype(x.dtype), BaseConvCache(window)

    def init_cache(self, batch_size: int, max_length: int) -> BaseConvCache:
        return BaseConvCache(self.conv.init_cache(batch_size, self.dtype))
