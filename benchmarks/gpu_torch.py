"""PyTorch baselines for the GPU benchmarks, timed in their own process (JAX preallocates GPU memory).

    python -m benchmarks.gpu_torch [--out DIR] [--smoke]

- ceilings through PyTorch (copy bandwidth, bf16 matmul), to cross-check the JAX ones;
- ``torch.nn.functional.embedding_bag`` (mode ``sum``, ``per_sample_weights``) at the sizes of
  ``benchmarks/gpu_embedding_bag.py``: forward, backward (dense table gradient and the
  per-sample-weight gradient), both;
- flash-linear-attention's Triton kernels ``chunk_gated_delta_rule`` and ``chunk_simple_gla``
  (the scalar-decay family that also computes Mamba-2's SSD core) at the sizes of
  ``benchmarks/gpu_linear_attention.py``, forward and forward + backward;
- a small float32 problem solved by FLA, saved as ``fla_check.npz`` so the JAX script can
  check that memjax computes the same function (same conventions for g, beta, scale).

Missing packages (``fla``) are reported in the JSON, not fatal.
"""
from __future__ import annotations

import argparse
import os
import time
import traceback

import numpy as np

from benchmarks.gpu_common import out_dir, torch_time_ms, write_json
from benchmarks.gpu_embedding_bag import MAIN as BAG_MAIN, SMOKE as BAG_SMOKE, bytes_moved
from benchmarks.gpu_linear_attention import CHECK as LA_CHECK, MAIN as LA_MAIN, SMOKE as LA_SMOKE, la_inputs_np


def ceilings(torch, smoke):
    n = (2 ** 22 if smoke else 2 ** 29)
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    t = torch_time_ms(lambda: y.copy_(x)) * 1e-3
    m = 1024 if smoke else 8192
    a, b = torch.randn(2, m, m, device="cuda", dtype=torch.bfloat16)
    t_mm = torch_time_ms(lambda: a @ b) * 1e-3
    return {"copy_GBps": 2 * n * 2 / t / 1e9, "matmul_bf16_TFLOPs": 2 * m ** 3 / t_mm / 1e12}


def embedding_bag(torch, size):
    """bf16 table (CUDA has no bf16 per-sample-weight gradient: the weights get none there) and
    float32 table with both gradients."""
    import torch.nn.functional as F

    n, d, bt, k = size["N"], size["D"], size["Bt"], size["k"]
    rows = []
    for dtype, weight_grad in ((torch.bfloat16, False), (torch.float32, True)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        table = torch.randn(n, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
        idx = torch.randint(0, n, (bt, k), device="cuda", generator=gen)
        w = torch.randn(bt, k, device="cuda", dtype=dtype, generator=gen).requires_grad_(weight_grad)
        g = torch.randn(bt, d, device="cuda", dtype=dtype, generator=gen)
        wrt = (table, w) if weight_grad else (table,)
        fwd = lambda: F.embedding_bag(idx, table, mode="sum", per_sample_weights=w)
        out = fwd()
        bwd = lambda: torch.autograd.grad(out, wrt, g, retain_graph=True)
        both = lambda: torch.autograd.grad(fwd(), wrt, g)
        itemsize = 2 if dtype == torch.bfloat16 else 4
        b_fwd, b_bwd = bytes_moved(n, d, bt, k, itemsize)
        if not weight_grad:  # no d_weights: the table rows are not re-read
            b_bwd -= bt * k * d * itemsize
        row = {"impl": "torch", "dtype": str(dtype).replace("torch.", ""), "weight_grad": weight_grad, **size,
               "fwd_ms": torch_time_ms(fwd), "bwd_ms": torch_time_ms(bwd), "fwd_bwd_ms": torch_time_ms(both)}
        row["fwd_GBps"] = b_fwd / row["fwd_ms"] / 1e6
        row["bwd_GBps"] = b_bwd / row["bwd_ms"] / 1e6
        rows.append(row)
        print(row, flush=True)
        del table, idx, w, g, out
        torch.cuda.empty_cache()
    return rows


def to_torch(torch, arrays, dtype=None):
    return {k: torch.from_numpy(np.ascontiguousarray(v)).cuda().to(dtype or torch.float32) for k, v in arrays.items()}


def fla_ops():
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.simple_gla import chunk_simple_gla

    def gdr(x, out_state=False):
        return chunk_gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], output_final_state=out_state)

    def gla(x, out_state=False):
        return chunk_simple_gla(x["q"], x["k"], x["v"], g=x["g"], output_final_state=out_state)

    return {"gated_delta_rule": gdr, "simple_gla": gla}


