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
another document (its state then holds only that other document).

Decoding: ``y, cache = block(x, cache=cache)`` with :class:`SlidingWindowSSMCache` (a
:class:`memjax.nn.cache.WindowKVCache` ring of the last ``window`` un-rotated keys and values,
their step sizes ``dt: [B, window, H]`` float32 in the same slots, and ``ssm: [B, H, Dh, Dh]``
float32). The cached window (oldest first) followed by the ``T`` new tokens is one stream; its
first ``T`` tokens are those leaving the window, which the SSM consumes (chunked for ``T > 1``,
recurrent for ``T = 1``). An empty slot has ``dt = 0``: evicting it is a no-op.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.attention import causal_attention, rope
from memjax.memory.segments import positions
from memjax.memory.ssm import selective_scan
from memjax.nn.block import Block
from memjax.nn.cache import WindowKVCache, window_keep, window_stream
from memjax.nn.layers import Linear, RMSNorm, param
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.ssm_blocks import decode_mode, dt_bias_init
from memjax.nn.validate import check_choice, check_heads, check_no_segments, check_positive


def _delay(x, n, fill_from_first=False):
    """Shift ``x [B, T, ...]`` right by ``n`` along time (zeros, or copies of ``x[:, :1]``, enter)."""
    t = x.shape[1]
    if n >= t:
        return jnp.broadcast_to(x[:, :1], x.shape) if fill_from_first else jnp.zeros_like(x)
    head = jnp.broadcast_to(x[:, :1], (x.shape[0], n, *x.shape[2:])) if fill_from_first else \
        jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype)
    return jnp.concatenate([head, x[:, : t - n]], axis=1)


class SlidingWindowSSMCache(NamedTuple):
    """Decoding cache of :class:`SlidingWindowSSM`: ``kv`` the last ``window`` un-rotated keys and
    values (a ring, slot ``p % window`` holds position ``p``), ``dt: [B, window, H]`` float32 their
    step sizes in the same slots (0 in empty slots), ``ssm: [B, H, Dh, Dh]`` float32 the state of
    every evicted token."""

    kv: WindowKVCache
    dt: jax.Array
    ssm: jax.Array


