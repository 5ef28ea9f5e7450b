"""benchmarks/gpu_train.py: FLOP and parameter accounting by hand, a CPU smoke run, the OOM retry,
and the size of configs/hybrid_125m.py (from shapes only, nothing allocated)."""
import json
import os

import jax
import numpy as np
import pytest

from benchmarks import gpu_train
from memjax.config import ModelConfig, load_config
from memjax.model.lm import block_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model() -> ModelConfig:
    m = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern="A,F,D,M", mlp_hidden=64)
    m.blocks = {"gated_deltanet": {"chunk_size": 32},
                "memory_plus": {"n_keys": 8, "heads": 2, "knn": 4, "k_dim": 16}}
    return m


def test_unit_lower_inverse_flops_by_hand():
    # C = 64: 16-blocks, 4 of them, padded size 64.
    #   forward substitution: 15 rows x (2 * 16 * 16) x 4 blocks                 = 30720
    #   recursion s = 16: 2 blocks of 32, 2 products each of 2 * 16^3             = 32768
    #   recursion s = 32: 1 block of 64, 2 products of 2 * 32^3                   = 131072
    assert gpu_train.unit_lower_inverse_flops(64) == 30720 + 32768 + 131072
    # C = 24: two 16-blocks (padded to 32): 15 * 512 * 2 + 1 * 2 * 2 * 16^3
    assert gpu_train.unit_lower_inverse_flops(24) == 15360 + 16384
    # C = 8: one 8-block, no recursion: 7 rows x 2 * 8 * 8
    assert gpu_train.unit_lower_inverse_flops(8) == 896


def test_flops_per_token_tiny_config_by_hand():
    """d 32, 2 heads of 16, T = 100 (not a multiple of C = 32: 4 chunks, 128 padded positions)."""
    f = gpu_train.flops_per_token(tiny_model(), 100, matmul_params=1000)
    t = f["terms"]
    assert t["dense"] == 6000  # 6 x 1000
    # One causal attention layer: 3 x 4 x (2 x 16) x T/2 = 3 * 4 * 32 * 50
    assert t["attention"] == 19200
    # Gated delta rule, per chunk and head (C = 32, K = V = 16):
    #   QK^T 2*32*32*16 = 32768, KK^T 32768, inverse 31744 (C = 32: 15*512*2 + 2*2*16^3),
    #   UT 2*32*32*32 = 65536, WS + K^T delta + QS 3 * 2*32*16*16 = 49152, scores@delta 32768
    #   = 244736; x 4 chunks x 2 heads / 100 tokens x 3 (fwd + bwd)
    assert t["delta_rule"] == pytest.approx(244736 * 4 * 2 / 100 * 3, rel=1e-12)
    assert t["delta_rule"] == pytest.approx(58736.64, rel=1e-12)
    # Memory+: scoring 3 x 2 x heads 2 x n_keys 8 x k_dim 16; read 3 x 2 x heads 2 x knn 4 x d 32
    assert t["memory_keys"] == 1536
    assert t["memory_read"] == 1536
    assert f["total"] == pytest.approx(6000 + 19200 + 58736.64 + 1536 + 1536, rel=1e-12)
    assert f["uncounted_blocks"] == []
    assert [r["block"] for r in f["per_layer"]] == ["attention", "mlp", "gated_deltanet", "memory_plus"]


def test_flops_windowed_attention_recurrent_delta_and_uncounted_blocks():
    m = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern="A,D,M2")
    m.blocks = {"attention": {"window": 20}, "gated_deltanet": {"mode": "recurrent"}}
    f = gpu_train.flops_per_token(m, 100, matmul_params=0)
    # window 20 over T = 100: mean keys per query 20 - 400 / 200 = 18
    assert f["terms"]["attention"] == 3 * 4 * 32 * 18
    assert f["terms"]["delta_rule"] == 3 * 2 * 6 * 16 * 16
    assert f["uncounted_blocks"] == ["2:mamba2"]
    with pytest.raises(ValueError, match="seq_len"):
        gpu_train.flops_per_token(m, 0, matmul_params=0)
    with pytest.raises(ValueError, match="matmul_params"):
        gpu_train.flops_per_token(m, 8, matmul_params=-1)


def test_param_counts_tiny_by_hand():
    p = gpu_train.param_counts(tiny_model())
    # Linear kernels: attention 4 * 32*32; MLP 3 * 32*64; gated DeltaNet q,k,v,gate,o 5 * 32*32 +
    # beta, decay 2 * 32*2; Memory+ query 32 * (2 heads * 16), gate 32*32, out 32*32.
    kernels = 4096 + 6144 + (5120 + 128) + (1024 + 1024 + 1024)
    assert p["kernels"] == kernels
    assert p["embedding"] == 64 * 32
    assert p["matmul"] == kernels + 64 * 32  # + the tied LM head
    assert p["memory_values"] == 8 * 8 * 32
    assert p["memory_keys"] == 2 * 2 * 8 * 8  # heads x halves x n_keys x k_dim/2
    assert p["total"] == p["embedding"] + p["memory_values"] + p["kernels"] + p["memory_keys"] + p["other"]
    assert p["non_embedding"] == p["total"] - 64 * 32 - 8 * 8 * 32


