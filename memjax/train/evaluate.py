"""``memjax-eval``: restore the latest checkpoint of a workdir and run the task's metrics,
at the training length and at longer lengths (length extrapolation)."""
from __future__ import annotations

import copy
import json
import os

import jax

from memjax.config import Config, ConfigError
from memjax.eval.plots import metrics_table_markdown
from memjax.train.checkpoint import Checkpointer, CheckpointError, steps_on_disk
from memjax.train.loop import build, evaluate
from memjax.train.memory_bank import HostTables
from memjax.train.run_record import check_same_run


def restore_state(cfg: Config, workdir: str, step: int | None = None, *, allow_changed: tuple[str, ...] = ()):
    """(setup, state, step) with the checkpoint (default: the newest intact one) laid out on this
    run's mesh. Reads only: a missing checkpoint is a :class:`CheckpointError` and nothing is created;
    a config that differs from the run's saved one is a :class:`memjax.train.run_record.RunMismatch`."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not steps_on_disk(ckpt_dir):
        raise CheckpointError(f"no checkpoint in {ckpt_dir}")
    check_same_run(cfg, workdir, allow_changed=allow_changed, what="eval")
    setup = build(cfg)
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    with jax.set_mesh(setup.mesh):
        abstract = jax.eval_shape(setup.init_fn)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, setup.state_shardings)
    try:
        state, _, step = ckpt.restore(abstract, step)
    finally:
        ckpt.close()
    if setup.host_modules:  # host-resident tables: the checkpoint's own snapshot, opened read-only
        root = cfg.train.host_tables_dir or os.path.join(workdir, "host_tables")
        setup.host = HostTables.open_snapshot(setup.host_modules, root, step)
    return setup, state, step


def check_writable(directory: str) -> None:
    """Raise ``PermissionError`` (before any work) if results cannot be written to ``directory``."""
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    if not os.access(probe, os.W_OK):
        raise PermissionError(f"cannot write to {directory}: pass --out DIR to write the results elsewhere")


def evaluate_checkpoint(cfg: Config, workdir: str, *, num_batches: int | None = None,
                        length_multiples: tuple[int, ...] = (1, 2, 4), out_dir: str | None = None,
                        allow_changed: tuple[str, ...] = ()) -> dict:
    """Metrics of the latest checkpoint; ``len_x{m}/...`` entries at ``m`` times the training length.

    Writes ``eval_metrics.json`` and the same numbers as a Markdown table, ``eval_metrics.md``, into
    ``out_dir`` (default: the workdir, which is otherwise only read; checked before any work).
    """
    out_dir = workdir if out_dir is None else out_dir
    if jax.process_index() == 0:
        check_writable(out_dir)
    setup, state, step = restore_state(cfg, workdir, allow_changed=allow_changed)
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
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "eval_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        with open(os.path.join(out_dir, "eval_metrics.md"), "w") as f:
            f.write(metrics_table_markdown(metrics))
    return metrics
