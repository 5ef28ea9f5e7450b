"""Causal softmax attention (the exact-memory baseline) as a pure function, plus RoPE.

Shapes: ``q: [B, T, H, K]``, ``k: [B, S, Hkv, K]``, ``v: [B, S, Hkv, V]`` with ``H % Hkv == 0``
(grouped-query attention). ``o_t = sum_s softmax_s(scale * q_t . k_s + mask_ts) v_s``.

Implementations of :func:`causal_attention` (``impl``):
  ``"xla"``    the masked softmax written out here (forms the ``[B, H, T, S]`` logits; every case).
  ``"cudnn"``  cuDNN's fused flash attention through ``jax.nn.dot_product_attention`` (GPU, bf16 /
               f16, causal self-attention with an optional sliding window; no packed segments,
               explicit positions or cache masks).
  ``"auto"``   cuDNN where it applies *and* the device is in ``VERIFIED_DEVICES`` (it has run this
               library's checks there); XLA otherwise. None is verified yet: ``auto`` is XLA.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from memjax.kernels.pallas_common import on_verified_device
from memjax.kernels.platform import target_platform
from memjax.memory import nonfinite
from memjax.memory.segments import document_ids

IMPLS = ("auto", "xla", "cudnn")
# backend -> device-kind prefixes where impl="cudnn" has passed the GPU benchmark's comparison
# with the XLA form. Empty: cuDNN attention has not run under this library yet.
VERIFIED_DEVICES: dict[str, tuple[str, ...]] = {}


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


def cudnn_unsupported(q, k, v, *, segment_ids=None, q_positions=None, k_positions=None,
                      k_valid=None) -> str | None:
    """Why ``impl="cudnn"`` cannot run this call, or None if it can."""
    if segment_ids is not None:
        return "segment_ids (packed documents)"
    if q_positions is not None or k_positions is not None or k_valid is not None:
        return "explicit positions or k_valid (decoding with a KV cache)"
    if q.shape[1] != k.shape[1]:
        return f"queries and keys of different lengths ({q.shape[1]} vs {k.shape[1]})"
    if not all(x.dtype in (jnp.bfloat16, jnp.float16) for x in (q, k, v)):
        return f"dtype {q.dtype} (cuDNN flash attention takes bfloat16 / float16)"
    if q.shape[3] % 8 or q.shape[3] > 128 or v.shape[3] != q.shape[3]:
        return f"head dims K = {q.shape[3]}, V = {v.shape[3]} (equal, a multiple of 8, at most 128)"
    return None


def fused_attention(q, k, v, *, scale: float, window: int = 0, implementation: str = "cudnn") -> jax.Array:
    """Causal (optionally sliding-window) self-attention through ``jax.nn.dot_product_attention``:
    the same function as the ``"xla"`` form of :func:`causal_attention` when ``segment_ids`` and
    positions are left out. ``implementation="xla"`` runs anywhere (the tests check the argument
    mapping with it); ``"cudnn"`` is the fused GPU kernel."""
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        local_window_size=(window - 1, 0) if window > 0 else None,
                                        implementation=implementation)


def _use_cudnn(impl: str, reason: str | None) -> bool:
    if impl == "cudnn":
        if reason is not None:
            raise ValueError(f"causal_attention: impl='cudnn' does not support {reason}; use impl='xla' or 'auto'")
        return True
    return impl == "auto" and reason is None and on_verified_device(VERIFIED_DEVICES, target_platform())


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                     segment_ids: jax.Array | None = None, window: int = 0,
                     q_positions: jax.Array | None = None, k_positions: jax.Array | None = None,
                     k_valid: jax.Array | None = None, impl: str = "auto") -> jax.Array:
    """Masked softmax attention; returns ``o: [B, T, H, V]`` (softmax in float32, float64 for float64 inputs).

    Default positions are ``0..T-1`` for queries and ``0..S-1`` for keys (self-attention).
    ``window > 0`` keeps only the last ``window`` keys (sliding-window attention); a negative
    ``window`` is a ``ValueError``.
    ``segment_ids: [B, T]`` (self-attention only) masks attention across packed documents; each
    contiguous run of an id is one document (:func:`memjax.memory.segments.document_ids`, the rule
    of the recurrent memories), so an id reused later in the row starts a new document.
    The XLA form keeps non-finite inputs causal (:mod:`memjax.memory.nonfinite`): a NaN key or
    value makes NaN exactly the rows that attend to it, a NaN query its own row.
    ``impl``: ``"auto" | "xla" | "cudnn"`` (module docstring).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got q{q.shape} k{k.shape} v{v.shape}")
    b, t, h, dk = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != dk or v.shape[:3] != k.shape[:3] or h % hkv:
        raise ValueError(f"k{k.shape} / v{v.shape} do not match q{q.shape}")
    if impl not in IMPLS:
        raise ValueError(f"causal_attention: impl must be one of {IMPLS}, got {impl!r}")
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"causal_attention: window must be an int >= 0 (0: no window), got {window!r}")
    scale = dk ** -0.5 if scale is None else scale
    reason = cudnn_unsupported(q, k, v, segment_ids=segment_ids, q_positions=q_positions,
                               k_positions=k_positions, k_valid=k_valid)
    if _use_cudnn(impl, reason):
        return fused_attention(q, k, v, scale=scale, window=window)
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    if k_positions is None:
        k_positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    # Each contiguous run of an id is its own document (the rule of every recurrent memory:
    # memjax.memory.segments), so [1, 1, 2, 2, 1, 1] is three documents, not two.
    seg = None if segment_ids is None else document_ids(segment_ids)
    mask = attention_mask(q_positions, k_positions, window=window, q_seg=seg, k_seg=seg, k_valid=k_valid)
    # A non-finite query poisons its own row, a non-finite key or value every row that sees it
    # (memjax.memory.nonfinite): `p @ v` would otherwise spread 0 * NaN to rows that mask it.
    bad_kv = nonfinite.either(nonfinite.bad(k, 3), nonfinite.bad(v, 3))  # [B, S, Hkv]
    seen = jnp.einsum("bts,bsg->btg", mask.astype(jnp.float32), bad_kv.astype(jnp.float32)) > 0
    poisoned = nonfinite.either(nonfinite.bad(q, 3), jnp.repeat(seen, h // hkv, axis=2))  # [B, T, H]
    q, k, v = (nonfinite.finite_or_zero(x) for x in (q, k, v))
    qg = q.reshape(b, t, hkv, h // hkv, dk)
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float32 softmax; float64 for float64 inputs
    logits = jnp.einsum("btgrk,bsgk->bgrts", qg, k, preferred_element_type=acc) * scale
    logits = jnp.where(mask[:, None, None], logits, -1e30)
    p = jax.nn.softmax(logits, axis=-1)
    p = jnp.where(mask[:, None, None], p, 0.0)  # rows with no visible key give 0, not a uniform average
    o = jnp.einsum("bgrts,bsgv->btgrv", p.astype(v.dtype), v)
    return nonfinite.poison(o.reshape(b, t, h, v.shape[-1]), poisoned)
