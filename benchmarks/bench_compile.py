"""Compile time of a config's train step against depth, with and without scanned layers.

    python -m benchmarks.bench_compile [--config configs/hybrid_125m.py] [--repeats 1 2]
        [--set ...] [--batch 1] [--seq 256]

For every ``pattern_repeat`` in ``--repeats`` and ``model.scan_layers`` in (True, False) it builds
the train step ``memjax-train`` would run (``memjax.train.loop.build``, one device), lowers it on
abstract inputs (nothing is allocated: ``jax.eval_shape`` of the initialiser) and times
``lower`` and ``compile`` separately, and counts the optimised HLO's lines (independent of the
machine's load; wall times on a shared machine are not). The batch and length are shrunk (``--batch``, ``--seq``)
because compile time does not depend on them but XLA:CPU's buffer planning for a 2048-token step
of a 125M model would need tens of GiB. Writes ``benchmarks/results/compile_time.json``.
"""
from __future__ import annotations

import argparse
import time

import jax

from benchmarks.runner import Table
from memjax.config import load_config
from memjax.model.lm import block_names
from memjax.train.loop import build


def compile_time(cfg) -> dict:
    setup = build(cfg, devices=jax.devices()[:1])
    abs_state = jax.eval_shape(setup.init_fn)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    abs_batch = {k: jax.ShapeDtypeStruct((b, t), jax.numpy.float32 if k == "mask" else jax.numpy.int32,
                                         sharding=setup.batch_sharding)
                 for k in ("inputs", "targets", "mask", "segment_ids")}
    with jax.set_mesh(setup.mesh):
        t0 = time.perf_counter()
        lowered = setup.train_step.lower(abs_state, abs_batch)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    # The optimised HLO's size does not depend on the machine's load: the deterministic witness that
    # a scanned body is compiled once whatever the depth.
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0,
            "hlo_lines": compiled.as_text().count("\n")}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/hybrid_125m.py")
    ap.add_argument("--repeats", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--name", default="compile_time")
    ap.add_argument("--no-unscanned", action="store_true", help="skip the scan_layers=False rows")
    args = ap.parse_args(argv)
    table = Table(args.name, ["config", "pattern_repeat", "layers", "scan_layers", "lower_s", "compile_s", "total_s",
                              "vs_first", "hlo_lines"])
    first = {}
    for scan in (True,) if args.no_unscanned else (True, False):
        for r in args.repeats:
            overrides = [f"model.pattern_repeat={r}", f"model.scan_layers={scan}", f"train.batch_size={args.batch}",
                         "train.microbatches=1", f"data.seq_len={args.seq}", *args.set]
            cfg = load_config(args.config, overrides)
            res = compile_time(cfg)
            first.setdefault(scan, res["total_s"])
            table.add({"config": args.config, "pattern_repeat": r, "layers": len(block_names(cfg.model)),
                       "scan_layers": scan, **res, "vs_first": res["total_s"] / first[scan]})
    table.finish({"argv": argv, "batch": args.batch, "seq": args.seq})


if __name__ == "__main__":
    main()
