"""The science studies: the HiPPO reconstruction study (benchmarks/hippo_study.py) and the length
extrapolation tooling (benchmarks/length_extrapolation.py, configs/sweeps/length_extrapolation.py,
configs/sweeps/zoology_full.py).

HiPPO: the online recurrences are checked against the projection computed directly from its
definition (``c_n = (1/T) sum_s f(s) sqrt(2n+1) P_n(2s/T - 1)``, a quadrature over the samples), and
the study's two claims are checked on tiny signals. Length extrapolation: the sweep configs expand
to valid configs, the evaluation configs change only what each mode says, the table keeps the
best learning rate at the training length, and a rerun skips finished runs; the end-to-end
train-then-evaluate run is ``slow`` (it compiles a model at three lengths).
"""
import importlib.util
import json
import os

import numpy as np
import pytest

from benchmarks import hippo_study as hs
from benchmarks import length_extrapolation as le
from memjax.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep_module(name):
    path = os.path.join(ROOT, "configs", "sweeps", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"sweep_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- HiPPO


def cubic(T):
    u = (np.arange(T) + 0.5) / T
    return 1 - 3 * u + 2 * u ** 3


def test_legs_online_approaches_the_direct_projection():
    f = cubic(2000)
    errs = {}
    for T in (250, 2000):
        g = cubic(T)
        c = hs.legs_online(g, 8)
        exact = hs.legendre_basis(8, 2 * (np.arange(T) + 0.5) / T - 1).T @ g / T  # the definition
        errs[T] = np.abs(c - exact).max()
    assert errs[2000] < 2e-3, errs
    assert errs[250] > 2 * errs[2000]  # discretisation error shrinks as the samples get denser
    # Batched columns run the same recurrence as one signal at a time.
    two = hs.legs_online(np.stack([f, -2 * f], 1), 4)
    np.testing.assert_allclose(two[:, 1], -2 * hs.legs_online(f, 4), rtol=1e-12, atol=1e-14)


def test_legs_and_legt_reconstruct_a_cubic_only_with_enough_terms():
    T, theta = 2000, 500
    f = cubic(T)
    assert hs.mse(hs.legs_reconstruct(hs.legs_online(f, 4), T), f) < 1e-5
    assert hs.mse(hs.legs_reconstruct(hs.legs_online(f, 2), T), f) > 1e-2  # degree 3 needs 4 terms
    # LegT reads back its own window, the last theta samples.
    assert hs.mse(hs.legt_reconstruct(hs.legt_online(f, 4, theta), T, theta), f[T - theta:]) < 1e-8
    assert hs.mse(hs.legt_reconstruct(hs.legt_online(f, 2, theta), T, theta), f[T - theta:]) > 1e-4


def test_stretched_signal_is_the_same_function():
    x1, x4 = hs.make_signal("white_noise", 50, 1, 3), hs.make_signal("white_noise", 50, 4, 3)
    np.testing.assert_allclose(x4.reshape(50, 4), np.repeat(x1[:, None], 4, 1), rtol=1e-12, atol=1e-12)  # held 4x
    s = hs.make_signal("sinusoids", 50, 2, 0)
    assert s.shape == (100,) and abs(s.mean()) < 1e-12 and abs(s.std() - 1) < 1e-12
    with pytest.raises(ValueError, match="kind"):
        hs.make_signal("pink", 50, 1, 0)


def test_legs_is_timescale_robust_and_fixed_window_legt_is_not():
    res = hs.run_study([4, 8], 100, [1, 4], 1)
    get = {(r["signal"], r["N"], r["stretch"]): r for r in res["rows"]}

    def ratio(kind, N, key):  # error of the 4x slower signal / error of the original
        return get[kind, N, 4][key] / get[kind, N, 1][key]

    for kind, N in (("sinusoids", 4), ("sinusoids", 8), ("random_walk", 4), ("white_noise", 8)):
        assert abs(ratio(kind, N, "legs") - 1) < 0.05, (kind, N, ratio(kind, N, "legs"))
    # LegT's window (100 samples) now covers a quarter of the signal: it cannot read back the rest.
    assert ratio("sinusoids", 8, "legt_fixed_history") > 2
    assert ratio("random_walk", 8, "legt_fixed_history") > 1.5


def test_hippo_main_writes_json_markdown_and_figure(tmp_path):
    hs.main(["--Ns", "4,8", "--base-len", "40", "--stretches", "1,2", "--seeds", "1", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "hippo_study.json").read_text())
    assert len(res["rows"]) == len(hs.SIGNALS) * 2 * 2
    md = (tmp_path / "hippo_study.md").read_text()
    assert "| random_walk | LegS (whole history) |" in md and "spread" in md
    assert (tmp_path / "hippo_study.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        hs.main(["--Ns", "0", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------- length extrapolation


@pytest.mark.parametrize("study", ["mqar", "text"])
def test_length_extrapolation_sweep_expands_to_valid_configs(study):
    mod = sweep_module("length_extrapolation")
    entries = mod.get_sweep(study=study)
    lrs = mod.STUDIES[study].get("learning_rates", mod.LEARNING_RATES)
    assert len({n for n, *_ in entries}) == len(entries) == len(mod.BLOCKS) * len(lrs)
    for name, base, overrides, label in entries[:: max(1, len(entries) // 3)]:
        cfg = load_config(os.path.join(ROOT, base), overrides)
        assert cfg.model.pattern.count(",") == 1 and cfg.data.seq_len == mod.STUDIES[study]["seq_len"]
        for m in (max(mod.MULTIPLES),):  # the longest evaluation is a valid config of the same model
            for mode in mod.STUDIES[study]["modes"]:
                longer = le.longer_config(cfg, m, mode)
                assert longer.data.seq_len == m * cfg.data.seq_len <= longer.model.max_seq_len
                assert (longer.model.d_model, longer.model.pattern) == (cfg.model.d_model, cfg.model.pattern)


def test_zoology_full_grid_matches_zoology():
    mod = sweep_module("zoology_full")
    entries = mod.get_sweep()
    assert len(entries) == len(mod.BLOCKS) * 16 * 4 and len({n for n, *_ in entries}) == len(entries)
    np.testing.assert_allclose(mod.LEARNING_RATES, [1e-4, 4.6416e-4, 2.1544e-3, 1e-2], rtol=1e-4)
    lrs = sorted({float(n.rsplit("_lr", 1)[1]) for n, *_ in entries})
    np.testing.assert_allclose(lrs, mod.LEARNING_RATES, rtol=1e-5)
    seen = set()
    for name, base, overrides, label in entries[: 16 * len(mod.BLOCKS): len(mod.BLOCKS)]:  # the 16 points
        cfg = load_config(os.path.join(ROOT, base), overrides)
        T, kv = cfg.data.seq_len, cfg.data.options["num_kv_pairs"]
        seen.add((cfg.model.d_model, T, kv))
        assert cfg.model.vocab_size == 8192 and cfg.data.options["random_non_queries"] is False
        assert cfg.train.steps == 64 * 100_000 // cfg.train.batch_size  # 64 epochs
        assert cfg.train.batch_size == {64: 512, 128: 512, 256: 256, 512: 128}[T]
    assert seen == {(d, t, kv) for t, kv in [(64, 4), (128, 8), (256, 16), (512, 64)] for d in (64, 128, 256, 512)}
    assert all(f"train.steps={7}" in o for _, _, o, _ in mod.get_sweep(blocks=["A"], steps=7))


def test_longer_config_changes_only_what_the_mode_says():
    cfg = load_config(os.path.join(ROOT, "configs", "mqar_tiny.py"),
                      ["data.seq_len=64", "model.vocab_size=512", "data.options={'num_kv_pairs': 8}"])
    same, scaled = le.longer_config(cfg, 4, "same_pairs"), le.longer_config(cfg, 4, "scaled_pairs")
    assert same.data.seq_len == scaled.data.seq_len == 256
    assert same.data.options["num_kv_pairs"] == 8 and scaled.data.options["num_kv_pairs"] == 32
    assert cfg.data.seq_len == 64 and cfg.data.options["num_kv_pairs"] == 8  # the input is not touched
    assert same.model.d_model == cfg.model.d_model and same.model.pattern == cfg.model.pattern
    small = load_config(os.path.join(ROOT, "configs", "mqar_tiny.py"), ["model.vocab_size=256"])
    with pytest.raises(ConfigError, match="vocab_size"):  # 257 tokens need a larger vocabulary
        le.longer_config(small, 4, "same_pairs")
    with pytest.raises(ValueError, match="mode"):
        le.longer_config(cfg, 2, "more")
    with pytest.raises(ValueError, match="multiple"):
        le.longer_config(cfg, 0, "same")


def fake_row(name, block, lr, accs, modes=("same_pairs", "scaled_pairs")):
    ev = {"step": 10}
    for mode in modes:
        ev[mode] = {"x1": {"accuracy": accs[0], "loss": 1.0, "accuracy_dist_8_16": accs[0] / 2},
                    "x2": {"accuracy": accs[1], "loss": 2.0, "accuracy_dist_16_32": accs[1] / 2},
                    "x4": {"skipped": "too long"} if mode == "scaled_pairs" else {"accuracy": accs[2], "loss": 3.0}}
    return {"name": name, "block": block, "task": "mqar", "d_model": 16, "seq_len": 8, "num_kv_pairs": 1,
            "vocab_size": 256, "lr": lr, "steps": 10, "multiples": [1, 2, 4], "eval": ev, "wall_s": 1.0}


def test_table_keeps_the_best_lr_at_the_training_length_and_rerun_skips_finished(tmp_path):
    rows = [fake_row("A_lr1", "A", 0.01, [0.2, 0.9, 0.9]), fake_row("A_lr2", "A", 0.003, [0.8, 0.1, 0.05]),
            fake_row("D_lr1", "D", 0.01, [0.5, 0.4, 0.3])]
    for r in rows:
        os.makedirs(tmp_path / r["name"])
        (tmp_path / r["name"] / "row.json").write_text(json.dumps(r))
    # Entries whose rows exist are not retrained (a missing base config would fail if they were loaded).
    entries = [(r["name"], "no/such/config.py", [], r["block"]) for r in rows]
    got = le.run(entries, str(tmp_path), multiples=(1, 2, 4), modes=("same_pairs", "scaled_pairs"))
    assert sorted(r["name"] for r in got) == ["A_lr1", "A_lr2", "D_lr1"]
    md = le.write_table(got, str(tmp_path))
    assert "| A | 16 | 8 (1 pairs) | 0.003 | 10 | 0.800 | 0.100 | 0.050 | 0.100 | skipped |" in md
    assert "| D | 16 | 8 (1 pairs) | 0.01 | 10 | 0.500 |" in md and "0.900" not in md
    assert "| block | length | 8-16 | 16-32 |" in md  # by distance, buckets in order
    assert "| A | 1x | 0.40 |  |" in md and "| A | 2x scaled_pairs |  | 0.05 |" in md
    loss_md = le.write_table(got, str(tmp_path), metric="loss")  # text: the lowest loss wins (all tie here)
    assert "| A |" in loss_md and "1.000" in loss_md
    assert os.path.getsize(le.plot(got, str(tmp_path))) > 10_000


@pytest.mark.slow
def test_length_extrapolation_trains_evaluates_and_resumes(tmp_path):
    out = str(tmp_path / "le")
    # batch 8: the test session runs on 8 host devices (conftest), and the batch splits over them.
    tiny = ["train.batch_size=8", "data.num_eval_examples=8", "train.eval_batches=1", "model.num_heads=1"]
    le.main(["--blocks", "A", "--grid", "16,8,1", "--steps", "2", "--lrs", "0.01", "--multiples", "1,2",
             "--out", out, "--set", *tiny])
    (row,) = le.load_rows(out)
    assert row["steps"] == 2 and row["seq_len"] == 8 and row["vocab_size"] == 256
    for mode in ("same_pairs", "scaled_pairs"):
        assert set(row["eval"][mode]) == {"x1", "x2"}
        assert 0.0 <= row["eval"][mode]["x2"]["accuracy"] <= 1.0
    assert row["eval"]["same_pairs"]["x1"] == row["eval"]["scaled_pairs"]["x1"]
    mtime = os.path.getmtime(os.path.join(out, row["name"], "row.json"))
    le.main(["--blocks", "A", "--grid", "16,8,1", "--steps", "2", "--lrs", "0.01", "--multiples", "1,2",
             "--out", out, "--set", *tiny])
    assert os.path.getmtime(os.path.join(out, row["name"], "row.json")) == mtime  # not rerun
    for f in ("results.md", "results.json", "length_extrapolation.png"):
        assert os.path.exists(os.path.join(out, f)), f
