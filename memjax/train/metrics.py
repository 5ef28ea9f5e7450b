"""Metric writers: stdout, a JSONL file and TensorBoard event files (process 0 only)."""
from __future__ import annotations

import json
import os
import sys

import jax


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
