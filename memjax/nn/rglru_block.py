"""Griffin recurrent block (De et al. 2024; RecurrentGemma's ``RecurrentBlock``), alias ``R``::

    gate = GeLU(x W_gate)                                   branch 1
    u    = ShortConv(x W_in)                                branch 2 (causal depthwise, width 4)
    r_a, r_x = BlockDiag_a(u) + b_a, BlockDiag_x(u) + b_x   per-head (block-diagonal) gate maps
    h    = RG-LRU(u, r_a, r_x; Lambda)                      (memjax.memory.rg_lru)
    y    = (gate * h) W_out

Width ``W = expand * d_model`` split into ``model.num_heads`` blocks for the gate maps.
``Lambda`` is initialised so that ``a = sigmoid(Lambda)`` has ``a^2 ~ U(min_rad^2, max_rad^2)``
(Griffin: 0.9, 0.999). Decoding state ``{"conv": [B, W_conv - 1, W], "rnn": [B, W] float32}``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ConfigError
from memjax.memory.rg_lru import rglru
from memjax.nn.block import Block
from memjax.nn.layers import Linear, ShortConv, param
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.ssm_blocks import conv_with_state


def _lambda_init(min_rad: float, max_rad: float):
    def init(key, shape, dtype):
        a = jnp.sqrt(jax.random.uniform(key, shape, jnp.float32, min_rad ** 2, max_rad ** 2))
        return (jnp.log(a) - jnp.log1p(-a)).astype(dtype)  # logit: sigmoid(Lambda) = a
    return init


@register_block("rglru", aliases=("R",))
class RGLRUBlock(Block):
    """Griffin's recurrent block: GeLU gate branch times conv + RG-LRU branch."""

    @dataclasses.dataclass
    class Options:
        expand: float = 1.0  # recurrence width = expand * d_model (Griffin: 4/3 with an MLP block after)
        conv_width: int = 4
        c: float = 8.0
        min_rad: float = 0.9
        max_rad: float = 0.999
        mode: str = "scan"  # training form: "scan" | "recurrent"

        def validate(self, m, where):
            width = int(m.d_model * self.expand)
            if self.expand <= 0 or width % m.num_heads:
                raise ConfigError(f"config key '{where}.expand': width {width} must be positive and divisible "
                                  f"by model.num_heads ({m.num_heads})")
            if self.conv_width < 1:
                raise ConfigError(f"config key '{where}.conv_width' must be >= 1, got {self.conv_width}")
            if self.c <= 0:
                raise ConfigError(f"config key '{where}.c' must be positive, got {self.c}")
            if not 0 < self.min_rad <= self.max_rad < 1:
                raise ConfigError(f"config key '{where}.min_rad' / max_rad must satisfy 0 < min_rad <= max_rad < 1")
            if self.mode not in ("scan", "recurrent"):
                raise ConfigError(f"config key '{where}.mode' must be 'scan' or 'recurrent', got {self.mode!r}")

    stateful = True

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        self.opts = opts
        d = cfg.d_model
        self.w = int(d * opts.expand)
        self.h = cfg.num_heads
        self.bw = self.w // self.h
        dt = jnp.dtype(cfg.compute_dtype)
        self.dtype = dt
        self.w_gate = Linear(d, self.w, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.w_in = Linear(d, self.w, ("embed", "mlp"), rngs=rngs, dtype=dt)
        self.conv = ShortConv(self.w, opts.conv_width, rngs=rngs, axes=("mlp",))
        block_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2)
        self.gate_a_w = param(rngs, block_init, (self.h, self.bw, self.bw), ("heads", "kv", "kv"))
        self.gate_x_w = param(rngs, block_init, (self.h, self.bw, self.bw), ("heads", "kv", "kv"))
        self.gate_a_b = param(rngs, nnx.initializers.zeros, (self.h, self.bw), ("heads", "kv"))
        self.gate_x_b = param(rngs, nnx.initializers.zeros, (self.h, self.bw), ("heads", "kv"))
        self.lam = param(rngs, _lambda_init(opts.min_rad, opts.max_rad), (self.w,), ("mlp",))
        self.wo = Linear(self.w, d, ("mlp", "embed"), rngs=rngs, dtype=dt)

    def _gates(self, u):
        b, t, _ = u.shape
        uh = u.reshape(b, t, self.h, self.bw).astype(jnp.float32)
        ga = jnp.einsum("bthi,hij->bthj", uh, self.gate_a_w[...]) + self.gate_a_b[...]
        gx = jnp.einsum("bthi,hij->bthj", uh, self.gate_x_w[...]) + self.gate_x_b[...]
        return ga.reshape(b, t, self.w), gx.reshape(b, t, self.w)

    def _run(self, x, *, segment_ids=None, state=None, mode):
        gate = jax.nn.gelu(self.w_gate(x))
        u, conv_state = conv_with_state(self.conv, self.w_in(x), segment_ids, None if state is None else state["conv"])
        ga, gx = self._gates(u)
        scan = lambda u, ga, gx, segment_ids, lam, initial_state, seq_axis: rglru(
            u, ga, gx, lam, c=self.opts.c, segment_ids=segment_ids, initial_state=initial_state, mode=mode,
            seq_axis=seq_axis)
        time_args = dict(u=u, ga=ga, gx=gx, segment_ids=segment_ids)
        other_args = dict(lam=self.lam[...], initial_state=None if state is None else state["rnn"])
        # training (no decoding state): time split over the mesh's seq axis, if any
        h, s = over_sequence(scan, time_args, other_args, enabled=mode == "scan" and state is None)
        return self.wo(gate * h.astype(gate.dtype)), {"conv": conv_state, "rnn": s.astype(jnp.float32)}

    def __call__(self, x, *, segment_ids=None, tokens=None):
        return self._run(x, segment_ids=segment_ids, mode=self.opts.mode)[0]

    def init_state(self, batch_size: int, max_len: int):
        return {"conv": self.conv.init_state(batch_size, self.w, self.dtype),
                "rnn": jnp.zeros((batch_size, self.w), jnp.float32)}

    def prefill(self, x, state, *, tokens=None):
        return self._run(x, state=state, mode="scan")

    def step(self, x, state, *, token=None):
        y, state = self._run(x[:, None], state=state, mode="recurrent")
        return y[:, 0], state
