"""Causal softmax attention on a TPU through JAX's own splash attention kernel (an adapter).

The kernel is ``jax.experimental.pallas.ops.tpu.splash_attention`` (a block-sparse flash
attention in Pallas / Mosaic that skips fully masked ``[block_q, block_kv]`` tiles); this module
writes no kernel. It maps memjax's layout and mask vocabulary onto it:

* layout: ``q [B, T, H, K]``, ``k [B, S, Hkv, K]``, ``v [B, S, Hkv, V]`` (grouped-query attention,
  ``H % Hkv == 0``) -> the kernel's per-example ``[H, T, K]`` / ``[Hkv, S, K]``; the batch is
  ``jax.vmap``-ed over the kernel;
* scale: the kernel computes ``q . k`` unscaled, so ``q`` is multiplied by ``scale`` first (in
  ``q``'s dtype: bfloat16 queries are rounded once more than in the XLA form);
* masks (static, per head the same): causal ``s <= t`` (the queries' default positions are
  ``0..T-1``, the keys' ``0..S-1``, as in :func:`memjax.memory.attention.causal_attention`),
  a sliding window ``t - window < s <= t`` (``LocalMask((window - 1, 0))``), and packed documents
  through the kernel's ``SegmentIds``: every contiguous run of a ``segment_ids`` value is one
  document (the rule of :func:`memjax.memory.segments.document_ids`, recomputed here because
  kernels do not import memory);
* gradients: the kernel's own ``custom_vjp`` (its dq and dkv Pallas kernels);
* sharding: under a mesh the batch is split over the devices by a ``shard_map``
  (:func:`memjax.kernels.manual_axes.over_batch`): XLA cannot partition a Mosaic call.

Equation (per batch element, query head ``h`` reading key/value head ``h // (H / Hkv)``)::

    o_t = sum_{s visible from t} softmax_s(scale * q_t . k_s) v_s

with softmax statistics and the output accumulator in float32 inside the kernel; ``o`` keeps
``q``'s dtype. Paper: Dao et al., FlashAttention (2022), with the block-sparse skipping of
splash attention (JAX authors, 2023).

Constraints (:func:`supports`): a TPU target; ``q, k, v`` all float32 or all bfloat16; ``T`` and
``S`` multiples of 128 (block sizes are multiples of 128 dividing them); head dims ``K, V`` multiples
of 8 up to 256; ``segment_ids`` only for self-attention (``S == T``).
``interpret=True`` runs the same kernel in the Pallas interpreter on any backend (the CPU tests).

Not handled (use ``impl="xla"``): explicit positions, ``k_valid`` (KV-cache masks), forget gates,
and memjax's non-finite semantics (a NaN value inside a partially masked tile reaches rows that
mask it, as ``0 * NaN``, where the XLA form keeps it out).

Trace-time cost: the kernel turns a mask into block-sparse tables with NumPy on the host
(``splash_attention_mask_info.process_mask``, which the kernel's library caches for the last 12
tables): ``O(T * S)`` element tests, a few seconds at 8k but about 8 minutes for the first call
shape at T = S = 128k on a heavily loaded CPU host (benchmarks/tpu_attention_cost.py).

Layout cost: the kernel wants head-major ``[H, T, D]`` per example, so ``q, k, v`` and ``o``
are transposed around it; compiled alone these copies are most of the adapter's temporaries
(``4 * B * T * H * D`` elements), which a model whose projections emit head-major tensors (or
XLA fusing the transpose into them) does not pay.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from memjax.kernels.manual_axes import over_batch

_LANES = 128
# Block sizes tried largest first: 512 is what MaxText uses on v5e / v5p; smaller blocks only when
# the length is not a multiple of it. Not timed on hardware here.
_BLOCKS = (512, 256, 128)
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_MAX_HEAD_DIM = 256


def block_size(n: int) -> int:
    """The largest of 512, 256, 128 dividing ``n`` (``n`` a multiple of 128)."""
    for b in _BLOCKS:
        if n % b == 0:
            return b
    raise ValueError(f"splash_attention: sequence length {n} is not a multiple of {_LANES}")


def block_sizes(t: int, s: int) -> sa.BlockSizes:
    """Forward and backward (separate dq and dkv kernels) block sizes valid for ``T``, ``S``:
    every query block divides ``T``, every key block divides ``S``, all multiples of 128."""
    bq, bkv = block_size(t), block_size(s)
    return sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                         block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                         block_q_dq=bq, block_kv_dq=bkv)


def supports(shape, dtype, platform: str) -> bool:
    """Whether the kernel takes ``shape = (B, T, S, H, Hkv, K, V)`` in ``dtype`` on ``platform``
    (``"tpu"`` only; see the module docstring's constraints)."""
    if platform != "tpu" or len(shape) != 7:
        return False
    b, t, s, h, hkv, k, v = (int(x) for x in shape)
    if jnp.dtype(dtype) not in _DTYPES or min(b, t, s, h, hkv, k, v) <= 0 or h % hkv:
        return False
    if t % _LANES or s % _LANES:
        return False
    return all(d % 8 == 0 and d <= _MAX_HEAD_DIM for d in (k, v))


def shape_of(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, ...]:
    """``(B, T, S, H, Hkv, K, V)`` of memjax-layout ``q, k, v``: the ``shape`` of :func:`supports`."""
    b, t, h, dk = q.shape
    return (b, t, k.shape[1], h, k.shape[2], dk, v.shape[3])


def unsupported(q, k, v, *, segment_ids=None, platform: str = "tpu") -> str | None:
    """Why :func:`splash_attention` (compiled, not interpreted) cannot run this call on
    ``platform``, or None if it can."""
    if platform != "tpu":
        return f"platform {platform!r} (the splash kernel is Mosaic, TPU only)"
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype) not in _DTYPES:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} (all float32 or all bfloat16)"
    shape = shape_of(q, k, v)
    if segment_ids is not None and shape[1] != shape[2]:
        return "segment_ids with keys of a different length than the queries"
    if not supports(shape, q.dtype, platform):
        return (f"shape (B, T, S, H, Hkv, K, V) = {shape} (T, S multiples of {_LANES}; K, V multiples of 8, "
                f"at most {_MAX_HEAD_DIM})")
    return None


