"""Grain input pipeline: task source -> shuffle -> repeat -> per-process slice -> batch.

Random access all the way (``MapDataset``) makes the stream deterministic per seed,
shardable by process, and resumable from a tiny iterator state (saved in every
checkpoint as JSON).
"""
from __future__ import annotations

import grain
import jax
import numpy as np

from memjax.config import Config, options_from_dict
from memjax.data.cluster_paths import cluster_path_transform
from memjax.data.registry import get_task


def make_task(cfg: Config, split: str):
    d = cfg.data
    cls = get_task(d.task)
    opts = options_from_dict(cls.Options, d.options, "data.options")
    n = d.num_train_examples if split == "train" else d.num_eval_examples
    return cls(opts, seq_len=d.seq_len, vocab_size=cfg.model.vocab_size, split=split,
               num_examples=n, seed=d.seed)


def _absl_flags_parsed() -> None:
    """Grain's worker pool reads Abseil flags, which raise ``UnparsedFlagAccessError`` in a
    program not started by ``absl.app`` (google/grain#1355): treat the defaults as parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _stack(examples):
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def make_dataset(cfg: Config, split: str, *, batch_size: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 task=None) -> grain.IterDataset:
    """Batches of this process's share of ``split``: each a dict of ``[batch/processes, seq_len]`` arrays.

    The train split is shuffled and repeated forever (reshuffled each epoch); the eval
    split is read once in order. Processes read disjoint examples (strided slicing).
    """
    task = task if task is not None else make_task(cfg, split)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    batch_size = batch_size or cfg.train.batch_size
    if batch_size % pc:
        raise ValueError(f"batch_size {batch_size} is not divisible by the process count {pc}")
    ds = grain.MapDataset.source(task)
    paths = cluster_path_transform(cfg)
    if paths is not None:  # (per example, before shuffling: a document's path never depends on its order)
        ds = ds.map(paths)
    if split == "train":
        if cfg.data.shuffle:
            ds = ds.shuffle(seed=cfg.data.seed)
        ds = ds.repeat(None)
    ds = ds[pi::pc]
    ds = ds.batch(batch_size // pc, drop_remainder=True, batch_fn=_stack)
    it = ds.to_iter_dataset()
    if cfg.data.worker_count > 0:
        _absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.worker_count))
    return it
