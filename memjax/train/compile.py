"""Compile the real train step for a Cloud TPU slice on any host: memory, FLOPs, time, MFU.

    memjax-compile --config configs/hybrid_125m.py --topology v5p-8 [--set k=v ...] [--json PATH]

With ``libtpu`` installed (``pip install -e '.[tpu]'``) JAX can describe a TPU slice without
having one: ``jax.experimental.topologies.get_topology_desc`` returns *compile-only* TPU devices
(nothing can run on them). :func:`compile_plan` builds the train step ``memjax-train`` would run
(:func:`memjax.train.loop.build`: same mesh, shardings, optimizer, micro-batching) over a mesh of
those devices, lowers it on abstract inputs (``jax.eval_shape`` of the initialiser: nothing is
allocated) and compiles it with the TPU compiler. From the compiled program:

* memory per device (``compiled.memory_analysis()``): XLA's peak of arguments + outputs
  - donated (aliased) buffers + temporaries, plus the program's code; the parameter and
  optimizer-state parts are counted from the state's shardings (per-device shard shape x
  itemsize). It is compared with the chip's HBM (:data:`HBM_BYTES_PER_CHIP`). The TPU compiler
  itself refuses a program that cannot fit; that is reported the same way (``fits: false``).
* FLOPs and bytes accessed per step (``compiled.cost_analysis()``). For an SPMD-partitioned
  program these are **per device**: the cost of the one partitioned program every device runs
  (checked in tests/test_compile.py: 4-way data parallelism gives ~1/4 of the 1-device count).
* estimated step time: the TPU compiler's own estimate (the ``optimal_seconds`` key of
  ``cost_analysis()``) when present and positive (it is negative for programs with ops it cannot
  time, e.g. the memory layers' scatter-add); otherwise a roofline ``max(flops / peak, bytes /
  HBM bandwidth)`` per device, and the output says which (``details.time_source``).
* model FLOPs per step: :func:`memjax.train.flops.flops_per_token` x tokens per step (6 N D plus
  the attention, delta-rule and memory terms; recomputation not counted), and estimated MFU =
  model FLOPs / (estimated seconds x devices x peak per device).

XLA's cost analysis counts the body of a loop once. The train step loops over
gradient-accumulation micro-batches (``train.microbatches > 1``) and over the layer groups of
scanned layers (``model.scan_layers`` with ``model.pattern_repeat > 1``), so the figures above are
corrected to count every iteration (:func:`_loop_free_cost`: x micro-batches; for scanned layers
two small unscanned compiles extrapolated to the full depth); ``details.xla_cost_as_compiled``
keeps XLA's own numbers and ``details.cost_source`` says what was done.

Slices: accelerator names as Google Cloud spells them (``v4-32``, ``v5p-8``, ``v5p-128``,
``v5e-256``, ``v6e-64``: for v4 / v5p the number counts TensorCores, two per chip, so v5p-8 is 4
chips; for v5e / v6e it counts chips) or topologies (``v5p:4x4x4``, ``v5e:16x16``, ``v4:2x2x4``).
One JAX device per chip: v4 and v5p chips are compiled as "megacore" (both TensorCores as one
device, as on the real slices); v5e and v6e chips have one TensorCore.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from memjax.config import Config, ConfigError
from memjax.model.sharding import MESH_AXES, axis_rules, mesh_shape
from memjax.train.flops import flops_per_token, param_counts
from memjax.train.loop import BATCH_KEYS, build

MISSING_LIBTPU = "memjax-compile needs libtpu: pip install -e '.[tpu]'"

GiB = 2 ** 30

# Per-chip figures from Google Cloud's TPU system-architecture pages
# (https://cloud.google.com/tpu/docs/v4, .../v5e, .../v5p, .../v6e): HBM capacity, peak dense
# bf16 FLOP/s and HBM bandwidth of one chip.
HBM_BYTES_PER_CHIP = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
PEAK_BF16_FLOPS_PER_CHIP = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
HBM_BANDWIDTH_PER_CHIP = {"v4": 1.2e12, "v5e": 0.82e12, "v5p": 2.76e12, "v6e": 1.64e12}

# Torus dimensions of a slice's topology, and TensorCores per chip (v4 / v5p accelerator names
# count cores). The libtpu chip config "megacore" makes one JAX device of a chip's two cores.
_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
_CHIP_CONFIG = {"v4": "megacore", "v5p": "megacore", "v5e": "default", "v6e": "default"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
# Chips per host that libtpu assumes when none are given; smaller slices pass their own shape.
_DEFAULT_HOST_BOUNDS = (2, 2, 1)
# Slice shapes of the 2D generations (v5e / v6e) by chip count, as Google Cloud offers them.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}

RESULT_KEYS = ("topology", "devices", "memory_per_device_bytes", "hbm_per_device_bytes", "flops_per_step",
               "bytes_accessed_per_step", "estimated_step_seconds", "model_flops_per_step", "estimated_mfu")


class MissingLibtpuError(RuntimeError):
    """libtpu (the TPU compiler) is not installed."""

    def __init__(self):
        super().__init__(MISSING_LIBTPU)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: ``generation`` (v4, v5e, v5p, v6e), ``shape`` (chips along each torus axis)."""

    name: str  # as the user gave it
    generation: str
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def devices(self) -> int:
        """JAX devices: one per chip (megacore on v4 / v5p)."""
        return self.chips

    @property
    def topology_string(self) -> str:
        """The name libtpu's ``get_topology_desc`` takes, e.g. ``"v5p:2x2x1"``."""
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def accelerator_type(self) -> str:
        """The Google Cloud accelerator name, e.g. ``"v5p-8"`` (cores on v4 / v5p, chips on v5e / v6e)."""
        return f"{self.generation}-{self.chips * _CORES_PER_CHIP[self.generation]}"

    @property
    def chip_config(self) -> str:
        return _CHIP_CONFIG[self.generation]

    @property
    def hbm_per_device_bytes(self) -> int:
        return HBM_BYTES_PER_CHIP[self.generation]

    @property
    def peak_flops_per_device(self) -> float:
        return PEAK_BF16_FLOPS_PER_CHIP[self.generation]

    @property
    def hbm_bandwidth_per_device(self) -> float:
        return HBM_BANDWIDTH_PER_CHIP[self.generation]


