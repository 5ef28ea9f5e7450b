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


def eval_main(argv=None) -> None:
    args = _parser("memjax-eval").parse_args(argv)
    cfg = _load(args)
    from memjax.train.evaluate import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(cfg, args.workdir), indent=2))


if __name__ == "__main__":
    train_main()
