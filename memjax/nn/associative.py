"""Associative matrix-memory blocks: linear attention, GLA, DeltaNet, Gated DeltaNet.

All four share one layout (the form of current linear-attention layers, e.g. Gated DeltaNet)::

    q, k, v = SiLU(ShortConv(x W_q)), SiLU(ShortConv(x W_k)), SiLU(ShortConv(x W_v))   per head
    q, k    = phi(q), phi(k)              (linear_attn / gla: feature map; delta blocks: L2 norm)
    beta    = sigmoid(x W_b)                                       (deltanet, gated_deltanet)
    g       = -exp(A_log) * softplus(x W_a + dt_bias)              (gla, gated_deltanet; log decay)
    o       = memory(q, k, v, beta, g)                             ([B, T, H, V], state [B, H, K, V])
    y       = (RMSNorm(o) * SiLU(x W_gate)) W_o                    (per-head RMSNorm over V)

``g`` is the Mamba-2 / Gated DeltaNet parameterisation of a per-head scalar data-dependent decay
(``A = exp(A_log) > 0`` initialised in [1, 16], ``softplus`` step size initialised in
[1e-3, 0.1]), always ``< 0`` so ``exp(g)`` is in (0, 1) whatever the weights: the simple-GLA
gate. Heads come from ``cfg.num_heads``; q/k head dim from ``cfg.resolved_head_dim`` (or
``qk_dim``), value head dim ``head_dim * expand_v``.

Decoding state: ``{"conv": {"q", "k", "v": [B, conv_width - 1, channels]} | None,
"memory": [B, H, K, V] float32}``. ``prefill`` runs the chunked form from that state; ``step``
the recurrent form for one token.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ConfigError
from memjax.kernels.chunk_pass import IMPLS as CHUNK_IMPLS
from memjax.memory.delta import delta_rule
from memjax.memory.feature_maps import FEATURE_MAPS, feature_dim, get_feature_map
from memjax.memory.linear import linear_attention
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, ShortConv, l2_normalize, param
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence


@dataclasses.dataclass
class AssociativeOptions:
    chunk_size: int = 64  # chunk length of the chunked (training / prefill) form
    conv_width: int = 4  # causal depthwise short conv on q, k, v; 0: none
    expand_v: float = 1.0  # value head dim = head_dim * expand_v
    output_gate: bool = True  # RMSNorm(o) * SiLU(x W_gate); False: RMSNorm(o) only
    mode: str = "chunked"  # training form: "chunked" or "recurrent" (same result, slower)
    kernel: str = "auto"  # chunk-to-chunk state pass: "auto", "xla" or "pallas" (memjax.kernels.chunk_pass)

    def validate(self, m, where):
        if self.chunk_size <= 0:
            raise ConfigError(f"config key '{where}.chunk_size' must be positive, got {self.chunk_size}")
        if self.conv_width < 0:
            raise ConfigError(f"config key '{where}.conv_width' must be >= 0, got {self.conv_width}")
        if self.expand_v <= 0 or int(m.resolved_head_dim * self.expand_v) < 1:
            raise ConfigError(f"config key '{where}.expand_v' must give a value head dim >= 1, got {self.expand_v}")
        if self.mode not in ("chunked", "recurrent"):
            raise ConfigError(f"config key '{where}.mode' must be 'chunked' or 'recurrent', got {self.mode!r}")
        if self.kernel not in CHUNK_IMPLS:
            raise ConfigError(f"config key '{where}.kernel' must be one of {CHUNK_IMPLS}, got {self.kernel!r}")


@dataclasses.dataclass
class FeatureMapOptions(AssociativeOptions):
    feature_map: str = "identity"  # one of memjax.memory.feature_maps.FEATURE_MAPS
    qk_dim: int = 0  # per-head q/k dim before the feature map; 0: model head dim
    qk_norm: bool = False  # L2-normalise q and k before the feature map

    def validate(self, m, where):
        super().validate(m, where)
        if self.feature_map not in FEATURE_MAPS:
            raise ConfigError(
                f"config key '{where}.feature_map' must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        if self.qk_dim < 0:
            raise ConfigError(f"config key '{where}.qk_dim' must be >= 0, got {self.qk_dim}")


def _a_log_init(key, shape, dtype):
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def _dt_bias_init(key, shape, dtype, dt_min=1e-3, dt_max=0.1):
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max)))
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus: softplus(dt_bias) = dt


class _AssociativeBlock(Block):
    """Shared projections, short conv, output norm/gate and decoding; subclasses pick the memory."""

    stateful = True
    uses_beta = False
    uses_decay = False
    l2_qk = False  # delta-rule blocks always L2-normalise q and k

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        self.chunk_size, self.mode, self.conv_width = opts.chunk_size, opts.mode, opts.conv_width
        self.kernel = opts.kernel
        self.h = cfg.num_heads
        self.dk = getattr(opts, "qk_dim", 0) or cfg.resolved_head_dim
        self.dv = int(cfg.resolved_head_dim * opts.expand_v)
        self.feature_map = getattr(opts, "feature_map", "identity")
        self.dphi = feature_dim(self.feature_map, self.dk)
        self.l2_qk = self.l2_qk or getattr(opts, "qk_norm", False)
        dt = jnp.dtype(cfg.compute_dtype)
        d, h = cfg.d_model, self.h
        self.wq = Linear(d, h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d, h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, h * self.dv, ("embed", "heads"), rngs=rngs, dtype=dt)
        w = opts.conv_width
        self.convs = nnx.Dict({n: ShortConv(c, w, rngs=rngs, axes=("heads",))
                               for n, c in (("q", h * self.dk), ("k", h * self.dk), ("v", h * self.dv))}
                              ) if w > 0 else None
        self.wb = Linear(d, h, ("embed", "heads"), rngs=rngs, dtype=dt) if self.uses_beta else None
        if self.uses_decay:
            self.wa = Linear(d, h, ("embed", "heads"), rngs=rngs, dtype=dt)
            self.a_log = param(rngs, _a_log_init, (h,), ("heads",))
            self.dt_bias = param(rngs, _dt_bias_init, (h,), ("heads",))
        else:
            self.wa = self.a_log = self.dt_bias = None
        self.o_norm = RMSNorm(self.dv, rngs=rngs, eps=cfg.norm_eps, axes=("kv",))
        self.wg = Linear(d, h * self.dv, ("embed", "heads"), rngs=rngs, dtype=dt) if opts.output_gate else None
        self.wo = Linear(h * self.dv, d, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.dtype = dt

    # ------------------------------------------------------------------ pieces

    def _project(self, x, segment_ids=None, conv_state=None):
        """q, k, v after conv + SiLU, ``[B, T, H, .]``, and the new conv state (if ``conv_state``)."""
        b, t, _ = x.shape
        raw = {"q": self.wq(x), "k": self.wk(x), "v": self.wv(x)}
        new_state = None
        if self.convs is not None:
            if conv_state is None:
                out = {n: self.convs[n](y, segment_ids) for n, y in raw.items()}
            else:  # continue from the last conv_width - 1 inputs of the previous call
                w1 = self.conv_width - 1
                full = {n: jnp.concatenate([conv_state[n].astype(y.dtype), y], axis=1) for n, y in raw.items()}
                out = {n: self.convs[n](y)[:, w1:] for n, y in full.items()}
                new_state = {n: y[:, y.shape[1] - w1:].astype(conv_state[n].dtype) for n, y in full.items()}
            raw = out
        q, k, v = (jax.nn.silu(raw[n]) for n in ("q", "k", "v"))
        q = q.reshape(b, t, self.h, self.dk)
        k = k.reshape(b, t, self.h, self.dk)
        v = v.reshape(b, t, self.h, self.dv)
        if self.l2_qk:
            q, k = l2_normalize(q), l2_normalize(k)
        phi = get_feature_map(self.feature_map)
        return phi(q), phi(k), v, new_state

    def _gates(self, x):
        beta = jax.nn.sigmoid(self.wb(x).astype(jnp.float32)) if self.uses_beta else None
        g = None
        if self.uses_decay:
            a = self.wa(x).astype(jnp.float32) + self.dt_bias[...]
            g = -jnp.exp(self.a_log[...]) * jax.nn.softplus(a)
        return beta, g

    def _memory(self, q, k, v, beta, g, *, initial_state=None, segment_ids=None, mode=None, seq_axis=None):
        kw = dict(g=g, initial_state=initial_state, segment_ids=segment_ids,
                  mode=mode or self.mode, chunk_size=self.chunk_size, impl=self.kernel, seq_axis=seq_axis)
        if self.uses_beta:
            return delta_rule(q, k, v, beta, **kw)
        return linear_attention(q, k, v, **kw)

    def _output(self, o, x):
        b, t = o.shape[:2]
        o = self.o_norm(o)
        if self.wg is not None:
            o = o * jax.nn.silu(self.wg(x)).reshape(b, t, self.h, self.dv).astype(o.dtype)
        return self.wo(o.reshape(b, t, self.h * self.dv))

    # ------------------------------------------------------------------ Block interface

    def __call__(self, x, *, segment_ids=None, tokens=None):
        q, k, v, _ = self._project(x, segment_ids)
        beta, g = self._gates(x)
        # (time split over the mesh's seq axis, if any)
        o, _ = over_sequence(self._memory, dict(q=q, k=k, v=v, beta=beta, g=g, segment_ids=segment_ids), {},
                             enabled=self.mode == "chunked")
        return self._output(o, x)

    def init_state(self, batch_size: int, max_len: int):
        conv = None
        if self.convs is not None:
            conv = {n: c.init_state(batch_size, c.weight.shape[1], self.dtype) for n, c in self.convs.items()}
        return {"conv": conv, "memory": jnp.zeros((batch_size, self.h, self.dphi, self.dv), jnp.float32)}

    def prefill(self, x, state, *, tokens=None):
        return self._run(x, state, mode="chunked")

    def step(self, x, state, *, token=None):
        y, state = self._run(x[:, None, :], state, mode="recurrent")
        return y[:, 0], state

    def _run(self, x, state, *, mode):
        q, k, v, conv = self._project(x, conv_state=state["conv"])
        beta, g = self._gates(x)
        o, mem = self._memory(q, k, v, beta, g, initial_state=state["memory"], mode=mode)
        return self._output(o, x), {"conv": conv, "memory": mem.astype(jnp.float32)}


@register_block("linear_attn", aliases=("L",))
class LinearAttention(_AssociativeBlock):
    """Linear attention ``S_t = S_{t-1} + phi(k_t) v_t^T`` (Katharopoulos et al. 2020); default phi = elu+1."""

    @dataclasses.dataclass
    class Options(FeatureMapOptions):
        feature_map: str = "elu"


@register_block("gla", aliases=("G",))
class GatedLinearAttention(_AssociativeBlock):
    """Gated linear attention with a scalar per-head decay, ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``
    (simple GLA / Mamba-2 / RetNet-style with a data-dependent ``g``)."""

    Options = FeatureMapOptions
    uses_decay = True


@register_block("deltanet", aliases=("DN",))
class DeltaNet(_AssociativeBlock):
    """DeltaNet: ``S_t = S_{t-1} + k_t (beta_t (v_t - S_{t-1}^T k_t))^T`` with L2-normalised q, k."""

    Options = AssociativeOptions
    uses_beta = True
    l2_qk = True


@register_block("gated_deltanet", aliases=("D",))
class GatedDeltaNet(_AssociativeBlock):
    """Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024): decay ``exp(g_t)`` then a delta-rule write."""

    Options = AssociativeOptions
    uses_beta = True
    uses_decay = True
    l2_qk = True
