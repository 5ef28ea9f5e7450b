"""Griffin recurrent block (De et al. 2024; RecurrentGemma's ``RecurrentBlock``), alias ``R``::

    gate = GeLU(x W_gate)                                   branch 1
    u    = ShortConv(x W_in)                                branch 2 (causal depthwise, width 4)
    r_a, r_x = BlockDiag_a(u) + b_a, BlockDiag_x(u) + b_x   per-head (block-diagonal) gate maps
    h    = RG-LRU(u, r_a, r_x; Lambda)                      (memjax.memory.rg_lru)
    y    = (gate * h) W_out

Width ``W = expand * d_model`` split into ``num_heads`` blocks for the gate maps. ``Lambda`` is
initialised so that ``a = sigmoid(Lambda)`` has ``a^2 ~ U(min_rad^2, max_rad^2)`` (Griffin: 0.9,
0.999). Decoding cache: :class:`RGLRUCache` (``conv: [B, W_conv - 1, W]``, ``rnn: [B, W]``
float32); ``y, cache = block(x, cache=cache)`` runs the scan form for ``T > 1`` tokens and the
recurrent form for ``T = 1``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.rg_lru import rglru
from memjax.nn.block import Block
from memjax.nn.layers import Linear, ShortConv, param
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.ssm_blocks import decode_mode
from memjax.nn.validate import check_choice, check_no_segments, check_positive


def _lambda_init(min_rad: float, max_rad: float):
    def init(key, shape, dtype):
        a = jnp.sqrt(jax.random.uniform(key, shape, jnp.float32, min_rad ** 2, max_rad ** 2))
        return (jnp.log(a) - jnp.log1p(-a)).astype(dtype)  # logit: sigmoid(Lambda) = a
    return init


class RGLRUCache(NamedTuple):
    """Decoding cache of :class:`RGLRUBlock`: the short conv's last ``conv_width - 1`` inputs
    ``conv: [B, conv_width - 1, W]`` (compute dtype) and the recurrence state ``rnn: [B, W]`` float32."""

    conv: jax.Array
    rnn: jax.Array


@register_block("rglru", aliases=("R",))
class RGLRUBlock(Block):
    """Griffin's recurrent block: GeLU gate branch times conv + RG-LRU branch; ``[B, T, d_model] -> [B, T, d_model]``.

    Args:
      d_model: model width.
      num_heads: blocks of the block-diagonal gate maps (must divide the width).
      expand: recurrence width ``W = expand * d_model`` (Griffin: 4/3 with an MLP block after).
      conv_width: width of the causal depthwise short convolution.
      c: gate temperature of the RG-LRU (8 in Griffin).
      min_rad, max_rad: ``a = sigmoid(Lambda)`` starts with ``a^2 ~ U(min_rad^2, max_rad^2)``.
      mode: training form, ``"scan"`` or ``"recurrent"``.
      dtype: compute dtype.
      seq_axis: mesh axis that time is split over in training (``None``: no sequence parallelism).
    """

    stateful = True

    def __init__(self, d_model: int, *, num_heads: int = 4, expand: float = 1.0, conv_width: int = 4, c: float = 8.0,
                 min_rad: float = 0.9, max_rad: float = 0.999, mode: str = "scan", dtype=jnp.float32,
                 seq_axis: str | None = None, rngs: nnx.Rngs):
        check_positive("RGLRUBlock", d_model=d_model, num_heads=num_heads, conv_width=conv_width, c=c)
        width = int(d_model * expand)
        if expand <= 0 or width % num_heads:
            raise ValueError(f"RGLRUBlock: expand: width {width} must be positive and divisible by num_heads "
                             f"({num_heads})")
        if not 0 < min_rad <= max_rad < 1:
            raise ValueError(f"RGLRUBlock: min_rad / max_rad must satisfy 0 < min_rad <= max_rad < 1, "
                             f"got {min_rad}, {max_rad}")
        check_choice("RGLRUBlock", "mode", mode, ("scan", "recurrent"))
        self.c, self.mode, self.seq_axis = c, mode, seq_axis
        d = d_model
        self.w = width
        self.h = num_heads
        self.bw = self.w // self.h
        dt = jnp.dtype(dtype)
        self.dtype = dt
        self.w_gate = Linear(d, self.w, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.w_in = Linear(d, self.w, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.conv = ShortConv(self.w, conv_width, rngs=rngs, axes=("mlp",))
        block_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2)
        self.gate_a_w = param(rngs, block_init, (self.h, self.bw, self.bw), ("heads", "kv", "kv"))
        self.gate_x_w = param(rngs, block_init, (self.h, self.bw, self.bw), ("heads", "kv", "kv"))
        self.gate_a_b = param(rngs, nnx.initializers.zeros, (self.h, self.bw), ("heads", "kv"))
        self.gate_x_b = param(rngs, nnx.initializers.zeros, (self.h, self.bw), ("heads", "kv"))
        self.lam = param(rngs, _lambda_init(min_rad, max_rad), (self.w,), ("mlp",))
        self.wo = Linear(self.w, d, ("mlp", "embed"), rngs=rngs, dtype=dt)

    def _gates(self, u):
        b, t, _ = u.shape
        uh = u.reshape(b, t, self.h, self.bw).astype(jnp.float32)
        ga = jnp.einsum("bthi,hij->bthj", uh, self.gate_a_w[...]) + self.gate_a_b[...]
        gx = jnp.einsum("bthi,hij->bthj", uh, self.gate_x_w[...]) + self.gate_x_b[...]
        return ga.reshape(b, t, self.w), gx.reshape(b, t, self.w)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: RGLRUCache | None = None):
        gate = jax.nn.gelu(self.w_gate(x))
        if cache is None:
            u, mode = self.conv(self.w_in(x), segment_ids), self.mode
        else:
            check_no_segments("RGLRUBlock", segment_ids)
            (u, conv), mode = self.conv(self.w_in(x), cache=cache.conv), decode_mode(x, "scan")
        ga, gx = self._gates(u)
        scan = lambda u, ga, gx, segment_ids, lam, initial_state, seq_axis: rglru(
            u, ga, gx, lam, c=self.c, segment_ids=segment_ids, initial_state=initial_state, mode=mode,
            seq_axis=seq_axis)
        time_args = dict(u=u, ga=ga, gx=gx, segment_ids=segment_ids)
        other_args = dict(lam=self.lam[...], initial_state=None if cache is None else cache.rnn)
        # training (no cache): time split over seq_axis, if any
        h, s = over_sequence(scan, time_args, other_args, axis=self.seq_axis,
                             enabled=mode == "scan" and cache is None)
        y = self.wo(gate * h.astype(gate.dtype))
        return y if cache is None else (y, RGLRUCache(conv, s.astype(jnp.float32)))

    def init_cache(self, batch_size: int, max_length: int) -> RGLRUCache:
        return RGLRUCache(self.conv.init_cache(batch_size, self.dtype), jnp.zeros((batch_size, self.w), jnp.float32))
