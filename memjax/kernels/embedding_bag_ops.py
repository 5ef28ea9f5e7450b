"""Embedding bag: gather rows of a value table and sum them with per-row weights.

    out[b] = sum_j weights[b, j] * values[indices[b, j]]

``values: [N, D]``, ``indices: int [Bt, k]``, ``weights: [Bt, k]`` -> ``out: [Bt, D]`` in
``values.dtype`` (or ``out_dtype``), accumulated in float32. This is the lookup of
product-key memory layers (a bag = the ``heads * knn`` slots one token reads) and of
hashed n-gram memories.

Gradients (``jax.custom_vjp``, identical for every implementation):
``d_values[n] = sum_{(b, j): indices[b, j] = n} weights[b, j] * d_out[b]`` (repeated indices
accumulate; rows nobody read get exact zeros) and ``d_weights[b, j] = <d_out[b],
values[indices[b, j]]>``; indices get no gradient.

Implementations (``impl``):

- ``"xla"``        ``take`` + ``einsum`` forward, ``.at[].add`` backward (the reference).
- ``"pallas"``     the Pallas kernel for the target platform (``"pallas_gpu"`` on GPU,
  ``"pallas_tpu"`` on TPU); on CPU only with ``interpret=True``. The target is
  the platform of the mesh set by ``jax.set_mesh`` (so a CPU host compiling for
  a TPU topology picks the TPU kernel), else ``jax.default_backend()``
  (``memjax.kernels.platform.target_platform``).
- ``"pallas_gpu"`` / ``"pallas_tpu"``  a kernel family by name (tests run both interpreted).
- ``"auto"``       a Pallas kernel only where ``kernel.supports(shape, dtype, backend)`` holds
  *and* the device is in ``VERIFIED_DEVICES`` (hardware tests passed: so far
  the GPU kernel on an H100); XLA otherwise. On CPU ``auto`` is always XLA:
  interpret mode is never chosen implicitly.

Out-of-range indices (outside ``[0, N)``, including negative ones): when ``indices`` is a
concrete array a ``ValueError`` is raised; under ``jit`` the check is impossible and indices
are clamped to ``[0, N - 1]`` (forward and backward consistently), like ``jnp.take(mode="clip")``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from memjax.kernels.embedding_bag_pallas import KERNELS
from memjax.kernels.pallas_common import on_verified_device
from memjax.kernels.platform import target_platform

F32 = jnp.float32
IMPLS = ("auto", "xla", "pallas", *KERNELS)
# Devices on which the compiled Pallas kernels have passed the hardware tests
# (tests/test_embedding_bag.py on the device, and benchmarks/gpu_embedding_bag.py's checks:
# float64 references, NaN-poisoned outputs, float32 and bfloat16 tables): backend ->
# device-kind prefixes. ``auto`` uses a kernel only there. The GPU kernels passed on an
# NVIDIA H100 80GB HBM3 with JAX 0.11.2 / Triton lowering (2026-11-24); no TPU has run them.
VERIFIED_DEVICES: dict[str, tuple[str, ...]] = {"gpu": ("NVIDIA H100",)}


def verified(backend: str, device_kind: str | None = None) -> bool:
    """Whether the Pallas kernels passed their hardware tests on this backend and device kind."""
    return on_verified_device(VERIFIED_DEVICES, backend, device_kind)


def supports(shape, dtype, backend: str) -> str | None:
    """Name of the Pallas kernel that handles values of ``shape``/``dtype`` on ``backend``, or None."""
    for name, kernel in KERNELS.items():
        if kernel.supports(tuple(shape), dtype, backend):
            return name
    return None


# ----------------------------------------------------------------------------- reference (XLA)


def xla_forward(values, indices, weights, out_dtype):
    rows = jnp.take(values, indices, axis=0)  # [Bt, k, D] in the table's dtype
    out = jnp.einsum("bk,bkd->bd", weights, rows.astype(weights.dtype))
    return out.astype(out_dtype)


def xla_backward_values(d_out, indices, weights, num_rows, out_dtype):
    contrib = weights[..., None] * d_out.astype(weights.dtype)[:, None, :]  # [Bt, k, D]
    d = jnp.zeros((num_rows, d_out.shape[1]), weights.dtype).at[indices].add(contrib)
    return d.astype(out_dtype)


def xla_backward_weights(d_out, values, indices, acc_dtype):
    rows = jnp.take(values, indices, axis=0)
    return jnp.einsum("bd,bkd->bk", d_out.astype(acc_dtype), rows.astype(acc_dtype))


# ----------------------------------------------------------------------------- custom_vjp core


def _acc_dtype(values):
    # float32 accumulation; float64 tables (x64 tests) accumulate in float64.
    return jnp.promote_types(values.dtype, F32)


def _forward(values, indices, weights, impl, interpret, out_dtype):
    w = weights.astype(_acc_dtype(values))
    if impl == "xla":
        return xla_forward(values, indices, w, out_dtype)
    return KERNELS[impl].forward(values, indices, w, out_dtype=out_dtype, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bag(values, indices, weights, impl, interpret, out_dtype):
    return _forward(values, indices, weights, impl, interpret, out_dtype)


def _bag_fwd(values, indices, weights, impl, interpret, out_dtype):
    return _forward(values, indices, weights, impl, interpret, out_dtype), (values, indices, weights)


def _bag_bwd(impl, interpret, out_dtype, res, d_out):
    values, indices, weights = res
    n = values.shape[0]
    acc = _acc_dtype(values)
    w = weights.astype(acc)
    if impl == "xla":
        d_values = xla_backward_values(d_out, indices, w, n, values.dtype)
        d_weights = xla_backward_weights(d_out, values, indices, acc)
    else:
        d_values, d_weights = KERNELS[impl].backward(d_out, values, indices, w, n, out_dtype=values.dtype,
                                                     acc_dtype=acc, interpret=interpret)
    return d_values, None, d_weights.astype(weights.dtype)


_bag.defvjp(_bag_fwd, _bag_bwd)


# ----------------------------------------------------------------------------- public API


def _validate(values, indices, weights):
    if getattr(values, "ndim", None) != 2:
        raise ValueError(f"values must be [N, D], got shape {getattr(values, 'shape', None)}")
    if not jnp.issubdtype(values.dtype, jnp.floating):
        raise ValueError(f"values must be floating point, got dtype {values.dtype}")
    if getattr(indices, "ndim", None) != 2:
        raise ValueError(f"indices must be [Bt, k], got shape {getattr(indices, 'shape', None)}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be integer [Bt, k], got dtype {indices.dtype}")
    if getattr(weights, "shape", None) != indices.shape:
        raise ValueError(
            f"weights must be [Bt, k] = {tuple(indices.shape)} like indices, got shape {getattr(weights, 'shape', None)}")
    if not jnp.issubdtype(weights.dtype, jnp.floating):
        raise ValueError(f"weights must be floating point, got dtype {weights.dtype}")
    if values.shape[0] == 0:
        raise ValueError("values must have at least one row (N >= 1)")
    if values.shape[0] >= 2 ** 31:
        raise ValueError(f"values has {values.shape[0]} rows; int32 indices address at most 2**31 - 1")


def _check_or_clamp(indices, num_rows: int):
    if not isinstance(indices, jax.core.Tracer):
        idx = np.asarray(indices)
        if idx.size and (idx.min() < 0 or idx.max() >= num_rows):
            bad = idx[(idx < 0) | (idx >= num_rows)]
            raise ValueError(
                f"indices must lie in [0, {num_rows}) (values has {num_rows} rows); "
                f"found {bad.size} out of range, e.g. {int(bad.flat[0])}")
    return jnp.clip(indices.astype(jnp.int32), 0, num_rows - 1)


def resolve_impl(impl: str, shape, dtype, interpret: bool | None, backend: str | None = None,
                 device_kind: str | None = None) -> tuple[str, bool]:
    """``(kernel name or "xla", interpret flag)`` for a call; see the module docstring."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    backend = target_platform(backend)  # the mesh's devices when a mesh is set, else the default backend
    if impl == "xla":
        return "xla", False
    if impl == "auto":
        if interpret:
            raise ValueError("interpret=True needs an explicit Pallas impl ('pallas', 'pallas_gpu', 'pallas_tpu')")
        name = supports(shape, dtype, backend)
        return (name, False) if name is not None and verified(backend, device_kind) else ("xla", False)
    interpret = bool(interpret)
    if impl == "pallas":
        impl = "pallas_tpu" if backend == "tpu" else "pallas_gpu"
    if interpret:
        return impl, True
    if backend == "cpu":
        raise ValueError(
            f"impl={impl!r} needs a GPU or TPU; on CPU pass interpret=True (tests) or use impl='xla'/'auto'")
    if not KERNELS[impl].supports(tuple(shape), dtype, backend):
        raise ValueError(
            f"impl={impl!r} does not support values of shape {tuple(shape)} and dtype {jnp.dtype(dtype)} "
            f"on backend {backend!r} ({KERNELS[impl].supports.__doc__.strip()}); use impl='auto' or 'xla'")
    return impl, False


