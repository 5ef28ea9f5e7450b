"""Decoding caches shared by the blocks: one typed cache per kind of state, each a pytree.

Every block's ``init_cache(batch_size, max_length)`` returns a NamedTuple (NamedTuples are
pytrees, so caches pass through ``jit``, ``lax.scan`` and ``nnx.scan`` as they are):

* :class:`NoCache` for position-wise blocks (MLP, memory layers): nothing to carry;
* :class:`KVCache` for softmax attention: keys and values of every position seen so far;
* :class:`ForgetKVCache` for Forgetting Attention: a :class:`KVCache` plus each key's cumulative
  log forget gate;
* :class:`WindowKVCache` for sliding-window attention: a ring of the last ``window`` keys and values;
* recurrent blocks define their own NamedTuple of (short-conv windows, memory state).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class NoCache(NamedTuple):
    """The decoding cache of a position-wise block: no fields, no leaves."""


class KVCache(NamedTuple):
    """Keys and values of the positions seen so far, ``[B, max_length, Hkv, K]``, and their count.

    All rows of a batch advance together (``pos`` is a scalar): decoding feeds ``[B, T]`` tokens
    at a time. Positions ``>= pos`` hold zeros and are masked by :meth:`update`'s ``valid``.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array  # int32 [], tokens written so far

    @classmethod
    def init(cls, batch_size: int, max_length: int, num_heads: int, head_dim: int, dtype=jnp.float32,
             value_dim: int | None = None) -> "KVCache":
        v_dim = head_dim if value_dim is None else value_dim
        return cls(jnp.zeros((batch_size, max_length, num_heads, head_dim), dtype),
                   jnp.zeros((batch_size, max_length, num_heads, v_dim), dtype), jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.k.shape[1]

    def positions(self, length: int) -> jax.Array:
        """``[B, length]`` positions of ``length`` new tokens written at ``pos``."""
        return self.pos + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (self.k.shape[0], length))

    def update(self, k: jax.Array, v: jax.Array):
        """Write ``k, v: [B, T, Hkv, .]`` at ``pos``.

        Returns ``(cache, k_positions [B, max_length], valid [B, max_length])``: the new cache, the
        position of every cache slot, and which slots hold a token (the ones to attend to).
        """
        t = k.shape[1]
        kc = jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), (0, self.pos, 0, 0))
        vc = jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), (0, self.pos, 0, 0))
        b, length = kc.shape[:2]
        k_pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        return KVCache(kc, vc, self.pos + t), k_pos, k_pos < self.pos + t


class ForgetKVCache(NamedTuple):
    """A :class:`KVCache` plus ``gate_cumsum [B, max_length, H]`` (float32; ``H`` query heads):
    ``G_s = sum_{l <= s} g_l`` of every cached key, so a query at ``t`` adds ``G_t - G_s`` to its
    logits (Forgetting Attention, :func:`memjax.memory.attention.causal_attention`). Slots
    ``>= pos`` hold zeros and are masked.
    """

    k: jax.Array
    v: jax.Array
    gate_cumsum: jax.Array
    pos: jax.Array  # int32 [], tokens written so far

    @classmethod
    def init(cls, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, num_heads: int,
             dtype=jnp.float32, value_dim: int | None = None) -> "ForgetKVCache":
        kv = KVCache.init(batch_size, max_length, num_kv_heads, head_dim, dtype, value_dim)
        return cls(kv.k, kv.v, jnp.zeros((batch_size, max_length, num_heads), jnp.float32), kv.pos)

    @property
    def max_length(self) -> int:
        return self.k.shape[1]

    def positions(self, length: int) -> jax.Array:
        """``[B, length]`` positions of ``length`` new tokens written at ``pos``."""
        return self.pos + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (self.k.shape[0], length))

    def update(self, k: jax.Array, v: jax.Array, g: jax.Array):
        """Write ``k, v: [B, T, Hkv, .]`` and log gates ``g: [B, T, H]`` at ``pos``.

        Returns ``(cache, k_positions, valid, q_gate_cumsum)``: as :meth:`KVCache.update`, plus the
        new tokens' cumulative gates ``[B, T, H]`` (float32): the last stored ``G`` (0 before the
        first token) plus the running sum of ``g``.
        """
        kv, k_pos, valid = KVCache(self.k, self.v, self.pos).update(k, v)
        last = jax.lax.dynamic_index_in_dim(self.gate_cumsum, jnp.maximum(self.pos - 1, 0), axis=1, keepdims=False)
        last = jnp.where(self.pos > 0, last, 0.0)  # [B, H]
        cum = last[:, None] + jnp.cumsum(g.astype(jnp.float32), axis=1)
        gc = jax.lax.dynamic_update_slice(self.gate_cumsum, cum, (0, self.pos, 0))
        return ForgetKVCache(kv.k, kv.v, gc, kv.pos), k_pos, valid, cum


