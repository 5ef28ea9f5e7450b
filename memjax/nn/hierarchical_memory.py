"""Hierarchical memory FFN block (``hierarchical_memory``, alias ``HM``).

Pouransari et al., "Pretraining with hierarchical memories: separating long-tail and common
knowledge" (2025): a gated FFN whose hidden units are extended, per example, by the memory blocks
on the example's cluster path (:mod:`memjax.memory.hierarchical_bank`):

    y = FFN(x) + W2_mem sigma(W1_mem x),    FFN(x) = (silu(x W_g) * (x W_u)) W_d,

where ``W1_mem = [W1_{n_1} | ... | W1_{n_L}]`` holds the ``L = depth`` blocks (``block_hidden``
units each) of the tree nodes ``n_l`` the example's ``cluster_path`` reaches. The bank of
``num_blocks(branching, depth)`` blocks lives on the host (TensorStore,
:mod:`memjax.train.memory_bank`); the block holds only a window of ``fetch_rows`` fetched blocks
(:class:`HostParam`) and each example's positions in it (:class:`HostIndex`), which the train
loop fills before each step (and writes back after it). Called without a fetch (standalone use,
decoding without :meth:`HierarchicalMemoryFFN.load_rows`) the window is zero and the block is its
plain FFN.

Evaluation and decoding outside the loop: the window is ordinary model state, so a model whose
windows were filled keeps using them in ``memjax.model.decode.generate`` (the block is
position-wise: its decode cache is empty). Fill them with
``memjax.train.memory_bank.HostTables.load_into(model, {"cluster_path": paths})`` (rows of the
run's bank, e.g. ``open_host_tables(setup, <workdir>/host_tables)`` after restoring a checkpoint)
or :meth:`HierarchicalMemoryFFN.load_rows`. The path of a prompt must be known beforehand
(``data.cluster_paths`` of the prompt's text, or a cluster label): the decoder does not re-route
while generating, and a model built from a checkpoint alone decodes with the zero window (the
plain FFN) until ``load_into`` is called. A checkpoint's own bank is
``HostTables.open_snapshot(setup.host_modules, <workdir>/host_tables, step)`` (read only).

The block follows the generic host-table protocol of :mod:`memjax.nn.host_params`
(:class:`~memjax.nn.host_params.HostParam` windows, one :class:`~memjax.nn.host_params.HostIndex`,
and ``host_row_ids(batch)``); the loop knows nothing else about this memory.
"""
from __future__ import annotations

import inspect

import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax.config import Config, ConfigError, register_check
from memjax.memory.hierarchical_bank import (
    ACTIVATIONS,
    memory_ffn,
    num_blocks,
    path_block_ids,
)
from memjax.nn.block import Block, position_wise_result
from memjax.nn.host_params import HostIndex, HostParam
from memjax.nn.mlp import GatedMLP
from memjax.nn.registry import canonical_name, register_block
from memjax.nn.validate import check_choice, check_positive


