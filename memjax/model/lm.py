"""Decoder-only language model assembled from a block pattern, with scanned layers.

``x_0 = E[tokens]``; for each block ``b_i`` of the pattern: ``x_i = x_{i-1} + b_i(RMSNorm(x_{i-1}))``;
``logits = RMSNorm(x_L) E^T`` (tied) or ``RMSNorm(x_L) W_out``.

The pattern (``model.pattern``, e.g. ``"A,F,D,F"``) is one *group* of blocks repeated
``model.pattern_repeat`` times. The model knows blocks only through the registry: each name maps
to a class, constructed from the model-wide settings it names (:data:`memjax.nn.registry.MODEL_SETTINGS`)
plus ``model.blocks[<name>]`` (its other keyword arguments).

With ``model.scan_layers`` (default) and more than one repeat, the repeats are built once with
``nnx.vmap`` (parameters stacked along a leading ``layers`` axis) and run under ``nnx.scan``, so
compile time does not grow with depth; ``model.remat`` picks what the backward pass recomputes
(``none``, ``full``, ``dots``: keep matmul outputs, ``dots_no_batch``). Groups holding a block that
cannot be stacked (``Block.scannable = False``: shared parameters, a per-layer index) are unrolled.
Unscanned models keep the parameter paths ``blocks/<i>``, ``norms/<i>`` (checkpoints written
before scanning existed restore with ``--set model.scan_layers=False``); scanned ones hold
``stack/blocks/<j>``, ``stack/norms/<j>`` with a leading axis of size ``pattern_repeat``.

Decoding: ``cache = model.init_cache(batch_size, max_length)``, then
``logits, cache = model(tokens, cache=cache)`` for a prompt (chunked forms) and for each new token
(recurrent forms).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ModelConfig
from memjax.model.sharding import constrain
from memjax.nn.block import layer_offset
from memjax.nn.dense import dense
from memjax.nn.layers import RMSNorm, batched_init, param, unbatched_init
from memjax.nn.memory_layers import recording_slots
from memjax.nn.registry import block_kwargs, canonical_name, get_block

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def pattern_names(cfg: ModelConfig) -> list[str]:
    """Canonical block names of one group of the pattern (``KeyError`` for an unknown name)."""
    return [canonical_name(s.strip()) for s in cfg.pattern.split(",") if s.strip()]


def block_names(cfg: ModelConfig) -> list[str]:
    """Canonical block names of every layer (the group repeated ``pattern_repeat`` times)."""
    return pattern_names(cfg) * cfg.pattern_repeat


def model_settings(cfg: ModelConfig, seq_axis: str | None = None) -> dict[str, Any]:
    """The model-wide settings handed to every block whose constructor names them."""
    return {"d_model": cfg.d_model, "num_heads": cfg.num_heads, "head_dim": cfg.head_dim or None,
            "mlp_hidden": cfg.mlp_hidden or None, "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len,
            "rope_theta": cfg.rope_theta, "norm_eps": cfg.norm_eps, "dtype": jnp.dtype(cfg.compute_dtype),
            "param_dtype": jnp.dtype(cfg.param_dtype), "seq_axis": seq_axis}


def block_arguments(cfg: ModelConfig, name: str, *, layer: int = 0, seq_axis: str | None = None) -> dict:
    """The keyword arguments the model constructs block ``name`` with (without ``rngs``)."""
    cls = get_block(name)
    model_args, _ = block_kwargs(cls)
    settings = {**model_settings(cfg, seq_axis), "layer": layer}
    return {**{k: settings[k] for k in model_args}, **cfg.blocks.get(cls.name, {})}


def residual_stack(norms, blocks, x, segment_ids, tokens, caches):
    """``x <- x + block(norm(x))`` for each block in order; with ``caches`` (one per block) the
    decoding form, returning the new caches. Returns ``(x, caches or None)``."""
    new = []
    for i, (norm, block) in enumerate(zip(norms, blocks)):
        if caches is None:
            y = block(norm(x), segment_ids=segment_ids, tokens=tokens)
        else:
            y, c = block(norm(x), tokens=tokens, cache=caches[i])
            new.append(c)
        x = constrain(x + y.astype(x.dtype), ("batch", "length", "embed"))
    return x, (None if caches is None else tuple(new))


class Group(nnx.Module):
    """One repeat of the pattern: pre-norm residual blocks in order."""

    def __init__(self, cfg: ModelConfig, names: list[str], *, first_layer: int, seq_axis, shared: dict,
                 rngs: nnx.Rngs):
        blocks, norms = [], []
        for j, name in enumerate(names):
            cls = get_block(name)
            kwargs = block_arguments(cfg, name, layer=first_layer + j, seq_axis=seq_axis)
            blocks.append(cls(**kwargs, **shared.get(cls.name, {}), rngs=rngs))
            norms.append(RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps))
        self.blocks = nnx.List(blocks)
        self.norms = nnx.List(norms)

    def __call__(self, x, *, segment_ids=None, tokens=None, caches=None):
        return residual_stack(self.norms, self.blocks, x, segment_ids, tokens, caches)

    def init_cache(self, batch_size: int, max_length: int) -> tuple:
        return tuple(b.init_cache(batch_size, max_length) for b in self.blocks)


class LM(nnx.Module):
    """``LM(cfg, *, seq_axis=None, rngs)``; ``seq_axis``: the mesh axis time is split over (the
    train loop passes ``"seq"`` when ``mesh.seq > 1``), handed to the blocks that take it."""

    def __init__(self, cfg: ModelConfig, *, seq_axis: str | None = None, rngs: nnx.Rngs):
        # All parameters are drawn batched when the block below ends (see batched_init: one
        # threefry hash per parameter made XLA:GPU compile the initialiser for minutes).
        with batched_init():
            self._build(cfg, seq_axis, rngs)

    def _build(self, cfg: ModelConfig, seq_axis, rngs: nnx.Rngs):
        d, v = cfg.d_model, cfg.vocab_size
        self.d_model, self.num_layers = d, len(block_names(cfg))
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        if cfg.remat not in REMAT_POLICIES:
            raise ValueError(f"LM: remat must be one of {tuple(REMAT_POLICIES)}, got {cfg.remat!r}")
        self.remat = cfg.remat
        self.embed = param(rngs, nnx.initializers.normal(1.0), (v, d), ("vocab", "embed"))
        names = pattern_names(cfg)
        shared = {}  # parameters every instance of a block type shares (e.g. one memory value pool)
        for name in dict.fromkeys(names):
            cls = get_block(name)
            shared[cls.name] = cls.shared_params(**block_arguments(cfg, name, seq_axis=seq_axis), rngs=rngs)
        repeat = cfg.pattern_repeat
        # (blocks sharing parameters across layers, or needing their layer index, are not stacked)
        self.scanned = (cfg.scan_layers and repeat > 1 and all(get_block(n).scannable for n in names)
                        and not any(shared.values()))
        if self.scanned:
            @nnx.split_rngs(splits=repeat)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make(r):
                return Group(cfg, names, first_layer=0, seq_axis=seq_axis, shared={}, rngs=r)

            with unbatched_init():  # (deferred draws cannot leave the vmap; the vmap batches them)
                self.stack = make(rngs)
            self.blocks = self.norms = None
        else:
            groups = [Group(cfg, names, first_layer=i * len(names), seq_axis=seq_axis, shared=shared, rngs=rngs)
                      for i in range(repeat)]
            self.blocks = nnx.List([b for g in groups for b in g.blocks])
            self.norms = nnx.List([n for g in groups for n in g.norms])
            self.stack = None
        self.final_norm = RMSNorm(d, rngs=rngs, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else param(
            rngs, nnx.initializers.normal(d ** -0.5), (d, v), ("embed", "vocab"))

    def _embed(self, tokens):
        # Unit-variance embeddings scaled by sqrt(d)^-1 keep the residual stream O(1) at init.
        x = jnp.take(self.embed[...], tokens, axis=0) * (self.d_model ** -0.5)
        return x.astype(self.compute_dtype)

    def _logits(self, x):
        x = self.final_norm(x)
        w = self.embed[...].T * (self.d_model ** -0.5) if self.head is None else self.head[...]
        return dense(x.astype(self.compute_dtype), w.astype(self.compute_dtype), preferred_element_type=jnp.float32)

    def _unrolled(self, x, segment_ids, tokens, caches):
        return residual_stack(self.norms, self.blocks, x, segment_ids, tokens, caches)

    def _scanned(self, x, segment_ids, tokens, caches):
        if caches is None and recording_slots():
            # Slot recording reads indices eagerly: run the stacked groups one by one, each
            # reporting its own layer indices.
            graphdef, state = nnx.split(self.stack)
            repeat = jax.tree.leaves(state)[0].shape[0]
            for i in range(repeat):
                group = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
                with layer_offset(i * len(group.blocks)):
                    x = group(x, segment_ids=segment_ids, tokens=tokens)[0]
            return x, None
        if caches is None:
            def body(group, x):
                return group(x, segment_ids=segment_ids, tokens=tokens)[0]

            if self.remat != "none":
                body = nnx.remat(body, policy=REMAT_POLICIES[self.remat])
            return nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.stack, x), None

        def step(group, x, cache):
            return group(x, tokens=tokens, caches=cache)

        return nnx.scan(step, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))(self.stack, x, caches)

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None, cache: Any = None):
        """``tokens: [B, T] int`` -> ``logits: [B, T, vocab] float32``; with ``cache`` (from
        :meth:`init_cache`) -> ``(logits, cache)``, continuing a decode."""
        if tokens.ndim != 2:
            raise ValueError(f"LM: tokens must be [batch, seq] int, got shape {tokens.shape}")
        if cache is not None and segment_ids is not None:
            raise ValueError("LM: segment_ids are not supported with a decoding cache")
        x = constrain(self._embed(tokens), ("batch", "length", "embed"))
        run = self._scanned if self.scanned else self._unrolled
        x, cache = run(x, segment_ids, tokens, cache)
        logits = self._logits(x)
        return logits if cache is None else (logits, cache)

    def init_cache(self, batch_size: int, max_length: int):
        """Decoding caches of every layer (stacked along a leading axis per scanned group slot)."""
        if not self.scanned:
            return tuple(b.init_cache(batch_size, max_length) for b in self.blocks)

        @nnx.vmap(in_axes=0, out_axes=0)
        def make(group):
            return group.init_cache(batch_size, max_length)

        return make(self.stack)
