"""The call of a fused chunked-memory kernel pair (forward and backward joined by a custom VJP),
shared by :mod:`memjax.memory.gla_kernel`, :mod:`memjax.memory.delta_kernel`,
:mod:`memjax.memory.kda_kernel` and :mod:`memjax.memory.mlstm_kernel`: the sequence inputs padded
to a whole number of chunks, the call run per device over the batch under a mesh
(:func:`memjax.kernels.manual_axes.over_batch`: XLA cannot partition a Mosaic call).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.kernels.manual_axes import over_batch
from memjax.memory.chunking import pad_time

__all__ = ["call_fused", "per_head_resets"]


def per_head_resets(resets: jax.Array | None, heads: int) -> jax.Array | None:
    """``[B, T]`` reset flags (or None) as the kernels' ``[B, T, H]``."""
    return None if resets is None else jnp.broadcast_to(resets[..., None], (*resets.shape, heads))


def call_fused(core, kernel: tuple[str, bool], scale: float, chunk_size: int, seq: tuple, rest: tuple = (),
               pad_values: tuple | None = None):
    """``core(*seq_padded, *rest, scale, chunk_size, interpret)`` over the batch of ``seq[0]``.

    ``seq``: ``[B, T, ...]`` arrays (or None) padded along time to a multiple of ``chunk_size``
    with ``pad_values`` (zeros by default: for q, k, v, gates and resets they leave the state
    unchanged); ``rest``: per-sequence arrays (states), passed as they are; ``kernel``:
    ``(name, interpret)`` from :func:`memjax.kernels.chunk_pass.fused_choice`. Returns what
    ``core`` returns, with padded time (callers slice it back)."""
    pad_values = pad_values or (0,) * len(seq)
    padded = [None if x is None else pad_time(x, chunk_size, value=v) for x, v in zip(seq, pad_values)]
    fn = lambda *xs: core(*xs, float(scale), int(chunk_size), bool(kernel[1]))  # noqa: E731
    return over_batch(fn, seq[0].shape[0], check_vma=not kernel[1])(*padded, *rest)
