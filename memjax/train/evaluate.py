"""``memjax-eval``: restore the latest checkpoint of a workdir and run the task's metrics."""
from __future__ import annotations

import json
import os

import jax

from memjax.config import Config
from memjax.train.checkpoint import Checkpointer, abstract_like
from memjax.train.loop import build, evaluate


def evaluate_checkpoint(cfg: Config, workdir: str, *, num_batches: int | None = None) -> dict:
    setup = build(cfg)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    with jax.set_mesh(setup.mesh):
        abstract = jax.eval_shape(setup.init_fn)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, setup.state_shardings)
    state, _ = ckpt.restore(abstract, step)
    ckpt.close()
    metrics = {"step": step, **evaluate(setup, state, num_batches=num_batches)}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics
