"""Metric writers: stdout, a JSONL file and TensorBoard event files (process 0 only)."""
from __future__ import annotations

import json
import os
import sys

import jax


def drop_steps_after(path: str, step: int) -> int:
    """Rewrite the JSONL file ``path`` without the lines of steps after ``step``; returns how many
    lines were dropped (a resumed run replays those steps and logs them again)."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by a kill
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return len(lines) - len(keep)


class MetricWriter:
    """``resume_step``: the step a resumed run restarts from; logged steps after it are dropped
    from ``metrics.jsonl`` and TensorBoard discards its events after it (``purge_step``)."""

    def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None:
            drop_steps_after(path, resume_step)
        self._jsonl = open(path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: dict, *, prefix: str = "", echo: bool = True) -> None:
        if not self.enabled:
            return
        scalars = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        if echo:
            body = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            print(f"[step {int(step)}] {body}", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
