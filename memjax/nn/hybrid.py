"""Eidetic + fading memory in one block: sliding-window attention over the recent past, a
selective-SSM state for everything older (alias ``E``).

B'MOJO (Zancato et al. 2024) combines *eidetic* memory (tokens kept verbatim, here the last
``window`` keys and values) with *fading* memory (a fixed-size state that compresses the rest);
Artificial Hippocampus Networks (2025) keep a sliding-window KV cache as lossless short-term memory
and recurrently compress the tokens that leave the window into a fixed-size long-term memory
(e.g. a Mamba-2 state). This block does exactly that, per head ``h``::

    q, k, v = x W_q, x W_k, x W_v                          ([B, T, H, Dh])
    o_att_t = SWA(rope(q), rope(k), v; window)              exact over keys t - window < s <= t
    S_t     = sum_{s <= t - window} (prod_{s < m <= t - window} exp(dt_m A)) dt_s v_s k_s^T
            = the Mamba-2 state (memjax.memory.ssm.selective_scan with x = v, B = k, C = q,
              dt = softplus(x W_dt + dt_bias), A = -exp(A_log)) *as of time t - window*
    o_ssm_t = S_t q_t
    o_t     = o_att_t + g_t * RMSNorm(o_ssm_t)             g_t = sigmoid(x W_g) ("gate") or 1 ("sum")
    y       = o W_o

What is kept exactly: the keys and values of the last ``window`` tokens (a ring-buffer KV cache
of ``window`` slots when decoding). What is compressed: every older token, written into the SSM
state at the moment it leaves the window, with decays accumulated since (fading, O(H Dh^2)
memory whatever the context length). The two never overlap, so no token is counted twice. The
SSM uses the un-rotated q and k (position enters through the decays); attention uses RoPE.

Training computes the SSM over the input delayed by ``window`` positions (the state at ``t`` is the
ordinary SSM state at ``t - window``). With ``segment_ids`` the attention is masked per document,
RoPE positions restart, and the SSM read at ``t`` is zeroed when token ``t - window`` belongs to
another document (its state then holds only that other document). Decoding state:
``{"k", "v": [B, window, H, Dh], "dt": [B, window, H] float32, "ssm": [B, H, Dh, Dh] float32,
"pos": int32}``; slot ``p % window`` holds token ``p``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ConfigError
from memjax.memory.attention import causal_attention, rope
from memjax.memory.ssm import selective_scan
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, param, positions_in_segment
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.ssm_blocks import dt_bias_init


def _delay(x, n, fill_from_first=False):
    """Shift ``x [B, T, ...]`` right by ``n`` along time (zeros, or copies of ``x[:, :1]``, enter)."""
    t = x.shape[1]
    if n >= t:
        return jnp.broadcast_to(x[:, :1], x.shape) if fill_from_first else jnp.zeros_like(x)
    head = jnp.broadcast_to(x[:, :1], (x.shape[0], n, *x.shape[2:])) if fill_from_first else \
        jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype)
    return jnp.concatenate([head, x[:, : t - n]], axis=1)


@register_block("swa_ssm", aliases=("E",))
class SlidingWindowSSM(Block):
    """Sliding-window attention (eidetic) + selective-SSM state of the evicted tokens (fading)."""

    @dataclasses.dataclass
    class Options:
        window: int = 128  # tokens kept exactly
        combine: str = "gate"  # "gate": o_att + sigmoid(x W_g) * norm(o_ssm); "sum": o_att + norm(o_ssm)
        chunk_size: int = 64
        dt_min: float = 1e-3
        dt_max: float = 1e-1
        a_init_min: float = 1.0
        a_init_max: float = 16.0
        mode: str = "chunked"  # SSM training form: "chunked" | "recurrent"

        def validate(self, m, where):
            if self.window <= 0:
                raise ConfigError(f"config key '{where}.window' must be positive, got {self.window}")
            if self.combine not in ("gate", "sum"):
                raise ConfigError(f"config key '{where}.combine' must be 'gate' or 'sum', got {self.combine!r}")
            if self.chunk_size <= 0:
                raise ConfigError(f"config key '{where}.chunk_size' must be positive, got {self.chunk_size}")
            if not 0 < self.dt_min <= self.dt_max:
                raise ConfigError(f"config key '{where}.dt_min' / dt_max must satisfy 0 < dt_min <= dt_max")
            if not 0 < self.a_init_min <= self.a_init_max:
                raise ConfigError(f"config key '{where}.a_init_min' / a_init_max must satisfy 0 < min <= max")
            if self.mode not in ("chunked", "recurrent"):
                raise ConfigError(f"config key '{where}.mode' must be 'chunked' or 'recurrent', got {self.mode!r}")
            if m.resolved_head_dim % 2:
                raise ConfigError(f"config key '{where}': RoPE needs an even head dim, got {m.resolved_head_dim}")

    stateful = True

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        self.opts = opts
        self.h, self.dh = cfg.num_heads, cfg.resolved_head_dim
        self.window, self.theta = opts.window, cfg.rope_theta
        d, hd = cfg.d_model, cfg.num_heads * cfg.resolved_head_dim
        dt = jnp.dtype(cfg.compute_dtype)
        self.dtype = dt
        self.wq = Linear(d, hd, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d, hd, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, hd, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wdt = Linear(d, self.h, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.dt_bias = param(rngs, dt_bias_init(opts.dt_min, opts.dt_max), (self.h,), ("heads",))
        self.a_log = param(rngs, lambda k, s, t: jnp.log(jax.random.uniform(k, s, t, opts.a_init_min, opts.a_init_max)),
                           (self.h,), ("heads",))
        self.ssm_norm = RMSNorm(self.dh, rngs=rngs, eps=cfg.norm_eps, axes=("kv",))
        self.wg = Linear(d, self.h, ("embed", "heads"), rngs=rngs, dtype=dt) if opts.combine == "gate" else None
        self.wo = Linear(hd, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    # ------------------------------------------------------------------ pieces

    def _project(self, x):
        b, t, _ = x.shape
        q = self.wq(x).reshape(b, t, self.h, self.dh)
        k = self.wk(x).reshape(b, t, self.h, self.dh)
        v = self.wv(x).reshape(b, t, self.h, self.dh)
        dt = jax.nn.softplus(self.wdt(x).astype(jnp.float32) + self.dt_bias[...])
        return q, k, v, dt

    def _A(self):
        return -jnp.exp(self.a_log[...])

    def _combine(self, x, o_att, o_ssm):
        b, t = x.shape[:2]
        o_ssm = self.ssm_norm(o_ssm).astype(o_att.dtype)
        if self.wg is not None:
            o_ssm = o_ssm * jax.nn.sigmoid(self.wg(x)).astype(o_att.dtype)[..., None]
        return self.wo((o_att + o_ssm).reshape(b, t, self.h * self.dh))

    # ------------------------------------------------------------------ Block interface

    def __call__(self, x, *, segment_ids=None, tokens=None):
        b, t, _ = x.shape
        w = self.window
        q, k, v, dt = self._project(x)
        pos = jnp.broadcast_to(jnp.arange(t), (b, t)) if segment_ids is None else positions_in_segment(segment_ids)
        o_att = causal_attention(rope(q, pos, self.theta), rope(k, pos, self.theta), v,
                                 segment_ids=segment_ids, window=w)
        seg_d = None if segment_ids is None else _delay(segment_ids, w, fill_from_first=True)
        scan = lambda x, dt, B, C, segment_ids, A, seq_axis: selective_scan(
            x, dt, A, B, C, segment_ids=segment_ids, mode=self.opts.mode, chunk_size=self.opts.chunk_size,
            seq_axis=seq_axis)
        time_args = dict(x=_delay(v, w), dt=_delay(dt, w), B=_delay(k, w), C=q, segment_ids=seg_d)
        o_ssm, _ = over_sequence(scan, time_args, dict(A=self._A()), enabled=self.opts.mode == "chunked")
        if segment_ids is not None:  # the state at t - w belongs to another document
            o_ssm = jnp.where((seg_d == segment_ids)[..., None, None], o_ssm, 0)
        return self._combine(x, o_att, o_ssm)

    def init_state(self, batch_size: int, max_len: int):
        kv = (batch_size, self.window, self.h, self.dh)
        return {"k": jnp.zeros(kv, self.dtype), "v": jnp.zeros(kv, self.dtype),
                "dt": jnp.zeros(kv[:3], jnp.float32),  # dt = 0 marks an empty slot: evicting it is a no-op
                "ssm": jnp.zeros((batch_size, self.h, self.dh, self.dh), jnp.float32),
                "pos": jnp.zeros((), jnp.int32)}

    def prefill(self, x, state, *, tokens=None):
        """A prompt from ``state``: the cached window (oldest first) followed by the prompt is one
        stream; the SSM consumes the first ``T`` tokens of it (those leaving the window)."""
        b, t, _ = x.shape
        w, pos0 = self.window, state["pos"]
        q, k, v, dt = self._project(x)
        chrono = lambda a: jnp.roll(a, -(pos0 % w), axis=1)  # ring -> oldest first (positions pos0 - w ...)
        K = jnp.concatenate([chrono(state["k"]), k.astype(state["k"].dtype)], 1)
        V = jnp.concatenate([chrono(state["v"]), v.astype(state["v"].dtype)], 1)
        DT = jnp.concatenate([chrono(state["dt"]), dt], 1)
        k_pos = jnp.broadcast_to(pos0 - w + jnp.arange(w + t), (b, w + t))
        q_pos = jnp.broadcast_to(pos0 + jnp.arange(t), (b, t))
        o_att = causal_attention(rope(q, q_pos, self.theta), rope(K, k_pos, self.theta), V, window=w,
                                 q_positions=q_pos, k_positions=k_pos, k_valid=k_pos >= 0)
        o_ssm, ssm = selective_scan(V[:, :t], DT[:, :t], self._A(), K[:, :t], q.astype(K.dtype),
                                    initial_state=state["ssm"], mode="chunked", chunk_size=self.opts.chunk_size)
        ring = lambda a: jnp.roll(a[:, t:], (pos0 + t) % w, axis=1)  # last w tokens -> slot p % w
        new = {"k": ring(K), "v": ring(V), "dt": ring(DT), "ssm": ssm, "pos": pos0 + t}
        return self._combine(x, o_att, o_ssm.astype(o_att.dtype)), new

    def step(self, x, state, *, token=None):
        """One token at position ``p``: evict slot ``p % window`` (token ``p - window``) into the SSM,
        read the SSM, write the new token into that slot, attend over the ring buffer."""
        w, p = self.window, state["pos"]
        q, k, v, dt = self._project(x[:, None])
        slot = p % w
        take = lambda a: jax.lax.dynamic_index_in_dim(a, slot, axis=1, keepdims=True)
        o_ssm, ssm = selective_scan(take(state["v"]), take(state["dt"]), self._A(), take(state["k"]),
                                    q.astype(state["k"].dtype), initial_state=state["ssm"], mode="recurrent")
        put = lambda a, new: jax.lax.dynamic_update_index_in_dim(a, new.astype(a.dtype), slot, axis=1)
        K, V, DT = put(state["k"], k), put(state["v"], v), put(state["dt"], dt)
        b = x.shape[0]
        slot_pos = p - jnp.remainder(p - jnp.arange(w), w)  # the position held by each slot
        k_pos = jnp.broadcast_to(slot_pos, (b, w))
        q_pos = jnp.full((b, 1), p)
        o_att = causal_attention(rope(q, q_pos, self.theta), rope(K, k_pos, self.theta), V, window=w,
                                 q_positions=q_pos, k_positions=k_pos, k_valid=k_pos >= 0)
        y = self._combine(x[:, None], o_att, o_ssm.astype(o_att.dtype))
        return y[:, 0], {"k": K, "v": V, "dt": DT, "ssm": ssm, "pos": p + 1}
