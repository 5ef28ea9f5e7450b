"""Mamba-1 block (Gu & Dao 2023; ``mamba_ssm``'s ``Mamba`` module), registered as ``mamba1``
(alias ``M1``)::

    x, z = u W_x, u W_z                                   (d_inner = expand * d_model; in_proj)
    x = SiLU(ShortConv(x) + conv_bias)                    (causal depthwise, width conv_width)
    dt_low, B, C = split(x W_xproj, [dt_rank, N, N])      (x_proj)
    delta = dt_low W_dt                                   (dt_proj; its bias is dt_bias)
    y = mamba1_scan(x, delta, -exp(A_log), B, C, D, z, delta_bias=dt_bias, delta_softplus=True)
    out = y W_out                                         (out_proj)

Initialisation as in ``mamba_ssm``: ``W_dt ~ U(-dt_rank^-1/2, dt_rank^-1/2)``, ``dt_bias`` the
inverse softplus of ``dt ~ logU(dt_min, dt_max)`` (floored at 1e-4), ``A_log[d, n] = log(n + 1)``
(S4D-Real), ``D = 1``. ``B, C`` are shared by all channels (Mamba-1 has one group).

Decoding cache: :class:`Mamba1Cache` (the short conv's last ``conv_width - 1`` inputs and the SSM
state ``[B, d_inner, N]`` float32); ``T > 1`` tokens run the block's parallel form from the cached
state, ``T = 1`` the recurrent form.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.mamba1 import MODES, mamba1_scan
from memjax.nn.block import Block
from memjax.nn.layers import Linear, ShortConv, param
from memjax.nn.registry import register_block
from memjax.nn.ssm_blocks import decode_mode, dt_bias_init
from memjax.nn.validate import check_choice, check_nonnegative, check_no_segments, check_positive


class Mamba1Cache(NamedTuple):
    """Decoding cache of :class:`Mamba1`: ``conv: [B, conv_width - 1, d_inner]`` (compute dtype)
    and ``ssm: [B, d_inner, d_state]`` float32."""

    conv: jax.Array
    ssm: jax.Array


@register_block("mamba1", aliases=("M1",))
class Mamba1(Block):
    """Mamba-1 block: ``[B, T, d_model] -> [B, T, d_model]`` (equations in the module docstring).

    Args:
      d_model: model width.
      d_state: ``N``, the state size per channel.
      expand: ``d_inner = expand * d_model`` channels.
      dt_rank: rank of the step-size projection; 0: ``ceil(d_model / 16)``.
      conv_width: width of the causal depthwise short convolution.
      dt_min, dt_max: ``softplus(dt_bias)`` starts log-uniform in ``[dt_min, dt_max]``.
      mode: training form, ``"auto"`` (the token loop on CPU, where it is fastest; chunked
        elsewhere), ``"chunked"``, ``"scan"`` or ``"recurrent"`` (:func:`memjax.memory.mamba1.mamba1_scan`).
      chunk_size: ``C`` of the chunked form (its chunk tensor is ``C^2 d_inner N`` per row).
      dtype: compute dtype of the projections and the scan's inputs.
    """

    stateful = True

    def __init__(self, d_model: int, *, d_state: int = 16, expand: int = 2, dt_rank: int = 0, conv_width: int = 4,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, mode: str = "auto", chunk_size: int = 8,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        check_positive("Mamba1", d_model=d_model, d_state=d_state, expand=expand, conv_width=conv_width,
                       dt_min=dt_min, dt_max=dt_max, chunk_size=chunk_size)
        check_nonnegative("Mamba1", dt_rank=dt_rank)
        check_choice("Mamba1", "mode", mode, MODES)
        if dt_min > dt_max:
            raise ValueError(f"Mamba1: dt_min ({dt_min}) exceeds dt_max ({dt_max})")
        self.mode, self.chunk_size = mode, chunk_size
        self.d_inner = expand * d_model
        self.n = d_state
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        dt = jnp.dtype(dtype)
        self.dtype = dt
        di, n, r = self.d_inner, self.n, self.dt_rank
        self.wx = Linear(d_model, di, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wz = Linear(d_model, di, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.conv = ShortConv(di, conv_width, rngs=rngs, axes=("heads",))
        self.conv_bias = param(rngs, nnx.initializers.zeros, (di,), ("heads",))
        self.x_proj = Linear(di, r + 2 * n, ("heads", "state"), rngs=rngs, dtype=dt)
        std = r ** -0.5
        self.dt_proj = Linear(r, di, ("state", "heads"), rngs=rngs, dtype=dt,
                              init=lambda k, s, d: jax.random.uniform(k, s, d, -std, std))
        self.dt_bias = param(rngs, dt_bias_init(dt_min, dt_max), (di,), ("heads",))
        self.a_log = param(rngs, lambda k, s, d: jnp.broadcast_to(jnp.log(jnp.arange(1, n + 1, dtype=d)), s),
                           (di, n), ("heads", "state"))
        self.skip = param(rngs, nnx.initializers.ones, (di,), ("heads",))
        self.wo = Linear(di, d_model, ("heads", "embed"), rngs=rngs, dtype=dt)

    def _run(self, u, *, segment_ids=None, cache: Mamba1Cache | None = None, mode: str):
        xs = self.wx(u)
        if cache is None:
            xs = self.conv(xs, segment_ids)
        else:
            xs, window = self.conv(xs, cache=cache.conv)
        xs = jax.nn.silu(xs + self.conv_bias[...].astype(xs.dtype))
        dt_low, Bm, Cm = jnp.split(self.x_proj(xs), [self.dt_rank, self.dt_rank + self.n], axis=-1)
        delta = self.dt_proj(dt_low)
        y, s = mamba1_scan(xs, delta, -jnp.exp(self.a_log[...]), Bm, Cm, D=self.skip[...], z=self.wz(u),
                           delta_bias=self.dt_bias[...], delta_softplus=True,
                           initial_state=None if cache is None else cache.ssm, segment_ids=segment_ids,
                           mode=mode, chunk_size=self.chunk_size)
        out = self.wo(y)
        if cache is None:
            return out
        return out, Mamba1Cache(window, s.astype(jnp.float32))

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: Mamba1Cache | None = None):
        if cache is None:
            return self._run(x, segment_ids=segment_ids, mode=self.mode)
        check_no_segments("Mamba1", segment_ids)
        parallel = "chunked" if self.mode == "recurrent" else self.mode
        return self._run(x, cache=cache, mode=decode_mode(x, parallel))

    def init_cache(self, batch_size: int, max_length: int) -> Mamba1Cache:
        return Mamba1Cache(self.conv.init_cache(batch_size, self.dtype),
                           jnp.zeros((batch_size, self.d_inner, self.n), jnp.float32))