class WindowKVCache(NamedTuple):
    """Keys and values of the last ``window`` positions only (sliding-window attention).

    ``k [B, window, Hkv, K]``, ``v [B, window, Hkv, V]`` form a ring: slot ``p % window`` holds
    position ``p``; ``pos`` (int32 scalar) counts the tokens seen, all rows together. Slots of
    positions ``< 0`` (fewer than ``window`` tokens seen) hold zeros. Per-token arrays that travel
    with the keys (e.g. step sizes) use :func:`window_stream` / :func:`window_keep` with ``pos``.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array  # int32 [], tokens written so far

    @classmethod
    def init(cls, batch_size: int, window: int, num_heads: int, head_dim: int, dtype=jnp.float32,
             value_dim: int | None = None) -> "WindowKVCache":
        v_dim = head_dim if value_dim is None else value_dim
        return cls(jnp.zeros((batch_size, window, num_heads, head_dim), dtype),
                   jnp.zeros((batch_size, window, num_heads, v_dim), dtype), jnp.zeros((), jnp.int32))

    @property
    def window(self) -> int:
        return self.k.shape[1]

    def positions(self, length: int) -> jax.Array:
        """``[B, length]`` positions of ``length`` new tokens written at ``pos``."""
        return self.pos + jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (self.k.shape[0], length))

    def update(self, k: jax.Array, v: jax.Array):
        """Append ``k, v: [B, T, Hkv, .]`` (any ``T >= 1``).

        Returns ``(cache, keys, values, k_positions, valid)``: the new cache, and the keys and
        values ``[B, window + T, Hkv, .]`` a query at positions ``pos .. pos + T - 1`` may see (the
        window before the call, oldest first, then the new tokens) with their positions
        ``pos - window + i`` and ``valid = position >= 0`` (``[B, window + T]``). The caller
        applies the window mask (positions ``> q - window``).
        """
        b, t = k.shape[:2]
        keys, values = window_stream(self.k, k, self.pos), window_stream(self.v, v, self.pos)
        k_pos = self.pos - self.window + jnp.broadcast_to(jnp.arange(self.window + t, dtype=jnp.int32),
                                                          (b, self.window + t))
        new = WindowKVCache(window_keep(self.k, k, self.pos), window_keep(self.v, v, self.pos), self.pos + t)
        return new, keys, values, k_pos, k_pos >= 0


def window_stream(ring: jax.Array, new: jax.Array, pos: jax.Array) -> jax.Array:
    """``[B, W + T, ...]``: the ring ``[B, W, ...]`` (slot ``p % W`` holds position ``p < pos``)
    oldest first, i.e. positions ``pos - W .. pos - 1``, followed by ``new [B, T, ...]``."""
    w = ring.shape[1]
    return jnp.concatenate([jnp.roll(ring, -(pos % w), axis=1), new.astype(ring.dtype)], axis=1)


def window_keep(ring: jax.Array, new: jax.Array, pos: jax.Array) -> jax.Array:
    """The ring after appending ``new [B, T, ...]`` at position ``pos``: its last ``min(T, W)``
    entries written at slots ``p % W``."""
    w, t = ring.shape[1], new.shape[1]
    keep = min(t, w)
    slots = jnp.mod(pos + t - keep + jnp.arange(keep), w)
    return ring.at[:, slots].set(new[:, t - keep:].astype(ring.dtype))
