"""Small building blocks shared by every family: projections with logical axes, RMSNorm, short conv.

Parameters carry Flax's own partitioning metadata with logical axis names
(``nnx.Param(..., sharding_names=("embed", "mlp"))``, stored as ``out_sharding``), so
``nnx.get_partition_spec`` sees them; a rules table (``nnx.logical_axis_rules`` or
``memjax.model.sharding.param_specs`` with ``config.mesh.rules``) maps the names to mesh axes.
Eager sharding is off: blocks are built outside any mesh and sharded by the caller's ``jit``.

Every parameter is created by :func:`param`. Inside :func:`batched_init` (the LM builds its
blocks inside one) the random draws are deferred and batched: see there.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax.memory.segments import same_segment_as_shifted
from memjax.nn.dense import dense


def dtype_of(name: str):
    return jnp.dtype(name)


# ----------------------------------------------------------------------------- parameters


@dataclasses.dataclass
class _Deferred:
    var: nnx.Param  # holds a placeholder until the draw
    key: jax.Array  # the stream's key; this parameter's key is fold_in(key, count)
    count: jax.Array
    init: Any
    shape: tuple
    dtype: Any
    traced: Any  # jaxpr of init(key, shape, dtype) (kept alive: its constants are compared)


_PENDING: contextvars.ContextVar = contextvars.ContextVar("memjax_batched_init", default=None)


@contextlib.contextmanager
def batched_init():
    """Draw the parameters created inside with one random-number loop per kind of parameter.

    Built one by one, every parameter costs a ``fold_in`` of the stream key and its own draw:
    one threefry hash each (361 in the jitted initialiser of ``configs/hybrid_125m.py``, 199
    parameters). On a GPU threefry lowers to straight-line code (on a CPU to a rolled loop) and
    XLA fuses one copy into every parameter's kernel; the initialiser of that model took over
    150 s to compile on an H100 against 10 s on a CPU. Inside this context :func:`param` reads
    the stream's counter (advancing it as usual) and returns a placeholder. On leaving it,
    parameters whose initialisers trace to the same computation (same jaxpr and constants) with
    the same key, shape and dtype form a group (14 groups for the 125M model; 11 use the key, 7
    of those hold more than one parameter). A group of several parameters that uses its key is
    drawn by one ``lax.map`` over its counters: a loop whose body holds one ``fold_in`` and one
    draw, which XLA compiles once (a ``vmap`` would be sliced per parameter and XLA fuses the
    hash back into every slice's kernel). Other groups are drawn parameter by parameter. The
    values are exactly those drawn outside the context. Only traced draws (``jit``,
    ``eval_shape``) are deferred; eagerly :func:`param` draws at once. Nested contexts join the
    outermost one.
    """
    if _PENDING.get() is not None:
        yield
        return
    pending: list[_Deferred] = []
    token = _PENDING.set(pending)
    try:
        yield
    finally:
        _PENDING.reset(token)
    _draw(pending)


@contextlib.contextmanager
def unbatched_init():
    """Draw parameters at once inside (suspends an enclosing :func:`batched_init`): for
    parameters created under a transform such as ``nnx.vmap``, whose values cannot be set after
    the transform returns (the vmap draws all layers' values in one batched call anyway)."""
    token = _PENDING.set(None)
    try:
        yield
    finally:
        _PENDING.reset(token)


def _fingerprint(traced) -> tuple:
    """Hashable identity of a traced initialiser: its jaxpr text and its constants' values."""
    consts = []
    for c in traced.consts:
        try:
            a = np.asarray(c)
        except Exception:  # noqa: BLE001 - a tracer or a non-addressable array: compare by identity
            consts.append(("id", id(c)))
        else:
            consts.append((a.dtype.str, a.shape, a.tobytes()))
    return str(traced.jaxpr), tuple(consts)


def _uses_key(traced) -> bool:
    key = traced.jaxpr.invars[0]
    return any(v is key for e in traced.jaxpr.eqns for v in e.invars) or any(v is key for v in traced.jaxpr.outvars)


def _draw(pending: list[_Deferred]) -> None:
    groups: dict = {}
    for d in pending:
        gid = (id(d.key), d.shape, str(d.dtype), _fingerprint(d.traced))
        groups.setdefault(gid, []).append(d)
    for members in groups.values():
        first = members[0]

        def draw(count, d=first):
            return d.init(jax.random.fold_in(d.key, count), d.shape, d.dtype)

        if not _uses_key(first.traced):  # ones, zeros, constants: no key to derive
            for d in members:
                d.var.set_value(d.init(d.key, d.shape, d.dtype))
        elif len(members) == 1:
            first.var.set_value(draw(first.count))
        else:
            values = jax.lax.map(draw, jnp.stack([d.count for d in members]))
            for i, d in enumerate(members):
                d.var.set_value(values[i])


def param(rngs: nnx.Rngs, init, shape, axes, dtype=jnp.float32, **metadata) -> nnx.Param:
    """An ``nnx.Param`` initialised with ``init(key, shape, dtype)`` carrying logical axis names
    (and any further ``metadata``, e.g. ``optim_group``). Under a trace inside
    :func:`batched_init` the value is drawn when the context exits."""
    shape = tuple(shape)
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    stream = rngs.params
    pending = _PENDING.get()
    if pending is not None and isinstance(getattr(stream, "count", None), nnx.Variable):
        key, count = stream.key[...], stream.count[...]
        if key.ndim == 0 and (isinstance(key, jax.core.Tracer) or isinstance(count, jax.core.Tracer)):
            traced = jax.make_jaxpr(lambda k: init(k, shape, dtype))(key)
            if len(traced.out_avals) == 1:
                stream.count[...] = count + 1  # as the draw nnx.RngStream.__call__ makes would
                out = traced.out_avals[0]
                var = _param(jnp.zeros(out.shape, out.dtype), axes, metadata)
                pending.append(_Deferred(var, key, count, init, shape, dtype, traced))
                return var
    return _param(init(stream(), shape, dtype), axes, metadata)


def _param(value, axes, metadata) -> nnx.Param:
    return nnx.Param(value, sharding_names=tuple(axes), eager_sharding=False, **metadata)


def logical_axes(var: nnx.Variable) -> tuple | None:
    """The logical axis names a parameter was created with (``None`` if it has none)."""
    names = var.get_metadata().get("out_sharding")
    return None if names is None else tuple(names)


class Linear(nnx.Module):
    """``y = x W (+ b)``; ``W: [d_in, d_out]`` with logical axes ``axes``. Computes in ``dtype``."""

    def __init__(self, d_in: int, d_out: int, axes=("embed", "mlp"), *, rngs: nnx.Rngs,
                 use_bias: bool = False, dtype=jnp.float32, init=None, param_dtype=jnp.float32):
        init = init or nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.kernel = param(rngs, init, (d_in, d_out), axes, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (d_out,), axes[1:], param_dtype) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale``, statistics in float32."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, axes=("embed",)):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def token_shift(x: jax.Array, segment_ids: jax.Array | None, last: jax.Array | None) -> jax.Array:
    """RWKV's token shift: the previous token's input for every position of ``x [B, T, d]``.

    ``last [B, d]`` (a decoding cache) stands before ``t = 0``, zeros if None; every document start
    of ``segment_ids [B, T]`` gets zeros (the shift never crosses documents)."""
    first = jnp.zeros_like(x[:, :1]) if last is None else last[:, None].astype(x.dtype)
    prev = jnp.concatenate([first, x[:, :-1]], axis=1)
    same = same_segment_as_shifted(segment_ids, 1)
    return prev if same is None else jnp.where(same.at[:, 0].set(True)[..., None], prev, 0)


class ShortConv(nnx.Module):
    """Causal depthwise 1-D convolution over time, ``y_t = sum_i w_i * x_{t-i}`` (width ``W``).

    Used before q/k/v in DeltaNet-style and Mamba-style blocks. With ``segment_ids`` the
    window never reaches into a previous document.

    ``__call__(x [B, T, C], segment_ids=None)`` -> ``y [B, T, C]``: the training form.
    ``__call__(x, cache=window)`` -> ``(y, window)``: decoding and prefill, continuing from the
    last ``W - 1`` inputs ``window: [B, W - 1, C]`` (oldest first; :meth:`init_cache` gives zeros)
    for any ``T >= 1``; the returned window holds the last ``W - 1`` inputs seen.
    """

    def __init__(self, dim: int, width: int = 4, *, rngs: nnx.Rngs, axes=("mlp",)):
        if width < 1:
            raise ValueError(f"ShortConv: width must be >= 1, got {width}")
        self.width = width
        self.weight = param(rngs, nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                                     in_axis=0, out_axis=1),
                            (width, dim), ("conv", *axes))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None, *, cache: jax.Array | None = None):
        w = self.weight[...].astype(x.dtype)  # w[0] multiplies x_t, w[i] multiplies x_{t-i}
        t, w1 = x.shape[1], self.width - 1
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("ShortConv: segment_ids are not supported with a decoding cache")
            full = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [B, W - 1 + T, C]
        else:
            full = jnp.pad(x, ((0, 0), (w1, 0), (0, 0)))
        y = x * w[0]
        for i in range(1, self.width):
            shifted = full[:, w1 - i: w1 - i + t]
            same = same_segment_as_shifted(segment_ids, i)
            if same is not None:  # mask before the product: a previous document never leaks in
                shifted = jnp.where(same[..., None], shifted, 0)
            y = y + shifted * w[i]
        if cache is None:
            return y
        return y, full[:, full.shape[1] - w1:].astype(cache.dtype)

    def init_cache(self, batch_size: int, dtype=jnp.float32) -> jax.Array:
        return jnp.zeros((batch_size, self.width - 1, self.weight.shape[1]), dtype)
