"""Mixture-of-memories block (MoM; Du et al. 2025), alias ``MoM``.

Per token a router picks ``top_k`` of ``num_memories`` matrix memories (plus an always-on shared
memory); each memory has its own key/value projections and gates, the query is shared::

    q          = L2(SiLU(ShortConv(x W_q)))                                   [B, T, H, K]
    k^m, v^m   = L2(SiLU(ShortConv(x W_k)))^m, SiLU(ShortConv(x W_v))^m       per memory m
    beta^m     = sigmoid(x W_b)^m                                             (memory = "delta")
    g^m        = -exp(A_log^m) softplus(x W_a + dt_bias)^m                    (decay = True)
    logits     = x W_r                                                        [B, T, M] (per token)
    o          = mixture_of_memories(q, k, v, logits, top_k, beta, g)        [B, T, H, V]
    y          = (RMSNorm(o) * SiLU(x W_gate)) W_o

The memory is the gated delta rule (``memory="delta"``, the paper's strongest variant) or gated
linear attention (``memory="linear"``). Decoding state: the short-conv windows and the memories
``[B, M', H, K, V]`` float32; ``prefill`` runs the chunked form, ``step`` the recurrent one.
No load-balancing loss is added (the block interface has no auxiliary-loss channel).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ConfigError
from memjax.memory.mixture import MEMORIES, mixture_of_memories
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, ShortConv, l2_normalize, param
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence


def _a_log_init(key, shape, dtype):
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def _dt_bias_init(key, shape, dtype, dt_min=1e-3, dt_max=0.1):
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max)))
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus


@register_block("mom", aliases=("MoM",))
class MixtureOfMemories(Block):
    @dataclasses.dataclass
    class Options:
        num_memories: int = 4
        top_k: int = 2
        memory: str = "delta"  # "delta" (gated delta rule) or "linear" (gated linear attention)
        shared_memory: bool = True
        decay: bool = True  # data-dependent per-memory log decay g
        chunk_size: int = 64
        conv_width: int = 4
        mode: str = "chunked"  # training form: "chunked" or "recurrent"

        def validate(self, m, where):
            for key in ("num_memories", "top_k", "chunk_size"):
                if getattr(self, key) <= 0:
                    raise ConfigError(f"config key '{where}.{key}' must be positive, got {getattr(self, key)}")
            if self.top_k > self.num_memories:
                raise ConfigError(f"config key '{where}.top_k' ({self.top_k}) must be <= num_memories "
                                  f"({self.num_memories})")
            if self.memory not in MEMORIES:
                raise ConfigError(f"config key '{where}.memory' must be one of {MEMORIES}, got {self.memory!r}")
            if self.conv_width < 0:
                raise ConfigError(f"config key '{where}.conv_width' must be >= 0, got {self.conv_width}")
            if self.mode not in ("chunked", "recurrent"):
                raise ConfigError(f"config key '{where}.mode' must be 'chunked' or 'recurrent', got {self.mode!r}")

    stateful = True

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        self.opts = opts
        self.h, self.dk = cfg.num_heads, cfg.resolved_head_dim
        self.m, self.mp = opts.num_memories, opts.num_memories + int(opts.shared_memory)
        d, h, dk, mp = cfg.d_model, self.h, self.dk, self.mp
        dt = jnp.dtype(cfg.compute_dtype)
        self.dtype = dt
        self.wq = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d, mp * h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, mp * h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.router = Linear(d, self.m, ("embed", None), rngs=rngs, dtype=jnp.float32,
                             init=nnx.initializers.normal(d ** -0.5))
        w = opts.conv_width
        self.convs = nnx.Dict({n: ShortConv(c, w, rngs=rngs, axes=("heads",))
                               for n, c in (("q", h * dk), ("k", mp * h * dk), ("v", mp * h * dk))}
                              ) if w > 0 else None
        self.wb = Linear(d, mp * h, ("embed", "heads"), rngs=rngs, dtype=dt) if opts.memory == "delta" else None
        if opts.decay:
            self.wa = Linear(d, mp * h, ("embed", "heads"), rngs=rngs, dtype=dt)
            self.a_log = param(rngs, _a_log_init, (mp * h,), ("heads",))
            self.dt_bias = param(rngs, _dt_bias_init, (mp * h,), ("heads",))
        else:
            self.wa = self.a_log = self.dt_bias = None
        self.o_norm = RMSNorm(dk, rngs=rngs, eps=cfg.norm_eps, axes=("kv",))
        self.wg = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wo = Linear(h * dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    def _project(self, x, segment_ids=None, conv_state=None):
        b, t, _ = x.shape
        raw = {"q": self.wq(x), "k": self.wk(x), "v": self.wv(x)}
        new_state = None
        if self.convs is not None:
            if conv_state is None:
                raw = {n: self.convs[n](y, segment_ids) for n, y in raw.items()}
            else:
                w1 = self.opts.conv_width - 1
                full = {n: jnp.concatenate([conv_state[n].astype(y.dtype), y], axis=1) for n, y in raw.items()}
                raw = {n: self.convs[n](y)[:, w1:] for n, y in full.items()}
                new_state = {n: y[:, y.shape[1] - w1:].astype(conv_state[n].dtype) for n, y in full.items()}
        q = l2_normalize(jax.nn.silu(raw["q"]).reshape(b, t, self.h, self.dk))
        k = l2_normalize(jax.nn.silu(raw["k"]).reshape(b, t, self.mp, self.h, self.dk))
        v = jax.nn.silu(raw["v"]).reshape(b, t, self.mp, self.h, self.dk)
        return q, k, v, new_state

    def _gates(self, x):
        b, t, _ = x.shape
        shape = (b, t, self.mp, self.h)
        beta = None if self.wb is None else jax.nn.sigmoid(self.wb(x).astype(jnp.float32)).reshape(shape)
        g = None
        if self.wa is not None:
            a = self.wa(x).astype(jnp.float32) + self.dt_bias[...]
            g = (-jnp.exp(self.a_log[...]) * jax.nn.softplus(a)).reshape(shape)
        return beta, g, self.router(x.astype(jnp.float32))

    def _memory(self, x, *, segment_ids=None, conv_state=None, initial_state=None, mode):
        q, k, v, conv = self._project(x, segment_ids, conv_state)
        beta, g, logits = self._gates(x)
        mix = lambda q, k, v, logits, beta, g, segment_ids, initial_state, seq_axis: mixture_of_memories(
            q, k, v, logits, top_k=self.opts.top_k, beta=beta, g=g, memory=self.opts.memory,
            shared_memory=self.opts.shared_memory, initial_state=initial_state, segment_ids=segment_ids, mode=mode,
            chunk_size=self.opts.chunk_size, seq_axis=seq_axis)
        time_args = dict(q=q, k=k, v=v, logits=logits, beta=beta, g=g, segment_ids=segment_ids)
        # training (no decoding state): time split over the mesh's seq axis, if any
        o, s = over_sequence(mix, time_args, dict(initial_state=initial_state),
                             enabled=mode == "chunked" and initial_state is None)
        b, t = x.shape[:2]
        o = self.o_norm(o) * jax.nn.silu(self.wg(x)).reshape(b, t, self.h, self.dk).astype(o.dtype)
        return self.wo(o.reshape(b, t, self.h * self.dk)), conv, s

    def __call__(self, x, *, segment_ids=None, tokens=None):
        return self._memory(x, segment_ids=segment_ids, mode=self.opts.mode)[0]

    def init_state(self, batch_size: int, max_len: int):
        conv = None
        if self.convs is not None:
            conv = {n: c.init_state(batch_size, c.weight.shape[1], self.dtype) for n, c in self.convs.items()}
        return {"conv": conv, "memory": jnp.zeros((batch_size, self.mp, self.h, self.dk, self.dk), jnp.float32)}

    def _run(self, x, state, mode):
        y, conv, s = self._memory(x, conv_state=state["conv"], initial_state=state["memory"], mode=mode)
        return y, {"conv": conv, "memory": s.astype(jnp.float32)}

    def prefill(self, x, state, *, tokens=None):
        return self._run(x, state, "chunked")

    def step(self, x, state, *, token=None):
        y, state = self._run(x[:, None, :], state, "recurrent")
        return y[:, 0], state
