"""``x @ W`` for the projections, with an opt-in layout guard for XLA:CPU training steps.

``dense(x, w)`` is ``jnp.dot(x, w)`` (``x: [..., d_in]``, ``w: [d_in, d_out]``) unless the caller
traces inside :func:`materialized_inputs`. There the input is materialised before the product
(an ``optimization_barrier``) and the backward is written out::

    dx = dy W^T                  dW = sum over all leading axes of x^T dy

Why: the weight gradient contracts over every token, so one of ``x`` and ``dy`` enters that dot
transposed. XLA:CPU lays the transposed operand out as ``[d, tokens]`` and writes it from inside
the elementwise fusion that produces it (the short conv's gradient, a norm, a gate), which it runs
with strided stores: profiled on a 2-layer d=64 gated-DeltaNet MQAR step (batch 64 x 256 tokens),
eight such fusions of 1M elements took 10-40 ms each, about a quarter of the step. With the
guard the producer writes row-major and the transpose is a plain copy: that step 0.68-0.72 -> 0.53-0.56 s,
Mamba-2's 0.89-0.90 -> 0.55-0.56 s, attention's unchanged (README, "Train step"). The training loop
turns the guard on when it compiles for CPU devices only: on GPU and TPU it was not measured, and
the barrier would keep XLA from fusing a producer into the matmul there. Anyone calling the blocks
directly gets plain ``jnp.dot``, which also keeps forward-mode differentiation (the hand-written
backward has none).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp

__all__ = ["dense", "materialized_inputs"]

_MATERIALIZE = contextvars.ContextVar("memjax_dense_materialized_inputs", default=False)


@contextlib.contextmanager
def materialized_inputs(enabled: bool = True):
    """Within this context (while tracing), :func:`dense` materialises its input and uses the
    written-out backward (module docstring). ``enabled=False`` is a no-op."""
    token = _MATERIALIZE.set(bool(enabled))
    try:
        yield
    finally:
        _MATERIALIZE.reset(token)


def dense(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """``x [..., d_in] @ w [d_in, d_out]`` -> ``[..., d_out]`` (as ``jnp.dot``, whose
    ``preferred_element_type`` it takes)."""
    if not _MATERIALIZE.get():
        return jnp.dot(x, w, preferred_element_type=preferred_element_type)
    return _materialized(x, w, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _materialized(x, w, preferred_element_type):
    return jnp.dot(jax.lax.optimization_barrier(x), w, preferred_element_type=preferred_element_type)


def _fwd(x, w, preferred_element_type):
    x = jax.lax.optimization_barrier(x)
    return jnp.dot(x, w, preferred_element_type=preferred_element_type), (x, w)


def _bwd(_, res, dy):
    x, w = res
    dx = jnp.dot(dy, w.T, preferred_element_type=jnp.promote_types(dy.dtype, w.dtype)).astype(x.dtype)
    dw = jnp.einsum("...i,...o->io", x, dy, preferred_element_type=jnp.promote_types(x.dtype, dy.dtype))
    return dx, dw.astype(w.dtype)


_materialized.defvjp(_fwd, _bwd)
