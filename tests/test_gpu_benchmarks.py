"""The GPU benchmark scripts run end to end at smoke sizes on CPU (Pallas in interpret mode),
so that a lent GPU's short time is not lost to a script error; their checks must pass."""
import json

from benchmarks import gpu_embedding_bag, gpu_linear_attention
from memjax.kernels import embedding_bag_pallas as ebp


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


def test_linear_attention_script_smoke(tmp_path):
    gpu_linear_attention.main(["--smoke", "--iters", "1", "--precisions", "default", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "gpu_linear_attention.json").read_text())
    # float32 chunked forms vs the float64 recurrence (CPU: every precision setting is float32)
    assert all(row["vs_float64_o"] < 1e-5 and row["vs_float64_state"] < 1e-5 for row in result["checks"])
    ops = {row["op"] for row in result["timings"] if "fwd_bwd_ms" in row}
    assert ops == {"gated_delta_rule", "gated_linear_attention", "ssd"}
