"""Host-resident parameter variables: generic NNX variable types for tables kept off the device.

A module whose parameter is too large for the device (e.g. the hierarchical memory bank of
:mod:`memjax.nn.hierarchical_memory`, Pouransari et al. 2025) holds only a *window* of rows fetched
from a host table for the current batch. The train loop (:mod:`memjax.train.loop`) and the store
(:mod:`memjax.train.memory_bank`) depend on these types only, never on a particular memory.

The module protocol:

- :class:`HostParam`: ``[capacity, *row_shape]`` rows fetched from a host table of ``num_rows``
  rows (metadata ``num_rows``, ``init_std``: the table's initial ``N(0, init_std^2)``). Trained
  by the loop with a row-wise optimizer, never by the device optimizer; all of a module's
  HostParams share the ``capacity`` (leading axis).
- :class:`HostIndex`: ``[B, L]`` int32, which fetched rows (positions along the HostParams'
  leading axis) each example uses; ``[1, L]``: the same rows for every example. One per module.
- the method ``host_row_ids(batch) -> [B, L]`` int: the global row ids each example needs,
  computed on the host from the NumPy batch.
"""
from __future__ import annotations

from flax import nnx

__all__ = ["HostIndex", "HostParam"]


class HostParam(nnx.Variable):
    """Rows of a host-resident table fetched for the current batch: ``[capacity, *row_shape]``.
    Metadata: ``num_rows`` (rows of the whole table), ``init_std`` (its initial N(0, std^2))."""


class HostIndex(nnx.Variable):
    """``[B, L]`` int32 positions, into the leading axis of the module's :class:`HostParam`
    windows, of the rows each example uses (``[1, L]``: the same rows for every example)."""
