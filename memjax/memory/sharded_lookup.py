"""Embedding-bag lookups into a value table sharded over one mesh axis (``jax.shard_map``).

Two layouts for ``values: [N, D]`` over the ``P`` devices of mesh axis ``axis``:

``"rows"``  each device holds ``N / P`` rows (spec ``P(axis, None)``). A device reads the
            pairs whose row it owns (others are masked to weight 0), sums them locally in
            float32, and the partial sums are combined: ``psum`` when every device of the
            axis holds the same bags, ``psum_scatter`` when the bags are split over the
            axis (their indices are first ``all_gather``-ed so every device sees the group's
            bags). Bytes exchanged: ``Bt x D`` per device.
``"cols"``  each device holds all rows and ``D / P`` columns (spec ``P(None, axis)``; Memory
            Layers at Scale). Every device computes the full bag sums for its columns; the
            column slices are then ``all_gather``-ed (bags replicated) or exchanged with one
            ``all_to_all`` (bags split over the axis). No masking, no partial sums.

In both layouts the backward scatter-add into ``values`` stays on the device that holds
the rows (the local :func:`embedding_bag`'s custom VJP); only activations and their
cotangents cross devices. Only ``axis`` is manual inside the ``shard_map``; the other mesh
axes stay automatic, so the bag dimension may additionally be sharded over e.g. ``data``.

``bags="replicated"`` (default): ``indices``/``weights`` and the output are replicated over
``axis``; ``bags="sharded"``: their first dimension is split over ``axis`` (``Bt`` divisible by
``P``). ``N`` (rows) or ``D`` (cols) must be divisible by ``P``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from memjax.kernels.embedding_bag_ops import embedding_bag

SCHEMES = ("rows", "cols")


def current_mesh(mesh=None):
    """``mesh`` if given, else the mesh set with ``jax.set_mesh`` (None if there is none)."""
    if mesh is not None:
        return mesh
    m = jax.sharding.get_abstract_mesh()
    return None if m is None or m.empty else m


def axis_size(axis: str, mesh=None) -> int:
    """Size of ``axis`` in ``mesh`` (or the current mesh); 1 if there is no such mesh axis."""
    m = current_mesh(mesh)
    if m is None or axis not in m.axis_names:
        return 1
    return m.shape[axis]


def sharded_embedding_bag(values: jax.Array, indices: jax.Array, weights: jax.Array, *,
                          scheme: str = "rows", axis: str = "tensor", bags: str = "replicated",
                          mesh=None, impl: str = "auto", interpret: bool | None = None) -> jax.Array:
    """``out[b] = sum_j weights[b, j] * values[indices[b, j]]`` with ``values`` sharded over ``axis``.

    Args:
      values: ``[N, D]``; indices: ``int [Bt, k]``; weights: ``[Bt, k]``.
      scheme: ``"rows"`` or ``"cols"`` (see module docstring).
      axis: the mesh axis holding the table's shards.
      bags: ``"replicated"`` or ``"sharded"`` over ``axis`` (first dim of indices/weights/out).
      mesh: a ``Mesh``/``AbstractMesh``; default the mesh set with ``jax.set_mesh``.
      impl, interpret: passed to the per-device :func:`embedding_bag`.

    Returns:
      ``[Bt, D]`` in ``values.dtype`` (float32 accumulation, also across devices).

    Out-of-range indices are clamped to ``[0, N)`` (inputs are traced inside ``shard_map``).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if bags not in ("replicated", "sharded"):
        raise ValueError(f"bags must be 'replicated' or 'sharded', got {bags!r}")
    if getattr(values, "ndim", None) != 2:
        raise ValueError(f"values must be [N, D], got shape {getattr(values, 'shape', None)}")
    if getattr(indices, "ndim", None) != 2 or not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be int [Bt, k], got {getattr(indices, 'shape', None)}")
    if getattr(weights, "shape", None) != indices.shape:
        raise ValueError(f"weights must be [Bt, k] = {tuple(indices.shape)}, got {getattr(weights, 'shape', None)}")
    m = current_mesh(mesh)
    if m is None:
        raise ValueError("sharded_embedding_bag needs a mesh: pass mesh= or call it under jax.set_mesh(mesh)")
    if axis not in m.axis_names:
        raise ValueError(f"axis {axis!r} is not a mesh axis; mesh axes: {m.axis_names}")
    p = m.shape[axis]
    n, d = values.shape
    bt = indices.shape[0]
    if scheme == "rows" and n % p:
        raise ValueError(f"values rows N={n} must be divisible by the size {p} of mesh axis {axis!r} (scheme='rows')")
    if scheme == "cols" and d % p:
        raise ValueError(f"values columns D={d} must be divisible by the size {p} of mesh axis {axis!r} (scheme='cols')")
    if bags == "sharded" and bt % p:
        raise ValueError(f"indices first dim Bt={bt} must be divisible by the size {p} of mesh axis {axis!r} (bags='sharded')")

    out_dtype = values.dtype
    acc_dtype = jnp.promote_types(values.dtype, jnp.float32)  # partial sums cross devices unrounded
    idx = jnp.clip(indices.astype(jnp.int32), 0, n - 1)
    split = bags == "sharded"
    bag_spec = P(axis) if split else P()

    # The Pallas interpreter mis-types loop carries under shard_map's varying-axes check (JAX
    # 0.10 raises "Scan carry input and output got mismatched varying manual axes"), so
    # interpreted kernels run with the check off; compiled kernels and XLA keep it.
    check_vma = not interpret

    def gather_bags(i, w):
        if not split and not check_vma:
            return i, w
        if not split:
            # Mark the replicated bags device-varying: the local lookup's d_weights differ per
            # device, and the transpose of this cast is the psum that adds them up.
            return jax.lax.pcast(i, axis, to="varying"), jax.lax.pcast(w, axis, to="varying")
        return (jax.lax.all_gather(i, axis, axis=0, tiled=True),
                jax.lax.all_gather(w, axis, axis=0, tiled=True))

    def rows_fn(v_local, i, w):
        i, w = gather_bags(i, w)
        n_local = v_local.shape[0]
        local = i - jax.lax.axis_index(axis) * n_local
        mine = (local >= 0) & (local < n_local)
        part = embedding_bag(v_local, jnp.where(mine, local, 0), jnp.where(mine, w, 0).astype(w.dtype),
                             impl=impl, interpret=interpret, out_dtype=acc_dtype)
        if split:
            total = jax.lax.psum_scatter(part, axis, scatter_dimension=0, tiled=True)
        else:
            total = jax.lax.psum(part, axis)
        return total.astype(out_dtype)

    def cols_fn(v_local, i, w):
        i, w = gather_bags(i, w)
        part = embedding_bag(v_local, i, w, impl=impl, interpret=interpret)  # [Bt_group, D/P]
        if split:
            return jax.lax.all_to_all(part, axis, split_axis=0, concat_axis=1, tiled=True)
        return jax.lax.all_gather(part, axis, axis=1, tiled=True, to="invarying")

    fn, v_spec = (rows_fn, P(axis, None)) if scheme == "rows" else (cols_fn, P(None, axis))
    manual = frozenset({axis})
    if any(t == jax.sharding.AxisType.Explicit for t in m.axis_types):
        # Explicit axes: shard_map takes arrays only in the layout its specs name. Every axis goes
        # manual (the arrays are replicated over the others anyway): JAX 0.12 cannot lower the
        # reduce-scatter of an array that still carries Explicit axes inside the map.
        values = jax.sharding.reshard(values, v_spec)
        idx, weights = jax.sharding.reshard(idx, bag_spec), jax.sharding.reshard(weights, bag_spec)
        manual = frozenset(m.axis_names)
    return jax.shard_map(fn, mesh=m, in_specs=(v_spec, bag_spec, bag_spec), out_specs=bag_spec,
                         axis_names=manual, check_vma=check_vma)(values, idx, weights)
