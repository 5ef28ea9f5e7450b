"""Which platform a computation is being built for: the kernels' choice of implementation.

A kernel picks Pallas-for-GPU, Pallas-for-TPU or plain XLA by platform. ``jax.default_backend()``
names the platform of *this process's* devices, which is the wrong question when a program is
compiled for other devices: ``memjax-compile`` lowers the train step on a CPU-only host for a
mesh of TPU devices from ``jax.experimental.topologies`` (compile-only devices; nothing runs).
The mesh set by ``jax.set_mesh`` (or ``jax.sharding.use_abstract_mesh``) names the devices the
program is for, so it decides; the default backend is only the fallback when no mesh is set.

In JAX 0.10 the mesh's devices are read from ``jax.sharding.get_abstract_mesh().abstract_device``
(``platform`` and ``device_kind``): it is set from the concrete mesh's devices by ``jax.set_mesh``,
is readable inside ``jax.jit`` and ``jax.shard_map`` (where ``jax.sharding.get_mesh`` is not), and
is ``None`` when no mesh is set or an abstract mesh was built without a device.
"""
from __future__ import annotations

import jax

# Platform names of devices / abstract devices -> the backend names the kernels compare against
# (``jax.default_backend()`` says "gpu" for CUDA and ROCm devices).
_BACKEND_OF_PLATFORM = {"cuda": "gpu", "rocm": "gpu"}


def _mesh_device():
    """The abstract device of the current mesh, or None (no mesh set, or one without devices)."""
    try:
        mesh = jax.sharding.get_abstract_mesh()
    except Exception:  # noqa: BLE001 - no mesh context support: fall back to the default backend
        return None
    if mesh is None or getattr(mesh, "empty", True):
        return None
    device = getattr(mesh, "abstract_device", None)
    if device is None or not getattr(device, "platform", None):
        return None
    return device


def target_platform(backend: str | None = None) -> str:
    """The backend (``"cpu" | "gpu" | "tpu"``) a computation is built for.

    ``backend`` when given; else the platform of the devices of the mesh set by ``jax.set_mesh``
    (or ``jax.sharding.use_abstract_mesh`` with an ``AbstractDevice``), inside or outside ``jit``;
    else ``jax.default_backend()``.
    """
    if backend:
        return backend
    device = _mesh_device()
    if device is not None:
        return _BACKEND_OF_PLATFORM.get(device.platform, device.platform)
    return jax.default_backend()


def target_device_kind(backend: str) -> str | None:
    """The ``device_kind`` of the current mesh's devices when they are on ``backend``, else None
    (callers then ask ``jax.devices(backend)``)."""
    device = _mesh_device()
    if device is None or _BACKEND_OF_PLATFORM.get(device.platform, device.platform) != backend:
        return None
    return getattr(device, "device_kind", None) or None
