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
    table: :meth:`MemoryPlusLayer.shared_params` makes it (``{"shared_values": table}``, the
    model calls it once) and each block gets it as ``shared_values=``; keys, queries and
    projections stay per block.

Both are position-wise: the decoding cache is :class:`memjax.nn.cache.NoCache`. They take
``layer`` (the block's index in the model) only to name their value table in the slot records
(``"pkm/layer<i>"``), so they stack under a scanned model (the model reports each stacked
group's offset through :func:`memjax.nn.block.layer_offset` when it runs them eagerly for
:func:`record_slots`); a shared pool is not stacked.

Value tables are ``nnx.Param`` with logical axes ``("memory_slots", "memory_dim")`` and
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

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.kernels.embedding_bag_ops import IMPLS, embedding_bag
from memjax.memory import product_keys
from memjax.memory.sharded_lookup import axis_size, sharded_embedding_bag
from memjax.nn.block import Block, layer_index, position_wise_result
from memjax.nn.layers import Linear, RMSNorm, param
from memjax.nn.registry import register_block
from memjax.nn.validate import check_choice, check_nonnegative, check_positive

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


def recording_slots() -> bool:
    """True inside :func:`record_slots` (a model then runs its layers eagerly, one by one)."""
    return _RECORDER.get() is not None


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
    entry["layers"].setdefault(layer_index(layer), []).append(idx)


# ----------------------------------------------------------------------------- blocks

SHARDS = ("none", "rows", "cols")


def _values_param(rngs, num_slots: int, dim: int) -> nnx.Param:
    return param(rngs, nnx.initializers.normal(dim ** -0.5), (num_slots, dim), ("memory_slots", "memory_dim"),
                 optim_group="memory_values")


class _ProductKeyMemory(Block):
    """Shared machinery: query projection, sub-keys, top-k, lookup (local or sharded).

    Args (common to ``pkm`` and ``memory_plus``):
      d_model: model width; ``x, y: [B, T, d_model]``.
      n_keys: sub-keys per half; slots = ``n_keys^2``.
      heads: query heads (each reads ``knn`` slots).
      knn: slots read per head, ``<= n_keys``.
      k_dim: query / key width (even); 0: ``d_model`` rounded down to even.
      impl: embedding-bag implementation (:mod:`memjax.kernels.embedding_bag_ops`).
      shard: ``"none" | "rows" | "cols"``: the value table is sharded over mesh axis ``shard_axis``
        of the current mesh (``jax.set_mesh``) and read with
        :func:`memjax.memory.sharded_lookup.sharded_embedding_bag` when that axis has > 1 device.
      shard_axis: the mesh axis of ``shard``.
      layer: the block's index in the model (names its table in the slot records).
      dtype: compute dtype (parameters stay float32; scores are float32).
    """

    def _setup_keys(self, d_model, *, n_keys, heads, knn, k_dim, impl, shard, shard_axis, layer, dtype, rngs):
        name = type(self).__name__
        check_positive(name, d_model=d_model, n_keys=n_keys, heads=heads, knn=knn)
        if knn > n_keys:
            raise ValueError(f"{name}: knn ({knn}) must be <= n_keys ({n_keys})")
        if k_dim < 0 or k_dim % 2:
            raise ValueError(f"{name}: k_dim must be 0 or a positive even number, got {k_dim}")
        check_choice(name, "impl", impl, IMPLS)
        check_choice(name, "shard", shard, SHARDS)
        if not isinstance(shard_axis, str) or not shard_axis:
            raise ValueError(f"{name}: shard_axis must be a mesh axis name, got {shard_axis!r}")
        self.layer, self.impl, self.shard, self.shard_axis = layer, impl, shard, shard_axis
        self.dtype = jnp.dtype(dtype)
        self.k_dim = k_dim or (d_model // 2) * 2
        if self.k_dim < 2:
            raise ValueError(f"{name}: k_dim must be a positive even number, got {self.k_dim} (d_model {d_model})")
        self.heads, self.knn, self.n_keys = heads, knn, n_keys
        self.num_slots = n_keys ** 2
        half = self.k_dim // 2
        self.query = Linear(d_model, heads * self.k_dim, ("embed", "heads"), rngs=rngs, dtype=self.dtype)
        self.subkeys = param(rngs, nnx.initializers.normal(half ** -0.5), (heads, 2, n_keys, half),
                             (None, None, None, "kv"))

    def _lookup(self, values, idx, w):
        if self.shard != "none" and axis_size(self.shard_axis) > 1:
            return sharded_embedding_bag(values, idx, w, scheme=self.shard, axis=self.shard_axis, impl=self.impl)
        return embedding_bag(values, idx, w, impl=self.impl)

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
    """Product-key memory layer (Lample et al. 2019); values ``[n_keys^2, d_model]``.

    ``y = sum_{h, j} softmax_j(s_h) V[idx_hj]`` with ``(s, idx) = topk(norm(x W_q)_h, knn)``.
    Options: the common ones (see :class:`_ProductKeyMemory`) and ``query_norm`` (RMSNorm on
    each head's query, the causal stand-in for the original batch-norm).
    """

    def __init__(self, d_model: int, *, n_keys: int = 32, heads: int = 4, knn: int = 8, k_dim: int = 0,
                 impl: str = "auto", shard: str = "none", shard_axis: str = "tensor", query_norm: bool = True,
                 layer: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
        self._setup_keys(d_model, n_keys=n_keys, heads=heads, knn=knn, k_dim=k_dim, impl=impl, shard=shard,
                         shard_axis=shard_axis, layer=layer, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(self.k_dim, rngs=rngs, axes=("kv",)) if query_norm else None
        self.values = _values_param(rngs, self.num_slots, d_model)

    def _query_and_keys(self, x):
        b, t, _ = x.shape
        q = self.query(x).reshape(b, t, self.heads, self.k_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return q.astype(jnp.float32), self.subkeys[...]

    def __call__(self, x, *, segment_ids=None, tokens=None, cache=None):
        q, keys = self._query_and_keys(x)
        y = self._read(q, keys, self.values[...], f"pkm/layer{layer_index(self.layer)}")
        return position_wise_result(y.astype(x.dtype), cache)


@register_block("memory_plus", aliases=("M",))
class MemoryPlusLayer(_ProductKeyMemory):
    """Memory+ (Berges et al. 2024): qk-norm product keys, ``y = (silu(x W_g) * mem(x)) W_o``.

    Options: the common ones (see :class:`_ProductKeyMemory`) and

    - ``value_dim``: width of the value table (0: ``d_model``).
    - ``shared_pool``: one value table for all ``memory_plus`` blocks of a model: the model makes it
      with :meth:`shared_params` and passes it to every block as ``shared_values``; a block
      built alone with ``shared_pool=True`` and no ``shared_values`` makes its own.
    - ``shared_values``: the shared table ``[n_keys^2, value_dim]`` (only with ``shared_pool``).
    """

    def __init__(self, d_model: int, *, n_keys: int = 32, heads: int = 4, knn: int = 8, k_dim: int = 0,
                 impl: str = "auto", shard: str = "none", shard_axis: str = "tensor", value_dim: int = 0,
                 shared_pool: bool = False, shared_values: nnx.Param | None = None, layer: int = 0,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self._setup_keys(d_model, n_keys=n_keys, heads=heads, knn=knn, k_dim=k_dim, impl=impl, shard=shard,
                         shard_axis=shard_axis, layer=layer, dtype=dtype, rngs=rngs)
        check_nonnegative("MemoryPlusLayer", value_dim=value_dim)
        dv = value_dim or d_model
        half = self.k_dim // 2
        self.q_norm = RMSNorm(half, rngs=rngs, axes=("kv",))
        self.k_norm = RMSNorm(half, rngs=rngs, axes=("kv",))
        self.gate = Linear(d_model, dv, ("embed", "mlp"), rngs=rngs, dtype=self.dtype)
        self.out = Linear(dv, d_model, ("mlp", "embed"), rngs=rngs, dtype=self.dtype)
        if shared_values is not None:
            if not shared_pool:
                raise ValueError("MemoryPlusLayer: shared_values is given but shared_pool is False")
            if shared_values.shape != (self.num_slots, dv):
                raise ValueError(f"MemoryPlusLayer: shared_values has shape {shared_values.shape}, this block needs "
                                 f"{(self.num_slots, dv)} (n_keys^2, value_dim)")
            self.values = shared_values
        else:
            self.values = _values_param(rngs, self.num_slots, dv)
        self.shared_pool = shared_pool

    @property
    def pool(self) -> str:
        """The value table's name in the slot records."""
        return "memory_plus/shared" if self.shared_pool else f"memory_plus/layer{layer_index(self.layer)}"

    @classmethod
    def shared_params(cls, *, rngs: nnx.Rngs, d_model: int, n_keys: int = 32, value_dim: int = 0,
                      shared_pool: bool = False, **kwargs) -> dict:
        """``{"shared_values": table [n_keys^2, value_dim or d_model]}`` with ``shared_pool``, else ``{}``."""
        if not shared_pool:
            return {}
        check_positive("MemoryPlusLayer", d_model=d_model, n_keys=n_keys)
        check_nonnegative("MemoryPlusLayer", value_dim=value_dim)
        return {"shared_values": _values_param(rngs, n_keys ** 2, value_dim or d_model)}

    def _query_and_keys(self, x):
        b, t, _ = x.shape
        half = self.k_dim // 2
        q = self.query(x).reshape(b, t, self.heads, 2, half)
        q = self.q_norm(q.astype(jnp.float32)) * half ** -0.5
        keys = self.k_norm(self.subkeys[...])
        return q.reshape(b, t, self.heads, self.k_dim), keys

    def __call__(self, x, *, segment_ids=None, tokens=None, cache=None):
        q, keys = self._query_and_keys(x)
        mem = self._read(q, keys, self.values[...], self.pool)
        y = self.out(jax.nn.silu(self.gate(x)) * mem.astype(self.dtype)).astype(x.dtype)
        return position_wise_result(y, cache)
