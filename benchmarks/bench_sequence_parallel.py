"""Sequence parallelism: per-device memory and agreement as the time axis is split over 1-8 devices.

    python -m benchmarks.bench_sequence_parallel            # T = 16384
    python -m benchmarks.bench_sequence_parallel --quick    # T = 4096

For gated linear attention, the gated delta rule and Mamba-2 SSD at a fixed total length, one
jitted ``value_and_grad`` (loss through the output and the final state) with time split over
``P`` devices of a ``seq`` mesh axis (``jax.shard_map``, :mod:`memjax.memory.sequence_parallel`):
XLA's planned temporary memory *per device*, the bytes each device receives in the state
exchange (``all_gather`` of ``(S_loc, Phi)``: ``(P - 1) B H (K V + 1)`` numbers for scalar-decay
memories, ``(P - 1) B H K (V + K)`` for the delta rule), the relative difference of the
gradients from the plain single-device function (the ``P = 1`` row), and the wall time. On a
CPU the ``P`` fake devices (``--xla_force_host_platform_device_count=8``) share the same cores,
so the time is not a speed-up figure; memory and agreement are what this run measures. B = 1, H = 4, K = V = 64,
chunk 64, float32. Writes ``benchmarks/results/sequence_parallel[_quick].json``.
"""
from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks.bench_associative import B, CHUNK, H, K, V  # noqa: E402
from benchmarks.bench_associative import _inputs as associative_inputs  # noqa: E402
from benchmarks.runner import Table, compiled_memory, time_fn  # noqa: E402
from memjax.memory.delta import delta_rule  # noqa: E402
from memjax.memory.linear import linear_attention  # noqa: E402
from memjax.memory.ssm import selective_scan  # noqa: E402


def _inputs(T):
    q, k, v, beta, g = associative_inputs(T)
    A = -jnp.exp(jax.random.normal(jax.random.key(1), (H,)))
    return {"q": q, "k": k, "v": v, "g": g, "beta": beta, "dt": -g, "A": A}


# op -> (memory(time_args, seq_axis) -> (out, state), time-axis inputs, exchanged numbers per shard)
OPS = {
    "gated_linear_attention": (lambda a, ax: linear_attention(a["q"], a["k"], a["v"], g=a["g"], chunk_size=CHUNK,
                                                              seq_axis=ax),
                               ("q", "k", "v", "g"), B * H * (K * V + 1)),
    "gated_delta_rule": (lambda a, ax: delta_rule(a["q"], a["k"], a["v"], a["beta"], g=a["g"], chunk_size=CHUNK,
                                                  seq_axis=ax),
                         ("q", "k", "v", "beta", "g"), B * H * K * (V + K)),
    # Mamba-2 SSD: x = v (P = V channels), B = k, C = q with one group (N = K).
    "selective_scan": (lambda a, ax: selective_scan(a["v"], a["dt"], a["A"], a["k"][:, :, :1], a["q"][:, :, :1],
                                                    chunk_size=CHUNK, seq_axis=ax),
                       ("q", "k", "v", "dt"), B * H * (K * V + 1)),
}


def case(op, inputs, shards):
    """Jitted value_and_grad of ``sum(out) + sum|state|`` w.r.t. the time-axis inputs, time split
    over ``shards`` devices (``shards = 1``: the plain single-device function, the baseline)."""
    memory, names, _ = OPS[op]
    fixed = {n: x for n, x in inputs.items() if n not in names}
    if shards == 1:
        run = lambda time_args: memory({**time_args, **fixed}, None)
    else:
        mesh = jax.make_mesh((shards,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,),
                             devices=jax.devices()[:shards])
        local = lambda time_args: memory({**time_args, **fixed}, "seq")
        run = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "seq"),), out_specs=(P(None, "seq"), P()))

    def loss(time_args):
        out, state = run(time_args)
        return jnp.sum(out) + jnp.sum(jnp.abs(state))

    return jax.jit(jax.value_and_grad(loss)), {n: inputs[n] for n in names}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T = 4096")
    ap.add_argument("--length", type=int, default=None)
    ap.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    ap.add_argument("--shards", nargs="*", type=int, default=[1, 2, 4, 8])
    args = ap.parse_args(argv)
    T = args.length or (4096 if args.quick else 16384)
    if max(args.shards) > jax.device_count():
        raise SystemExit(f"--shards {max(args.shards)} needs that many devices; this process has {jax.device_count()}")
    inputs = _inputs(T)
    cols = ["op", "T", "shards", "temp_MiB_per_device", "temp_vs_1", "exchange_KiB_per_device", "rel_diff_grad",
            "ms"]
    table = Table("sequence_parallel_quick" if args.quick else "sequence_parallel", cols)
    for op in args.ops:
        ref = base_mem = None
        for n in args.shards:
            fn, x = case(op, inputs, n)
            (loss, grads) = fn(x)
            mem = compiled_memory(fn, x).get("temp_bytes", 0) / 2 ** 20
            t = time_fn(fn, x, warmup=1, repeats=3)
            if ref is None:
                ref, base_mem = (loss, grads), mem
            diff = max(_rel(grads[k], ref[1][k]) for k in grads)
            table.add({"op": op, "T": T, "shards": n, "temp_MiB_per_device": mem,
                       "temp_vs_1": mem / max(base_mem, 1e-9),
                       "exchange_KiB_per_device": (n - 1) * OPS[op][2] * 4 / 2 ** 10,
                       "rel_diff_grad": diff, "ms": 1e3 * t["median_s"]})
    table.finish({"what": "value_and_grad with time split over a seq mesh axis; temp memory per device from "
                          "compiled.memory_analysis(); rel_diff_grad: max over inputs of ||g - g_1|| / ||g_1||",
                  "shapes": {"B": B, "H": H, "K": K, "V": V, "chunk_size": CHUNK}})


if __name__ == "__main__":
    main()
