"""Input-pipeline throughput with 0, 1, 2 Grain worker processes (``data.worker_count``).

    python -m benchmarks.bench_pipeline --quick

Times the loop's own train iterator (:func:`memjax.data.pipeline.make_dataset`) on two
tasks at opposite ends of per-example cost: MQAR (numpy generation of a 64-token
example, cheap) and byte-level text over the Python standard library sources
(:mod:`memjax.data.text_stdlib`: file reads and packing of 256-token windows, heavier).
``first_batch_s`` is the time to the first batch (worker start-up included); the rates
are over the following batches. ``--step-ms`` makes the consumer hold each batch that
long (sleeping, like a training step running on an accelerator) to show whether workers
overlap input production with compute; 0 measures the bare pipeline.
Writes ``benchmarks/results/pipeline.json`` (``pipeline_quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import time

from benchmarks.runner import Table
from memjax.config import Config, validate
from memjax.data.pipeline import make_dataset
from memjax.data.text_stdlib import stdlib_options


def task_config(task: str, batch_size: int) -> Config:
    cfg = Config(name=f"bench_pipeline_{task}")
    if task == "mqar":
        cfg.model.vocab_size = 256
        cfg.data.seq_len = 64
        cfg.data.options = {"num_kv_pairs": 4}
    elif task == "text":
        cfg.model.vocab_size = 264
        cfg.model.max_seq_len = 256
        cfg.data.task = "text"
        cfg.data.seq_len = 256
        cfg.data.options = stdlib_options()
        cfg.data.num_train_examples = 0
    else:
        raise ValueError(f"task must be 'mqar' or 'text', got {task!r}")
    cfg.train.batch_size = batch_size
    return cfg


def measure(cfg: Config, workers: int, num_batches: int, step_ms: float = 0.0) -> dict:
    cfg.data.worker_count = workers
    validate(cfg)
    t0 = time.perf_counter()
    it = iter(make_dataset(cfg, "train", process_index=0, process_count=1))
    next(it)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
        if step_ms:
            time.sleep(step_ms / 1e3)
    dt = time.perf_counter() - t1
    del it  # stops the worker processes
    return {"first_batch_s": first, "seconds": dt, "batches_per_s": num_batches / dt,
            "examples_per_s": num_batches * cfg.train.batch_size / dt}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer batches (results are noisier)")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--tasks", default="mqar,text")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--step-ms", default="0", help="comma-separated simulated step times per batch")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = ap.parse_args(argv)
    batches = {"mqar": 100 if args.quick else 1000, "text": 30 if args.quick else 300}
    table = Table("pipeline_quick" if args.quick else "pipeline",
                  ["task", "workers", "step_ms", "batch", "first_batch_s", "batches_per_s", "examples_per_s"])
    for task in args.tasks.split(","):
        for step_ms in (float(s) for s in args.step_ms.split(",")):
            for w in (int(x) for x in args.workers.split(",")):
                cfg = task_config(task, args.batch_size)
                n = batches[task] if not step_ms else max(10, batches[task] // 3)
                r = measure(cfg, w, n, step_ms)
                table.add({"task": task, "workers": w, "step_ms": step_ms, "batch": args.batch_size,
                           "seq_len": cfg.data.seq_len, "num_batches": n, **r})
    table.finish({"quick": args.quick, "note": args.note})


if __name__ == "__main__":
    main()
