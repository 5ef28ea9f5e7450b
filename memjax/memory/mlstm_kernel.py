"""The mLSTM's chunked pass on the fused Mosaic kernels (:mod:`memjax.kernels.mlstm_fused_pallas_tpu`:
the intra-chunk work with its per-row stabiliser and the stabilised state pass in one kernel each
way, the state in VMEM), with the custom VJP that joins them.

:func:`memjax.memory.mlstm.mlstm` calls :func:`chunked_mlstm_kernel` for ``impl="pallas_tpu"``
(or ``"auto"`` on a TPU where the kernels have passed their hardware tests) without
``seq_axis`` (under a mesh the kernels run per device: :func:`memjax.kernels.manual_axes.over_batch`).
The forward saves the inputs and the chunk-start states (``C~`` in the operand dtype). The
stabiliser ``m`` gets no gradient (as in the XLA forms); the incoming ``m``'s gradient is
``<dC~_0, C~_0> + <dn~_0, n~_0>``, since ``C~_0, n~_0`` enter only as ``exp(m_0) C~_0`` and
``exp(m_0) n~_0``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.kernels import mlstm_fused_pallas_tpu as fused_tpu
from memjax.kernels.chunk_pass import fused_choice
from memjax.memory.fused_call import call_fused, per_head_resets

__all__ = ["chunked_mlstm_kernel", "mlstm_kernel"]


def mlstm_kernel(impl: str, q_shape, v_dim: int, dtype, chunk_size: int,
                 interpret: bool | None) -> tuple[str, bool] | None:
    """The ``kernel`` argument of :func:`chunked_mlstm_kernel` for a call with ``impl``
    (:func:`memjax.kernels.chunk_pass.fused_choice` with the fused kernel's ``supports``)."""
    return fused_choice(impl, q_shape, v_dim, dtype, chunk_size, interpret, fused_tpu.supports)


def chunked_mlstm_kernel(q, k, v, ig, log_f, c0, n0, m0, resets, scale: float, chunk_size: int,
                         kernel: tuple[str, bool]):
    """The chunked mLSTM by the fused kernels.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]`` (non-finite entries read as 0, zero gradient).
      ig, log_f: ``[B, T, H]`` finite input-gate pre-activations and log forget gates.
      c0, n0, m0: the stabilised incoming state, ``C~ [B, H, K, V]``, ``n~ [B, H, K]`` and
        ``m [B, H]`` (``-inf``: empty), in the accumulation dtype.
      resets: ``[B, T]`` bool (the state is emptied before token ``t``) or None.
      scale: the write's scale; chunk_size: ``C`` (``T`` is padded to a multiple: q, k, v with
        zeros, ``i`` with ``-inf``, so padding writes nothing and leaves ``m`` alone).
      kernel: ``(name, interpret)`` from :func:`mlstm_kernel`.

    Returns ``(h [B, T, H, V]`` in q's dtype, ``(C~, n~, m)`` of the final state in c0's dtype).
    """
    nm0 = jnp.stack([n0, jnp.broadcast_to(m0[..., None], n0.shape)], axis=2)  # [B, H, 2, K]
    y, cf, nmf = call_fused(_core, kernel, scale, chunk_size,
                            (q, k, v, ig, log_f, per_head_resets(resets, q.shape[2])), (c0, nm0),
                            pad_values=(0, 0, 0, -jnp.inf, 0, False))
    return y[:, :q.shape[1]], (cf, nmf[:, :, 0], nmf[:, :, 1, 0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _core(q, k, v, ig, lf, resets, c0, nm0, scale, c, interpret):
    y, cf, nmf, _ = fused_tpu.forward(q, k, v, ig, lf, resets, c0, nm0, scale, c, save_states=False,
                                      interpret=interpret)
    return y, cf, nmf


def _core_fwd(q, k, v, ig, lf, resets, c0, nm0, scale, c, interpret):
    y, cf, nmf, (cst, nmst) = fused_tpu.forward(q, k, v, ig, lf, resets, c0, nm0, scale, c, save_states=True,
                                                interpret=interpret)
    return (y, cf, nmf), (q, k, v, ig, lf, resets, c0, nm0, cst, nmst)


def _core_bwd(scale, c, interpret, res, cts):
    q, k, v, ig, lf, resets, c0, nm0, cst, nmst = res
    dy, dcf, dnmf = cts  # (the final m is a stabiliser: its cotangent is dropped, as the XLA forms do)
    acc = c0.dtype
    dq, dk, dv, di, dlf, dc0, dn0 = fused_tpu.backward(q, k, v, dy, ig, lf, resets, cst, nmst, dcf.astype(acc),
                                                       dnmf[:, :, :1].astype(acc), scale, c, interpret=interpret)
    n0, m0 = nm0[:, :, 0], nm0[:, :, 1, 0]
    dm0 = jnp.where(m0 > -jnp.inf, jnp.sum(dc0 * c0, axis=(2, 3)) + jnp.sum(dn0[:, :, 0] * n0, axis=-1), 0.0)
    dnm0 = jnp.concatenate([dn0, jnp.zeros_like(dn0).at[..., 0].set(dm0[..., None])], axis=2)
    return dq, dk, dv, di.astype(ig.dtype), dlf.astype(lf.dtype), None, dc0, dnm0.astype(nm0.dtype)


_core.defvjp(_core_fwd, _core_bwd)
