"""Mesh construction and logical-axis sharding (the MaxText way, with plain ``jax.jit``).

Parameters carry ``logical_axes`` metadata; ``config.mesh.rules`` maps each logical
name to a mesh axis (or several, or None). ``param_shardings`` turns a parameter
tree into ``NamedSharding``s for ``jax.jit(in_shardings=..., out_shardings=...)``;
``constrain`` pins activations at block boundaries while a rules context is active.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import warnings

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import PartitionSpec as P

from memjax.config import ConfigError, MeshConfig
from memjax.nn.layers import logical_axes

MESH_AXES = ("data", "fsdp", "seq", "tensor")

_RULES: contextvars.ContextVar = contextvars.ContextVar("memjax_axis_rules", default=None)


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve ``-1`` (the remaining devices) and check the product equals ``num_devices``."""
    sizes = {a: getattr(mesh_cfg, a) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"config keys mesh.{' and mesh.'.join(free)}: at most one mesh axis may be -1")
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise ConfigError(f"config key 'mesh.{a}' must be positive or -1, got {s}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"config key 'mesh.{free[0]}': the other mesh axes ({fixed} devices) do not divide "
                f"the {num_devices} available devices")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"config keys mesh.data x mesh.fsdp x mesh.seq x mesh.tensor = "
            f"{' x '.join(str(sizes[a]) for a in MESH_AXES)} = {math.prod(sizes.values())} "
            f"does not match the {num_devices} available devices")
    return sizes


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A ``(data, fsdp, seq, tensor)`` mesh (``seq``: sequence parallelism). Axis types are Auto on purpose: shardings come from
    explicit in/out shardings and constraints, and XLA propagates the rest (Explicit
    axes would make every op's sharding part of its type, which our layers don't need)."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except NotImplementedError as e:
        # A TPU slice's devices form a torus (v5p-128: 4x4x4) and each mesh axis should be a
        # product of whole torus axes (4, 16, 64 there); mesh.seq = 8 is not. Splitting a
        # physical axis still gives a valid mesh whose neighbours are a link or two apart.
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (NotImplementedError, ValueError) as e2:
            raise ConfigError(f"config keys mesh.data x mesh.fsdp x mesh.seq x mesh.tensor = "
                              f"{' x '.join(map(str, shape))} cannot be laid out on these devices: {e2}") from e
        warnings.warn(f"mesh {dict(sizes)} splits a physical axis of the device torus ({e.args[0].split('.')[0]}); "
                      "collectives may cross extra links: mesh sizes that are products of the torus axes avoid it",
                      stacklevel=2)
        return jax.sharding.Mesh(grid, MESH_AXES, axis_types=types)


def logical_to_spec(axes, rules: dict, mesh: jax.sharding.Mesh | None = None, shape=None, where: str = "") -> P:
    """Map logical names to a PartitionSpec; a mesh axis is used at most once per array."""
    used, spec = set(), []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ConfigError(f"config key 'mesh.rules' has no rule for logical axis {name!r} (used by {where})")
        target = rules[name]
        target = tuple(target) if isinstance(target, (tuple, list)) else (target,)
        target = tuple(a for a in target if a is not None and a not in used
                       and (mesh is None or mesh.shape[a] > 1))
        if shape is not None and mesh is not None and target:
            size = math.prod(mesh.shape[a] for a in target)
            if shape[i] % size:
                raise ConfigError(
                    f"{where}: dimension {i} ({name!r}, size {shape[i]}) is not divisible by mesh axes "
                    f"{target} of size {size}; change config.mesh or mesh.rules[{name!r}]")
        used.update(target)
        spec.append(target[0] if len(target) == 1 else (target or None))
    return P(*spec)


def flax_rules(rules: dict) -> tuple:
    """``config.mesh.rules`` as the ``(logical, mesh axes)`` pairs of ``nnx.logical_axis_rules``."""
    return tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in rules.items())


def param_specs(state: nnx.State, rules: dict, mesh=None) -> nnx.State:
    """PartitionSpec per variable from its logical axis names (replicated if it has none).
    The stacked axis of scanned layers (``"layers"``) is replicated unless ``rules`` map it."""
    rules = {"layers": None, **rules}

    def spec(path, var):
        axes = logical_axes(var) if isinstance(var, nnx.Variable) else None
        if axes is None:
            return P()
        return logical_to_spec(axes, rules, mesh, var.shape, "/".join(map(str, path)))

    return nnx.map_state(spec, state)


def batch_spec(rules: dict, mesh=None, ndim: int = 2) -> P:
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh)


@contextlib.contextmanager
def axis_rules(rules: dict):
    token = _RULES.set(rules)
    try:
        yield
    finally:
        _RULES.reset(token)


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
    """``with_sharding_constraint`` by logical names, when a mesh and rules are active."""
    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules, mesh))
