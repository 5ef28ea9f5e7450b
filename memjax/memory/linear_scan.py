"""The element-wise linear recurrence ``h_t = a_t * h_{t-1} + b_t`` as a parallel scan.

Forward: ``jax.lax.associative_scan`` over ``(a, b)`` pairs with the combine
``(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)`` (O(log T) depth; the ``a`` products only shrink
for ``|a| <= 1``, so no overflow).

Backward, two choices:

- ``remat=False`` (default): JAX differentiates the scan, saving its intermediate products.
- ``remat=True``: a ``custom_vjp`` (as recurrentgemma's scan) runs the cotangent through the same
  recurrence backwards in time, ``lam_t = dh_t + a_{t+1} lam_{t+1}``, with ``db_t = lam_t`` and
  ``da_t = lam_t h_{t-1}`` (transposes, not conjugates, for complex inputs: JAX's convention).
  It saves only ``a`` and ``h`` and recomputes the products: 0.72x the temporary memory and
  1.2x the time of the default for a ``[2, 16384, 256]`` float32 scan on CPU. The
  sequence-parallel scans use it, because XLA:CPU in JAX 0.11.2 crashes compiling the default's
  derivative inside a ``shard_map`` over two or more devices.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def linear_scan(a: jax.Array, b: jax.Array, h0: jax.Array | None = None, axis: int = 1, *,
                remat: bool = False) -> jax.Array:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` (element-wise) along ``axis``.

    ``a`` broadcasts against ``b``; ``h0`` (the state before ``t = 0``, shape of ``b`` without
    ``axis``) is folded into ``b_0``. ``remat``: the backward pass (module docstring). Returns
    ``h`` with ``b``'s shape and the common dtype of ``a`` and ``b``.
    """
    a = jnp.broadcast_to(a, b.shape).astype(jnp.result_type(a, b))
    b = b.astype(a.dtype)
    if h0 is not None:
        first = jax.lax.index_in_dim(b, 0, axis) + jax.lax.index_in_dim(a, 0, axis) * jnp.expand_dims(h0, axis)
        b = jax.lax.dynamic_update_index_in_dim(b, first, 0, axis)
    return _scan(a, b, axis % b.ndim) if remat else _forward(a, b, axis % b.ndim)


def _combine(e1, e2):
    a1, b1 = e1
    a2, b2 = e2
    return a1 * a2, a2 * b1 + b2


def _forward(a, b, axis, reverse=False):
    return jax.lax.associative_scan(_combine, (a, b), axis=axis, reverse=reverse)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scan(a, b, axis):
    return _forward(a, b, axis)


def _scan_fwd(a, b, axis):
    h = _forward(a, b, axis)
    return h, (a, h)


def _shift(x, axis, by):
    """``x`` moved ``by = +1`` (later) or ``-1`` (earlier) along ``axis``, zero-filled."""
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 0) if by > 0 else (0, 1)
    kept = jax.lax.slice_in_dim(x, 0, n - 1, axis=axis) if by > 0 else jax.lax.slice_in_dim(x, 1, n, axis=axis)
    return jnp.pad(kept, pad)


def _scan_bwd(axis, res, dh):
    a, h = res
    lam = _forward(_shift(a, axis, -1), dh, axis, reverse=True)  # lam_t = dh_t + a_{t+1} lam_{t+1}
    return lam * _shift(h, axis, +1), lam


_scan.defvjp(_scan_fwd, _scan_bwd)
