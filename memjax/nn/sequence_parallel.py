"""Blocks under sequence parallelism: run a memory function with time split over a named mesh axis.

A block built with ``seq_axis="seq"`` (the model passes it when ``config.mesh.seq > 1``; in
your own model, pass it yourself) expects to run under a mesh with that axis
(``jax.set_mesh``), with activations ``[B, T, D]`` split along ``T``. XLA partitions the
position-wise layers, attention and short convolutions by itself; a recurrent memory is the one
place where that would serialise (XLA gathers the whole sequence for a scan), so the blocks hand
their memory call to :func:`over_sequence`: a ``jax.shard_map`` manual over that axis only
(batch and heads stay with XLA) in which each device runs its slice and the shards exchange
states (:mod:`memjax.memory.sequence_parallel`). Nothing is inferred from the ambient mesh: a
block built without ``seq_axis`` never shards time.
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import PartitionSpec as P

from memjax.memory.sharded_lookup import axis_size


def over_sequence(fn: Callable, time_args: dict, other_args: dict, *, axis: str | None, enabled: bool = True):
    """``fn(**time_args, **other_args, seq_axis=...)`` with the time axis (axis 1) of every
    ``time_args`` array split over mesh axis ``axis``; ``fn`` returns ``(y [B, T, ...],
    final_state)``. With ``axis=None``, ``enabled=False`` (decoding, the recurrent forms) or an
    axis of size 1: ``fn(..., seq_axis=None)`` on the whole sequence.

    ``other_args`` (parameters, the initial state) are the same on every ``axis`` device.
    """
    if axis is None or not enabled:
        return fn(**time_args, **other_args, seq_axis=None)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or axis not in mesh.axis_names:
        raise ValueError(f"sequence parallelism: the block was built with seq_axis={axis!r} but the current mesh "
                         f"has no such axis (run under jax.set_mesh with a mesh that has it)")
    n = axis_size(axis)
    if n == 1:
        return fn(**time_args, **other_args, seq_axis=None)
    for name, x in time_args.items():
        if x is not None and x.shape[1] % n:
            raise ValueError(f"sequence parallelism: {name} has length {x.shape[1]} along time, not divisible by "
                             f"the {n} devices of mesh axis {axis!r}")

    def local(t_args, o_args):
        return fn(**t_args, **o_args, seq_axis=axis)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(None, axis), P()), out_specs=(P(None, axis), P()),
                         axis_names=frozenset({axis}))(time_args, other_args)
