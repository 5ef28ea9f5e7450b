"""Blocks under sequence parallelism: run a memory function with time split over the ``seq`` mesh axis.

The model is written in the global view (``jax.jit`` + sharding constraints): with
``config.mesh.seq > 1`` the activations ``[B, T, D]`` are split over ``seq`` along ``T`` and XLA
partitions the position-wise layers, attention and short convolutions by itself. A recurrent
memory is the one place where that would serialise (XLA gathers the whole sequence for a scan),
so the blocks hand their memory call to :func:`over_sequence`: a ``jax.shard_map`` manual over
``seq`` only (batch and heads stay with XLA) in which each device runs its slice and the shards
exchange states (:mod:`memjax.memory.sequence_parallel`).
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from memjax.memory.sharded_lookup import axis_size

SEQ_AXIS = "seq"


def sequence_shards() -> int:
    """Size of the ``seq`` axis of the current mesh (``jax.set_mesh``); 1 without one."""
    return axis_size(SEQ_AXIS)


def over_sequence(fn: Callable, time_args: dict, other_args: dict, *, enabled: bool = True):
    """``fn(**time_args, **other_args, seq_axis=...)`` with the time axis (axis 1) of every
    ``time_args`` array split over the ``seq`` mesh axis; ``fn`` returns ``(y [B, T, ...],
    final_state)``. Without a ``seq`` axis of size > 1, or with ``enabled=False`` (decoding, the
    recurrent forms): ``fn(..., seq_axis=None)`` on the whole sequence.

    ``other_args`` (parameters, the initial state) are the same on every ``seq`` device.
    """
    n = sequence_shards()
    if n == 1 or not enabled:
        return fn(**time_args, **other_args, seq_axis=None)
    for name, x in time_args.items():
        if x is not None and x.shape[1] % n:
            raise ValueError(f"sequence parallelism: {name} has length {x.shape[1]} along time, not divisible by "
                             f"the {n} devices of mesh axis {SEQ_AXIS!r}")

    def local(t_args, o_args):
        return fn(**t_args, **o_args, seq_axis=SEQ_AXIS)

    m = jax.sharding.get_abstract_mesh()
    return jax.shard_map(local, mesh=m, in_specs=(P(None, SEQ_AXIS), P()), out_specs=(P(None, SEQ_AXIS), P()),
                         axis_names=frozenset({SEQ_AXIS}))(time_args, other_args)
