"""Linear attention with a decay per key channel (GLA, HGRN2) on the fused Mosaic kernels
(:mod:`memjax.kernels.gla_fused_pallas_tpu`: the sub-chunked intra-chunk work and the state pass
in one kernel each way, the state in VMEM), with the custom VJP that joins them.

:func:`memjax.memory.linear.linear_attention` calls :func:`chunked_gla_kernel` for
``impl="pallas_tpu"`` (or ``"auto"`` on a TPU where the kernels have passed their hardware tests)
with ``g [B, T, H, K]``, no bonus, no ``seq_axis`` (under a mesh the kernels run per device:
:func:`memjax.kernels.manual_axes.over_batch`); the forward saves the inputs and the chunk-start
states in the operand dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.kernels import gla_fused_pallas_tpu as fused_tpu
from memjax.kernels.chunk_pass import fused_choice
from memjax.memory.fused_call import call_fused, per_head_resets

__all__ = ["chunked_gla_kernel", "gla_kernel"]


def gla_kernel(impl: str, q_shape, v_dim: int, dtype, chunk_size: int,
               interpret: bool | None) -> tuple[str, bool] | None:
    """The ``kernel`` argument of :func:`chunked_gla_kernel` for a call with ``impl``
    (:func:`memjax.kernels.chunk_pass.fused_choice` with the fused kernel's ``supports``)."""
    return fused_choice(impl, q_shape, v_dim, dtype, chunk_size, interpret, fused_tpu.supports)


def chunked_gla_kernel(q, k, v, g, seg_starts, s0, scale: float, chunk_size: int,
                       kernel: tuple[str, bool]) -> tuple[jax.Array, jax.Array]:
    """Chunked linear attention with per-key-channel decays by the fused kernels.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (non-finite entries read as 0, zero gradient).
      g: ``[B, T, H, K]`` log decays, ``<= 0`` or ``-inf`` (a reset of that channel); NaN and
        ``+inf`` read as 0 with a zero gradient (``memjax.memory.nonfinite.finite_gate``, in the kernel).
      seg_starts: ``[B, T]`` bool or None; s0: ``[B, H, K, V]`` (accumulation dtype).
      scale: read scale; chunk_size: ``C`` (``T`` is padded with zeros to a multiple).
      kernel: ``(name, interpret)`` from :func:`gla_kernel`.

    Returns ``(o [B, T, H, V]`` in q's dtype, ``S_T [B, H, K, V]`` in s0's dtype).
    """
    o, s = call_fused(_core, kernel, scale, chunk_size, (q, k, v, g, per_head_resets(seg_starts, q.shape[2])), (s0,))
    return o[:, :q.shape[1]], s


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _core(q, k, v, g, seg, s0, scale, c, interpret):
    o, s, _ = fused_tpu.forward(q, k, v, g, seg, s0, scale, c, save_states=False, interpret=interpret)
    return o, s


def _core_fwd(q, k, v, g, seg, s0, scale, c, interpret):
    o, s, states = fused_tpu.forward(q, k, v, g, seg, s0, scale, c, save_states=True, interpret=interpret)
    return (o, s), (q, k, v, g, seg, states, s)


def _core_bwd(scale, c, interpret, res, cts):
    q, k, v, g, seg, states, final = res
    do, dsf = cts
    last = jnp.sum(dsf.astype(final.dtype) * final, axis=-1)  # [B, H, K]
    dq, dk, dv, dg, ds0 = fused_tpu.backward(q, k, v, do, g, seg, states, dsf.astype(final.dtype), last, scale, c,
                                             interpret=interpret)
    return dq, dk, dv, dg.astype(g.dtype), None, ds0.astype(dsf.dtype)


_core.defvjp(_core_fwd, _core_bwd)
