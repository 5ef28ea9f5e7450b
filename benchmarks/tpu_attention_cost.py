"""Causal attention on a TPU by XLA's TPU cost model, without a TPU: dense XLA form vs splash.

    pip install -e ".[tpu]"      # libtpu; JAX_PLATFORMS=cpu is enough, no TPU attached
    python -m benchmarks.tpu_attention_cost                       # v5p, B=4 H=16 D=128 bf16, T = 8k 32k 128k
    python -m benchmarks.tpu_attention_cost --T 256 --B 1 --H 2 --D 128 --json /tmp/x.json   # smoke

Each implementation of causal self-attention is compiled for one device of the topology
(``memjax.train.compile.topology_devices``), forward and forward + backward (the VJP: inputs and
the output cotangent in, gradients of q, k, v out), and the table reads

* ``temp GB``: the per-device temporaries XLA plans (``compiled.memory_analysis()``), the
  number that decides whether a shape fits in HBM;
* ``GB accessed`` and ``XLA est ms``: ``compiled.cost_analysis()``'s HBM bytes and the TPU
  compiler's time estimate. A Pallas kernel (splash) is a custom call whose cost XLA counts from
  its operands only (the splash kernels give no cost estimate): the kernel's own re-reads of K / V
  tiles are not in the bytes, and its FLOPs are not in the time. Read the splash rows as "the
  XLA glue plus the kernel's operands", a lower bound.

Implementations: ``causal_attention(impl="xla")`` (forms the ``[B, H, T, S]`` logits),
``causal_attention(impl="chunked")`` when this checkout's ``causal_attention`` has it (else a row
saying so), and :func:`memjax.kernels.splash_attention.splash_attention`. When the XLA form fails
to compile at ``B`` it is retried at ``B = 1`` and both rows are kept. Compiling splash for a long
``T`` first runs the kernel's NumPy mask analysis on the host (minutes at 128k).
"""
from __future__ import annotations

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.runner import Table, machine
from memjax.kernels.splash_attention import splash_attention
from memjax.memory import attention as attention_lib
from memjax.train import compile as plan_lib

COLUMNS = ["impl", "pass", "B", "T", "temp GB", "GB accessed", "XLA est ms", "compile s", "note"]


def attention_fn(impl: str):
    """``f(q, k, v) -> o`` for one implementation (scale ``D^-1/2``, causal)."""
    if impl == "splash":
        return lambda q, k, v: splash_attention(q, k, v, scale=q.shape[-1] ** -0.5)
    return lambda q, k, v: attention_lib.causal_attention(q, k, v, impl=impl)


def _nbytes(shapes) -> int:
    return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in shapes)


def measure(impl: str, b: int, t: int, h: int, d: int, dtype, device, backward: bool) -> dict:
    """Compile one program for ``device`` and read its memory plan and cost analysis."""
    mesh = jax.make_mesh((1,), ("x",), devices=[device], axis_types=(jax.sharding.AxisType.Auto,))
    rep = NamedSharding(mesh, P())
    sds = [jax.ShapeDtypeStruct((b, t, h, d), dtype, sharding=rep) for _ in range(3)]
    fwd = attention_fn(impl)
    if backward:
        def program(q, k, v, do):
            _, vjp = jax.vjp(fwd, q, k, v)
            return vjp(do)

        args = sds + [jax.ShapeDtypeStruct((b, t, h, d), dtype, sharding=rep)]
    else:
        program, args = fwd, sds
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # the mesh's (compile-only TPU) device makes the target a TPU
        compiled = jax.jit(program).lower(*args).compile()
    seconds = time.perf_counter() - start
    cost = plan_lib._xla_cost(compiled)
    mem = compiled.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else None
    text = compiled.as_text()
    return {"temp_bytes": temp, "bytes_accessed": cost["bytes"], "flops": cost["flops"],
            "xla_estimate_ms": cost["seconds"] * 1e3 if cost["seconds"] else None, "compile_s": seconds,
            "io_bytes": _nbytes(args) + (_nbytes(sds) if backward else _nbytes(sds[:1])),
            "custom_calls": text.count("tpu_custom_call")}


def _row(impl, backward, b, t) -> dict:
    return {"impl": impl, "pass": "fwd+bwd" if backward else "fwd", "B": b, "T": t}


def _fill(row: dict, m: dict) -> dict:
    row.update(m)
    row.update({"temp GB": m["temp_bytes"] / 1e9 if m["temp_bytes"] is not None else None,
                "GB accessed": m["bytes_accessed"] / 1e9 if m["bytes_accessed"] else None,
                "XLA est ms": m["xla_estimate_ms"], "compile s": m["compile_s"],
                "note": f"{m['custom_calls']} Pallas call(s): cost counts operands only" if m["custom_calls"] else ""})
    return row


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}" if str(e).strip() else type(e).__name__


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topology", default="v5p:1x1x1")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--T", type=int, nargs="*", default=[8192, 32768, 131072])
    ap.add_argument("--impls", nargs="*", default=["xla", "chunked", "splash"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--json", default=None, help="also write the rows here (default: only benchmarks/results/)")
    args = ap.parse_args(argv)
    device = plan_lib.topology_devices(args.topology)[0]
    dtype = jnp.dtype(args.dtype)
    table = Table("tpu_attention_cost", COLUMNS, out_dir=os.path.dirname(args.json) if args.json else None)
    rows = []

    def add(row):
        rows.append(row)
        if "error" in row:
            row["note"] = row["error"]
            print(f"{row['impl']} {row['pass']} B={row['B']} T={row['T']}: {row['error']}", flush=True)
        table.add(row)

    for t in args.T:
        for impl in args.impls:
            for backward in (False, True):
                if impl not in ("splash",) and impl not in attention_lib.IMPLS:
                    add({**_row(impl, backward, args.B, t),
                         "error": f"skipped: causal_attention has no impl={impl!r} in this checkout "
                                  f"(IMPLS = {attention_lib.IMPLS})"})
                    continue
                batches = [args.B] + ([1] if impl == "xla" and args.B > 1 else [])
                for b in batches:
                    row = _row(impl, backward, b, t)
                    try:
                        add(_fill(row, measure(impl, b, t, args.H, args.D, dtype, device, backward)))
                        break  # compiled: no smaller batch needed
                    except Exception as e:  # noqa: BLE001 - a shape that cannot compile is a result too
                        add({**row, "error": _error(e)})
    extra = {"topology": args.topology, "shape": {"B": args.B, "H": args.H, "D": args.D, "T": args.T},
             "dtype": str(dtype), "machine": machine(),
             "note": "XLA TPU cost model on a CPU host (compile-only devices); Pallas calls count operands only"}
    table.rows = rows
    table.finish(extra, json_path=args.json)
    return rows


if __name__ == "__main__":
    main()
