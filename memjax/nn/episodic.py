"""Episodic-memory attention block: local attention within a segment + top-k retrieval from a ring
buffer of the document's earlier segments (Memorizing Transformers, Wu et al., ICLR 2022, section 3;
LongMem; CAMELoT).

Semantics (exact; the training form, the cached prefill and token-by-token decoding all compute it).
Time is cut into segments of ``segment_length = L`` tokens counted from the start of each document
(the document position ``p`` of a token is its index in its document, or in the stream a decoding
cache has seen; its segment starts at ``S(p) = L * (p // L)``). With ``M = memory_slots``, a token
at ``p`` sees

* **locally** (causal softmax attention over RoPE-rotated q, k, per head): the tokens ``p' <= p``
  of its own segment, ``S(p) <= p'``;
* **in the memory**: the ``(k, v)`` pairs of the ``M`` tokens before its segment,
  ``S(p) - M <= p' < S(p)`` (the ring buffer's contents at the segment start: segments are
  written once complete, the oldest pair overwritten first), of which it attends to the
  ``top_k`` with the largest cosine similarity (:func:`memjax.memory.episodic.topk_attention`).

Nothing crosses a document (``segment_ids``: each contiguous run of an id is one document, positions
restart) and nothing crosses a segment except through the memory. Per head ``h``::

    a_loc = softmax(q k^T / sqrt(D) + causal in-segment mask) v                 (rope(q), rope(k))
    a_mem = sum_{i < top_k} softmax_i(tau_h <q_hat, k_hat_{I_i}>) v_{I_i}       (un-rotated q, k; hats: L2 norm)
    o     = g_h * a_mem + (1 - g_h) * a_loc,    g_h = sigmoid(b_h)   (learned gate and temperature tau_h)
    y     = W_o o

As in the paper the memory is non-differentiable: no gradient reaches the keys and values it
holds (so a loss at one segment has zero gradient in the tokens of earlier segments); the
query, the temperature and the gate are trained through it. A query with nothing in its memory
(the first segment) reads ``a_mem = 0``.

Decoding and long documents: ``cache = block.init_cache(B, max_length)`` holds the ring buffer
(:class:`memjax.memory.episodic.EpisodicState`, positions are stream positions) and the last
``L`` tokens' keys and values (:class:`memjax.nn.cache.WindowKVCache`). ``y, cache = block(x,
cache=cache)`` with any ``T >= 1`` continues the stream: the call's tokens see the ring and the
not-yet-written tokens of the window as the rule above says, and every segment the call
completes is written to the ring when the call ends (a segment is written when its last token
has been seen). So a document fed in pieces of any sizes, token by token, or in one call
without a cache gives the same outputs, and a document longer than one training window carries
its memory across calls (the cached form is differentiable like the training form).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.attention import causal_attention, rope
from memjax.memory.episodic import EpisodicState, episodic_init, episodic_write, l2_normalize, topk_attention
from memjax.memory.segments import document_ids, positions
from memjax.nn.block import Block
from memjax.nn.cache import WindowKVCache
from memjax.nn.layers import Linear, param
from memjax.nn.registry import register_block
from memjax.nn.validate import check_heads, check_no_segments, check_positive


class EpisodicCache(NamedTuple):
    """Decoding cache of :class:`EpisodicAttention`: ``memory`` (the ring of completed segments,
    ``[B, Hkv, M, D]``) and ``window`` (un-rotated keys and values of the last ``L`` tokens and
    ``pos``, the tokens seen)."""

    memory: EpisodicState
    window: WindowKVCache


@register_block("episodic", aliases=("EP",))
class EpisodicAttention(Block):
    """Memorizing-Transformer layer: in-segment causal attention gated with a top-k read of an
    episodic memory of the earlier segments (module docstring: exact semantics).

    Args:
      d_model: model width; ``num_heads`` query heads of ``head_dim`` (None: ``d_model // num_heads``).
      num_kv_heads: key/value heads (None or 0: ``num_heads``; fewer: grouped queries; the memory
        stores ``num_kv_heads`` heads).
      segment_length: ``L``, tokens per segment (the memory is written once per segment).
      memory_slots: ``M``, pairs per row and key head in the ring buffer.
      top_k: pairs each query reads (``1 <= top_k <= memory_slots``).
      approx: ``jax.lax.approx_max_k`` instead of the exact ``lax.top_k`` (accelerated on TPU;
        exact on CPU / GPU).
      gate_init: initial ``b_h`` of the gate ``g_h = sigmoid(b_h)`` (0: an even mix).
      temperature_init: initial ``tau_h`` (learned as ``log tau``) scaling the cosine similarities.
      rope_theta, dtype: RoPE base and compute dtype (also the cache's dtype).
    """

    stateful = True

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 num_kv_heads: int | None = None, segment_length: int = 64, memory_slots: int = 1024,
                 top_k: int = 32, approx: bool = False, gate_init: float = 0.0, temperature_init: float = 10.0,
                 rope_theta: float = 10000.0, dtype=jnp.float32, rngs: nnx.Rngs):
        name = "EpisodicAttention"
        self.h, self.dk = check_heads(name, d_model, num_heads, head_dim)
        self.hkv = num_kv_heads or num_heads
        if self.h % self.hkv:
            raise ValueError(f"{name}: num_kv_heads ({self.hkv}) must divide num_heads ({self.h})")
        for arg, value in (("segment_length", segment_length), ("memory_slots", memory_slots), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        check_positive(name, segment_length=segment_length, memory_slots=memory_slots, top_k=top_k,
                       temperature_init=temperature_init, rope_theta=rope_theta)
        if top_k > memory_slots:
            raise ValueError(f"{name}: top_k ({top_k}) must be <= memory_slots ({memory_slots})")
        if not isinstance(approx, bool):
            raise ValueError(f"{name}: approx must be a bool, got {approx!r}")
        self.seg, self.slots, self.top_k, self.approx, self.theta = segment_length, memory_slots, top_k, approx, \
            rope_theta
        self.dtype = jnp.dtype(dtype)
        dt = self.dtype
        self.wq = Linear(d_model, self.h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d_model, self.hkv * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d_model, self.hkv * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wo = Linear(self.h * self.dk, d_model, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.gate_bias = param(rngs, nnx.initializers.constant(gate_init), (self.h,), ("heads",))
        self.log_temperature = param(rngs, nnx.initializers.constant(math.log(temperature_init)), (self.h,),
                                     ("heads",))

    # ------------------------------------------------------------------ pieces

    def _project(self, x):
        b, t, _ = x.shape
        return (self.wq(x).reshape(b, t, self.h, self.dk), self.wk(x).reshape(b, t, self.hkv, self.dk),
                self.wv(x).reshape(b, t, self.hkv, self.dk))

    def _read(self, q, keys, values, visible):
        """The memory read over candidate keys (already L2-normalised, as the ring stores them) with
        ``visible [B, T, S]``."""
        k_eff = min(self.top_k, keys.shape[1])  # fewer candidates than top_k: all of them
        return topk_attention(l2_normalize(q), keys, values, k_eff, visible=visible,
                              scale=jnp.exp(self.log_temperature[...]), approx=self.approx).output

    def _combine(self, a_loc, a_mem):
        b, t = a_loc.shape[:2]
        acc = jnp.promote_types(a_loc.dtype, jnp.float32)  # the mix in float32 (float64 for float64)
        g = jax.nn.sigmoid(self.gate_bias[...].astype(acc))[:, None]  # [H, 1]
        o = g * a_mem.astype(acc) + (1.0 - g) * a_loc.astype(acc)
        return self.wo(o.astype(self.dtype).reshape(b, t, self.h * self.dk))

    # ------------------------------------------------------------------ forward

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: EpisodicCache | None = None):
        if cache is not None:
            check_no_segments("EpisodicAttention", segment_ids)
            return self._cached(x, cache)
        b, t, _ = x.shape
        q, k, v = self._project(x)
        pos = positions(b, t, segment_ids)  # document positions
        doc = jnp.zeros((b, t), jnp.int32) if segment_ids is None else document_ids(segment_ids)
        # one id per (document, segment) run: each contiguous run is one attention document
        local_ids = jnp.cumsum((pos % self.seg == 0).astype(jnp.int32), axis=1)
        a_loc = causal_attention(rope(q, pos, self.theta), rope(k, pos, self.theta), v, segment_ids=local_ids)
        start = (pos // self.seg) * self.seg  # S(p) of each query
        visible = ((doc[:, :, None] == doc[:, None, :]) & (pos[:, None, :] < start[:, :, None])
                   & (pos[:, None, :] >= start[:, :, None] - self.slots))
        return self._combine(a_loc, self._read(q, l2_normalize(k), v, visible))

    def _cached(self, x, cache: EpisodicCache):
        b, t, _ = x.shape
        L = self.seg
        q, k, v = self._project(x)
        pos0 = cache.window.pos
        qpos = cache.window.positions(t)  # [B, T] stream positions
        window, ks, vs, kpos, kvalid = cache.window.update(k, v)  # stream: the last L tokens, then the new T
        if t == 1:  # one query: a key mask suffices (same segment, seen)
            same = kvalid & (kpos // L == pos0 // L)
            a_loc = causal_attention(rope(q, qpos, self.theta), rope(ks, kpos, self.theta), vs, q_positions=qpos,
                                     k_positions=kpos, k_valid=same)
        else:  # queries in several segments: self-attention over the stream with (segment) ids
            ids = jnp.where(kvalid, kpos // L, -1)
            qs = jnp.concatenate([jnp.zeros((b, L, self.h, self.dk), q.dtype), q], axis=1)  # (outputs dropped)
            a_loc = causal_attention(rope(qs, kpos, self.theta), rope(ks, kpos, self.theta), vs,
                                     segment_ids=ids)[:, L:]
        # memory candidates: the ring (segments completed before this call) and the stream tokens
        # not yet written to it (positions >= the current segment's start at the call)
        ring = cache.memory
        call_start = (pos0 // L) * L
        start = (qpos // L) * L  # [B, T]
        ring_vis = ring.valid[:, None, :] & (ring.positions[:, None, :] >= start[:, :, None] - self.slots)
        fresh = kvalid & (kpos >= call_start)  # [B, L + T]
        stream_vis = (fresh[:, None, :] & (kpos[:, None, :] < start[:, :, None])
                      & (kpos[:, None, :] >= start[:, :, None] - self.slots))
        keys = jnp.concatenate([jnp.moveaxis(ring.keys, 1, 2), l2_normalize(ks).astype(ring.keys.dtype)], axis=1)
        values = jnp.concatenate([jnp.moveaxis(ring.values, 1, 2), vs.astype(ring.values.dtype)], axis=1)
        a_mem = self._read(q, keys, values, jnp.concatenate([ring_vis, stream_vis], axis=2))
        # write every segment this call completed (tokens in [call_start, end of the last full segment))
        done = fresh & (kpos < ((pos0 + t) // L) * L)
        memory = episodic_write(ring, ks, vs, done, positions=kpos)
        return self._combine(a_loc, a_mem), EpisodicCache(memory, window)

    def init_cache(self, batch_size: int, max_length: int) -> EpisodicCache:
        """An empty ring of ``memory_slots`` pairs and window of ``segment_length`` tokens (the
        cache's size does not grow with ``max_length``)."""
        return EpisodicCache(episodic_init(batch_size, self.hkv, self.slots, self.dk, self.dk, self.dtype),
                             WindowKVCache.init(batch_size, self.seg, self.hkv, self.dk, self.dtype))
