"""Product-key memory layers: ``pkm`` (Lample et al. 2019) and ``memory_plus`` (Memory Layers at Scale).

Both are position-wise residual sub-layers (usually in place of, or next to, an FFN):

``pkm`` (alias ``P``)
    ``q = norm(x W_q)`` per head; ``(s, idx) = topk(q, K)`` over ``n_keys^2`` slots (exact,
    :func:`memjax.memory.product_keys.topk`); ``y = sum_{h, j} softmax_j(s_h) V[idx_hj]``.
    The original batch-norm on queries would mix positions (and padding) of a batch;
    an RMSNorm per head keeps the layer causal and position-wise.
``memory_plus`` (alias ``M``)
    qk-normalised queries and keys (RMSNorm on each query half and each sub-key, scores
    scaled by ``(d/2)^-1/2``), output ``y = (silu(x W_g) * mem(x)) W_o``. With
    ``shared_pool=True`` every ``memory_plus`` block of the model reads and writes one value
    table (kept in the model's ``shared`` dict); keys, queries and projections stay per block.

Value tables are ``nnx.Param`` with ``logical_axes=("memory_slots", "memory_dim")`` and
``optim_group="memory_values"`` (``optim.memory_values_lr`` gives them their own learning
rate). ``shard="rows" | "cols"`` reads them with
:func:`memjax.memory.sharded_lookup.sharded_embedding_bag` under the current mesh
(``jax.set_mesh``) when mesh axis ``shard_axis`` has more than one device; set the mesh rules
to match (rows: ``memory_slots -> tensor``; cols: ``memory_slots -> None``,
``memory_dim -> tensor``) or XLA will reshard the table at every step.

Slot usage (fraction of slots read, a diagnostic for dead slots): run a model eagerly
inside :func:`record_slots`, or call :func:`slot_usage`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ConfigError
from memjax.kernels.embedding_bag_ops import IMPLS, embedding_bag
from memjax.memory import product_keys
from memjax.memory.sharded_lookup import axis_size, sharded_embedding_bag
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, param
from memjax.nn.registry import register_block

SHARED_VALUES_KEY = "memory_plus/values"

# ----------------------------------------------------------------------------- slot recording

_RECORDER: contextvars.ContextVar = contextvars.ContextVar("memjax_slot_recorder", default=None)


@contextlib.contextmanager
def record_slots():
    """Collect the slot indices read by every product-key block called (eagerly) inside.

    Yields a dict ``pool name -> {"num_slots": N, "layers": {layer: [indices, ...]}}``.
    """
    rec: dict = {}
    token = _RECORDER.set(rec)
    try:
        yield rec
    finally:
        _RECORDER.reset(token)


def summarize_slots(rec: dict) -> dict[str, float]:
    """Fractions of slots read from a :func:`record_slots` record, per value table.

    Returns ``{pool: fraction}`` with pools ``"pkm/layer<i>"``, ``"memory_plus/layer<i>"`` or
    ``"memory_plus/shared"`` (union over the blocks sharing it, plus ``"memory_plus/shared/layer<i>"``
    for each block's own share).
    """
    out = {}
    for pool, info in rec.items():
        n, layers = info["num_slots"], info["layers"]
        flat = {layer: jnp.concatenate([i.reshape(-1) for i in idxs]) for layer, idxs in sorted(layers.items())}
        out[pool] = float(product_keys.slot_usage(jnp.concatenate(list(flat.values())), n))
        if len(flat) > 1:
            out.update({f"{pool}/layer{layer}": float(product_keys.slot_usage(i, n)) for layer, i in flat.items()})
    return out


def slot_usage(model, tokens, *, segment_ids=None) -> dict[str, float]:
    """Fraction of slots read over one batch (see :func:`summarize_slots`).

    ``model`` is called eagerly (no jit) as ``model(tokens, segment_ids=...)``.
    """
    with record_slots() as rec:
        model(tokens, segment_ids=segment_ids)
    return summarize_slots(rec)


def _record(pool: str, num_slots: int, layer: int, idx) -> None:
    rec = _RECORDER.get()
    if rec is None:
        return
    if isinstance(idx, jax.core.Tracer):
        raise RuntimeError("record_slots / slot_usage need an eager (un-jitted) forward pass")
    entry = rec.setdefault(pool, {"num_slots": num_slots, "layers": {}})
    entry["layers"].setdefault(layer, []).append(idx)


# ----------------------------------------------------------------------------- blocks


@dataclasses.dataclass
class _MemoryOptions:
    n_keys: int = 32  # sub-keys per half; slots = n_keys^2
    heads: int = 4
    knn: int = 8  # slots read per head (k)
    k_dim: int = 0  # query / key width (even); 0: d_model rounded down to even
    impl: str = "auto"  # embedding-bag implementation (memjax.kernels.embedding_bag_ops)
    shard: str = "none"  # "none" | "rows" | "cols": value table sharded over shard_axis
    shard_axis: str = "tensor"

    def validate(self, m, where):
        for key in ("n_keys", "heads", "knn"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{where}.{key}' must be >= 1, got {getattr(self, key)}")
        if self.knn > self.n_keys:
            raise ConfigError(f"config key '{where}.knn' ({self.knn}) must be <= {where}.n_keys ({self.n_keys})")
        if self.k_dim < 0 or self.k_dim % 2:
            raise ConfigError(f"config key '{where}.k_dim' must be 0 or a positive even number, got {self.k_dim}")
        if self.impl not in IMPLS:
            raise ConfigError(f"config key '{where}.impl' must be one of {IMPLS}, got {self.impl!r}")
        if self.shard not in ("none", "rows", "cols"):
            raise ConfigError(f"config key '{where}.shard' must be 'none', 'rows' or 'cols', got {self.shard!r}")
        if self.shard_axis not in ("data", "fsdp", "tensor"):
            raise ConfigError(f"config key '{where}.shard_axis' must be a mesh axis (data, fsdp, tensor), got {self.shard_axis!r}")


def _values_param(rngs, num_slots: int, dim: int) -> nnx.Param:
    return param(rngs, nnx.initializers.normal(dim ** -0.5), (num_slots, dim), ("memory_slots", "memory_dim"),
                 optim_group="memory_values")


class _ProductKeyMemory(Block):
    """Shared machinery: query projection, sub-keys, top-k, lookup (local or sharded)."""

    pool_prefix = "pkm"

    def _setup_keys(self, cfg, opts, layer, rngs):
        self.opts, self.layer = opts, layer
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.k_dim = opts.k_dim or (cfg.d_model // 2) * 2
        if self.k_dim < 2 or self.k_dim % 2:
            raise ValueError(f"k_dim must be a positive even number, got {self.k_dim}")
        self.heads, self.knn, self.n_keys = opts.heads, opts.knn, opts.n_keys
        self.num_slots = opts.n_keys ** 2
        half = self.k_dim // 2
        self.query = Linear(cfg.d_model, opts.heads * self.k_dim, ("embed", "heads"), rngs=rngs, dtype=self.dtype)
        self.subkeys = param(rngs, nnx.initializers.normal(half ** -0.5), (opts.heads, 2, opts.n_keys, half),
                             (None, None, None, "kv"))

    def _lookup(self, values, idx, w):
        o = self.opts
        if o.shard != "none" and axis_size(o.shard_axis) > 1:
            return sharded_embedding_bag(values, idx, w, scheme=o.shard, axis=o.shard_axis, impl=o.impl)
        return embedding_bag(values, idx, w, impl=o.impl)

    def _read(self, q, subkeys, values, pool):
        """``q: [B, T, H, k_dim]`` -> memory read ``[B, T, D_v]`` (computed in float32 scores)."""
        out, idx = product_keys.product_key_lookup(q.astype(jnp.float32), subkeys.astype(jnp.float32),
                                                   values, self.knn, lookup=self._lookup)
        _record(pool, self.num_slots, self.layer, idx)
        return out

    def slot_indices(self, x):
        """Slots read for the block input ``x: [B, T, D]``: ``int [B, T, heads, knn]``."""
        _, idx = product_keys.topk(*self._query_and_keys(x), self.knn)
        return idx


@register_block("pkm", aliases=("P",))
class PKMLayer(_ProductKeyMemory):
    """Product-key memory layer (Lample et al. 2019); values ``[n_keys^2, d_model]``."""

    @dataclasses.dataclass
    class Options(_MemoryOptions):
        query_norm: bool = True  # RMSNorm on each head's query (causal stand-in for batch-norm)

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        self._setup_keys(cfg, opts, layer, rngs)
        self.q_norm = RMSNorm(self.k_dim, rngs=rngs, axes=("kv",)) if opts.query_norm else None
        self.values = _values_param(rngs, self.num_slots, cfg.d_model)

    def _query_and_keys(self, x):
        b, t, _ = x.shape
        q = self.query(x).reshape(b, t, self.heads, self.k_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return q.astype(jnp.float32), self.subkeys[...]

    def __call__(self, x, *, segment_ids=None, tokens=None):
        q, keys = self._query_and_keys(x)
        y = self._read(q, keys, self.values[...], f"pkm/layer{self.layer}")
        return y.astype(x.dtype)


@register_block("memory_plus", aliases=("M",))
class MemoryPlusLayer(_ProductKeyMemory):
    """Memory+ (Berges et al. 2024): qk-norm product keys, ``(silu(x W_g) * mem(x)) W_o``."""

    @dataclasses.dataclass
    class Options(_MemoryOptions):
        value_dim: int = 0  # 0: d_model
        shared_pool: bool = False  # one value table for all memory_plus blocks of the model

        def validate(self, m, where):
            super().validate(m, where)
            if self.value_dim < 0:
                raise ConfigError(f"config key '{where}.value_dim' must be >= 0, got {self.value_dim}")

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        self._setup_keys(cfg, opts, layer, rngs)
        dv = opts.value_dim or cfg.d_model
        half = self.k_dim // 2
        self.q_norm = RMSNorm(half, rngs=rngs, axes=("kv",))
        self.k_norm = RMSNorm(half, rngs=rngs, axes=("kv",))
        self.gate = Linear(cfg.d_model, dv, ("embed", "mlp"), rngs=rngs, dtype=self.dtype)
        self.out = Linear(dv, cfg.d_model, ("mlp", "embed"), rngs=rngs, dtype=self.dtype)
        if opts.shared_pool:
            if SHARED_VALUES_KEY not in shared:
                shared[SHARED_VALUES_KEY] = _values_param(rngs, self.num_slots, dv)
            self.values = shared[SHARED_VALUES_KEY]
            if self.values.shape != (self.num_slots, dv):
                raise ValueError(f"shared memory pool has shape {self.values.shape}, this block needs {(self.num_slots, dv)}")
            self.pool = "memory_plus/shared"
        else:
            self.values = _values_param(rngs, self.num_slots, dv)
            self.pool = f"memory_plus/layer{layer}"

    def _query_and_keys(self, x):
        b, t, _ = x.shape
        half = self.k_dim // 2
        q = self.query(x).reshape(b, t, self.heads, 2, half)
        q = self.q_norm(q.astype(jnp.float32)) * half ** -0.5
        keys = self.k_norm(self.subkeys[...])
        return q.reshape(b, t, self.heads, self.k_dim), keys

    def __call__(self, x, *, segment_ids=None, tokens=None):
        q, keys = self._query_and_keys(x)
        mem = self._read(q, keys, self.values[...], self.pool)
        return self.out(jax.nn.silu(self.gate(x)) * mem.astype(self.dtype)).astype(x.dtype)
