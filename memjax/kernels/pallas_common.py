"""Small pieces every Pallas kernel family here shares: shard_map-aware ``pallas_call``, Triton
launch parameters, power-of-two block sizes, row padding and NaN-poisoned outputs for tests."""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from memjax.kernels.manual_axes import common_varying
from memjax.kernels.platform import target_device_kind

_DEBUG = contextvars.ContextVar("memjax_pallas_debug", default=False)


@contextlib.contextmanager
def print_kernel_ir():
    """Lower the kernels traced inside with ``pallas_call(debug=True)``: JAX prints each kernel's
    jaxpr and, for the Triton lowering, its Triton IR (``benchmarks/triton_resources.py``
    compiles that IR without a GPU)."""
    token = _DEBUG.set(True)
    try:
        yield
    finally:
        _DEBUG.reset(token)


def pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    """Pad axis 0 of ``x`` with zeros to a multiple of ``multiple``."""
    pad = (-x.shape[0]) % multiple
    return x if pad == 0 else jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))


def pow2_divisor(d: int, cap: int) -> int:
    """Largest power of two dividing ``d``, at most ``cap`` (Triton tensors are powers of two)."""
    b = 1
    while b * 2 <= cap and d % (b * 2) == 0:
        b *= 2
    return b


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def on_verified_device(table: dict, backend: str, device_kind: str | None = None) -> bool:
    """Whether ``device_kind`` (default: that of the current mesh's devices when they are on
    ``backend``, else the first ``backend`` device's) starts with one of the prefixes
    ``table[backend]`` lists: the devices where a kernel has passed its hardware tests."""
    prefixes = table.get(backend, ())
    if not prefixes:
        return False
    # A mesh of compile-only devices (memjax-compile) names devices this process does not have.
    device_kind = device_kind or target_device_kind(backend) or jax.devices(backend)[0].device_kind
    return any(device_kind.startswith(prefix) for prefix in prefixes)


def triton_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as pltr

    return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def pallas_call(kernel, *, out_shape, **kwargs):
    """``pl.pallas_call`` whose outputs declare how they vary over manual mesh axes.

    ``out_shape`` is one ``(shape, dtype)`` pair or a tuple of them. Inside ``jax.shard_map``
    (``check_vma``) Pallas needs each output's manual-axis type: it is the union of the inputs'
    varying axes, and inputs that vary over fewer axes are cast.
    """
    single = all(isinstance(n, int) for n in out_shape[0])  # one (shape, dtype) pair
    debug = kwargs.pop("debug", False)
    pairs = [out_shape] if single else list(out_shape)

    def call(*inputs):
        inputs, axes = common_varying(*inputs)
        vma = jax.sharding.ManualAxisType(varying=axes)
        structs = [jax.ShapeDtypeStruct(s, d, manual_axis_type=vma) for s, d in pairs]
        return pl.pallas_call(kernel, out_shape=structs[0] if single else tuple(structs),
                              debug=debug or _DEBUG.get(), **kwargs)(*inputs)

    return call


def poison_output(poison: bool, specs: list, inputs: list, out_spec, shape, dtype, *, output: int = 0) -> dict:
    """With ``poison`` (tests), append a NaN buffer aliased to output number ``output``, so elements
    the kernel never writes stay NaN; returns the extra ``pallas_call`` arguments (merge the
    ``input_output_aliases`` of several calls with :func:`merge_aliases`)."""
    if not poison:
        return {}
    specs.append(out_spec)
    inputs.append(jnp.full(shape, jnp.nan, dtype))
    return {"input_output_aliases": {len(inputs) - 1: output}}


def merge_aliases(*extras: dict) -> dict:
    aliases = {}
    for e in extras:
        aliases.update(e.get("input_output_aliases", {}))
    return {"input_output_aliases": aliases} if aliases else {}
