"""What Triton makes of memjax's Pallas GPU kernels, without a GPU: shared memory, registers, spills.

    python -m benchmarks.triton_resources [--arch 90] [--out DIR] [--smoke]

Each kernel is lowered by JAX's Pallas Triton lowering (for an abstract H100 under JAX >= 0.11;
no device needed), the Triton IR that ``pallas_call(debug=True)`` prints is compiled by the
installed ``triton`` package for ``sm_<arch>`` and the PTX goes through ``ptxas -v``. Needs
``pip install triton`` (pure compile: no GPU, no CUDA driver). A launch tile whose shared memory
exceeds the GPU's per-block limit fails at run time with "out of resources"; spilled registers
cost local-memory traffic. This is how the default tiles of kernels that have not run on
hardware are chosen (``memjax.kernels.chunk_pass_pallas.GPU_TILE``); the embedding-bag
kernels, which did run on an H100, are listed as a check of the method.

Kernels: the chunk recurrence forward and backward (without / with the delta-rule ``w``), float32
and bf16 chunk tensors, at ``C = 64, K = V = 128`` for each tile in ``--tiles``; the embedding
bag's three kernels at their ``GPU_TILES``. Prints a Markdown table, writes
``triton_resources.json`` (``$OUT`` or ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp

from benchmarks.gpu_common import markdown_table, write_json

TRITON_TARGET = "__gpu$xla.gpu.triton"
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes of shared memory per block
_HEADER = re.compile(r"\nThe Triton module for pallas_call [^\n]*:\n")


def _abstract_gpu(kind: str = "NVIDIA H100 80GB HBM3"):
    if not hasattr(jax.sharding, "AbstractDevice"):  # JAX 0.10 lowers without a target GPU
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


def triton_ir(fn, *args) -> list[str]:
    """The Triton IR (text) of every Pallas kernel in ``jax.jit(fn)(*args)``, in lowering order;
    ``args`` may be ``jax.ShapeDtypeStruct``s."""
    from memjax.kernels.pallas_common import print_kernel_ir

    buf = io.StringIO()
    with _abstract_gpu(), print_kernel_ir(), contextlib.redirect_stdout(buf):
        jax.export.export(jax.jit(fn), platforms=["cuda"],
                          disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_TARGET)])(*args)
    modules = []
    for part in _HEADER.split(buf.getvalue())[1:]:
        part = part.split("\nThe kernel jaxpr for pallas_call")[0]
        modules.append(part)
    return modules


def _clean(module: str) -> str:
    """Drop the debug locations JAX prints (Triton's parser wants none of them)."""
    text = re.sub(r" \[unknown\]", "", module)
    text = re.sub(r' "[^"\n]*"\(#loc\d*\)', "", text)
    text = re.sub(r" \(?#loc\d*\)?", "", text)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("#loc"))
    return text[: text.rindex("}") + 1]


