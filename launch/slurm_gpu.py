"""Train on SLURM GPU nodes: write an sbatch script and submit it.

One JAX process per node (it drives all the node's GPUs) or one per GPU (``--procs per-gpu``).
The script makes the first node of the allocation the coordinator
(``scontrol show hostnames $SLURM_JOB_NODELIST | sed -n 1p``), exports
``JAX_COORDINATOR_ADDRESS`` and ``JAX_NUM_PROCESSES``, and ``srun`` starts
``memjax-train ... --distributed`` once per task; each process takes its rank from
``SLURM_PROCID`` and, one per GPU, its GPU from ``SLURM_LOCALID`` (JAX's SLURM detection).
With one process per node, ``JAX_LOCAL_DEVICE_IDS`` lists all the node's GPUs (otherwise
JAX's SLURM detection would give the process only GPU ``SLURM_LOCALID = 0``).
``--signal-before`` asks SLURM for a SIGTERM ahead of the time limit: the train loop saves a
checkpoint and exits, and resubmitting the same script resumes.

    python launch/slurm_gpu.py --nodes 2 --gpus-per-node 8 --partition gpu --time 04:00:00 \\
        --setup "source ~/memjax/.venv/bin/activate" \\
        --config configs/mqar_tiny.py --workdir /shared/runs/mqar --set train.steps=2000 --dry-run

``--dry-run`` prints the script and the ``sbatch`` command, writes and runs nothing; otherwise
the script is written to ``--script`` (default ``<workdir>/memjax-<job-name>.sbatch``) and the
printed ``sbatch`` command is run. The workdir must be on a filesystem shared by all nodes.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/slurm_gpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    job = p.add_argument_group("allocation")
    job.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    job.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    job.add_argument("--procs", choices=("per-node", "per-gpu"), default="per-node",
                     help="one JAX process per node (default) or per GPU")
    job.add_argument("--cpus-per-task", type=int, default=0,
                     help="CPUs per process (default: SLURM's; set it, the data pipeline uses CPUs)")
    job.add_argument("--mem", default=None, help="memory per node, e.g. 200G (default: SLURM's)")
    job.add_argument("--partition", default=None, help="SLURM partition")
    job.add_argument("--account", default=None, help="SLURM account")
    job.add_argument("--qos", default=None, help="SLURM QOS")
    job.add_argument("--time", default="01:00:00", help="time limit HH:MM:SS (default 01:00:00)")
    job.add_argument("--job-name", default="memjax", help="job name (default memjax)")
    job.add_argument("--signal-before", type=int, default=120,
                     help="seconds before the time limit to send SIGTERM (checkpoint and exit; 0: none)")
    job.add_argument("--port", type=int, default=0,
                     help="coordinator port on the first node (0: 20000 + job id mod 20000)")
    job.add_argument("--chdir", default=ROOT, help="directory the job runs in (default: this checkout)")
    job.add_argument("--setup", action="append", default=[], metavar="SHELL",
                     help="shell line run before training, e.g. 'module load cuda' or "
                          "'source .venv/bin/activate' (repeatable)")
    job.add_argument("--script", default=None,
                     help="where to write the sbatch script (default <workdir>/memjax-<job-name>.sbatch)")
    run = p.add_argument_group("training")
    run.add_argument("--config", required=True, help="config file (relative to --chdir or absolute)")
    run.add_argument("--workdir", required=True, help="run directory on a filesystem shared by all nodes")
    run.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; run nothing")
    return p


def _check(args) -> None:
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.cpus_per_task < 0 or args.signal_before < 0 or not 0 <= args.port < 65536:
        raise ValueError("--cpus-per-task and --signal-before must be >= 0, --port in [0, 65535]")


def script_path(args) -> str:
    return args.script or os.path.join(args.workdir, f"memjax-{args.job_name}.sbatch")


def build_script(args) -> str:
    """The sbatch script text."""
    _check(args)
    per_gpu = args.procs == "per-gpu"
    tasks_per_node = args.gpus_per_node if per_gpu else 1
    sb = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks_per_node}",
          f"--gpus-per-node={args.gpus_per_node}", f"--time={args.time}",
          f"--output={os.path.join(args.workdir, 'slurm-%j.out')}", f"--chdir={args.chdir}"]
    if args.cpus_per_task:
        sb.append(f"--cpus-per-task={args.cpus_per_task}")
    for opt in ("mem", "partition", "account", "qos"):
        if getattr(args, opt):
            sb.append(f"--{opt}={getattr(args, opt)}")
    if args.signal_before:
        sb.append(f"--signal=TERM@{args.signal_before}")
    port = str(args.port) if args.port else "$((20000 + SLURM_JOB_ID % 20000))"
    train = ["memjax-train", "--config", args.config, "--workdir", args.workdir]
    if args.set:
        train += ["--set", *args.set]
    train.append("--distributed")
    lines = ["#!/bin/bash", *(f"#SBATCH {s}" for s in sb),
             "# Generated by launch/slurm_gpu.py.",
             "set -euo pipefail", *args.setup,
             f"mkdir -p {shlex.quote(args.workdir)}",
             "# The first node of the allocation runs the coordination service. (sed, not head:",
             "# head would exit early, scontrol get SIGPIPE, and pipefail + set -e end the job.)",
             'COORDINATOR_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
             f'export JAX_COORDINATOR_ADDRESS="$COORDINATOR_HOST:{port}"',
             f"export JAX_NUM_PROCESSES={args.nodes * tasks_per_node}"]
    if not per_gpu:
        lines.append(f"export JAX_LOCAL_DEVICE_IDS={','.join(map(str, range(args.gpus_per_node)))}")
    lines += ['echo "memjax: $JAX_NUM_PROCESSES processes, coordinator $JAX_COORDINATOR_ADDRESS"',
              "# Rank from SLURM_PROCID (and, one process per GPU, the GPU from SLURM_LOCALID).",
              "srun --kill-on-bad-exit=1 " + shlex.join(train)]
    return "\n".join(lines) + "\n"


def sbatch_command(args) -> str:
    return shlex.join(["sbatch", script_path(args)])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.workdir = os.path.abspath(args.workdir)  # relative to where you launch, not to --chdir
    try:
        script = build_script(args)
    except ValueError as e:
        parser.error(str(e))
    path, cmd = script_path(args), sbatch_command(args)
    if args.dry_run:
        print(f"# {path}")
        print(script)
        print(cmd)
        return 0
    os.makedirs(args.workdir, exist_ok=True)  # SLURM does not create the --output directory
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(script)
    print(f"wrote {path}\n+ {cmd}", flush=True)
    return subprocess.run(shlex.split(cmd)).returncode


if __name__ == "__main__":
    sys.exit(main())
