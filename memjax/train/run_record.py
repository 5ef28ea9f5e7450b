"""A run's record in its workdir: the config it was trained with, checked before a resume or an eval.

``<workdir>/config.json`` is written when a run starts from scratch. A later run in the same
workdir (a resume, ``memjax-eval``) compares its config with it, key by key, before anything is
built or written: any difference in what shapes the parameters, the optimizer or the data order
refuses the run with the list of differing keys. Differences that cannot change the trained
state (``RESUME_FREE``: logging / eval / checkpoint intervals, the mesh, ``stop_at_step``) pass.
An intended change (``train.steps`` to extend a run, ``optim.*`` for a new schedule) is passed
with ``--allow-changed KEY`` (a key or a section prefix such as ``optim``); the record is then
updated and the change appended to ``config_changes.jsonl`` with the step it took effect at.
A refused run writes nothing.
"""
from __future__ import annotations

import json
import os
from typing import Any

from memjax.config import Config, ConfigError

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"

# Keys (or prefixes ending in ".") that never change what a resumed run computes.
RESUME_FREE = (
    "name", "mesh.", "train.stop_at_step", "train.progress", "train.log_every", "train.eval_every",
    "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpointing",
    "train.target_accuracy", "train.inject_nan_at_step", "data.worker_count", "data.num_eval_examples",
)


class RunMismatch(ConfigError):
    """The config differs from the one the workdir's run was trained with."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.d_model": 64, "model.blocks.attention.window": 8, ...}`` of a nested dict."""
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _matches(key: str, patterns) -> bool:
    return any(key == p or key.startswith(p if p.endswith(".") else p + ".") for p in patterns)


def saved_config(workdir: str) -> dict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def differences(saved: dict, cfg: Config) -> dict[str, tuple]:
    """``{key: (saved value, current value)}`` for every key outside ``RESUME_FREE`` that differs."""
    old, new = flatten(saved), flatten(json.loads(cfg.to_json()))
    keys = sorted(set(old) | set(new))
    missing = "<absent>"
    return {k: (old.get(k, missing), new.get(k, missing)) for k in keys
            if not _matches(k, RESUME_FREE) and old.get(k, missing) != new.get(k, missing)}


def check_same_run(cfg: Config, workdir: str, *, allow_changed=(), what: str = "resume") -> dict[str, tuple]:
    """Raise :class:`RunMismatch` unless ``cfg`` trains what ``workdir``'s saved config trained
    (differences listed in ``allow_changed`` pass); returns the allowed differences."""
    saved = saved_config(workdir)
    if saved is None:
        return {}
    diff = differences(saved, cfg)
    refused = {k: v for k, v in diff.items() if not _matches(k, allow_changed)}
    if refused:
        lines = [f"  {k}: trained with {a!r}, now {b!r}" for k, (a, b) in refused.items()]
        raise RunMismatch(
            f"{what} refused: the config differs from the one {os.path.join(workdir, CONFIG_FILE)} was trained "
            f"with in {len(refused)} key(s):\n" + "\n".join(lines)
            + "\n  Use that config (the file above), another --workdir, or --allow-changed KEY for an intended "
              "change (e.g. train.steps to extend the run, optim for a new schedule).")
    return diff


def record(cfg: Config, workdir: str, *, step: int, changes: dict[str, tuple]) -> None:
    """Write ``config.json`` (a fresh run, or a resume with allowed changes) and log the changes."""
    os.makedirs(workdir, exist_ok=True)
    if changes:
        with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
            f.write(json.dumps({"step": step, "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(cfg.to_json())