def _kernel(t: int, s: int, h: int, window: int, interpret: bool) -> sa.SplashAttentionKernel:
    """The kernel for one (shape, mask) pair. Its NumPy mask analysis over every
    ``[block_q, block_kv]`` tile (``O(T * S)`` host work) is cached by the kernel's library
    (``process_mask`` keeps the last 12 tables: forward, dq and dkv of 4 shapes); the kernel object
    itself is not cached, because it holds its tables as arrays of the trace that built it."""
    if window and window < t:
        one = sa.LocalMask((t, s), window_size=(window - 1, 0), offset=0)
    else:  # a window covering every query's past is plain causal (whose tables are cheaper)
        one = sa.CausalMask((t, s))
    # Every head has the same mask: the kernel de-duplicates it to one table for all heads.
    mask = sa.MultiHeadMask([one] * h)
    return sa.make_splash_mha(mask, block_sizes=block_sizes(t, s), head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _check(q, k, v, scale, segment_ids, window) -> None:
    fn = "splash_attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{fn}: {name} must be floating, got {x.dtype}")
        if x.ndim != 4:
            raise ValueError(f"{fn}: {name} must be 4-d ({'[B, T, H, K]' if name == 'q' else '[B, S, Hkv, D]'}), "
                             f"got shape {x.shape}")
    b, t, h, dk = q.shape
    if k.shape[0] != b or k.shape[3] != dk or v.shape[:3] != k.shape[:3] or h % k.shape[2]:
        raise ValueError(f"{fn}: k{k.shape} / v{v.shape} must be [B, S, Hkv, K] / [B, S, Hkv, V] with H % Hkv == 0 "
                         f"for q{q.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    s = k.shape[1]
    if t % _LANES or s % _LANES:
        raise ValueError(f"{fn}: T = {t} and S = {s} must be multiples of {_LANES} (the kernel's block sizes)")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: scale must be a Python float, got {scale!r}")
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"{fn}: window must be an int >= 0 (0: no window), got {window!r}")
    if segment_ids is not None:
        if s != t:
            raise ValueError(f"{fn}: segment_ids need self-attention (S == T), got T = {t}, S = {s}")
        if segment_ids.shape != (b, t):
            raise ValueError(f"{fn}: segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"{fn}: segment_ids must be integer, got {segment_ids.dtype}")


def _runs(segment_ids: jax.Array) -> jax.Array:
    """``[B, T]`` int32 ids, one per contiguous run of equal ``segment_ids`` (so a reused id later
    in the row is a new document, as in :func:`memjax.memory.segments.document_ids`)."""
    start = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], dtype=bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jnp.cumsum(start, axis=1, dtype=jnp.int32)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                     segment_ids: jax.Array | None = None, window: int = 0,
                     interpret: bool = False) -> jax.Array:
    """Causal attention through the splash kernel; returns ``o: [B, T, H, V]`` in ``q``'s dtype.

    ``q [B, T, H, K]``, ``k [B, S, Hkv, K]``, ``v [B, S, Hkv, V]`` (one dtype; ``H % Hkv == 0``;
    ``T, S`` multiples of 128), ``o_t = sum_s softmax_s(scale * q_t . k_s) v_s`` over ``s <= t``,
    ``s > t - window`` when ``window > 0``, and ``s`` in ``t``'s document when
    ``segment_ids [B, T]`` (integer, ``S == T``) is given. ``interpret``: run the kernel in the
    Pallas interpreter (any backend; tests). Gradients go through the kernel's own backward
    kernels. See the module docstring for what it does not handle.
    """
    _check(q, k, v, scale, segment_ids, window)
    b, t, h, _ = q.shape
    s = k.shape[1]
    kernel = _kernel(t, s, h, int(window), bool(interpret))
    # [B, L, H, D] -> [B, H, L, D]: the kernel's head-major layout per batch element.
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in ((q * jnp.asarray(scale, q.dtype)), k, v))
    # Under a mesh the kernel runs per device (XLA cannot partition a Pallas call); the splash
    # library's own pallas_call does not declare manual-axis types, hence check_vma=False.
    if segment_ids is None:
        o = over_batch(jax.vmap(kernel), b, check_vma=False)(qh, kh, vh)
    else:
        docs = _runs(segment_ids)
        per_row = lambda a, c, d, ids: kernel(a, c, d, segment_ids=sa.SegmentIds(q=ids, kv=ids))  # noqa: E731
        o = over_batch(jax.vmap(per_row), b, check_vma=False)(qh, kh, vh, docs)
    return jnp.swapaxes(o, 1, 2).astype(q.dtype)
