"""Multi-process start-up: one call before anything touches a JAX device.

Every process of a multi-host job (TPU pod slice, SLURM GPU nodes, or N local CPU
processes for testing) runs the same program and calls :func:`maybe_initialize` first.
Explicit arguments win over the environment::

    coordinator     JAX_COORDINATOR_ADDRESS   "host:port" of process 0's coordination service
    num_processes   JAX_NUM_PROCESSES         total number of processes
    process_id      JAX_PROCESS_ID            this process's rank in [0, num_processes)

Whatever is still unset is left to ``jax.distributed.initialize()``, which detects SLURM
(``SLURM_*`` variables), Cloud TPU VMs (metadata server), Open MPI and Kubernetes by itself.
With nothing set and ``auto=False`` this is a no-op, so single-process runs are unchanged.

CPU processes talk through Gloo (``jax_cpu_collectives_implementation``, the default of
jax 0.10's CPU backend); if it was switched off (``"none"``) we switch it back on, since
without it cross-process collectives on CPU fail. An explicit ``"mpi"`` is kept.
"""
from __future__ import annotations

import os

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None) -> dict:
    """The ``jax.distributed.initialize`` arguments from the arguments, else the environment.

    Returns ``{"coordinator_address", "num_processes", "process_id"}`` (values may be None:
    JAX's cluster auto-detection fills them). Raises ``ValueError`` naming the argument for
    a malformed address, a non-positive ``num_processes`` or a ``process_id`` out of range.
    """
    coordinator = coordinator if coordinator is not None else (os.environ.get(ENV_COORDINATOR) or None)
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator is not None:
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"coordinator must be 'host:port', got {coordinator!r}")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None:
        if process_id < 0:
            raise ValueError(f"process_id must be >= 0, got {process_id}")
        if num_processes is not None and process_id >= num_processes:
            raise ValueError(f"process_id must be < num_processes ({num_processes}), got {process_id}")
    return {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}


def set_local_device_count(n: int) -> None:
    """Give this process ``n`` CPU devices (``--xla_force_host_platform_device_count``).

    Must run before JAX creates its backends; only the CPU platform is affected.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"local_device_count must be a positive int, got {n!r}")
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as e:  # JAX raises once a backend exists
        raise RuntimeError(
            "local_device_count must be set before JAX initializes its backends "
            "(call maybe_initialize() before any jax.devices() / array creation)") from e
    # Also in XLA_FLAGS, so subprocesses this one starts (Grain workers) agree.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, local_device_count: int | None = None,
                     *, auto: bool = False) -> bool:
    """Initialize ``jax.distributed`` when this process is part of a multi-process job.

    Args:
      coordinator: ``"host:port"`` of process 0 (else ``$JAX_COORDINATOR_ADDRESS``).
      num_processes: world size (else ``$JAX_NUM_PROCESSES``).
      process_id: this process's rank (else ``$JAX_PROCESS_ID``).
      local_device_count: if set, the number of CPU devices this process exposes
        (for simulating several hosts on one machine; ignored by GPU / TPU backends).
      auto: initialize even when none of the above is set, leaving everything to JAX's
        cluster auto-detection (SLURM, Cloud TPU, MPI, Kubernetes): what ``--distributed`` does.

    Returns True if ``jax.distributed.initialize`` was called by this function, False if
    there was nothing to do (single process) or it was already initialized.
    """
    if local_device_count is not None:
        set_local_device_count(local_device_count)
    args = resolve(coordinator, num_processes, process_id)
    explicit = any(v is not None for v in args.values())
    if not (explicit or auto):
        return False
    import jax

    if jax.distributed.is_initialized():
        return False
    if args["num_processes"] == 1 and args["coordinator_address"] is None:
        return False  # a world of one needs no coordination service
    if (jax.config.jax_cpu_collectives_implementation or "none") == "none":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**{k: v for k, v in args.items() if v is not None})
    return True


def add_arguments(parser) -> None:
    """The multi-process flags shared by ``memjax-train`` / ``memjax-eval``."""
    g = parser.add_argument_group("multi-process (see memjax.train.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize(); unset values come from the environment "
                        "or JAX's SLURM / Cloud TPU / MPI auto-detection")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"process 0's coordination service (default ${ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None,
                   help=f"number of processes (default ${ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None,
                   help=f"this process's rank (default ${ENV_PROCESS_ID})")
    g.add_argument("--local-device-count", type=int, default=None,
                   help="CPU devices in this process (simulating hosts on one machine)")


def initialize_from_args(args) -> bool:
    """:func:`maybe_initialize` from the flags added by :func:`add_arguments`."""
    return maybe_initialize(args.coordinator, args.num_processes, args.process_id,
                            args.local_device_count, auto=args.distributed)