def fla_timings(torch, size):
    rows = []
    x_np = la_inputs_np(size, seed=0)
    for op, fn in fla_ops().items():
        x = to_torch(torch, x_np, torch.bfloat16)
        x["g"] = x["g"].float()  # log decays stay float32 (FLA's convention)
        for key in ("q", "k", "v", "beta"):
            x[key].requires_grad_()
        x["g"].requires_grad_()
        grads_of = [x[k] for k in ("q", "k", "v", "g") + (("beta",) if op == "gated_delta_rule" else ())]
        do = torch.randn_like(x["v"])

        def fwd():
            return fn(x)[0]

        def fwd_bwd():
            return torch.autograd.grad(fn(x)[0], grads_of, do)

        row = {"impl": "fla (Triton)", "op": op, **size, "fwd_ms": torch_time_ms(fwd)}
        try:
            row["fwd_bwd_ms"] = torch_time_ms(fwd_bwd)
        except RuntimeError as err:  # e.g. FLA refuses its gated backward on Hopper with Triton < 3.7.1
            row["fwd_bwd_error"] = str(err)[:300]
        rows.append(row)
        print(rows[-1], flush=True)
        write_json("gpu_torch_fla_rows", {"rows": rows})  # kept if the step's time limit ends it
    return rows


def fla_check(torch, path):
    """FLA's float32 outputs and final states on a small problem, for memjax to compare against."""
    x_np = la_inputs_np(LA_CHECK, seed=7)
    saved = dict(x_np)
    for op, fn in fla_ops().items():
        x = to_torch(torch, x_np)
        o, s = fn(x, out_state=True)
        saved[f"{op}_o"] = o.float().cpu().numpy()
        saved[f"{op}_state"] = s.float().cpu().numpy()
    np.savez(path, **saved)
    print(f"wrote {path}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", nargs="*", default=["ceilings", "embedding_bag", "fla_check", "fla"],
                    choices=["ceilings", "embedding_bag", "fla_check", "fla"])
    args = ap.parse_args(argv)
    import torch

    t0 = time.perf_counter()
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
    for name, fn in [("ceilings", lambda: ceilings(torch, args.smoke)),
                     ("embedding_bag", lambda: embedding_bag(torch, BAG_SMOKE if args.smoke else BAG_MAIN)),
                     ("fla_check", lambda: fla_check(torch, os.path.join(out_dir(args.out), "fla_check.npz"))),
                     ("fla", lambda: fla_timings(torch, LA_SMOKE if args.smoke else LA_MAIN))]:
        if name not in args.parts:
            continue
        try:
            result[name] = fn()
            print(name, result[name], flush=True)
        except Exception as err:  # noqa: BLE001 - one missing baseline must not lose the others
            result[name] = {"error": repr(err)[:500], "traceback": traceback.format_exc()[-2000:]}
            print(name, "FAILED", result[name]["traceback"], flush=True)
        torch.cuda.empty_cache()
        write_json("gpu_torch", result, args.out)  # after every part: a time limit keeps what is done
    try:
        import fla

        result["fla_version"] = getattr(fla, "__version__", "?")
    except ImportError as err:
        result["fla_version"] = repr(err)
    result["seconds"] = time.perf_counter() - t0
    write_json("gpu_torch", result, args.out)
    return result


if __name__ == "__main__":
    main()
