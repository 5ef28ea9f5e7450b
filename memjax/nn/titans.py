"""Titans MAG and MAL blocks: neural long-term memory with attention (Behrouz et al. 2025).

``titans_mag`` and ``titans_mal`` have two branches over the block input ``x`` (already
RMS-normalised by the model):

- neural memory (:class:`NeuralMemory`): ``q, k, v = SiLU(ShortConv(x W))`` per head, ``q, k``
  L2-normalised; data-dependent gates ``theta = theta_max * sigmoid(x w_theta + b)``,
  ``eta = sigmoid(x w_eta + b)``, ``alpha = sigmoid(x w_alpha + b)`` per head; the memory MLP
  (``depth`` layers, initial weights ``params0`` learned by the outer loop) is written with
  :func:`memjax.memory.neural_memory.titans` (chunked form) and read at ``q``; per-head RMSNorm.
- sliding-window attention (:class:`SlidingWindowAttention`): causal softmax attention over the
  last ``window`` tokens, RoPE, per-head RMSNorm.

``titans_mag`` (memory as a gate, alias ``MAG``)::

    gate = sigmoid(x W_g)                         (per channel)
    y    = W_o(gate * swa(x) + (1 - gate) * memory(x))

The paper writes MAG as ``y ⊗ M(x)`` with normalised branches and a non-linearity; here the two
normalised branches are mixed by a data-dependent gate, so either branch can carry the output.

``titans_mal`` (memory as a layer, alias ``MAL``): the memory layer, then the attention layer,
each with its own residual::

    m = memory(x) W_m ;  h = x + m ;  y = m + W_o swa(RMSNorm(h))

so the model's ``x + y`` equals ``h + swa(RMSNorm(h))``.

``titans_mac`` (memory as context) lives in :mod:`memjax.nn.titans_mac`.

Decoding (MAG, MAL): the state holds the short-conv windows, the attention ring buffer of the last
``window`` keys/values with the position counter, and a :class:`memjax.memory.neural_memory.TitansCache`
(memory weights and momentum at the last chunk boundary plus the tokens of the unfinished chunk).
``prefill`` and ``step`` both continue the chunked algorithm with
:func:`memjax.memory.neural_memory.titans_decode`, which advances the weights exactly where the
training form does (every ``chunk_size`` tokens from the start of the sequence), so a prompt
prefilled in any pieces and then decoded token by token reproduces ``__call__`` on the whole
sequence. ``chunk_size = 1`` is the exact per-token update (then ``__call__`` uses the recurrent
form, which gives the same result faster).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ConfigError
from memjax.memory.attention import causal_attention, rope
from memjax.memory.neural_memory import ACTIVATIONS, titans, titans_decode, titans_init_cache
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, ShortConv, l2_normalize, param, positions_in_segment
from memjax.nn.registry import register_block


@dataclasses.dataclass
class TitansOptions:
    chunk_size: int = 16  # tokens per chunk of the memory's training form (1: exact per-token)
    window: int = 64  # sliding-window attention span
    depth: int = 1  # memory MLP layers (1: linear memory K -> V)
    memory_expansion: int = 2  # hidden width of the memory MLP = head_dim * memory_expansion
    activation: str = "silu"  # between memory MLP layers: "silu" or "gelu"
    conv_width: int = 4  # causal depthwise short conv on the memory's q, k, v; 0: none
    # Upper bound of the memory learning rate theta; 0: 0.5 for a linear memory (for a repeated
    # unit key the momentum update is stable iff 2 theta < (1 + eta)(2 - alpha), true for any
    # eta, alpha), 0.1 for an MLP memory (0.5 diverged within a few training steps on MQAR).
    theta_max: float = 0.0
    eta_bias: float = 0.0  # initial momentum decay sigmoid(eta_bias)
    alpha_bias: float = -5.0  # initial weight decay sigmoid(alpha_bias)

    def validate(self, m, where):
        for key in ("chunk_size", "window", "depth", "memory_expansion"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config key '{where}.{key}' must be positive, got {getattr(self, key)}")
        if self.conv_width < 0:
            raise ConfigError(f"config key '{where}.conv_width' must be >= 0, got {self.conv_width}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"config key '{where}.activation' must be one of {tuple(ACTIVATIONS)}, "
                              f"got {self.activation!r}")
        if self.theta_max < 0:
            raise ConfigError(f"config key '{where}.theta_max' must be >= 0, got {self.theta_max}")


def _const(value):
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)


class NeuralMemory(nnx.Module):
    """The Titans long-term memory branch; returns per-head reads ``[B, T, H, head_dim]``."""

    def __init__(self, cfg, opts: TitansOptions, *, rngs: nnx.Rngs):
        self.opts = opts
        self.h, self.dk = cfg.num_heads, cfg.resolved_head_dim
        d, h, dk = cfg.d_model, self.h, self.dk
        dt = jnp.dtype(cfg.compute_dtype)
        self.dtype = dt
        self.wq = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        w = opts.conv_width
        self.convs = nnx.Dict({n: ShortConv(h * dk, w, rngs=rngs, axes=("heads",)) for n in ("q", "k", "v")}
                              ) if w > 0 else None
        self.theta_max = opts.theta_max or (0.5 if opts.depth == 1 else 0.1)
        self.w_gates = Linear(d, 3 * h, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.b_theta = param(rngs, _const(0.0), (h,), ("heads",))
        self.b_eta = param(rngs, _const(opts.eta_bias), (h,), ("heads",))
        self.b_alpha = param(rngs, _const(opts.alpha_bias), (h,), ("heads",))
        # Initial memory weights, learned by the outer loop. A linear memory starts empty; an
        # MLP needs non-zero weights to receive any gradient.
        hidden = dk * opts.memory_expansion
        dims = [dk] + [hidden] * (opts.depth - 1) + [dk]
        axes = lambda i: ("heads", "kv" if i == 0 else "mlp", "kv" if i == opts.depth - 1 else "mlp")
        init = (nnx.initializers.zeros if opts.depth == 1 else
                nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2,
                                                    batch_axis=0))
        self.params0 = nnx.List([param(rngs, init, (h, i, o), axes(n))
                                 for n, (i, o) in enumerate(zip(dims[:-1], dims[1:]))])
        self.o_norm = RMSNorm(dk, rngs=rngs, eps=cfg.norm_eps, axes=("kv",))

    def _weights0(self):
        return tuple(p[...] for p in self.params0)

    def _project(self, x, segment_ids=None, conv_state=None):
        b, t, _ = x.shape
        raw = {"q": self.wq(x), "k": self.wk(x), "v": self.wv(x)}
        new_state = None
        if self.convs is not None:
            if conv_state is None:
                raw = {n: self.convs[n](y, segment_ids) for n, y in raw.items()}
            else:  # continue from the last conv_width - 1 inputs
                w1 = self.opts.conv_width - 1
                full = {n: jnp.concatenate([conv_state[n].astype(y.dtype), y], axis=1) for n, y in raw.items()}
                raw = {n: self.convs[n](y)[:, w1:] for n, y in full.items()}
                new_state = {n: y[:, y.shape[1] - w1:].astype(conv_state[n].dtype) for n, y in full.items()}
        q, k, v = (jax.nn.silu(raw[n]).reshape(b, t, self.h, self.dk) for n in ("q", "k", "v"))
        return l2_normalize(q), l2_normalize(k), v, new_state

    def _gates(self, x):
        z = self.w_gates(x).astype(jnp.float32)
        zt, ze, za = jnp.split(z, 3, axis=-1)
        theta = self.theta_max * jax.nn.sigmoid(zt + self.b_theta[...])
        eta = jax.nn.sigmoid(ze + self.b_eta[...])
        alpha = jax.nn.sigmoid(za + self.b_alpha[...])
        return theta, eta, alpha

    def __call__(self, x, segment_ids=None):
        q, k, v, _ = self._project(x, segment_ids)
        theta, eta, alpha = self._gates(x)
        c = self.opts.chunk_size
        o, _ = titans(q, k, v, theta, eta, alpha, params0=self._weights0(), activation=self.opts.activation,
                      segment_ids=segment_ids, mode="recurrent" if c == 1 else "chunked", chunk_size=c)
        return self.o_norm(o)

    def init_state(self, batch_size: int):
        conv = None
        if self.convs is not None:
            conv = {n: c.init_state(batch_size, c.weight.shape[1], self.dtype) for n, c in self.convs.items()}
        cache = titans_init_cache(batch_size, self.h, self.dk, self.dk, params0=self._weights0(),
                                  chunk_size=self.opts.chunk_size)
        return {"conv": conv, "cache": cache}

    def prefill(self, x, state):
        q, k, v, conv = self._project(x, conv_state=state["conv"])
        theta, eta, alpha = self._gates(x)
        o, cache = titans_decode(q, k, v, theta, eta, alpha, state["cache"], activation=self.opts.activation,
                                 chunk_size=self.opts.chunk_size)
        return self.o_norm(o), {"conv": conv, "cache": cache}


class SlidingWindowAttention(nnx.Module):
    """Causal attention over the last ``window`` tokens (RoPE); per-head outputs ``[B, T, H, K]``.

    Decoding keeps a ring buffer of ``window`` rotated keys and values (slot ``p % window`` holds
    position ``p``) and the number of tokens seen.
    """

    def __init__(self, cfg, window: int, *, rngs: nnx.Rngs):
        self.h, self.dk, self.window, self.theta = cfg.num_heads, cfg.resolved_head_dim, window, cfg.rope_theta
        d, dt = cfg.d_model, jnp.dtype(cfg.compute_dtype)
        self.wq = Linear(d, self.h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d, self.h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, self.h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.o_norm = RMSNorm(self.dk, rngs=rngs, eps=cfg.norm_eps, axes=("kv",))

    def _qkv(self, x, positions):
        b, t, _ = x.shape
        q, k, v = (w(x).reshape(b, t, self.h, self.dk) for w in (self.wq, self.wk, self.wv))
        return rope(q, positions, self.theta), rope(k, positions, self.theta), v

    def __call__(self, x, segment_ids=None):
        b, t, _ = x.shape
        positions = (jnp.broadcast_to(jnp.arange(t), (b, t)) if segment_ids is None
                     else positions_in_segment(segment_ids))
        q, k, v = self._qkv(x, positions)
        return self.o_norm(causal_attention(q, k, v, segment_ids=segment_ids, window=self.window))

    def init_state(self, batch_size: int):
        shape = (batch_size, self.window, self.h, self.dk)
        return {"k": jnp.zeros(shape, self.wk.dtype), "v": jnp.zeros(shape, self.wv.dtype),
                "pos": jnp.zeros((), jnp.int32)}

    def prefill(self, x, state):
        b, t, _ = x.shape
        w, pos0 = self.window, state["pos"]
        q_pos = pos0 + jnp.arange(t)
        q, k, v = self._qkv(x, jnp.broadcast_to(q_pos, (b, t)))
        slots = jnp.arange(w)
        slot_pos = pos0 - 1 - jnp.mod(pos0 - 1 - slots, w)  # latest position < pos0 held by each slot
        k_pos = jnp.concatenate([slot_pos, q_pos])
        keys = jnp.concatenate([state["k"].astype(k.dtype), k], axis=1)
        vals = jnp.concatenate([state["v"].astype(v.dtype), v], axis=1)
        o = causal_attention(q, keys, vals, window=w, q_positions=jnp.broadcast_to(q_pos, (b, t)),
                             k_positions=jnp.broadcast_to(k_pos, (b, w + t)),
                             k_valid=jnp.broadcast_to(k_pos >= 0, (b, w + t)))
        keep = min(t, w)  # only the last `window` new tokens can stay in the buffer
        new_slots = jnp.mod(pos0 + t - keep + jnp.arange(keep), w)
        kc = state["k"].at[:, new_slots].set(k[:, t - keep:].astype(state["k"].dtype))
        vc = state["v"].at[:, new_slots].set(v[:, t - keep:].astype(state["v"].dtype))
        return self.o_norm(o), {"k": kc, "v": vc, "pos": pos0 + t}


class _TitansBlock(Block):
    Options = TitansOptions
    stateful = True

    def init_state(self, batch_size: int, max_len: int):
        return {"memory": self.memory.init_state(batch_size), "attn": self.attn.init_state(batch_size)}

    def step(self, x, state, *, token=None):
        y, state = self.prefill(x[:, None, :], state)
        return y[:, 0], state


@register_block("titans_mag", aliases=("MAG",))
class TitansMAG(_TitansBlock):
    """Memory as a gate: sliding-window attention and neural memory mixed by a learned gate."""

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        h, dk, d, dt = cfg.num_heads, cfg.resolved_head_dim, cfg.d_model, jnp.dtype(cfg.compute_dtype)
        self.memory = NeuralMemory(cfg, opts, rngs=rngs)
        self.attn = SlidingWindowAttention(cfg, opts.window, rngs=rngs)
        self.wg = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wo = Linear(h * dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    def _combine(self, ya, ym, x):
        b, t = x.shape[:2]
        g = jax.nn.sigmoid(self.wg(x)).reshape(ya.shape)
        y = g * ya + (1.0 - g) * ym.astype(ya.dtype)
        return self.wo(y.reshape(b, t, -1))

    def __call__(self, x, *, segment_ids=None, tokens=None):
        return self._combine(self.attn(x, segment_ids), self.memory(x, segment_ids), x)

    def prefill(self, x, state, *, tokens=None):
        ya, sa = self.attn.prefill(x, state["attn"])
        ym, sm = self.memory.prefill(x, state["memory"])
        return self._combine(ya, ym, x), {"memory": sm, "attn": sa}


@register_block("titans_mal", aliases=("MAL",))
class TitansMAL(_TitansBlock):
    """Memory as a layer: the neural-memory layer, then a sliding-window attention layer."""

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        h, dk, d, dt = cfg.num_heads, cfg.resolved_head_dim, cfg.d_model, jnp.dtype(cfg.compute_dtype)
        self.memory = NeuralMemory(cfg, opts, rngs=rngs)
        self.wm = Linear(h * dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.norm = RMSNorm(d, rngs=rngs, eps=cfg.norm_eps)
        self.attn = SlidingWindowAttention(cfg, opts.window, rngs=rngs)
        self.wo = Linear(h * dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    def _mem_out(self, ym, x):
        return self.wm(ym.reshape(*x.shape[:2], -1)).astype(x.dtype)

    def __call__(self, x, *, segment_ids=None, tokens=None):
        m = self._mem_out(self.memory(x, segment_ids), x)
        ya = self.attn(self.norm(x + m), segment_ids)
        return m + self.wo(ya.reshape(*x.shape[:2], -1))

    def prefill(self, x, state, *, tokens=None):
        ym, sm = self.memory.prefill(x, state["memory"])
        m = self._mem_out(ym, x)
        ya, sa = self.attn.prefill(self.norm(x + m), state["attn"])
        return m + self.wo(ya.reshape(*x.shape[:2], -1)), {"memory": sm, "attn": sa}


# ----------------------------------------------------------------------------- MAC
