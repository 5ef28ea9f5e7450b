"""Command-line entry points: ``memjax-train`` and ``memjax-eval``."""
from __future__ import annotations

import argparse
import json
import sys

from memjax.config import ConfigError, load_config
from memjax.train.distributed import add_arguments as add_distributed_arguments
from memjax.train.distributed import initialize_from_args as initialize_distributed


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--config", required=True, help="a configs/*.py file defining get_config()")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and logs go here; rerun to resume")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. --set train.steps=200 model.d_model=64")
    add_distributed_arguments(p)  # --distributed, --coordinator, --num-processes, --process-id
    return p


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
    from memjax.train.loop import NonFiniteLossError, train_and_evaluate

    try:
        final = train_and_evaluate(cfg, args.workdir)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
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
    args = p.parse_args(argv)
    cfg = _load(args)
    if args.needle_grid:
        from memjax.train.needle import needle_grid_with_step, save_needle_grid

        try:
            results, step = needle_grid_with_step(cfg, args.workdir, args.lengths, args.depths)
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            sys.exit(2)
        json_path, png_path = save_needle_grid(results, args.workdir, step=step)
        for (n, d), acc in sorted(results.items()):
            print(f"length {n:>6} depth {d:<5g} key_accuracy {acc:.4f}")
        print(f"wrote {json_path} and {png_path}")
        return
    from memjax.train.evaluate import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(cfg, args.workdir), indent=2))


if __name__ == "__main__":
    train_main()
