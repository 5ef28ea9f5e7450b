"""AdamW with warmup + cosine decay and global-norm clipping; memory values in their own group.

Parameters whose metadata says ``optim_group="memory_values"`` (memory-layer value
tables) get their own constant learning rate and their own clipping when
``optim.memory_values_lr > 0`` (Memory Layers at Scale trains values at a fixed lr).
Weight decay applies to matrices only (ndim >= 2), not to norms and biases.
"""
from __future__ import annotations

import jax
import optax

from memjax.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.end_lr_fraction)


def _adamw(cfg: OptimConfig, lr, params_like, decay_mask=None) -> optax.GradientTransformation:
    if decay_mask is None:
        decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params_like)
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm > 0 else optax.identity(),
        optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def make_optimizer(cfg: OptimConfig, total_steps: int, params_like, labels,
                   decay_mask=None) -> optax.GradientTransformation:
    """``params_like``: the parameter tree (arrays or ShapeDtypeStructs); ``labels``: same tree of
    group names; ``decay_mask``: same tree of bools, where weight decay applies (default: ndim >= 2)."""
    schedule = learning_rate_schedule(cfg, total_steps)
    groups = set(jax.tree.leaves(labels))
    if cfg.memory_values_lr <= 0 or "memory_values" not in groups:
        return _adamw(cfg, schedule, params_like, decay_mask)
    values_cfg = OptimConfig(**{**cfg.__dict__, "weight_decay": 0.0})
    return optax.multi_transform(
        {"default": _adamw(cfg, schedule, params_like, decay_mask),
         "memory_values": _adamw(values_cfg, cfg.memory_values_lr, params_like, decay_mask)},
        labels)
