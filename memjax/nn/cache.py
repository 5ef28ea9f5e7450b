"""Decoding caches shared by the blocks: one typed cache per kind of state, each a pytree.

Every block's ``init_cache(batch_size, max_length)`` returns a NamedTuple (NamedTuples are
pytrees, so caches pass through ``jit``, ``lax.scan`` and ``nnx.scan`` as they are):

* :class:`NoCache` for position-wise blocks (MLP, memory layers): nothing to carry;
* :class:`KVCache` for softmax attention: keys and values of every position seen so far;
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
