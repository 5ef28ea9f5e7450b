"""The GPU benchmark scripts run end to end at smoke sizes on CPU (Pallas in interpret mode),
so that a lent GPU's short time is not lost to a script error; their checks must pass."""
import json

import pytest

from benchmarks import gpu_embedding_bag, gpu_linear_attention
from memjax.kernels import embedding_bag_pallas as ebp


@pytest.mark.slow  # (a benchmark script end to end; its pieces are tested elsewhere)
def test_embedding_bag_script_smoke(tmp_path):
    defaults = dict(ebp.GPU_TILES)
    gpu_embedding_bag.main(["--smoke", "--iters", "2", "--out", str(tmp_path)])
    assert ebp.GPU_TILES == defaults  # the sweep's tiles do not leak into the library
    result = json.loads((tmp_path / "gpu_embedding_bag.json").read_text())
    assert result["checks"] and all(row["ok"] for row in result["checks"] + result["checks_best_tiles"])
    assert {row["impl"] for row in result["timings"]} == {"xla", "pallas_gpu"}
    assert all(row["fwd_ms"] > 0 and row["bwd_ms"] > 0 for row in result["timings"])
    assert set(result["best_tiles"]) == {"forward", "d_values", "d_weights"}
    assert result["sort"]["same_result"] and result["sort"]["sort_by_row_ms"] > 0


@pytest.mark.slow  # (a benchmark script end to end; its pieces are tested elsewhere)
def test_linear_attention_script_smoke(tmp_path):
    gpu_linear_attention.main(["--smoke", "--iters", "1", "--precisions", "default", "--tiles", "8,4,2",
                               "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_linear_attention.json").read_text())
    # float32 chunked forms (XLA, and the Pallas state pass interpreted) vs the float64 recurrence
    assert {row["precision"] for row in result["checks"]} == {"default", "pallas"}
    assert all(row["vs_float64_o"] < 1e-5 and row["vs_float64_state"] < 1e-5 for row in result["checks"])
    timed = [row for row in result["timings"] if "fwd_bwd_ms" in row]
    ops = {row["op"] for row in timed}
    assert ops == {"gated_delta_rule", "gated_linear_attention", "ssd"}
    assert {row["impl"] for row in timed} >= {"memjax chunked XLA (default)", "memjax Pallas bv8 w4 s2"}
    pallas = [r for r in result["agreement"] if r["impl"].startswith("memjax Pallas")]
    assert len(pallas) == 3 and all(r["rel_err_vs_memjax_default"] < 1e-2 for r in pallas)  # bf16 inputs


def test_triton_resources_lowers_every_kernel(tmp_path):
    """The kernels' Triton IR is extracted without the `triton` package."""
    from benchmarks import triton_resources

    result = triton_resources.main(["--smoke", "--ir-only", "--tiles", "16,4,1", "--out", str(tmp_path)])
    kernels = [row["kernel"] for row in result["rows"]]
    assert kernels == ["chunk_recurrence float32 fwd", "chunk_recurrence float32 bwd",
                       "chunk_recurrence_delta float32 fwd", "chunk_recurrence_delta float32 bwd"]
    assert all(row["ttir_chars"] > 1000 for row in result["rows"])
    assert (tmp_path / "triton_resources.json").exists()


def test_triton_resources_compiles_for_sm90(tmp_path):
    """The compile step (Triton + ptxas, no GPU); CI has no `triton` package, so it runs only
    where one is installed (a developer machine, the GPU machine)."""
    pytest.importorskip("triton")
    from benchmarks import triton_resources

    result = triton_resources.main(["--smoke", "--tiles", "16,4,1", "--out", str(tmp_path)])
    assert all("error" not in row and row["registers"] > 0 and row["fits"] for row in result["rows"])
