"""Hierarchical memory bank: fetch / write-back throughput from TensorStore vs the step time.

    python -m benchmarks.hierarchical_memory                  # bank of 8+64+512 blocks per table
    python -m benchmarks.hierarchical_memory --quick          # smaller, 3 steps
    python -m benchmarks.hierarchical_memory --root gs://bucket/bank   # the same code on a bucket

Model: the loop's LM with pattern ``A,HM`` (one attention block, one hierarchical-memory FFN
block: two host tables ``w1 [num_blocks, D, H]`` and ``w2 [num_blocks, H, D]``), trained by
:func:`memjax.train.loop.run_steps` on MQAR with cluster paths attached. Per step the loop
(1) plans and fetches the rows of the batch's cluster paths with their Adam moments
(``HostTables.fetch``), (2) runs the jitted train step, (3) writes the updated rows and moments
back (``HostTables.write``). Each is timed separately over ``--steps`` steps after one warm-up
step (compilation); medians. ``rows/step``: distinct blocks the batch needs (per table);
``fetch MB/s``: bytes of rows + moments read per second (3 arrays x 2 tables), ``write MB/s``
likewise; ``fetch/step``: how much of a device step one fetch costs (>= 1 means the bank is the
bottleneck unless fetching is overlapped with the previous step, which the loop does not do yet).

Writes ``benchmarks/results/hierarchical_memory[_quick].json`` (or into ``--out-dir``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np

from benchmarks.runner import Table
from memjax.config import Config
from memjax.data.pipeline import make_dataset
from memjax.train.loop import build, open_host_tables, to_global

COLUMNS = ["blocks", "row_KiB", "batch", "rows/step", "fetch_ms", "write_ms", "step_ms", "fetch_rows/s",
           "fetch_MB/s", "write_MB/s", "fetch/step"]


def make_config(*, d_model: int, block_hidden: int, branching: int, depth: int, batch: int, seq_len: int) -> Config:
    cfg = Config(name="hierarchical_memory_bench")
    m = cfg.model
    m.vocab_size, m.d_model, m.num_heads, m.pattern = 128, d_model, 2, "A,HM"
    m.blocks = {"hierarchical_memory": {"depth": depth, "branching": branching, "block_hidden": block_hidden,
                                        "fetch_rows": batch * depth}}
    cfg.data.seq_len, cfg.data.options = seq_len, {"num_kv_pairs": 4}
    cfg.data.cluster_paths = {"depth": depth, "branching": branching}
    cfg.data.num_train_examples = 4096
    cfg.train.batch_size, cfg.train.steps, cfg.train.progress = batch, 1000, False
    cfg.optim.warmup_steps = 0
    return cfg


def measure(setup, state, batches) -> tuple[dict, object]:
    """Median fetch / step / write times (s) of ``run_steps``'s three parts over ``batches`` (the
    first is a warm-up), and the final state."""
    tables = setup.host
    times = {"fetch": [], "step": [], "write": [], "rows": []}
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        host, plans = tables.fetch(batch)
        t1 = time.perf_counter()
        with jax.set_mesh(setup.mesh):
            state, _, new = setup.train_step(state, to_global(setup, batch), host)
            new = jax.block_until_ready(new)
        t2 = time.perf_counter()
        tables.write(plans, new)
        t3 = time.perf_counter()
        if i:  # (the first step compiles)
            times["fetch"].append(t1 - t0)
            times["step"].append(t2 - t1)
            times["write"].append(t3 - t2)
            times["rows"].append(len(plans[0].unique))
    return {k: statistics.median(v) for k, v in times.items()}, state


def row_bytes(setup) -> int:
    """Bytes fetched per row id: every table of every host module, value + 2 moments (float32)."""
    return sum(3 * 4 * int(np.prod(s.row_shape)) for m in setup.host_modules for s in m.tables.values())


def run_case(cfg: Config, steps: int, root: str) -> dict:
    setup = build(cfg, devices=jax.devices()[:1])
    open_host_tables(setup, root, fresh=True)
    with jax.set_mesh(setup.mesh):
        state = setup.init_fn()
    it = iter(make_dataset(cfg, "train"))
    t, _ = measure(setup, state, [next(it) for _ in range(steps + 1)])
    return summarize(setup, cfg, t)


def summarize(setup, cfg: Config, t: dict) -> dict:
    spec = setup.host_modules[0].tables["w1"]
    per_row = row_bytes(setup)
    rows = t["rows"]
    return {"blocks": spec.num_rows, "row_KiB": 4 * int(np.prod(spec.row_shape)) / 1024, "batch": cfg.train.batch_size,
            "rows/step": rows, "fetch_ms": 1e3 * t["fetch"], "write_ms": 1e3 * t["write"], "step_ms": 1e3 * t["step"],
            "fetch_rows/s": rows / t["fetch"], "fetch_MB/s": rows * per_row / t["fetch"] / 1e6,
            "write_MB/s": rows * per_row / t["write"] / 1e6, "fetch/step": t["fetch"] / t["step"]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="d_model 32, depth 2, 3 steps")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--root", default=None, help="bank directory or gs:// URL (default: a temporary directory)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)
    if args.quick:
        cases = [{"d_model": 32, "block_hidden": 8, "branching": 4, "depth": 2, "batch": 8, "seq_len": 32}]
    else:
        cases = [{"d_model": 64, "block_hidden": 16, "branching": 8, "depth": 3, "batch": 16, "seq_len": 64},
                 {"d_model": 128, "block_hidden": 32, "branching": 8, "depth": 3, "batch": 16, "seq_len": 64}]
    print(" | ".join(COLUMNS))
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run_case(make_config(**case), steps, args.root or tmp))
            print(" | ".join(str(rows[-1][c]) for c in COLUMNS), flush=True)
    report(rows, quick=args.quick, out_dir=args.out_dir,
           root=args.root or "local temporary directory (zarr, file driver)", steps=steps)
    return rows


def report(rows: list[dict], *, quick: bool, out_dir: str | None, root: str, steps: int) -> str:
    """Print the Markdown table and write the JSON (``benchmarks/results`` unless ``out_dir``)."""
    table = Table("hierarchical_memory_quick" if quick else "hierarchical_memory", COLUMNS, out_dir=out_dir)
    table.rows = list(rows)
    return table.finish({"what": "median per-step times of HostTables.fetch (rows + Adam moments from TensorStore), "
                                 "the jitted train step and HostTables.write, pattern A,HM; MB/s over value+mu+nu of "
                                 "both tables", "root": root, "steps": steps})


if __name__ == "__main__":
    main()
