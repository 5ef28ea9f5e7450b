"""Train on a Cloud TPU VM (single host or pod slice): create/reuse, install, run on every worker.

Every worker of a pod slice runs the same ``memjax-train ... --distributed`` command
(``gcloud compute tpus tpu-vm ssh --worker=all``); ``jax.distributed.initialize()`` finds
the other workers through the TPU metadata, each worker reads its own slice of the data,
and all of them take part in every checkpoint save. Steps, each one shell command:

0. ``memjax-compile --config ... --topology ACCELERATOR_TYPE --set ...`` here, before any VM
   exists: the exact train step compiled for the slice (needs libtpu on this machine,
   ``pip install -e ".[tpu]"``); a plan that does not fit in HBM stops the launch with what to
   change (``--skip-plan`` skips this step);
1. ``gcloud compute tpus tpu-vm describe NAME || gcloud compute tpus tpu-vm create NAME ...``
   (reuse the VM if it exists; ``--no-create`` only checks that it exists);
2. install memjax on all workers: ``git clone`` of ``--repo`` at ``--ref`` (``--source git``),
   or a tarball of this checkout copied with ``tpu-vm scp`` (``--source copy``); then
   ``uv pip install -e ".[tpu]"`` into ``~/memjax-venv`` (Python 3.11: TPU VM images ship
   3.10, memjax needs 3.11; ``--skip-install`` skips step 2);
3. ``memjax-train --config ... --workdir ... --set ... --distributed`` on all workers;
4. ``gcloud compute tpus tpu-vm delete`` if ``--delete-after``.

The workdir must be one directory visible to all workers (an NFS / Filestore mount, or a
bucket mounted with gcsfuse): Orbax writes every host's shards under the same path and
the primary host finalizes the checkpoint.

    python launch/tpu_pod.py --name my-pod --zone us-central2-b --accelerator-type v4-16 \\
        --repo https://github.com/ORG/memjax.git --config configs/mqar_tiny.py \\
        --workdir /mnt/shared/runs/mqar --set train.steps=2000 --dry-run

``--dry-run`` prints exactly the shell commands (one per line) and runs nothing; without
it the same lines are run one after the other with ``bash -c``, stopping at the first failure.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Default TPU VM software versions by accelerator generation (override with --version).
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

SRC_EXCLUDES = (".git", ".venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/tpu_pod.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    vm = p.add_argument_group("TPU VM")
    vm.add_argument("--name", required=True, help="TPU VM name")
    vm.add_argument("--zone", required=True, help="e.g. us-central2-b")
    vm.add_argument("--project", default=None, help="GCP project (default: gcloud's configured one)")
    vm.add_argument("--accelerator-type", default="v4-8",
                    help="e.g. v4-8 (one host), v4-32 (pod slice), v5litepod-16 (default v4-8)")
    vm.add_argument("--version", default=None,
                    help="TPU software version (default by generation: "
                         + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
    vm.add_argument("--spot", action="store_true", help="create a Spot VM (preemptible; SIGTERM saves a checkpoint)")
    vm.add_argument("--no-create", action="store_true", help="only reuse an existing VM; fail if it is missing")
    vm.add_argument("--delete-after", action="store_true", help="delete the VM after training succeeds")
    src = p.add_argument_group("code on the workers")
    src.add_argument("--source", choices=("git", "copy"), default="git",
                     help="git: clone --repo at --ref on every worker; copy: scp a tarball of this checkout")
    src.add_argument("--repo", default=None, help="git URL of memjax (required with --source git)")
    src.add_argument("--ref", default="main", help="branch or tag to check out (default main)")
    src.add_argument("--local-dir", default=ROOT, help="checkout to copy with --source copy (default: this one)")
    src.add_argument("--remote-dir", default="memjax", help="directory on each worker, relative to $HOME")
    src.add_argument("--venv", default="memjax-venv",
                     help="virtual environment on each worker, relative to $HOME (default memjax-venv)")
    src.add_argument("--python-version", default="3.11", help="Python of that environment (default 3.11)")
    src.add_argument("--skip-install", action="store_true",
                     help="the workers already have memjax installed in --venv")
    run = p.add_argument_group("training")
    run.add_argument("--config", required=True, help="config file, relative to the repository root")
    run.add_argument("--workdir", required=True, help="run directory shared by all workers")
    run.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    run.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="environment variable for the training processes (repeatable)")
    run.add_argument("--skip-plan", action="store_true",
                     help="do not compile the step for the slice with memjax-compile before launching")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit without running them")
    return p


def runtime_version(accelerator_type: str) -> str:
    gen = accelerator_type.rsplit("-", 1)[0]
    if gen not in RUNTIME_VERSIONS:
        raise ValueError(f"--accelerator-type {accelerator_type!r}: unknown generation {gen!r}; "
                         f"pass --version (known: {', '.join(RUNTIME_VERSIONS)})")
    return RUNTIME_VERSIONS[gen]


def _gcloud(args, *words: str, worker_all: bool = False) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", *words, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    if worker_all:
        cmd.append("--worker=all")
    return cmd


def _ssh_all(args, remote: str) -> str:
    return shlex.join(_gcloud(args, "ssh", args.name, worker_all=True)) + " --command=" + shlex.quote(remote)


def build_commands(args) -> list[str]:
    """The shell command lines, in order."""
    for kv in args.env:
        if "=" not in kv:
            raise ValueError(f"--env {kv!r} is not of the form KEY=VALUE")
    if args.source == "git" and not args.skip_install and not args.repo:
        raise ValueError("--repo is required with --source git (or use --source copy / --skip-install)")
    lines = []
    if not args.skip_plan:
        plan = ["memjax-compile", "--config", args.config, "--topology", args.accelerator_type]
        lines.append(shlex.join(plan + (["--set", *args.set] if args.set else [])))
    describe = shlex.join(_gcloud(args, "describe", args.name)) + " >/dev/null"
    if args.no_create:
        lines.append(describe)
    else:
        create = _gcloud(args, "create", args.name) + [
            f"--accelerator-type={args.accelerator_type}",
            f"--version={args.version or runtime_version(args.accelerator_type)}"]
        if args.spot:
            create.append("--spot")
        lines.append(f"{describe} 2>&1 || {shlex.join(create)}")

    rdir, venv = shlex.quote(args.remote_dir), '"$HOME"/' + shlex.quote(args.venv)
    # TPU VM images ship Python 3.10 and memjax needs >= 3.11: uv fetches an interpreter.
    install = (
        'export PATH="$HOME/.local/bin:$PATH"; '
        "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; "
        f"[ -x {venv}/bin/python ] || uv venv -q --python {shlex.quote(args.python_version)} {venv}; "
        f'uv pip install -q --python {venv}/bin/python -e "./{args.remote_dir}[tpu]"')
    if not args.skip_install:
        if args.source == "git":
            repo, ref = shlex.quote(args.repo), shlex.quote(args.ref)
            lines.append(_ssh_all(args, (
                f"set -e; if [ -d {rdir}/.git ]; then "
                f"git -C {rdir} fetch -q --depth 1 origin {ref} && git -C {rdir} checkout -q FETCH_HEAD; "
                f"else git clone -q --depth 1 --branch {ref} {repo} {rdir}; fi; {install}")))
        else:
            tarball = f"/tmp/memjax-src-{args.name}.tgz"
            excludes = [f"--exclude={e}" for e in SRC_EXCLUDES]
            lines.append(shlex.join(["tar", "czf", tarball, *excludes, "-C", args.local_dir, "."]))
            lines.append(shlex.join(_gcloud(args, "scp", tarball, f"{args.name}:memjax-src.tgz",
                                            worker_all=True)))
            lines.append(_ssh_all(args, (
                f"set -e; rm -rf {rdir} && mkdir -p {rdir} && tar xzf memjax-src.tgz -C {rdir}; {install}")))

    train = ["memjax-train", "--config", args.config, "--workdir", args.workdir]
    if args.set:
        train += ["--set", *args.set]
    train.append("--distributed")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (kv.split("=", 1) for kv in args.env))
    lines.append(_ssh_all(args, (
        f"cd {rdir} && source {venv}/bin/activate && "
        + (f"{env} " if env else "") + shlex.join(train))))
    if args.delete_after:
        lines.append(shlex.join(_gcloud(args, "delete", args.name) + ["--quiet"]))
    return lines


def run_lines(lines: list[str]) -> int:
    for line in lines:
        print(f"+ {line}", flush=True)
        rc = subprocess.run(["bash", "-c", line]).returncode
        if rc != 0:
            print(f"command failed with exit code {rc}: {line}", file=sys.stderr)
            return rc
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        lines = build_commands(args)
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        print("\n".join(lines))
        return 0
    return run_lines(lines)


if __name__ == "__main__":
    sys.exit(main())
