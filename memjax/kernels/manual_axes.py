"""Manual mesh axes inside ``jax.shard_map``: making per-device and replicated values meet."""
from __future__ import annotations

import jax


def common_varying(*arrays):
    """``(arrays cast to the union of their manual-axis types, that union)``.

    Inside ``jax.shard_map`` (``check_vma``) an array that is the same on every device of a
    manual axis (e.g. a replicated initial state) must be cast to *varying* before it meets
    per-device values in a loop carry or a Pallas call; outside ``shard_map`` this is a no-op.
    """
    axes = frozenset().union(*(jax.typeof(a).mat.varying for a in arrays))
    cast = [a if axes <= jax.typeof(a).mat.varying
            else jax.lax.pcast(a, tuple(axes - jax.typeof(a).mat.varying), to="varying")
            for a in arrays]
    return cast, axes


def over_batch(fn, batch: int, *, check_vma: bool = True):
    """``fn`` run per device when a mesh is set: a Mosaic (Pallas TPU) call cannot be partitioned
    by XLA ("Mosaic kernels cannot be automatically partitioned"), so a kernel called from a
    sharded program must sit inside ``jax.shard_map``. ``fn`` takes and returns arrays (or None)
    whose axis 0 is the batch, independent per batch row. The wrapper is manual over the current
    mesh's free axes (those not already manual); the batch is split over those of size > 1,
    taken greedily in mesh order while their product divides ``batch``, and the call replicated
    over the rest (an input sharded otherwise, e.g. heads over a tensor axis, is resharded on
    the way in). Without a mesh, or with every axis already manual, ``fn`` itself.
    ``check_vma=False`` for kernels run in interpret mode (the Pallas interpreter does not track
    manual-axis types)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", True):
        return fn
    manual = set(getattr(mesh, "manual_axes", ()))
    free = [(n, s) for n, s in zip(mesh.axis_names, mesh.axis_sizes) if n not in manual]
    if not free:
        return fn
    axes, prod = [], 1
    for name, size in free:
        if size > 1 and batch % (prod * size) == 0:
            axes.append(name)
            prod *= size
    spec = jax.sharding.PartitionSpec(tuple(axes) if axes else None)
    # manual over every free axis, size-1 ones included: an axis left to XLA's partitioner, even
    # of size 1, makes it refuse the Mosaic call
    return jax.shard_map(fn, in_specs=spec, out_specs=spec, axis_names=frozenset(n for n, _ in free),
                         check_vma=check_vma)
