"""``memjax-eval``: restore the latest checkpoint of a workdir and run the task's metrics,
at the training length and at longer lengths (length extrapolation)."""
from __future__ import annotations

import copy
import json
import os

import jax

from memjax.config import Config, ConfigError
from memjax.train.checkpoint import Checkpointer
from memjax.train.loop import build, evaluate


def restore_state(cfg: Config, workdir: str, step: int | None = None):
    """(setup, state, step) with the checkpoint laid out on this run's mesh."""
    setup = build(cfg)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step() if step is None else step
    if step is None:
        ckpt.close()
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    with jax.set_mesh(setup.mesh):
        abstract = jax.eval_shape(setup.init_fn)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, setup.state_shardings)
    state, _ = ckpt.restore(abstract, step)
    ckpt.close()
    return setup, state, step


def evaluate_checkpoint(cfg: Config, workdir: str, *, num_batches: int | None = None,
                        length_multiples: tuple[int, ...] = (1, 2, 4)) -> dict:
    """Metrics of the latest checkpoint; ``len_x{m}/...`` entries at ``m`` times the training length.

    Writes ``eval_metrics.json`` and the same numbers as a Markdown table, ``eval_metrics.md``.
    """
    setup, state, step = restore_state(cfg, workdir)
    metrics: dict = {"step": step, **evaluate(setup, state, num_batches=num_batches)}
    for m in length_multiples:
        if m == 1:
            continue
        longer = copy.deepcopy(cfg)
        longer.data.seq_len = cfg.data.seq_len * m
        longer.model.max_seq_len = max(cfg.model.max_seq_len, longer.data.seq_len)
        try:
            long_setup = build(longer)  # same parameters: only sequence shapes change
        except ConfigError as e:
            metrics[f"len_x{m}/skipped"] = str(e)
            continue
        for k, v in evaluate(long_setup, state, num_batches=num_batches).items():
            metrics[f"len_x{m}/{k}"] = v
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        from memjax.eval.plots import metrics_table_markdown

        with open(os.path.join(workdir, "eval_metrics.md"), "w") as f:
            f.write(metrics_table_markdown(metrics))
    return metrics
