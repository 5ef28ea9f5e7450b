"""Run N ``memjax-train`` processes on this machine as one multi-process JAX job.

Each process (``python -m memjax.train.cli``, i.e. ``memjax-train`` with this interpreter) gets
``--local-device-count`` CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count``)
and joins a coordination service on ``127.0.0.1:<free port>`` run by process 0, so the job
sees ``N * local_device_count`` devices: the same code path as a multi-host TPU / GPU job
(per-process data slices, ``jax.make_array_from_process_local_data``, collective Orbax saves),
on one laptop.

    python launch/local.py --num-processes 2 --local-device-count 4 \\
        --config configs/mqar_tiny.py --workdir runs/mp --set train.steps=100

Process 0 prints to the terminal; process i > 0 writes ``<log-dir>/process_<i>.log``.
``--dry-run`` prints the commands (with their environment) and runs nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/local.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="configs/*.py file passed to memjax-train")
    p.add_argument("--workdir", required=True, help="shared workdir of all processes")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--num-processes", type=int, default=2, help="processes to start (default 2)")
    p.add_argument("--local-device-count", type=int, default=4,
                   help="CPU devices per process (default 4)")
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    p.add_argument("--log-dir", default=None, help="logs of processes 1..N-1 (default <workdir>/logs)")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs memjax.train.cli")
    p.add_argument("--timeout", type=float, default=0, help="kill the job after this many seconds (0: never)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit without running them")
    return p


def build_commands(args) -> list[tuple[dict, list[str]]]:
    """``[(env_overrides, argv)]`` for processes ``0..N-1``."""
    if args.num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.local_device_count < 1:
        raise ValueError(f"--local-device-count must be >= 1, got {args.local_device_count}")
    port = args.port or free_port()
    coordinator = f"127.0.0.1:{port}"
    env = {"JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.local_device_count}"}
    cmds = []
    for i in range(args.num_processes):
        argv = [args.python, "-m", "memjax.train.cli", "--config", args.config, "--workdir", args.workdir]
        if args.set:
            argv += ["--set", *args.set]
        argv += ["--coordinator", coordinator, "--num-processes", str(args.num_processes),
                 "--process-id", str(i), "--local-device-count", str(args.local_device_count)]
        cmds.append((dict(env), argv))
    return cmds


def format_command(env: dict, argv: list[str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(argv)


class Job:
    """The started processes of one local multi-process run."""

    def __init__(self, procs, log_dir: str, log_files):
        self.procs, self.log_dir, self._files = procs, log_dir, log_files

    def log_path(self, i: int) -> str:
        return os.path.join(self.log_dir, f"process_{i}.log")

    def wait(self, timeout: float = 0) -> list[int]:
        """Wait for every process; if one fails (or ``timeout`` s pass), stop the rest. Returns exit codes."""
        deadline = time.monotonic() + timeout if timeout > 0 else None
        try:
            while any(p.poll() is None for p in self.procs):
                failed = any(p.returncode not in (None, 0) for p in self.procs)
                late = deadline is not None and time.monotonic() > deadline
                if failed or late:
                    # A dead peer leaves the others blocked in a collective until JAX's
                    # heartbeat timeout (minutes): stop them now.
                    self.stop()
                    break
                time.sleep(0.1)
        finally:
            for f in self._files:
                f.close()
        return [p.wait() for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start(cmds, *, log_dir: str, log_first: bool = False) -> Job:
    """Start every command. Process 0 prints to this terminal unless ``log_first``; the others
    (and process 0 if ``log_first``) write ``<log_dir>/process_<i>.log``."""
    os.makedirs(log_dir, exist_ok=True)
    procs, files = [], []
    for i, (env_over, argv) in enumerate(cmds):
        out = None  # inherit: the user watches process 0
        if i > 0 or log_first:
            out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
            files.append(out)
        procs.append(subprocess.Popen(argv, env={**os.environ, **env_over}, stdout=out,
                                      stderr=subprocess.STDOUT if out else None))
    return Job(procs, log_dir, files)


def run(cmds, *, log_dir: str, timeout: float = 0) -> list[int]:
    """Start, wait, and print the end of the log of any process that failed. Returns exit codes."""
    job = start(cmds, log_dir=log_dir)
    codes = job.wait(timeout)
    for i, c in enumerate(codes):
        if c != 0 and i > 0:
            with open(job.log_path(i)) as f:
                tail = f.read()[-3000:]
            print(f"--- process {i} exited with {c}; end of {job.log_path(i)}:\n{tail}", file=sys.stderr)
    return codes


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cmds = build_commands(args)
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        for env, a in cmds:
            print(format_command(env, a))
        return 0
    codes = run(cmds, log_dir=args.log_dir or os.path.join(args.workdir, "logs"), timeout=args.timeout)
    return max((abs(c) for c in codes), default=0)


if __name__ == "__main__":
    sys.exit(main())