def embedding_bag(values: jax.Array, indices: jax.Array, weights: jax.Array, *, impl: str = "auto",
                  interpret: bool | None = None, out_dtype=None) -> jax.Array:
    """``out[b] = sum_j weights[b, j] * values[indices[b, j]]``.

    Args:
      values: ``[N, D]`` float table.
      indices: ``int [Bt, k]`` rows to read per bag (validated when concrete, clamped under jit).
      weights: ``[Bt, k]`` float weights (the gradient ``d_weights`` has their dtype).
      impl: ``"auto" | "xla" | "pallas" | "pallas_gpu" | "pallas_tpu"`` (see module docstring).
      interpret: run a Pallas kernel in interpret mode (CPU tests); only with a Pallas impl.
      out_dtype: output dtype (default ``values.dtype``); accumulation is always float32, so
        ``out_dtype=float32`` keeps the exact float32 sum of a bfloat16 table.

    Returns:
      ``[Bt, D]``.
    """
    _validate(values, indices, weights)
    out_dtype = jnp.dtype(values.dtype if out_dtype is None else out_dtype)
    name, interp = resolve_impl(impl, values.shape, values.dtype, interpret)
    idx = _check_or_clamp(indices, values.shape[0])
    return _bag(values, idx, weights, name, interp, out_dtype)