def _generation(text: str, given: str) -> str:
    gen = _ALIASES.get(text.lower(), text.lower())
    if gen not in _DIMS:
        known = ", ".join(sorted(_DIMS))
        raise ValueError(f"unknown TPU generation {text!r} in {given!r}: expected one of {known} "
                         f"(e.g. v5p-8, v5e-256, v5p:2x2x1, v5e:16x16)")
    return gen


def _shape_for(gen: str, chips: int, given: str) -> tuple[int, ...]:
    """The standard slice shape of ``chips`` chips of generation ``gen``."""
    if _DIMS[gen] == 2:
        if chips in _SHAPES_2D:
            return _SHAPES_2D[chips]
    elif chips == 4:
        return (2, 2, 1)
    elif chips >= 8 and chips & (chips - 1) == 0:
        e = chips.bit_length() - 1  # chips = 2**e: exponents as equal as possible, ascending
        exps = [e // 3] * 3
        for i in range(e % 3):
            exps[2 - i] += 1
        return tuple(2 ** x for x in exps)
    example = "v5e:4x8" if _DIMS[gen] == 2 else "v5p:2x2x3"
    raise ValueError(f"{given!r}: no standard {gen} slice has {chips} chips; give the topology instead, "
                     f"e.g. {example}")


def parse_topology(name: str) -> Topology:
    """``"v5p-8"`` / ``"v5p:2x2x1"`` -> :class:`Topology` (needs no libtpu).

    Accelerator names: for v4 / v5p the number counts TensorCores (2 per chip: v5p-8 = 4 chips),
    for v5e / v6e chips (``v5litepod-`` is accepted for v5e). Topologies: ``<generation>:AxBxC``
    (v4, v5p) or ``<generation>:AxB`` (v5e, v6e).
    """
    text = name.strip()
    m = re.fullmatch(r"([A-Za-z0-9]+)-(\d+)", text)
    if m:
        gen = _generation(m.group(1), name)
        count = int(m.group(2))
        cores = _CORES_PER_CHIP[gen]
        if count <= 0 or count % cores:
            raise ValueError(f"{name!r}: {gen} accelerator names count TensorCores ({cores} per chip), "
                             f"so the number must be a positive multiple of {cores}")
        return Topology(name, gen, _shape_for(gen, count // cores, name))
    m = re.fullmatch(r"([A-Za-z0-9]+):(\d+(?:x\d+)*)", text)
    if m:
        gen = _generation(m.group(1), name)
        shape = tuple(int(x) for x in m.group(2).split("x"))
        if len(shape) != _DIMS[gen] or min(shape) <= 0:
            want = "AxBxC" if _DIMS[gen] == 3 else "AxB"
            raise ValueError(f"{name!r}: a {gen} topology has {_DIMS[gen]} positive dimensions ({gen}:{want})")
        return Topology(name, gen, shape)
    raise ValueError(f"cannot read TPU topology {name!r}: expected an accelerator name such as v5p-8, v4-32, "
                     f"v5e-256, v6e-64 or a topology such as v5p:2x2x1, v5e:16x16, v4:2x2x4")


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def prepare_libtpu_environment(topology: Topology) -> None:
    """Environment libtpu reads when it loads, for compiling without TPU hardware (set only where unset).

    ``ALLOW_MULTIPLE_LIBTPU_LOAD=1``: without it the first process that loads libtpu holds
    ``/tmp/libtpu_lockfile`` and every other one fails ("Internal error when accessing libtpu
    multi-process lockfile") although compiling needs no chip. ``TPU_ACCELERATOR_TYPE`` and
    ``TPU_WORKER_HOSTNAMES``: libtpu otherwise looks for the TPU VM's metadata and logs errors.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def topology_devices(name: str | Topology) -> list:
    """Compile-only JAX devices of a TPU slice (one per chip), e.g. 4 for ``"v5p-8"``.

    Raises :class:`MissingLibtpuError` without libtpu and ``ValueError`` for a name it cannot read.
    """
    topo = name if isinstance(name, Topology) else parse_topology(name)
    if not has_libtpu():
        raise MissingLibtpuError()
    prepare_libtpu_environment(topo)
    from jax.experimental import topologies  # noqa: PLC0415 - after the libtpu environment is set

    kwargs = {"chip_config_name": topo.chip_config}
    shape3 = tuple(topo.shape) + (1,) * (3 - len(topo.shape))
    if any(s % b for s, b in zip(shape3, _DEFAULT_HOST_BOUNDS)):  # smaller than one default host
        kwargs["chips_per_host_bounds"] = tuple(min(s, b) for s, b in zip(shape3, _DEFAULT_HOST_BOUNDS))
    devices = list(topologies.get_topology_desc(topo.topology_string, "tpu", **kwargs).devices)
    if len(devices) != topo.devices:
        raise RuntimeError(f"libtpu described {topo.topology_string} with {len(devices)} devices, expected "
                           f"{topo.devices} (one per chip)")
    return devices


# ----------------------------------------------------------------------------- the plan


def fit_mesh_to_devices(cfg, num_devices: int, topology_name: str) -> None:
    """Make ``cfg.mesh`` fit ``num_devices``: a mesh of product 1 (a one-device config) becomes
    ``mesh.data = num_devices``; ``-1`` takes the remaining devices as usual; any other mesh must
    multiply to the device count (``ConfigError`` naming the topology's count otherwise)."""

    sizes = {a: getattr(cfg.mesh, a) for a in MESH_AXES}
    if all(s == 1 for s in sizes.values()):
        cfg.mesh.data = num_devices
        return
    try:
        mesh_shape(cfg.mesh, num_devices)
    except ConfigError as e:
        raise ConfigError(f"topology {topology_name} has {num_devices} devices (one per chip): {e}") from None


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = tuple(sharding.shard_shape(shape))
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _xla_cost(compiled) -> dict:
    """``{"flops", "bytes", "seconds", "raw"}`` from ``compiled.cost_analysis()`` (per device).

    ``seconds`` is the TPU compiler's estimate (``optimal_seconds``), None when absent or not
    positive (it is negative for programs with ops it cannot time, e.g. the memory layers'
    scatter-add); ``raw`` keeps the scalar entries (not the per-operand ``...{}`` ones).
    """
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        ca = None
    if isinstance(ca, (list, tuple)):  # older JAX: one dict per program
        ca = ca[0] if ca else None
    ca = dict(ca or {})
    raw = {k: float(v) for k, v in ca.items() if "{" not in k}
    seconds = raw.get("optimal_seconds")
    return {"flops": raw.get("flops"), "bytes": raw.get("bytes accessed"),
            "seconds": seconds if seconds is not None and seconds > 0 else None, "raw": raw}


_SIZE_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": GiB, "T": 2 ** 40}


def _parse_hbm_oom(message: str) -> tuple[int | None, int | None]:
    """``(needed, available)`` bytes per device from the TPU compiler's out-of-memory message:
    "Ran out of memory on HBM, the total memory required for HLO temporaries (168.03G) exceeds
    available HBM (95.74G)" (binary units) or the older "Used 168.03G of 95.74G hbm"."""
    size = r"([\d.]+)\s*([KMGT]?)i?B?"
    for pattern in (rf"required for [^(]*\({size}\)\s*exceeds available HBM\s*\({size}\)",
                    rf"Used\s+{size}\s+of\s+{size}\s+hbm"):
        m = re.search(pattern, message, re.IGNORECASE)
        if m:
            val = lambda x, u: int(float(x) * _SIZE_UNITS[u.upper()])  # noqa: E731
            return val(m.group(1), m.group(2)), val(m.group(3), m.group(4))
    return None, None


def _compile_step(cfg, devices) -> dict:
    """Build ``cfg``'s train step over ``devices`` and compile it on abstract inputs.

    Returns ``{"setup", "abs_state", "abs_batch", "compiled" (None if the compiler ran out of
    HBM), "error", "lower_s", "compile_s"}``.
    """
    setup = build(cfg, devices=devices)
    b, t = cfg.train.batch_size, cfg.data.seq_len
    with jax.set_mesh(setup.mesh), axis_rules(cfg.mesh.rules):
        abs_state = jax.eval_shape(setup.init_fn)
        abs_batch = {k: jax.ShapeDtypeStruct((b, t), jnp.float32 if k == "mask" else jnp.int32,
                                             sharding=setup.batch_sharding) for k in BATCH_KEYS}
        t0 = time.perf_counter()
        lowered = setup.train_step.lower(abs_state, abs_batch)
        t1 = time.perf_counter()
        compiled, error = None, None
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - the TPU compiler refuses a program that cannot fit
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            error = str(e)
        t2 = time.perf_counter()
    return {"setup": setup, "abs_state": abs_state, "abs_batch": abs_batch, "compiled": compiled, "error": error,
            "lower_s": t1 - t0, "compile_s": t2 - t1}


def _loop_free_cost(cfg, devices, cost: dict, scanned: bool) -> tuple[dict, str]:
    """The step's cost with every loop iteration counted, from ``cost`` (XLA's, loop bodies once).

    * micro-batches (``train.microbatches = m > 1``): the loop body is the whole forward and
      backward pass of one micro-batch, so the step costs about ``m x`` XLA's count (the optimizer
      update after the loop is counted ``m`` times too: a small overcount).
    * scanned layers (``R = model.pattern_repeat`` groups in one scan): the same step with
      unscanned layers, one micro-batch, is compiled for ``R = 1`` and ``R = 2``; the cost is
      linear in ``R`` (identical groups), so ``c(R) = c(1) + (R - 1) (c(2) - c(1))``, times ``m``.
      These two small compiles replace unrolling all ``R`` groups.
    Returns ``(cost, how)``; ``cost`` has ``flops``, ``bytes``, ``seconds`` (None where unknown).
    """
    micro = cfg.train.microbatches
    keys = ("flops", "bytes", "seconds")
    if not scanned:
        if micro == 1:
            return {k: cost[k] for k in keys}, "as compiled (no loops)"
        return ({k: None if cost[k] is None else micro * cost[k] for k in keys},
                f"XLA's count x train.microbatches={micro} (XLA counts the micro-batch loop's body once)")
    variants = []
    for r in (1, 2):
        c = Config.from_dict(cfg.to_dict())
        c.model.scan_layers, c.model.pattern_repeat = False, r
        c.train.batch_size, c.train.microbatches = cfg.train.batch_size // micro, 1
        step = _compile_step(c, devices)
        if step["compiled"] is None:
            raise RuntimeError(step["error"])
        variants.append(_xla_cost(step["compiled"]))
    reps = cfg.model.pattern_repeat
    out = {}
    for k in keys:
        c1, c2 = variants[0][k], variants[1][k]
        out[k] = None if c1 is None or c2 is None else micro * (c1 + (reps - 1) * (c2 - c1))
    how = (f"scanned layers: unscanned steps of 1 and 2 layer groups compiled, extrapolated linearly to "
           f"model.pattern_repeat={reps}" + (f", x train.microbatches={micro}" if micro > 1 else ""))
    return out, how


def compile_plan(cfg, topology: str, loop_correction: bool = True) -> dict:
    """Compile ``cfg``'s train step for ``topology`` (e.g. ``"v5p-8"``) and report what it needs.

    Returns a dict with the keys :data:`RESULT_KEYS`, plus ``fits`` (memory per device <= HBM),
    ``breakdown`` (bytes per device: parameters, optimizer state, other state, batch from the
    state's shardings; arguments, outputs, aliased, temporaries, generated code, XLA's peak from
    ``memory_analysis()``) and ``details`` (mesh, device kind, peaks, how the cost and time were
    obtained, XLA's uncorrected cost, compile times, model FLOP terms).

    Per device: ``memory_per_device_bytes``, ``flops_per_step``, ``bytes_accessed_per_step``
    (XLA's cost analysis of the partitioned program), ``estimated_step_seconds``. For the whole
    slice: ``model_flops_per_step``. ``loop_correction``: count every iteration of the
    micro-batch loop and of scanned layers (:func:`_loop_free_cost`; for scanned layers two more
    small compiles); False reports XLA's counts as they are (loop bodies once). ``cfg`` is
    modified (its mesh fitted to the slice, see :func:`fit_mesh_to_devices`).
    """
    topo = parse_topology(topology)
    devices = topology_devices(topo)

    fit_mesh_to_devices(cfg, len(devices), topology)
    n = len(devices)
    b, t = cfg.train.batch_size, cfg.data.seq_len

    step = _compile_step(cfg, devices)
    setup, abs_state, compiled = step["setup"], step["abs_state"], step["compiled"]
    params = param_counts(cfg.model)
    model_flops = flops_per_token(cfg.model, t, params["matmul"], backend="tpu")
    model_flops_per_step = model_flops["total"] * b * t
    scanned = "stack" in abs_state["params"]  # memjax.model.lm.LM: scanned layer groups live in `stack`

    breakdown = {
        "parameters": _shard_bytes(abs_state["params"]),
        "optimizer_state": _shard_bytes(abs_state["opt_state"]),
        "other_state": _shard_bytes({k: v for k, v in abs_state.items() if k not in ("params", "opt_state")}),
        "batch": _shard_bytes(step["abs_batch"]),
    }
    details = {
        "config": cfg.name, "accelerator_type": topo.accelerator_type, "topology_string": topo.topology_string,
        "chips": topo.chips, "device_kind": devices[0].device_kind,
        "mesh": dict(setup.mesh.shape), "batch": b, "seq_len": t, "microbatches": cfg.train.microbatches,
        "scanned_layers": scanned, "pattern_repeat": cfg.model.pattern_repeat,
        "tokens_per_step": b * t, "peak_flops_per_device": topo.peak_flops_per_device,
        "hbm_bandwidth_per_device": topo.hbm_bandwidth_per_device,
        "params": params["total"], "matmul_params": params["matmul"],
        "model_flops_per_token": model_flops["total"], "model_flops_terms": model_flops["terms"],
        "lower_s": step["lower_s"], "compile_s": step["compile_s"], "jax_version": jax.__version__,
    }
    hbm = topo.hbm_per_device_bytes
    result = {"topology": topology, "devices": n, "memory_per_device_bytes": None, "hbm_per_device_bytes": hbm,
              "flops_per_step": None, "bytes_accessed_per_step": None, "estimated_step_seconds": None,
              "model_flops_per_step": model_flops_per_step, "estimated_mfu": None, "fits": False,
              "breakdown": breakdown, "details": details}

    if compiled is None:  # the TPU compiler's own verdict: out of HBM
        needed, available = _parse_hbm_oom(step["error"])
        lines = [ln.strip() for ln in step["error"].strip().splitlines() if ln.strip()]
        details["compile_error"] = " ".join(lines[:4])[:2000]
        details["time_source"] = "none (the compiler ran out of HBM)"
        if available:
            details["compiler_hbm_bytes"] = available
        if needed is None:  # at least the state it would hold
            needed = breakdown["parameters"] + breakdown["optimizer_state"] + breakdown["other_state"]
            details["memory_is_lower_bound"] = True
        result["memory_per_device_bytes"] = needed
        breakdown.update(arguments=None, outputs=None, aliased=None, temporaries=None, generated_code=None,
                         xla_peak=None)
        return result

    ma = compiled.memory_analysis()
    arg, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
    code = int(getattr(ma, "generated_code_size_in_bytes", 0) or 0)
    peak = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)
    memory = max(peak, arg + out - alias + temp) + code
    breakdown.update(arguments=arg, outputs=out, aliased=alias, temporaries=temp, generated_code=code,
                     xla_peak=peak)

    xla = _xla_cost(compiled)
    details["xla_cost_as_compiled"] = xla["raw"]
    cost, how = {k: xla[k] for k in ("flops", "bytes", "seconds")}, "XLA's count as compiled (loop bodies once)"
    if loop_correction:
        try:
            cost, how = _loop_free_cost(cfg, devices, xla, scanned)
        except Exception as e:  # noqa: BLE001 - keep XLA's own figures, say why
            how = f"XLA's count as compiled (loop bodies once): the loop correction failed ({str(e)[:300]})"
    details["cost_source"] = how
    roofline = max((cost["flops"] or 0.0) / topo.peak_flops_per_device,
                   (cost["bytes"] or 0.0) / topo.hbm_bandwidth_per_device) or None
    details["roofline_seconds"] = roofline
    if cost["seconds"]:
        est = cost["seconds"]
        details["time_source"] = "the TPU compiler's estimate (cost_analysis()['optimal_seconds'])"
    else:
        est = roofline
        why = ("absent" if "optimal_seconds" not in xla["raw"]
               else f"unusable: {xla['raw']['optimal_seconds']:.4g}")
        details["time_source"] = (f"roofline max(flops / peak bf16 FLOP/s, bytes accessed / HBM bandwidth) per "
                                  f"device: XLA's time estimate (optimal_seconds) is {why}")
    result.update(memory_per_device_bytes=memory, flops_per_step=cost["flops"], bytes_accessed_per_step=cost["bytes"],
                  estimated_step_seconds=est, fits=memory <= hbm,
                  estimated_mfu=model_flops_per_step / (est * n * topo.peak_flops_per_device) if est else None)
    return result


# ----------------------------------------------------------------------------- output


def _bytes(x) -> str:
    """Bytes in binary units: ``"10.30 GiB"``, ``"512.0 MiB"``."""
    if x is None:
        return "n/a"
    for unit, size in (("TiB", 2 ** 40), ("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{int(x)} B"


def _num(x, fmt="{:.4g}") -> str:
    return "n/a" if x is None else fmt.format(x)


def format_plan(plan: dict) -> str:
    """The plan as plain aligned lines (the ``memjax-compile`` table)."""
    d, bd = plan["details"], plan["breakdown"]
    mesh = " x ".join(f"{k} {v}" for k, v in d["mesh"].items())
    est = plan["estimated_step_seconds"]
    rows = [
        ("config", d["config"]),
        ("topology", f"{plan['topology']} ({d['topology_string']}, {d['device_kind']}, {plan['devices']} devices)"),
        ("mesh", mesh),
        ("batch", f"{d['batch']} x {d['seq_len']} tokens, train.microbatches {d['microbatches']}"),
        ("compile", f"lower {d['lower_s']:.1f} s, compile {d['compile_s']:.1f} s"),
        ("memory / device", f"{_bytes(plan['memory_per_device_bytes'])} of {_bytes(plan['hbm_per_device_bytes'])} HBM"
                            f" ({'fits' if plan['fits'] else 'DOES NOT FIT'})"),
        ("  parameters", _bytes(bd["parameters"])),
        ("  optimizer state", _bytes(bd["optimizer_state"])),
        ("  other state", _bytes(bd["other_state"])),
        ("  batch", _bytes(bd["batch"])),
        ("  arguments", _bytes(bd.get("arguments"))),
        ("  outputs", _bytes(bd.get("outputs"))),
        ("  aliased (donated)", _bytes(bd.get("aliased"))),
        ("  temporaries", _bytes(bd.get("temporaries"))),
        ("  generated code", _bytes(bd.get("generated_code"))),
        ("FLOPs / step / device", _num(plan["flops_per_step"])),
        ("bytes / step / device", _num(plan["bytes_accessed_per_step"])),
        ("est. step time", "n/a" if est is None else f"{est * 1e3:.2f} ms"),
        ("model FLOPs / step", f"{plan['model_flops_per_step']:.4g} (all devices; "
                               f"{plan['model_flops_per_step'] / plan['devices']:.4g} per device)"),
        ("est. MFU", _num(plan["estimated_mfu"], "{:.1%}")),
    ]
    if d.get("cost_source"):
        rows.append(("FLOPs and bytes", d["cost_source"]))
    rows.append(("step time", d["time_source"]))
    if d.get("compile_error"):
        rows.append(("compiler", d["compile_error"][:400]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def advice(plan: dict) -> str:
    """Why a plan does not fit and what to change (the ``memjax-compile`` exit-1 message)."""
    d, bd = plan["details"], plan["breakdown"]
    mem, hbm = plan["memory_per_device_bytes"], plan["hbm_per_device_bytes"]
    state = bd["parameters"] + bd["optimizer_state"]
    fsdp, n = d["mesh"].get("fsdp", 1), plan["devices"]
    need = f"{'at least ' if d.get('memory_is_lower_bound') else ''}{_bytes(mem)}"
    parts = [f"parameters {_bytes(bd['parameters'])}", f"optimizer state {_bytes(bd['optimizer_state'])}"]
    if bd.get("temporaries") is not None:
        parts.append(f"temporaries {_bytes(bd['temporaries'])}")
    lines = [f"does not fit: the train step needs {need} per device on {plan['topology']}, a {d['device_kind']} "
             f"has {_bytes(hbm)} HBM ({', '.join(parts)} per device)."]
    if d.get("compile_error"):
        lines.append(f"the TPU compiler: {d['compile_error'][:400]}")
    lines.append("what to change:")
    if fsdp < n:
        lines.append(f"  - shard parameters and optimizer state over more devices: --set mesh.fsdp={n} mesh.data=1 "
                     f"(now mesh.fsdp={fsdp}; the {_bytes(state)} of state per device becomes about "
                     f"{_bytes(state * fsdp / n)} where parameters have an fsdp-sharded axis)")
    if d.get("scanned_layers"):
        lines.append("  - recompute activations in the backward pass: --set model.remat=full (least memory) "
                     "or model.remat=dots")
    else:
        lines.append("  - recompute activations in the backward pass: model.remat=full or dots (it applies to "
                     "scanned layer groups: model.scan_layers=True with model.pattern_repeat > 1)")
    per_device = d["batch"] // max(1, d["mesh"].get("data", 1) * fsdp)
    lines.append(f"  - fewer tokens per device at a time: --set train.microbatches={2 * d['microbatches']} (the same "
                 f"batch, accumulated) or a smaller train.batch_size (now {d['batch']}, {per_device} per device)")
    if state > hbm:
        lines.append("  - parameters and optimizer state alone exceed HBM at this sharding: shard them (above), "
                     "a larger slice or a smaller model")
    return "\n".join(lines)


def write_json(plan: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(plan, f, indent=2, sort_keys=False)
        f.write("\n")