@pytest.mark.slow  # (the whole benchmark run; FLOP counts and retries are tested without it)
def test_smoke_run_writes_json(tmp_path):
    res = gpu_train.main(["--smoke", "--out", str(tmp_path)])
    with open(tmp_path / "gpu_train.json") as f:
        d = json.load(f)
    assert d["status"] == res["status"] == "ok"
    assert d["tokens_per_s"] > 0 and d["step_ms"] > 0 and d["compile_s"] > 0
    assert d["batch"] == 2 and d["seq"] == 128 and d["tokens_per_step"] == 256
    assert len(d["step_times_ms"]) == 2
    assert d["device_kind"] and d["jax_version"] and d["config"] == "hybrid_125m_smoke"
    assert d["flops_per_token"] == pytest.approx(sum(d["flops_breakdown"].values()))
    assert d["flops_breakdown"]["attention"] > 0 and d["flops_breakdown"]["delta_rule"] > 0
    assert d["flops_breakdown"]["memory_keys"] > 0
    achieved = d["flops_per_token"] * d["tokens_per_s"]
    assert d["model_tflops_per_s"] == pytest.approx(achieved / 1e12)
    assert d["mfu"] == pytest.approx(achieved / 989e12)
    assert d["nonfinite_step"] == 0 and d["loss"] == d["loss"]  # finite: not NaN
    assert d["rows"][0]["tokens_per_s"] == pytest.approx(d["tokens_per_s"])


@pytest.mark.slow
def test_host_init_gives_the_device_init_state():
    """Initialising on the host CPU and copying over (the default on a GPU) gives the same train
    state, with the train step's shardings."""
    from memjax.train.loop import build

    cfg = gpu_train.make_config(gpu_train.parse_args(["--smoke"]))
    setup = build(cfg, devices=jax.devices()[:1])
    with jax.set_mesh(setup.mesh):
        on_device = gpu_train.init_state(setup, host=False)
        on_host = gpu_train.init_state(setup, host=True)
    assert jax.tree.structure(on_host) == jax.tree.structure(on_device)
    for a, b in zip(jax.tree.leaves(on_host), jax.tree.leaves(on_device)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding


@pytest.mark.slow
def test_oom_retries_with_more_microbatches(tmp_path, monkeypatch):
    calls = []

    def fake_run_once(cfg, args, devices, report=None, deadline=None):
        calls.append(cfg.train.microbatches)
        if cfg.train.microbatches < 4:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 99 bytes.")
        return {"compile_s": 1.0, "xla_memory": {}, "xla_flops_per_step": None, "step_times_s": [0.5, 0.25, 1.0],
                "loss": 1.0, "bad_step": 0, "device_memory": {}, "data_s": 0.0, "warmup_s": 0.0}

    monkeypatch.setattr(gpu_train, "run_once", fake_run_once)
    res = gpu_train.main(["--smoke", "--batch", "4", "--oom-retries", "2", "--out", str(tmp_path)])
    assert calls == [1, 2, 4]
    assert [a["status"] for a in res["attempts"]] == ["oom", "oom", "ok"]
    assert res["status"] == "ok" and res["microbatches"] == 4
    assert res["step_ms"] == pytest.approx(500.0)  # the median
    assert res["tokens_per_s"] == pytest.approx(4 * 128 / 0.5)

    calls.clear()
    res = gpu_train.main(["--smoke", "--batch", "4", "--oom-retries", "1", "--out", str(tmp_path)])
    assert calls == [1, 2] and res["status"] == "oom"
    with open(tmp_path / "gpu_train.json") as f:
        d = json.load(f)
    assert d["status"] == "oom" and "RESOURCE_EXHAUSTED" in d["attempts"][-1]["error"]

    calls.clear()  # a retry that cannot finish within --budget-s is skipped
    res = gpu_train.main(["--smoke", "--batch", "4", "--oom-retries", "2", "--budget-s", "1e-3",
                          "--out", str(tmp_path)])
    assert calls == [1] and res["status"] == "oom"


def test_hybrid_125m_config_size():
    cfg = load_config(os.path.join(ROOT, "configs", "hybrid_125m.py"))
    m = cfg.model
    names = block_names(m)
    assert names.count("mlp") == 12 and names.count("memory_plus") == 1
    assert names.count("gated_deltanet") == 9 and names.count("attention") == 3
    assert (m.d_model, m.num_heads, m.vocab_size, cfg.data.seq_len) == (768, 12, 32768, 2048)
    assert m.compute_dtype == "bfloat16"
    assert cfg.train.batch_size * cfg.data.seq_len == 16 * 2048
    p = gpu_train.param_counts(m)  # nnx.eval_shape: shapes only
    assert 100e6 <= p["total"] <= 150e6
    assert p["total"] == 130_358_808  # the figure in the config's docstring
    assert p["non_embedding"] == 92_610_072 and p["matmul"] == 117_540_864
    assert 10e6 <= p["memory_values"] <= 20e6
    f = gpu_train.flops_per_token(m, cfg.data.seq_len, p["matmul"])
    assert f["terms"]["attention"] == 12 * 3 * 2048 * 768 / 2
    assert f["total"] == pytest.approx(756_709_248, rel=1e-9)