@register_block("hierarchical_memory", aliases=("HM",))
class HierarchicalMemoryFFN(Block):
    """Gated FFN plus fetched memory blocks (see the module docstring).

    Options: ``branching``, ``depth`` (the cluster tree: must equal ``data.cluster_paths``),
    ``block_hidden`` (hidden units per memory block), ``fetch_rows`` (fetch capacity: distinct
    blocks one batch may use; at most ``batch_size * depth``), ``activation`` of the memory units.
    The batch must carry ``cluster_path [B, depth]`` int (:class:`memjax.data.cluster_paths.ClusterPaths`).
    """

    # (the host tables are per layer and fetched per module: not stacked under nnx.scan)
    scannable = False

    def __init__(self, d_model: int, *, mlp_hidden: int | None = None, branching: int = 4, depth: int = 2,
                 block_hidden: int = 16, fetch_rows: int = 64, activation: str = "silu", dtype=jnp.float32,
                 rngs: nnx.Rngs):
        name = "HierarchicalMemoryFFN"
        check_positive(name, d_model=d_model, branching=branching, depth=depth, block_hidden=block_hidden,
                       fetch_rows=fetch_rows)
        check_choice(name, "activation", activation, ACTIVATIONS)
        self.ffn = GatedMLP(d_model, mlp_hidden=mlp_hidden, dtype=dtype, rngs=rngs)
        self.branching, self.depth, self.activation = branching, depth, activation
        self.num_blocks = num_blocks(branching, depth)
        self.dtype = jnp.dtype(dtype)
        # Zero windows until the loop fetches: the memory then adds exactly nothing.
        self.w1 = HostParam(jnp.zeros((fetch_rows, d_model, block_hidden), jnp.float32),
                            num_rows=self.num_blocks, init_std=d_model ** -0.5)
        self.w2 = HostParam(jnp.zeros((fetch_rows, block_hidden, d_model), jnp.float32),
                            num_rows=self.num_blocks, init_std=(depth * block_hidden) ** -0.5)
        self.row_index = HostIndex(jnp.zeros((1, depth), jnp.int32))

    def host_row_ids(self, batch: dict) -> np.ndarray:
        """``[B, depth]`` global block ids of each example's cluster path (host side, NumPy)."""
        if "cluster_path" not in batch:
            raise ValueError("HierarchicalMemoryFFN: the batch has no 'cluster_path' [B, depth]: attach it with "
                             "data.cluster_paths (memjax.data.cluster_paths.ClusterPaths)")
        return path_block_ids(np.asarray(batch["cluster_path"]), self.branching, self.depth)

    def load_rows(self, w1_rows, w2_rows, row_index) -> None:
        """Set the fetched window by hand (standalone use): ``w1_rows [N, D, H]``, ``w2_rows
        [N, H, D]``, ``row_index [B, depth]`` (or ``[1, depth]``)."""
        # (.value: the window may change size, which [...] assignment refuses)
        self.w1.value = jnp.asarray(w1_rows, jnp.float32)
        self.w2.value = jnp.asarray(w2_rows, jnp.float32)
        self.row_index.value = jnp.asarray(row_index, jnp.int32)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache=None):
        index = self.row_index[...]
        if index.shape[0] == 1:
            index = jnp.broadcast_to(index, (x.shape[0], index.shape[1]))
        w1, w2 = self.w1[...].astype(self.dtype), self.w2[...].astype(self.dtype)
        y = self.ffn(x) + memory_ffn(x.astype(self.dtype), w1, w2, index, activation=self.activation)
        return position_wise_result(y.astype(x.dtype), cache)


def check_cluster_paths(cfg: Config, num_devices: int | None = None) -> None:
    """A pattern using ``hierarchical_memory``: ``data.cluster_paths``, when set, must give the
    block's ``depth`` and ``branching`` explicitly; no gradient accumulation (microbatches 1)."""
    names = []
    for s in cfg.model.pattern.split(","):
        try:
            names.append(canonical_name(s.strip()))
        except KeyError:
            continue  # (reported by the model's own check)
    if "hierarchical_memory" not in names:
        return
    defaults = {n: p.default for n, p in inspect.signature(HierarchicalMemoryFFN.__init__).parameters.items()}
    opts = {**defaults, **cfg.model.blocks.get("hierarchical_memory", {})}
    paths = cfg.data.cluster_paths
    if cfg.train.microbatches != 1:
        raise ConfigError("config key 'train.microbatches' must be 1 with hierarchical_memory (the fetched rows "
                          "are per batch)")
    if not paths:
        # (not an error here: a model can be built, initialised and decoded without a bank; the first
        # train or eval step names data.cluster_paths when the batch has no cluster_path)
        return
    for key in ("depth", "branching"):
        if paths.get(key) != opts[key]:
            raise ConfigError(f"config key 'data.cluster_paths.{key}' ({paths.get(key)!r}) must equal "
                              f"model.blocks.hierarchical_memory.{key} ({opts[key]}); give both explicitly")


register_check(check_cluster_paths)