def compile_resources(module: str, *, arch: int, num_warps: int, num_stages: int) -> dict:
    """``{"shared_bytes", "registers", "spill_stores", "spill_loads"}`` of one kernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ttir")
        with open(src, "w") as f:
            f.write(_clean(module))
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))[0]
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([ptxas, "-v", "--gpu-name", f"sm_{arch}{suffix}", ptx, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    info = out.stdout + out.stderr
    grab = lambda pattern: int(m.group(1)) if (m := re.search(pattern, info)) else 0
    return {"shared_bytes": int(kernel.metadata.shared), "registers": grab(r"Used (\d+) registers"),
            "spill_stores": grab(r"(\d+) bytes spill stores"), "spill_loads": grab(r"(\d+) bytes spill loads")}


def chunk_recurrence_cases(tiles, dtypes, size):
    """``(name, tile, fn, args)``: forward (saving states) and backward, without and with ``w``."""
    from memjax.kernels import chunk_pass_pallas as crp

    b, h, n, c, k, v = size
    for dtype in dtypes:
        sd = lambda *s, d=dtype: jax.ShapeDtypeStruct(s, d)
        f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
        args = (sd(b, h, n, c, k), sd(b, h, n, c, c), sd(b, h, n, c, v), sd(b, h, n, c, k), f32(b, h, n),
                f32(b, h, k, v), sd(b, h, n, c, k), sd(b, h, n, c, v), f32(b, h, k, v))
        for tile in tiles:
            for has_w in (False, True):
                def fn(qg, p, u, ke, a, s0, w, do, dsf, tile=tile, has_w=has_w):
                    w = w if has_w else None
                    return (crp.forward(qg, p, u, w, ke, a, s0, save_states=True, interpret=False, tile=tile),
                            crp.backward(qg, p, w, ke, a, do, dsf, interpret=False, tile=tile))
                label = f"chunk_recurrence{'_delta' if has_w else ''} {jnp.dtype(dtype).name}"
                yield label, ("fwd", "bwd"), tile, fn, args


def embedding_bag_cases():
    from memjax.kernels import embedding_bag_pallas as ebp

    def fn(values, idx, w, d_out):
        out = ebp.gpu_forward(values, idx, w, out_dtype=values.dtype, interpret=False)
        dv, dw = ebp.gpu_backward(d_out, values, idx, w, values.shape[0], out_dtype=values.dtype,
                                  acc_dtype=jnp.float32, interpret=False)
        return out, dv, dw

    args = (jax.ShapeDtypeStruct((1 << 20, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((32768, 32), jnp.int32),
            jax.ShapeDtypeStruct((32768, 32), jnp.float32), jax.ShapeDtypeStruct((32768, 1024), jnp.bfloat16))
    tiles = ebp.GPU_TILES
    yield "embedding_bag bfloat16", ("forward", "d_values", "d_weights"), tiles, fn, args


def run(args) -> dict:
    from memjax.kernels.chunk_pass_pallas import Tile

    tiles = [Tile(*map(int, t.split(","))) for t in args.tiles]
    size = (1, 2, 4, 16, 16, 16) if args.smoke else (1, 2, 4, 64, 128, 128)
    dtypes = [jnp.float32] if args.smoke else [jnp.float32, jnp.bfloat16]
    cases = list(chunk_recurrence_cases(tiles, dtypes, size))
    if not args.smoke:
        cases += list(embedding_bag_cases())
    limit = SHARED_LIMIT.get(args.arch)
    rows = []
    for label, kernels, tile, fn, fn_args in cases:
        modules = triton_ir(fn, *fn_args)
        if len(modules) != len(kernels):
            raise RuntimeError(f"{label}: expected {len(kernels)} Triton kernels, found {len(modules)}")
        for kernel, module in zip(kernels, modules):
            t = tile[kernel] if isinstance(tile, dict) else tile
            row = {"kernel": f"{label} {kernel}",
                   "tile": f"bv{t.bv}" if hasattr(t, "bv") else f"{t.rows}x{t.cols}",
                   "num_warps": t.num_warps, "num_stages": t.num_stages, "ttir_chars": len(module)}
            if not args.ir_only:
                try:
                    row.update(compile_resources(module, arch=args.arch, num_warps=t.num_warps,
                                                 num_stages=t.num_stages))
                    row["fits"] = limit is None or row["shared_bytes"] <= limit
                except Exception as err:  # noqa: BLE001 - one kernel that fails to compile is a result
                    row["error"] = repr(err)[:300]
            rows.append(row)
            print(row, flush=True)
    return {"arch": args.arch, "shared_limit_bytes": limit, "size_B_H_N_C_K_V": size, "jax": jax.__version__,
            "triton": _triton_version(), "rows": rows}


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (H100: 90)")
    ap.add_argument("--tiles", nargs="*", default=["32,4,1", "32,8,1", "64,4,1", "64,8,1", "64,8,2", "128,8,1"],
                    help="chunk-recurrence tiles 'bv,num_warps,num_stages'")
    ap.add_argument("--ir-only", action="store_true", help="only lower to Triton IR (no triton package needed)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, float32 only, no embedding bag")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = run(args)
    write_json("triton_resources", result, args.out or os.environ.get("OUT")
               or os.path.join(os.path.dirname(__file__), "results"))
    cols = ["kernel", "tile", "num_warps", "num_stages"]
    cols += ["ttir_chars"] if args.ir_only else ["shared_bytes", "fits", "registers", "spill_stores", "spill_loads"]
    print(markdown_table(result["rows"], cols))
    return result


if __name__ == "__main__":
    main()
