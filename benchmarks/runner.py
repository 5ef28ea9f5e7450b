"""Shared benchmark runner: warm-up, repeats, median, peak memory, a table and JSON.

Usage::

    from benchmarks.runner import time_fn, compiled_memory, Table
    t = time_fn(jitted, *args)               # {"median_s", "min_s", "repeats"}
    mem = compiled_memory(jitted, *args)     # bytes XLA plans for temporaries + outputs
    table = Table("name", ["T", "chunked_ms", ...]); table.add({...}); table.finish()
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import jax


def time_fn(fn, *args, warmup: int = 2, repeats: int = 5, min_time: float = 0.0) -> dict:
    """Median wall time of ``fn(*args)`` after ``warmup`` calls, blocking on every output."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    while len(times) < repeats or sum(times) < min_time:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": len(times)}


def compiled_memory(fn, *args) -> dict:
    """Peak-memory proxy from the compiled executable: temporaries, arguments and outputs in bytes."""
    lowered = fn.lower(*args) if hasattr(fn, "lower") else jax.jit(fn).lower(*args)
    return memory_of(lowered.compile())


def memory_of(compiled) -> dict:
    """XLA's memory plan of a compiled executable (``temp_bytes``, ``argument_bytes``, ...); {} where
    the backend does not report one."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - optional on some backends
        return {}
    if ma is None:
        return {}
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k.replace("_size_in_bytes", "_bytes"): int(getattr(ma, k)) for k in keys if hasattr(ma, k)}


def machine() -> dict:
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


class Table:
    """Collects rows, prints them as a Markdown table, writes ``benchmarks/results/<name>.json``."""

    def __init__(self, name: str, columns: list[str], out_dir: str | None = None):
        self.name, self.columns, self.rows = name, columns, []
        self.out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(" | ".join(_fmt(row.get(c, "")) for c in self.columns), flush=True)

    def finish(self, extra: dict | None = None, json_path: str | None = None) -> str:
        """Print the Markdown table and write ``benchmarks/results/<name>.json`` (and, if given,
        the same rows and ``extra`` to ``json_path``); returns the Markdown."""
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in self.columns) + " |" for r in self.rows]
        md = "\n".join(lines)
        print("\n" + md)
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"{self.name}.json")
        with open(path, "w") as f:
            json.dump({"name": self.name, "machine": machine(), "rows": self.rows, **(extra or {})}, f, indent=2)
        print(f"\nwrote {path}")
        if json_path:
            with open(json_path, "w") as f:
                json.dump({"name": self.name, "rows": self.rows, **(extra or {})}, f, indent=1, default=str)
        return md


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def loss_and_grad(fn, argnums):
    """Jitted value-and-grad of ``sum(output) + sum|final state|`` for a memory ``fn -> (output, state)``:
    a forward+backward workload that touches both results."""
    import jax.numpy as jnp

    def loss(*args):
        out, state = fn(*args)
        return jnp.sum(out.astype(jnp.float32)) + sum(jnp.sum(jnp.abs(s)) for s in jax.tree.leaves(state))

    return jax.jit(jax.value_and_grad(loss, argnums))


def time_and_memory(case, T, mode, repeats):
    """``case(T, mode) -> (jitted fn, args)``; returns (median ms, planned temporary MiB)."""
    fn, args = case(T, mode)
    t = time_fn(fn, *args, warmup=1, repeats=repeats)
    mem = compiled_memory(fn, *args)
    return 1e3 * t["median_s"], mem.get("temp_bytes", 0) / 2 ** 20
