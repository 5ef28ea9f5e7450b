"""Causal softmax attention (the exact-memory baseline) as a pure function, plus RoPE.

Shapes: ``q: [B, T, H, K]``, ``k: [B, S, Hkv, K]``, ``v: [B, S, Hkv, V]`` with ``H % Hkv == 0``
(grouped-query attention). ``o_t = sum_s softmax_s(scale * q_t . k_s + mask_ts) v_s``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary embedding of ``x: [B, T, H, K]`` (K even) at ``positions: [B, T]`` (half-split layout)."""
    k = x.shape[-1]
    if k % 2:
        raise ValueError(f"rope needs an even head dim, got {k}")
    freqs = theta ** (-jnp.arange(0, k // 2, dtype=jnp.float32) * 2.0 / k)
    ang = positions.astype(jnp.float32)[..., None, None] * freqs  # [B, T, 1, K/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : k // 2], xf[..., k // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, *, window: int = 0,
                   q_seg: jax.Array | None = None, k_seg: jax.Array | None = None,
                   k_valid: jax.Array | None = None) -> jax.Array:
    """``[B, T, S]`` bool: causal (``k_pos <= q_pos``), within ``window`` if > 0, same segment."""
    m = k_pos[:, None, :] <= q_pos[:, :, None]
    if window > 0:
        m &= k_pos[:, None, :] > q_pos[:, :, None] - window
    if q_seg is not None:
        m &= q_seg[:, :, None] == k_seg[:, None, :]
    if k_valid is not None:
        m &= k_valid[:, None, :]
    return m


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                     segment_ids: jax.Array | None = None, window: int = 0,
                     q_positions: jax.Array | None = None, k_positions: jax.Array | None = None,
                     k_valid: jax.Array | None = None) -> jax.Array:
    """Masked softmax attention; returns ``o: [B, T, H, V]`` (softmax in float32).

    Default positions are ``0..T-1`` for queries and ``0..S-1`` for keys (self-attention).
    ``window > 0`` keeps only the last ``window`` keys (sliding-window attention).
    ``segment_ids: [B, T]`` (self-attention only) masks attention across packed documents.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got q{q.shape} k{k.shape} v{v.shape}")
    b, t, h, dk = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != dk or v.shape[:3] != k.shape[:3] or h % hkv:
        raise ValueError(f"k{k.shape} / v{v.shape} do not match q{q.shape}")
    scale = dk ** -0.5 if scale is None else scale
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    if k_positions is None:
        k_positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask = attention_mask(q_positions, k_positions, window=window, q_seg=segment_ids,
                          k_seg=segment_ids, k_valid=k_valid)
    qg = q.reshape(b, t, hkv, h // hkv, dk)
    logits = jnp.einsum("btgrk,bsgk->bgrts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, -1e30)
    p = jax.nn.softmax(logits, axis=-1)
    p = jnp.where(mask[:, None, None], p, 0.0)  # rows with no visible key give 0, not a uniform average
    o = jnp.einsum("bgrts,bsgv->btgrv", p.astype(v.dtype), v)
    return o.reshape(b, t, h, v.shape[-1])
