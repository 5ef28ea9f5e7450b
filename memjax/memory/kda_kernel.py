"""The channel-wise delta rule (Kimi Delta Attention, GDN-2) on the fused Mosaic kernels
(:mod:`memjax.kernels.kda_fused_pallas_tpu`: the sub-chunked intra-chunk solve and the state pass
in one kernel each way, the state in VMEM), with the custom VJP that joins them.

:func:`memjax.memory.gdn2.channel_delta` calls :func:`chunked_kda_kernel` for
``impl="pallas_tpu"`` (or ``"auto"`` on a TPU where the kernels have passed their hardware tests)
with ``g [B, T, H, K]`` (under a mesh the kernels run per device:
:func:`memjax.kernels.manual_axes.over_batch`); GDN-2's erase vectors and write values travel in
the operand dtype, KDA's ``beta`` as per-token strengths the kernels multiply in, and the forward
saves the inputs and the chunk-start states in the operand dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.kernels import kda_fused_pallas_tpu as fused_tpu
from memjax.kernels.chunk_pass import fused_choice
from memjax.memory.fused_call import call_fused, per_head_resets

__all__ = ["chunked_kda_kernel", "kda_kernel"]


def kda_kernel(impl: str, q_shape, v_dim: int, dtype, chunk_size: int,
               interpret: bool | None) -> tuple[str, bool] | None:
    """The ``kernel`` argument of :func:`chunked_kda_kernel` for a call with ``impl``
    (:func:`memjax.kernels.chunk_pass.fused_choice` with the fused kernel's ``supports``)."""
    return fused_choice(impl, q_shape, v_dim, dtype, chunk_size, interpret, fused_tpu.supports)


def chunked_kda_kernel(q, k, u, a, g, seg_starts, s0, scale: float, chunk_size: int,
                       kernel: tuple[str, bool], w=None) -> tuple[jax.Array, jax.Array]:
    """The chunked channel-wise delta rule by the fused kernels.

    Args:
      q, k: ``[B, T, H, K]``; u: ``[B, T, H, V]`` write values, or the values ``v`` that ``beta``
        or ``w`` scale.
      a: ``[B, T, H, K]`` erase vectors (u, a are cast to q's dtype: matmul operands); or ``[B, T,
        H]`` finite per-token strengths ``beta`` (kept in the accumulation dtype): erase ``beta k``,
        write ``beta u`` (KDA, ``u = v``); or, with ``w``, the erase gate ``b [B, T, H, K]``:
        erase ``b * k``. The products are formed inside the kernel, so neither they nor their
        gradients are written to HBM.
      w: None, or the write gate ``[B, T, H, V]``: write ``w * u`` (GDN-2, ``u = v``); ``b`` and
        ``w`` are read in their own dtype (non-finite entries read as 0, zero gradient).
      g: ``[B, T, H, K]`` log decays, ``<= 0`` or ``-inf`` (a reset of that channel); NaN and
        ``+inf`` read as 0 with a zero gradient (``memjax.memory.nonfinite.finite_gate``, in the kernel).
      seg_starts: ``[B, T]`` bool or None; s0: ``[B, H, K, V]`` (accumulation dtype).
      scale: read scale; chunk_size: ``C`` (``T`` is padded with zeros to a multiple).
      kernel: ``(name, interpret)`` from :func:`kda_kernel`.

    Returns ``(o [B, T, H, V]`` in q's dtype, ``S_T [B, H, K, V]`` in s0's dtype).
    """
    u = u.astype(q.dtype)
    if w is None:
        a = a.astype(s0.dtype) if a.ndim == 3 else a.astype(q.dtype)
    o, s = call_fused(_core, kernel, scale, chunk_size, (q, k, a, u, w, g, per_head_resets(seg_starts, q.shape[2])),
                      (s0,))
    return o[:, :q.shape[1]], s


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _core(q, k, a, u, w, g, seg, s0, scale, c, interpret):
    o, s, _ = fused_tpu.forward(q, k, a, u, g, seg, s0, scale, c, save_states=False, interpret=interpret, w=w)
    return o, s


def _core_fwd(q, k, a, u, w, g, seg, s0, scale, c, interpret):
    o, s, states = fused_tpu.forward(q, k, a, u, g, seg, s0, scale, c, save_states=True, interpret=interpret, w=w)
    return (o, s), (q, k, a, u, w, g, seg, states, s)


def _core_bwd(scale, c, interpret, res, cts):
    q, k, a, u, w, g, seg, states, final = res
    do, dsf = cts
    last = jnp.sum(dsf.astype(final.dtype) * final, axis=-1)  # [B, H, K]
    grads = fused_tpu.backward(q, k, a, u, do, g, seg, states, dsf.astype(final.dtype), last, scale, c,
                               interpret=interpret, w=w)
    dq, dk, da, du = grads[:4]
    dw = grads[4].astype(w.dtype) if w is not None else None
    dg, ds0 = grads[-2:]
    return dq, dk, da.astype(a.dtype), du, dw, dg.astype(g.dtype), None, ds0.astype(dsf.dtype)


_core.defvjp(_core_fwd, _core_bwd)