@register_block("swa_ssm", aliases=("E",))
class SlidingWindowSSM(Block):
    """Sliding-window attention (eidetic) + selective-SSM state of the evicted tokens (fading).

    ``[B, T, d_model] -> [B, T, d_model]`` (equations in the module docstring).

    Args:
      d_model: model width; ``num_heads`` heads of ``head_dim`` (``None``: ``d_model // num_heads``, even: RoPE).
      window: tokens kept exactly (attention span, the query included).
      combine: ``"gate"``: ``o_att + sigmoid(x W_g) * norm(o_ssm)``; ``"sum"``: ``o_att + norm(o_ssm)``.
      chunk_size: ``C`` of the SSM's chunked form.
      dt_min, dt_max: ``softplus(dt_bias)`` starts log-uniform in ``[dt_min, dt_max]``.
      a_init_min, a_init_max: ``A = -U(a_init_min, a_init_max)`` at init.
      mode: SSM training form, ``"chunked"`` or ``"recurrent"``.
      rope_theta, norm_eps, dtype: RoPE base, RMSNorm epsilon, compute dtype.
      seq_axis: mesh axis that time is split over in training (``None``: no sequence parallelism).
    """

    stateful = True

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, window: int = 128,
                 combine: str = "gate", chunk_size: int = 64, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 a_init_min: float = 1.0, a_init_max: float = 16.0, mode: str = "chunked",
                 rope_theta: float = 10000.0, norm_eps: float = 1e-6, dtype=jnp.float32,
                 seq_axis: str | None = None, rngs: nnx.Rngs):
        name = "SlidingWindowSSM"
        self.h, self.dh = check_heads(name, d_model, num_heads, head_dim)
        check_positive(name, window=window, chunk_size=chunk_size, rope_theta=rope_theta)
        check_choice(name, "combine", combine, ("gate", "sum"))
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"{name}: dt_min / dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        if not 0 < a_init_min <= a_init_max:
            raise ValueError(f"{name}: a_init_min / a_init_max must satisfy 0 < min <= max, "
                             f"got {a_init_min}, {a_init_max}")
        check_choice(name, "mode", mode, ("chunked", "recurrent"))
        if self.dh % 2:
            raise ValueError(f"{name}: head_dim must be even (RoPE), got {self.dh}")
        self.window, self.theta = window, rope_theta
        self.chunk_size, self.mode, self.seq_axis = chunk_size, mode, seq_axis
        d, hd = d_model, self.h * self.dh
        dt = jnp.dtype(dtype)
        self.dtype = dt
        self.wq = Linear(d, hd, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d, hd, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, hd, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wdt = Linear(d, self.h, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.dt_bias = param(rngs, dt_bias_init(dt_min, dt_max), (self.h,), ("heads",))
        self.a_log = param(rngs, lambda k, s, t: jnp.log(jax.random.uniform(k, s, t, a_init_min, a_init_max)),
                           (self.h,), ("heads",))
        self.ssm_norm = RMSNorm(self.dh, rngs=rngs, eps=norm_eps, axes=("kv",))
        self.wg = Linear(d, self.h, ("embed", "heads"), rngs=rngs, dtype=dt) if combine == "gate" else None
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

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: SlidingWindowSSMCache | None = None):
        if cache is not None:
            check_no_segments("SlidingWindowSSM", segment_ids)
            return self._decode(x, cache)
        b, t, _ = x.shape
        w = self.window
        q, k, v, dt = self._project(x)
        pos = positions(b, t, segment_ids)
        o_att = causal_attention(rope(q, pos, self.theta), rope(k, pos, self.theta), v,
                                 segment_ids=segment_ids, window=w)
        seg_d = None if segment_ids is None else _delay(segment_ids, w, fill_from_first=True)
        scan = lambda x, dt, B, C, segment_ids, A, seq_axis: selective_scan(
            x, dt, A, B, C, segment_ids=segment_ids, mode=self.mode, chunk_size=self.chunk_size, seq_axis=seq_axis)
        time_args = dict(x=_delay(v, w), dt=_delay(dt, w), B=_delay(k, w), C=q, segment_ids=seg_d)
        o_ssm, _ = over_sequence(scan, time_args, dict(A=self._A()), axis=self.seq_axis,
                                 enabled=self.mode == "chunked")
        if segment_ids is not None:  # the state at t - w belongs to another document
            o_ssm = jnp.where((seg_d == segment_ids)[..., None, None], o_ssm, 0)
        return self._combine(x, o_att, o_ssm)

    def _decode(self, x, cache: SlidingWindowSSMCache):
        """``T >= 1`` tokens from ``cache``: the cached window (oldest first) followed by the new
        tokens is one stream of ``window + T``; the SSM consumes its first ``T`` tokens (those
        leaving the window) and attention sees the last ``window`` of it per query."""
        t = x.shape[1]
        pos0 = cache.kv.pos
        q, k, v, dt = self._project(x)
        kv, K, V, k_pos, valid = cache.kv.update(k, v)
        DT = window_stream(cache.dt, dt, pos0)
        q_pos = cache.kv.positions(t)
        o_att = causal_attention(rope(q, q_pos, self.theta), rope(K, k_pos, self.theta), V, window=self.window,
                                 q_positions=q_pos, k_positions=k_pos, k_valid=valid)
        o_ssm, ssm = selective_scan(V[:, :t], DT[:, :t], self._A(), K[:, :t], q.astype(K.dtype),
                                    initial_state=cache.ssm, mode=decode_mode(x, "chunked"),
                                    chunk_size=self.chunk_size)
        new = SlidingWindowSSMCache(kv, window_keep(cache.dt, dt, pos0), ssm.astype(cache.ssm.dtype))
        return self._combine(x, o_att, o_ssm.astype(o_att.dtype)), new

    def init_cache(self, batch_size: int, max_length: int) -> SlidingWindowSSMCache:
        kv = WindowKVCache.init(batch_size, self.window, self.h, self.dh, self.dtype)
        return SlidingWindowSSMCache(kv, jnp.zeros((batch_size, self.window, self.h), jnp.float32),
                                     jnp.zeros((batch_size, self.h, self.dh, self.dh), jnp.float32))
