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
