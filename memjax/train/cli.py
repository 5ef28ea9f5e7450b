"""Command-line entry points: ``memjax-train``, ``memjax-eval`` and ``memjax-compile``."""
from __future__ import annotations

import argparse
import json
import os
import sys

from memjax.config import ConfigError, load_config
from memjax.train import compile as plan_lib
from memjax.train.checkpoint import CheckpointError, CheckpointMismatch
from memjax.train.distributed import add_arguments as add_distributed_arguments
from memjax.train.distributed import initialize_from_args as initialize_distributed
from memjax.train.evaluate import evaluate_checkpoint
from memjax.train.loop import NonFiniteLossError, train_and_evaluate
from memjax.train.needle import needle_grid_with_step, save_needle_grid


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--config", required=True, help="a configs/*.py file defining get_config()")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and logs go here; rerun to resume")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --set train.steps=200 model.d_model=64")
    p.add_argument("--allow-changed", nargs="*", default=[], metavar="KEY",
                   help="config keys (or sections, e.g. optim) allowed to differ from the workdir's saved "
                        "config.json when resuming or evaluating, e.g. --allow-changed train.steps")
    add_distributed_arguments(p)  # --distributed, --coordinator, --num-processes, --process-id
    return p


def _fail(kind: str, e: Exception, code: int = 2):
    print(f"{kind}: {e}", file=sys.stderr)
    sys.exit(code)


def _load(args):
    try:
        initialize_distributed(args)  # no-op unless a multi-process flag or JAX_* variable is set
    except ValueError as e:
        print(f"distributed setup error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        return load_config(args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)


def train_main(argv=None) -> None:
    args = _parser("memjax-train").parse_args(argv)
    cfg = _load(args)
    try:
        final = train_and_evaluate(cfg, args.workdir, allow_changed=tuple(args.allow_changed))
    except ConfigError as e:
        _fail("config error", e)
    except (CheckpointError, CheckpointMismatch) as e:
        _fail("checkpoint error", e)
    except OSError as e:  # e.g. a data file removed or unreadable mid-run (the message names it)
        _fail("error", e)
    except NonFiniteLossError as e:
        _fail("error", e, 3)
    if "accuracy" in final:
        print(f"final eval (step {final['step']}): accuracy={final['accuracy']:.4f} loss={final['loss']:.4f}")
        print(json.dumps(final))


def _numbers(kind):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None

    return parse


def eval_main(argv=None) -> None:
    p = _parser("memjax-eval")
    p.add_argument("--needle-grid", action="store_true",
                   help="passkey checkpoints: accuracy by context length x needle depth instead of the "
                        "standard eval; writes needle.json and needle_heatmap.png into the workdir")
    p.add_argument("--lengths", type=_numbers(int), default=None,
                   help="needle grid context lengths, e.g. 256,512,1024 (default: 1x,2x,4x data.seq_len)")
    p.add_argument("--depths", type=_numbers(float), default=None,
                   help="needle grid depths in [0, 1], e.g. 0,0.5,1 (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write the results here instead of into the workdir (which eval only reads)")
    args = p.parse_args(argv)
    cfg = _load(args)
    if args.needle_grid:
        try:
            results, step = needle_grid_with_step(cfg, args.workdir, args.lengths, args.depths)
        except ConfigError as e:
            _fail("config error", e)
        except (CheckpointError, CheckpointMismatch) as e:
            _fail("error", e)
        json_path, png_path = save_needle_grid(results, args.out or args.workdir, step=step)
        for (n, d), acc in sorted(results.items()):
            print(f"length {n:>6} depth {d:<5g} key_accuracy {acc:.4f}")
        print(f"wrote {json_path} and {png_path}")
        return
    try:
        metrics = evaluate_checkpoint(cfg, args.workdir, out_dir=args.out, allow_changed=tuple(args.allow_changed))
    except ConfigError as e:
        _fail("config error", e)
    except (CheckpointError, CheckpointMismatch, PermissionError) as e:
        _fail("error", e)
    print(json.dumps(metrics, indent=2))


def compile_main(argv=None) -> None:
    """``memjax-compile``: compile the train step for a TPU slice on this host (libtpu, no TPU).

    Prints memory per device against HBM, XLA's FLOPs / bytes / time estimate and the estimated
    MFU (``memjax.train.compile``); ``--json PATH`` also writes them. Exit status: 0 fits, 1 does
    not fit (with what to change), 2 configuration error or libtpu missing.
    """
    p = argparse.ArgumentParser(prog="memjax-compile", description=compile_main.__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a configs/*.py file defining get_config()")
    p.add_argument("--topology", required=True,
                   help="TPU slice: an accelerator name (v5p-8, v4-32, v5e-256, v6e-64; v4/v5p count "
                        "TensorCores, 2 per chip) or a topology (v5p:2x2x1, v5e:16x16, v4:2x2x4)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --set train.batch_size=64 mesh.fsdp=4")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON here")
    p.add_argument("--no-loop-correction", action="store_true",
                   help="report XLA's cost as compiled (loop bodies counted once) and skip the extra compiles "
                        "that count scanned layer groups")
    args = p.parse_args(argv)
    # Compile-only: this process runs nothing, so it uses the CPU backend (libtpu would otherwise
    # look for local TPU chips). Read when JAX creates its backends.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        topology = plan_lib.parse_topology(args.topology)
    except ValueError as e:
        print(f"topology error: {e}", file=sys.stderr)
        sys.exit(2)
    if not plan_lib.has_libtpu():
        print(plan_lib.MISSING_LIBTPU, file=sys.stderr)
        sys.exit(2)
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        plan = plan_lib.compile_plan(cfg, topology.name, loop_correction=not args.no_loop_correction)
    except plan_lib.MissingLibtpuError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    print(plan_lib.format_plan(plan))
    if args.json:
        plan_lib.write_json(plan, args.json)
        print(f"wrote {args.json}")
    if not plan["fits"]:
        print(plan_lib.advice(plan), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    train_main()
