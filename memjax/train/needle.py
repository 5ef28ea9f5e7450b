"""Needle-in-a-haystack grid: pass-key accuracy of one checkpoint by context length and needle depth.

A checkpoint trained on the ``passkey`` task (:mod:`memjax.data.passkey`) is restored once
and evaluated at every ``(context_length, depth)``: the eval split is regenerated with
``data.seq_len = context_length`` and the needle fixed at ``data.options.depth = depth``
(fraction of the haystack before it; 0 = first token, 1 = right before the query). The
score is the task's ``key_accuracy`` (a key counts only if all its tokens are right).
Lengths beyond the training length measure length extrapolation with the same
parameters, as :func:`memjax.train.evaluate.evaluate_checkpoint` does.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence

import jax

from memjax.config import Config, ConfigError, validate
from memjax.data.pipeline import make_task
from memjax.eval.plots import plot_needle_heatmap
from memjax.train.evaluate import restore_state
from memjax.train.loop import build, evaluate

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_LENGTH_MULTIPLES = (1, 2, 4)


def _grid_config(cfg: Config, length: int, depth: float | None = None) -> Config:
    out = copy.deepcopy(cfg)
    out.data.seq_len = length
    out.model.max_seq_len = max(cfg.model.max_seq_len, length)
    if depth is not None:
        out.data.options = {**out.data.options, "depth": float(depth)}
    return out


def _check(cfg: Config, context_lengths, depths) -> tuple[list[int], list[float]]:
    if cfg.data.task != "passkey":
        raise ConfigError(f"config key 'data.task' must be 'passkey' for a needle grid, got {cfg.data.task!r}")
    lengths = list(context_lengths)
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths):
        raise ValueError(f"context_lengths must be a non-empty sequence of positive ints, got {context_lengths!r}")
    ds = [float(d) for d in depths]
    if not ds or any(not 0.0 <= d <= 1.0 for d in ds):
        raise ValueError(f"depths must be a non-empty sequence of fractions in [0, 1], got {depths!r}")
    for n in lengths:
        try:
            validate(_grid_config(cfg, n, ds[0]))
        except ConfigError as e:
            raise ConfigError(f"needle grid context length {n}: {e}") from None
    return lengths, ds


def needle_grid_with_step(cfg: Config, workdir: str, context_lengths: Sequence[int] | None = None,
                          depths: Sequence[float] | None = None, *, num_batches: int | None = None,
                          step: int | None = None) -> tuple[dict, int]:
    """:func:`needle_grid` and the checkpoint step it evaluated."""
    if context_lengths is None:
        context_lengths = [cfg.data.seq_len * m for m in DEFAULT_LENGTH_MULTIPLES]
    lengths, ds = _check(cfg, context_lengths, DEFAULT_DEPTHS if depths is None else depths)
    setup, state, step = restore_state(cfg, workdir, step)
    results = {}
    for n in lengths:
        # Parameters do not depend on the length: one build (one eval-step compile) per length.
        n_setup = setup if n == cfg.data.seq_len else build(_grid_config(cfg, n))
        for d in ds:
            task = make_task(_grid_config(cfg, n, d), "eval")
            m = evaluate(n_setup, state, num_batches=num_batches, task=task)
            if "key_accuracy" not in m:
                raise ValueError(
                    f"no eval batch at context length {n}: data.num_eval_examples "
                    f"({cfg.data.num_eval_examples}) must be >= train.batch_size ({cfg.train.batch_size})")
            results[(n, d)] = m["key_accuracy"]
    return results, step


def needle_grid(cfg: Config, workdir: str, context_lengths: Sequence[int] | None = None,
                depths: Sequence[float] | None = None, *, num_batches: int | None = None,
                step: int | None = None) -> dict[tuple[int, float], float]:
    """``{(context_length, depth): key_accuracy}`` of the checkpoint in ``workdir``.

    Args:
      cfg: the passkey config the checkpoint was trained with.
      context_lengths: positive ints (default: 1x, 2x, 4x ``data.seq_len``).
      depths: needle depths in [0, 1] (default 0, 0.25, 0.5, 0.75, 1).
      num_batches: eval batches per cell (default ``train.eval_batches``).
      step: checkpoint step (default: the latest).
    Raises ``ConfigError`` naming the key for a non-passkey config or a context length
    the task cannot fill (checked for every length before anything is restored).
    """
    return needle_grid_with_step(cfg, workdir, context_lengths, depths, num_batches=num_batches, step=step)[0]


def save_needle_grid(results: dict, workdir: str, *, step: int | None = None) -> tuple[str, str]:
    """Write ``needle.json`` (one row per cell) and ``needle_heatmap.png`` into ``workdir``."""
    rows = [{"context_length": n, "depth": d, "key_accuracy": acc} for (n, d), acc in sorted(results.items())]
    json_path = os.path.join(workdir, "needle.json")
    png_path = os.path.join(workdir, "needle_heatmap.png")
    if jax.process_index() == 0:
        with open(json_path, "w") as f:
            json.dump({"step": step, "metric": "key_accuracy", "results": rows}, f, indent=2)
        title = "pass-key accuracy" + (f" (step {step})" if step is not None else "")
        plot_needle_heatmap(results, png_path, title=title)
    return json_path, png_path
