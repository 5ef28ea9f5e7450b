"""ParaRNN blocks (Danieli et al. 2025): a diagonal GRU (``pararnn_gru``, alias ``PG``) or LSTM
(``pararnn_lstm``, alias ``PL``) trained in parallel over time by Newton iterations
(:mod:`memjax.memory.pararnn`)::

    pre  = ShortConv(x) W_in + bias        [B, T, H, G*Dh]   gate pre-activations (G = 3 or 4)
    h    = ParaRNN_cell(pre; a)            [B, T, H, Dh]     diagonal recurrent weights a: [H, Dh]
    y    = (h * silu(x W_gate)) W_out

Width ``W = expand * d_model`` split into ``num_heads`` heads of ``Dh`` channels (the cells act
per channel, so the heads only group the parameters). The conv (width ``conv_width``, 0 for none)
gives the cell a short local context, as in Mamba-style blocks. Gate biases start so that the
state is kept: the GRU's update gate ``z`` at ``sigmoid(-1)``, the LSTM's forget gate at
``sigmoid(1)``. Decoding cache: :class:`ParaRNNCache` (``conv: [B, conv_width - 1, d_model]``,
``rnn``: the cell state ``[B, H, Dh]`` (GRU) or ``[B, H, 2, Dh]`` (LSTM) float32); a call with a
cache runs the Newton form for ``T > 1`` tokens and one sequential step for ``T = 1``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.pararnn import CELLS, pararnn, state_shape
from memjax.nn.block import Block
from memjax.nn.layers import Linear, ShortConv, param
from memjax.nn.registry import register_block
from memjax.nn.validate import check_choice, check_no_segments, check_nonnegative, check_positive

# bias of each gate's pre-activation at initialisation (a kept state: slow update / open forget gate)
_GATE_BIAS = {"gru": (-1.0, 0.0, 0.0), "lstm": (1.0, 0.0, 0.0, 0.0)}


class ParaRNNCache(NamedTuple):
    """Decoding cache of the ParaRNN blocks: the conv window ``conv: [B, conv_width - 1, d_model]``
    (compute dtype; ``[B, 0, d_model]`` without a conv) and the cell state ``rnn`` (float32)."""

    conv: jax.Array
    rnn: jax.Array


class ParaRNNBlock(Block):
    """A diagonal nonlinear RNN block; ``[B, T, d_model] -> [B, T, d_model]`` (module docstring).

    Args:
      d_model: model width.
      num_heads: heads the recurrence width is split into (must divide it).
      expand: recurrence width ``W = expand * d_model``.
      conv_width: width of the causal depthwise conv before the input projection (0: none).
      a_scale: the recurrent weights ``a`` start uniform in ``[-a_scale, a_scale]``.
      mode: training form, ``"newton"`` (parallel) or ``"sequential"`` (``lax.scan``).
      max_iters, tol: Newton iterations (at most) and the early-exit tolerance (None: always
        ``max_iters``).
      dtype: compute dtype of the projections (the recurrence runs in float32).
    """

    stateful = True
    cell_name = "gru"

    def __init__(self, d_model: int, *, num_heads: int = 4, expand: float = 1.0, conv_width: int = 4,
                 a_scale: float = 0.5, mode: str = "newton", max_iters: int = 32, tol: float | None = 1e-5,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        name = type(self).__name__
        check_positive(name, d_model=d_model, num_heads=num_heads, max_iters=max_iters)
        check_nonnegative(name, conv_width=conv_width, a_scale=a_scale)
        if tol is not None:
            check_nonnegative(name, tol=tol)
        check_choice(name, "mode", mode, ("newton", "sequential"))
        width = int(d_model * expand)
        if expand <= 0 or width == 0 or width % num_heads:
            raise ValueError(f"{name}: expand: width {width} must be positive and divisible by num_heads "
                             f"({num_heads})")
        self.cell = CELLS[self.cell_name]
        self.mode, self.max_iters, self.tol = mode, int(max_iters), tol
        self.h, self.dh = num_heads, width // num_heads
        self.w = width
        self.dtype = jnp.dtype(dtype)
        g = self.cell.gates
        self.conv = ShortConv(d_model, conv_width, rngs=rngs, axes=("embed",)) if conv_width else None
        self.w_in = Linear(d_model, g * width, ("embed", "mlp"), rngs=rngs, dtype=self.dtype)
        bias = jnp.repeat(jnp.asarray(_GATE_BIAS[self.cell_name], jnp.float32), self.dh)  # [G*Dh] per head

        def bias_init(key, shape, dtype):
            return jnp.broadcast_to(bias, shape).astype(dtype)

        self.bias = param(rngs, bias_init, (num_heads, g * self.dh), ("heads", "kv"))
        a_init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -a_scale, a_scale)
        for k in self.cell.params:  # a_z, a_r, a_c (GRU) / a_f, a_i, a_o, a_c (LSTM): [H, Dh]
            setattr(self, k, param(rngs, a_init, (num_heads, self.dh), ("heads", "kv")))
        self.w_gate = Linear(d_model, width, ("embed", "mlp"), rngs=rngs, dtype=self.dtype)
        self.wo = Linear(width, d_model, ("mlp", "embed"), rngs=rngs, dtype=self.dtype)

    def _pre(self, u):
        """Gate pre-activations ``[B, T, H, G*Dh]``: per head, gate-major (the cell's layout)."""
        b, t, _ = u.shape
        g = self.cell.gates
        pre = self.w_in(u).reshape(b, t, g, self.h, self.dh)
        pre = jnp.moveaxis(pre, 2, 3).reshape(b, t, self.h, g * self.dh)
        return pre.astype(jnp.float32) + self.bias[...]

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: ParaRNNCache | None = None):
        b, t, _ = x.shape
        if cache is None:
            u, conv = (x if self.conv is None else self.conv(x, segment_ids)), None
            mode, h0 = self.mode, None
        else:
            check_no_segments(type(self).__name__, segment_ids)
            if self.conv is None:
                u, conv = x, cache.conv
            else:
                u, conv = self.conv(x, cache=cache.conv)
            mode, h0 = ("sequential" if t == 1 else self.mode), cache.rnn
        params = {k: getattr(self, k)[...] for k in self.cell.params}
        h, state = pararnn(self.cell, params, self._pre(u), initial_state=h0, segment_ids=segment_ids,
                           mode=mode, max_iters=self.max_iters, tol=self.tol)
        gate = jax.nn.silu(self.w_gate(x))
        y = self.wo(gate * h.reshape(b, t, self.w).astype(gate.dtype))
        return y if cache is None else (y, ParaRNNCache(conv.astype(cache.conv.dtype), state.astype(jnp.float32)))

    def init_cache(self, batch_size: int, max_length: int) -> ParaRNNCache:
        d_model = self.w_in.kernel.shape[0]
        conv = (jnp.zeros((batch_size, 0, d_model), self.dtype) if self.conv is None
                else self.conv.init_cache(batch_size, self.dtype))
        return ParaRNNCache(conv, jnp.zeros(state_shape(self.cell, batch_size, (self.h,), self.dh), jnp.float32))


@register_block("pararnn_gru", aliases=("PG",))
class ParaGRU(ParaRNNBlock):
    """ParaRNN block with the diagonal GRU cell (:data:`memjax.memory.pararnn.GRU`)."""

    cell_name = "gru"


@register_block("pararnn_lstm", aliases=("PL",))
class ParaLSTM(ParaRNNBlock):
    """ParaRNN block with the diagonal LSTM cell (:data:`memjax.memory.pararnn.LSTM`)."""

    cell_name = "lstm"
