"""The (gated) delta rule's chunked pass on the fused Mosaic kernels
(:mod:`memjax.kernels.delta_fused_pallas_tpu`: the UT transform, the intra-chunk work and the
state pass in one kernel each way, the state in VMEM), with the custom VJP that joins them.

:func:`memjax.memory.delta.delta_rule` calls :func:`chunked_delta_kernel` for
``impl="pallas_tpu"`` (or ``"auto"`` on a TPU where the kernels have passed their hardware tests)
with a per-head (or no) decay, no ``seq_axis`` and one head count for q, k, v (under a mesh the
kernels run per device: :func:`memjax.kernels.manual_axes.over_batch`); the forward saves the
inputs and the chunk-start states in the operand dtype, the backward kernel recomputes each
chunk's UT transform from them.
"""
from __future__ import annotations

import functools

import jax

from memjax.kernels import delta_fused_pallas_tpu as fused_tpu
from memjax.kernels.chunk_pass import fused_choice
from memjax.memory.fused_call import call_fused, per_head_resets
from memjax.memory.segments import full_decays_as_resets

__all__ = ["chunked_delta_kernel", "delta_kernel"]


def delta_kernel(impl: str, q_shape, v_dim: int, dtype, chunk_size: int,
                 interpret: bool | None) -> tuple[str, bool] | None:
    """The ``kernel`` argument of :func:`chunked_delta_kernel` for a call with ``impl``
    (:func:`memjax.kernels.chunk_pass.fused_choice` with the fused kernel's ``supports``)."""
    return fused_choice(impl, q_shape, v_dim, dtype, chunk_size, interpret, fused_tpu.supports)


def chunked_delta_kernel(q, k, v, beta, g, resets, s0, scale: float, chunk_size: int,
                         kernel: tuple[str, bool]) -> tuple[jax.Array, jax.Array]:
    """The chunked (gated) delta rule by the fused kernels.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (non-finite entries read as 0, zero gradient).
      beta: ``[B, T, H]`` finite; g: ``[B, T, H]`` log decays (``-inf``: a full decay) or None;
      resets: ``[B, T]`` bool (segment starts) or None; s0: ``[B, H, K, V]`` (accumulation dtype).
      scale: read scale; chunk_size: ``C`` (``T`` is padded with zeros to a multiple).
      kernel: ``(name, interpret)`` from :func:`delta_kernel`.

    Returns ``(o [B, T, H, V]`` in q's dtype, ``S_T [B, H, K, V]`` in s0's dtype).
    """
    g, resets = full_decays_as_resets(g, resets)
    if resets is not None and resets.ndim == 2:
        resets = per_head_resets(resets, q.shape[2])
    o, s = call_fused(_core, kernel, scale, chunk_size, (q, k, v, beta, g, resets), (s0,))
    return o[:, :q.shape[1]], s


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _core(q, k, v, beta, g, resets, s0, scale, c, interpret):
    o, s, _ = fused_tpu.forward(q, k, v, beta, g, resets, s0, scale, c, save_states=False, interpret=interpret)
    return o, s


def _core_fwd(q, k, v, beta, g, resets, s0, scale, c, interpret):
    o, s, states = fused_tpu.forward(q, k, v, beta, g, resets, s0, scale, c, save_states=True, interpret=interpret)
    return (o, s), (q, k, v, beta, g, resets, states)


def _core_bwd(scale, c, interpret, res, cts):
    q, k, v, beta, g, resets, states = res
    do, dsf = cts
    dq, dk, dv, db, dg, ds0 = fused_tpu.backward(q, k, v, do, beta, g, resets, states, dsf, scale, c,
                                                 interpret=interpret)
    return (dq, dk, dv, db.astype(beta.dtype), None if g is None else dg.astype(g.dtype), None,
            ds0.astype(dsf.dtype))


_core.defvjp(_core_fwd, _core_bwd)
