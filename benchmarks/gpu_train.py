"""Training throughput and MFU of a full model config on one accelerator (or a mesh of them).

    python -m benchmarks.gpu_train [--config configs/hybrid_125m.py] [--set key=value ...]
        [--steps 20] [--warmup 3] [--batch B] [--seq T] [--peak-tflops 989] [--out DIR]
        [--smoke] [--compile-only] [--oom-retries 1] [--budget-s S] [--devices N]

What it does: builds the training step of ``memjax.train.loop.build(cfg)`` (the same jitted,
sharded AdamW step as ``memjax-train``), makes a few synthetic batches up front (cycled, already
on device), compiles (timed), runs ``--warmup`` steps, then ``--steps`` timed steps, blocking on
the whole train state after each so every time is one complete step. Reported: compile time,
median / mean / min step time, tokens/s, parameter counts, model FLOPs per token, achieved model
TFLOP/s and MFU = achieved / ``--peak-tflops`` (default 989: H100 SXM dense bf16), peak device
memory (``memory_stats()``; absent on CPU) and XLA's planned memory (``memory_analysis()``).
Writes ``<out>/gpu_train.json`` (``--out``, else ``$OUT`` when set, else benchmarks/results/):
first with the config, parameter and FLOP counts (``status: "running"``), again after compiling
and every 5 timed steps, so a run killed by an outer time limit still leaves its figures so far;
``status: "ok"`` once complete. ``--budget-s`` (seconds from start-up) ends the timed loop early
and skips an out-of-memory retry that could not finish in time.

Model FLOPs per token: ``memjax.train.flops.flops_per_token`` (re-exported here; its docstring
writes the formulas down: 6 N_matmul, attention, chunked delta rule and product-key terms,
forward + backward = 3 x forward).

MFU uses these model FLOPs (recomputation and padding are not counted as useful work). XLA's
own count (``cost_analysis``) is recorded as a cross-check only: it counts a loop body once.

``--smoke`` shrinks the model (d_model 64, 2 heads, vocab 256, seq 128, batch 2, 2 steps, a 16^2-slot
memory table, one sub-layer of each block type of the pattern) so the script runs in seconds on a
CPU; ``--set`` values apply after it (e.g. ``--set model.pattern=...`` for the full pattern).
On an out-of-memory error the step is rebuilt with twice the gradient-accumulation micro-batches
(``train.microbatches``; same tokens per step) up to ``--oom-retries`` times; each failure is
printed and recorded in the JSON (``status: "oom"`` if every attempt failed).
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    # JAX preallocates 75% of GPU memory by default; the step's peak may need more.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

import argparse
import gc
import math
import statistics
import time
import traceback

import jax
import numpy as np

from benchmarks.gpu_common import write_json
from benchmarks.runner import Table, memory_of
from memjax.config import apply_overrides, load_config, set_by_path, validate
from memjax.data.pipeline import make_dataset
from memjax.model.sharding import axis_rules
# The FLOP and parameter accounting lives in the library (memjax-compile's MFU estimate uses it too).
from memjax.train.flops import (delta_chunk_flops, flops_per_token, param_counts,  # noqa: F401
                                unit_lower_inverse_flops)
from memjax.train.loop import BATCH_KEYS, build, to_global

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "hybrid_125m.py")
RESULT_NAME = "gpu_train"

SMOKE_OVERRIDES = {
    "model.d_model": 64,
    "model.num_heads": 2,
    "model.vocab_size": 256,
    "model.mlp_hidden": 0,
    "model.max_seq_len": 128,
    "data.seq_len": 128,
    "train.batch_size": 2,
    "train.microbatches": 1,
}

# ----------------------------------------------------------------------------- helpers


def is_oom(err: BaseException) -> bool:
    msg = str(err)
    return any(s in msg for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))


def _fit_task_options(cfg) -> None:
    """MQAR needs ``seq_len >= 4 * num_kv_pairs - 1``: shrink the pair count for short sequences."""
    if cfg.data.task == "mqar":
        pairs = cfg.data.options.get("num_kv_pairs", 4)
        fit = max(1, (cfg.data.seq_len + 1) // 4)
        if pairs > fit:
            cfg.data.options["num_kv_pairs"] = fit


def make_config(args):
    path = args.config
    if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO, path)):
        path = os.path.join(REPO, path)  # configs/... given from outside the repository root
    cfg = load_config(path, [])
    if args.smoke:
        for k, v in SMOKE_OVERRIDES.items():
            set_by_path(cfg, k, v)
        for name, opts in (("memory_plus", {"n_keys": 16, "k_dim": 0}), ("pkm", {"n_keys": 16, "k_dim": 0})):
            if name in cfg.model.blocks:
                cfg.model.blocks[name] = {**cfg.model.blocks[name], **opts}
        # One sub-layer of each block type (first-appearance order): compiling all 25 takes ~20 s on a CPU.
        names = [s.strip() for s in cfg.model.pattern.split(",") if s.strip()]
        cfg.model.pattern = ",".join(dict.fromkeys(names))
        cfg.model.pattern_repeat = 1
        cfg.name = f"{cfg.name}_smoke"
    for item in args.set:
        apply_overrides(cfg, [item])
    if args.batch:
        cfg.train.batch_size = args.batch
        if args.batch % cfg.train.microbatches:  # e.g. --batch 1 with the config's 2 micro-batches
            cfg.train.microbatches = math.gcd(args.batch, cfg.train.microbatches)
    if args.seq:
        cfg.data.seq_len = args.seq
        cfg.model.max_seq_len = max(cfg.model.max_seq_len, args.seq)
    _fit_task_options(cfg)
    cfg.train.progress = False
    validate(cfg)
    return cfg


def host_batches(cfg, n: int) -> list[dict]:
    it = iter(make_dataset(cfg, "train"))
    return [{k: np.asarray(b[k]) for k in BATCH_KEYS} for b, _ in zip(it, range(n))]


def xla_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def device_memory() -> dict:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not implemented on every backend
        stats = None
    if not stats:
        return {}
    keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit", "largest_alloc_size")
    return {k: int(stats[k]) for k in keep if k in stats}


def _gib(x) -> str:
    return "n/a" if x is None else f"{x / 2 ** 30:.2f} GiB"


def init_state(setup, host: bool):
    """The initial train state, sharded as the train step expects.

    ``host``: compute it with the CPU backend and copy it over. On the H100 (JAX 0.11.2) XLA
    spent over 150 s compiling the jitted initialiser of the 125M model (a slow-compile alarm;
    the train step never got to compile inside a 330 s limit), against 10 s on a CPU.
    """
    if not host:
        state = setup.init_fn()
    else:
        cpu = jax.devices("cpu")[0]
        names = setup.mesh.axis_names  # same axis names, one CPU device: the logical rules still apply
        host_mesh = jax.sharding.Mesh(np.array([cpu]).reshape((1,) * len(names)), names)
        with jax.default_device(cpu), jax.set_mesh(host_mesh):
            state = jax.jit(setup.init_fn.__wrapped__)()
        state = jax.device_put(state, setup.state_shardings)
    return jax.block_until_ready(state)


# ----------------------------------------------------------------------------- one attempt


def run_once(cfg, args, devices, report=None, deadline=None) -> dict:
    """Build, compile and time ``cfg``; returns the measurements (raises on failure).

    ``report(measured)`` is called after compiling and every few timed steps (the caller writes
    the JSON, so a run killed by an outer time limit still leaves its figures so far);
    ``deadline`` (a ``time.perf_counter()`` value) ends the timed loop early, after >= 3 steps.
    """
    report = report or (lambda _: None)
    setup = build(cfg, devices=devices)
    out: dict = {}
    with jax.set_mesh(setup.mesh), axis_rules(cfg.mesh.rules):
        if args.compile_only:
            abs_state = jax.eval_shape(setup.init_fn)
            shp = (cfg.train.batch_size, cfg.data.seq_len)
            abs_batch = {k: jax.ShapeDtypeStruct(shp, np.float32 if k == "mask" else np.int32) for k in BATCH_KEYS}
            t0 = time.perf_counter()
            compiled = setup.train_step.lower(abs_state, abs_batch).compile()
            out["compile_s"] = time.perf_counter() - t0
            out["xla_memory"] = memory_of(compiled)
            out["xla_flops_per_step"] = xla_flops(compiled)
            return out
        n_batches = max(1, min(args.num_batches, args.steps))
        t0 = time.perf_counter()
        batches = [to_global(setup, b) for b in host_batches(cfg, n_batches)]
        jax.block_until_ready(batches)
        out["data_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        state = init_state(setup, host=args.host_init)
        out["init_s"] = time.perf_counter() - t0
        print(f"initialised in {out['init_s']:.1f} s ({'on the host CPU' if args.host_init else 'on device'})",
              flush=True)
        report(out)
        t0 = time.perf_counter()
        compiled = setup.train_step.lower(state, batches[0]).compile()
        out["compile_s"] = time.perf_counter() - t0
        out["xla_memory"] = memory_of(compiled)
        out["xla_flops_per_step"] = xla_flops(compiled)
        print(f"compiled in {out['compile_s']:.1f} s", flush=True)
        report(out)
        t0 = time.perf_counter()
        for i in range(args.warmup):
            state, metrics = compiled(state, batches[i % n_batches])
            jax.block_until_ready(state)
        out["warmup_s"] = time.perf_counter() - t0
        out["step_times_s"] = times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, batches[i % n_batches])
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
            if i % 5 == 4:
                report(out)
            if deadline is not None and len(times) >= 3 and time.perf_counter() + 2 * max(times) > deadline:
                print(f"--budget-s reached: stopping after {len(times)} timed steps", flush=True)
                break
        out["loss"] = float(metrics["loss"]) if args.warmup + len(times) else float("nan")
        out["bad_step"] = int(state["bad_step"])
        out["device_memory"] = device_memory()
        del state, batches, compiled
    return out


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--set", nargs="*", action="extend", default=[],
                    help="config overrides key.path=value (repeatable: every --set adds)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --smoke: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps after compiling (default 3; --smoke: 1)")
    ap.add_argument("--batch", type=int, default=0, help="override train.batch_size")
    ap.add_argument("--seq", type=int, default=0, help="override data.seq_len (and max_seq_len if needed)")
    ap.add_argument("--num-batches", type=int, default=4, help="distinct batches made up front and cycled")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 SXM dense bf16: 989)")
    ap.add_argument("--devices", type=int, default=0, help="use the first N devices (0: all; --smoke: 1)")
    ap.add_argument("--oom-retries", type=int, default=1, help="on OOM, retry with 2x train.microbatches this many times")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="wall-clock budget from start-up (0: none): no OOM retry that cannot fit, fewer timed steps")
    ap.add_argument("--compile-only", action="store_true", help="compile with abstract inputs; report XLA memory")
    ap.add_argument("--host-init", action=argparse.BooleanOptionalAction, default=None,
                    help="initialise the train state on the host CPU and copy it over (default: on a GPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny model that runs in seconds on a CPU")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else benchmarks/results)")
    args = ap.parse_args(argv)
    if args.host_init is None:
        args.host_init = jax.default_backend() == "gpu"
    if args.steps is None:
        args.steps = 2 if args.smoke else 20
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 3
    if args.devices == 0 and args.smoke:
        args.devices = 1
    for key in ("steps", "num_batches"):
        if getattr(args, key) <= 0:
            ap.error(f"--{key.replace('_', '-')} must be positive")
    if args.warmup < 0 or args.oom_retries < 0 or args.devices < 0 or args.budget_s < 0 or args.peak_tflops <= 0:
        ap.error("--warmup, --oom-retries, --devices, --budget-s must be >= 0 and --peak-tflops > 0")
    return args


def summarize(result: dict, measured: dict, peak_tflops: float) -> None:
    """Fill step time, tokens/s, TFLOP/s and MFU into ``result`` from the step times so far."""
    times = measured.get("step_times_s") or []
    if not times:
        return
    step_s = statistics.median(times)
    tokens_per_s = result["tokens_per_step"] / step_s
    achieved = result["flops_per_token"] * tokens_per_s
    result.update({
        "steps": len(times), "step_ms": 1e3 * step_s, "step_ms_mean": 1e3 * statistics.fmean(times),
        "step_ms_min": 1e3 * min(times), "step_times_ms": [1e3 * x for x in times],
        "tokens_per_s": tokens_per_s, "model_tflops_per_s": achieved / 1e12,
        "mfu": achieved / (peak_tflops * 1e12),
    })


def main(argv=None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    deadline = t_start + args.budget_s if args.budget_s else None
    out_dir = args.out or os.environ.get("OUT") or os.path.join(REPO, "benchmarks", "results")
    cfg = make_config(args)
    devices = jax.devices()[: args.devices] if args.devices else jax.devices()
    dev = devices[0]
    m, b, t = cfg.model, cfg.train.batch_size, cfg.data.seq_len
    params = param_counts(m)
    flops = flops_per_token(m, t, params["matmul"])
    print(f"config {cfg.name}: pattern {m.pattern!r} x{m.pattern_repeat}, d_model {m.d_model}, "
          f"{params['total']:,} params ({params['non_embedding']:,} without embedding and memory values, "
          f"{params['matmul']:,} in matmuls); batch {b} x seq {t} (train.microbatches "
          f"{cfg.train.microbatches}); {len(devices)} x {getattr(dev, 'device_kind', dev.platform)}; "
          f"model FLOPs/token {flops['total']:.4g}", flush=True)

    result = {
        "status": "running", "config": cfg.name, "config_file": args.config, "overrides": list(args.set),
        "smoke": args.smoke, "device_kind": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
        "num_devices": len(devices), "jax_version": jax.__version__,
        "batch": b, "seq": t, "tokens_per_step": b * t, "microbatches": cfg.train.microbatches,
        "compute_dtype": m.compute_dtype, "pattern": m.pattern, "params": params,
        "flops_per_token": flops["total"], "flops_breakdown": flops["terms"],
        "flops_formulas": flops["formulas"], "flops_uncounted_blocks": flops["uncounted_blocks"],
        "peak_tflops": args.peak_tflops, "warmup": args.warmup, "attempts": [],
    }
    _write(result, out_dir, quiet=True)

    def report(measured):  # partial results, in case an outer time limit kills the process
        for k in ("compile_s", "xla_memory", "xla_flops_per_step"):
            if k in measured:
                result[k] = measured[k]
        summarize(result, measured, args.peak_tflops)
        _write(result, out_dir, quiet=True)

    measured = None
    for attempt in range(args.oom_retries + 1):
        micro = cfg.train.microbatches
        result["microbatches"] = micro
        oom_msg = None
        t_attempt = time.perf_counter()
        try:
            measured = run_once(cfg, args, devices, report=report, deadline=deadline)
            result["attempts"].append({"microbatches": micro, "status": "ok"})
            break
        except Exception as err:  # noqa: BLE001 - reported, then re-raised unless it is an OOM
            msg = str(err).strip().splitlines()
            short = " ".join(msg[:3])[:2000] if msg else repr(err)
            oom = is_oom(err)
            result["attempts"].append({"microbatches": micro, "status": "oom" if oom else "error", "error": short})
            result["device_memory"] = device_memory()
            if not oom:
                result["status"] = "error"
                result["traceback"] = traceback.format_exc()[-6000:]
                _write(result, out_dir)
                raise
            oom_msg = short
        # Out of memory. The failed attempt's arrays die with the exception (left behind above).
        spent = time.perf_counter() - t_attempt
        print(f"\nOUT OF MEMORY at batch {b} x seq {t} with train.microbatches={micro} after {spent:.0f} s: "
              f"{oom_msg[:500]}", flush=True)
        gc.collect()
        jax.clear_caches()
        nxt = micro * 2
        if attempt == args.oom_retries or b % nxt:
            break
        if deadline is not None and time.perf_counter() + 1.5 * spent > deadline:
            print(f"no retry: it would not fit in --budget-s {args.budget_s:g}", flush=True)
            break
        cfg.train.microbatches = nxt
        print(f"retrying with train.microbatches={nxt} (same {b * t} tokens per step)", flush=True)
    if measured is None:
        result["status"] = "oom"
        _write(result, out_dir)
        print("every attempt ran out of memory: lower --batch or raise train.microbatches "
              "(--set train.microbatches=4)", flush=True)
        return result

    result["status"] = "ok"
    for k in ("compile_s", "xla_memory", "xla_flops_per_step"):
        result[k] = measured[k]
    row = {"config": cfg.name, "device": result["device_kind"], "batch": b, "seq": t,
           "micro": cfg.train.microbatches, "compile_s": measured["compile_s"]}
    if not args.compile_only:
        summarize(result, measured, args.peak_tflops)
        result.update({"loss": measured["loss"], "nonfinite_step": measured["bad_step"],
                       "device_memory": measured["device_memory"], "data_s": measured["data_s"],
                       "warmup_s": measured["warmup_s"]})
        if len(result["attempts"]) > 1:
            result["device_memory_note"] = "peak_bytes_in_use includes the failed (out-of-memory) attempts"
        peak = measured["device_memory"].get("peak_bytes_in_use")
        row.update({"step_ms": result["step_ms"], "tokens_per_s": result["tokens_per_s"],
                    "model_TFLOPs": result["model_tflops_per_s"], "mfu": result["mfu"],
                    "peak_mem_GiB": None if peak is None else peak / 2 ** 30})
        print(f"peak device memory: {_gib(peak)} (limit {_gib(measured['device_memory'].get('bytes_limit'))})",
              flush=True)
    xm = measured["xla_memory"]
    if xm:
        print(f"XLA plan: temporaries {_gib(xm.get('temp_bytes'))}, arguments {_gib(xm.get('argument_bytes'))}, "
              f"outputs {_gib(xm.get('output_bytes'))}", flush=True)
    terms = ", ".join(f"{k} {v:.4g}" for k, v in flops["terms"].items())
    print(f"model FLOPs/token {flops['total']:.4g} = {terms}", flush=True)
    columns = ["config", "device", "batch", "seq", "micro", "compile_s"]
    if not args.compile_only:
        columns += ["step_ms", "tokens_per_s", "model_TFLOPs", "mfu", "peak_mem_GiB"]
    result["wall_s"] = time.perf_counter() - t_start
    table = Table(RESULT_NAME, columns, out_dir=out_dir)
    table.add(row)
    table.finish(extra=result)
    result["path"] = os.path.join(out_dir, f"{RESULT_NAME}.json")
    return result


def _write(result: dict, out_dir: str, quiet: bool = False) -> None:
    write_json(RESULT_NAME, result, out_dir, quiet=quiet)


if __name__ == "__main__":
    main()
