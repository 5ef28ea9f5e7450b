"""Smoke test of the fact-capacity study (configs/sweeps/fact_capacity.py, benchmarks/fact_capacity.py):
every grid entry builds a valid config, bad grids raise, the FLOPs and parameter accounting
match hand computations, and one tiny entry runs end to end (2 steps) into a row and a report."""
import json
import os

import pytest

from benchmarks.fact_capacity import (
    accounting,
    count_params,
    load_sweep,
    report,
    run_entry,
)
from memjax.config import ConfigError

SWEEP = load_sweep()
D = 32


def test_every_grid_entry_builds_a_valid_config():
    entries = SWEEP.get_sweep(facts=SWEEP.FACTS, epochs=SWEEP.EPOCHS)
    assert len(entries) == len(SWEEP.FACTS) * len(SWEEP.VARIANTS)
    assert len({e[0] for e in entries}) == len(entries)  # distinct run directories
    steps = {}
    for name, variant, n, n_steps, lr, names, seed in entries:
        cfg = SWEEP.make_config(variant, n, steps=n_steps, lr=lr, subject_length=names, seed=seed)
        assert seed == 0 and cfg.data.seed == cfg.train.seed == 0
        o = cfg.data.options
        assert o["num_subjects"] * o["num_relations"] == n and names == SWEEP.SUBJECT_LENGTH == 2
        # named subjects: the vocabulary is the name alphabet, the same at every number of facts
        assert o["subject_alphabet"] ** 2 >= o["num_subjects"]
        assert cfg.model.vocab_size == 256 >= 2 + o["subject_alphabet"] + o["num_relations"] + o["num_objects"] + o["num_words"]
        # sparse-read tables: their own constant lr, no weight decay; everything else the one lr
        tables = variant.startswith(("pkm", "memory_plus", "ngram"))
        assert cfg.optim.memory_values_lr == (SWEEP.VALUES_LR if tables else 0.0)
        steps[n] = n_steps
    one_token = SWEEP.get_sweep(facts=[1024], variants=["pkm"], epochs=SWEEP.EPOCHS, subject_length=1)
    assert one_token[0][0] == "pkm_facts1024_steps1339_lr0.01"  # the first study's run directory
    seeded = SWEEP.get_sweep(facts=[1024], variants=["pkm"], epochs=SWEEP.EPOCHS, seed=1)[0]
    assert seeded[0].endswith("_names2_seed1") and seeded[-1] == 1
    assert SWEEP.make_config("pkm", 1024, steps=10, seed=1).data.seed == 1
    assert "subject_length" not in SWEEP.make_config("pkm", 1024, steps=10, subject_length=1).data.options
    # Steps grow with the number of facts (a fixed number of exposures per fact).
    ordered = [steps[n] for n in sorted(steps)]
    assert ordered == sorted(ordered) and ordered[-1] > 10 * ordered[0]


def test_bad_grids_raise():
    with pytest.raises(ConfigError, match="multiple of num_relations"):
        SWEEP.task_options(1001)
    with pytest.raises(ConfigError, match="MAX_VOCAB"):
        SWEEP.task_options(SWEEP.NUM_RELATIONS * (SWEEP.MAX_VOCAB + 8), subject_length=1)
    with pytest.raises(ConfigError, match="unknown fact-capacity variant"):
        SWEEP.get_sweep(variants=["dense_f999"], facts=[1024])
    with pytest.raises(ConfigError, match="steps"):
        SWEEP.make_config("pkm", 1024, steps=0)


def test_flops_and_params_match_hand_counts():
    # pkm: query 2 d H k + sub-key scores 2 H n k + candidates H knn^2 + value read 2 H knn d.
    assert SWEEP.block_flops("pkm") == 2 * D * 2 * D + 2 * 2 * 64 * D + 2 * 8 * 8 + 2 * 2 * 8 * D == 13440
    assert SWEEP.block_flops("dense_f64") == 6 * D * 64
    # memory+ with 1 head: query, scores, candidates, value read, gate, out.
    assert SWEEP.block_flops("memory_plus") == 2 * D * D + 2 * 64 * D + 64 + 2 * 8 * D + 4 * D * D
    assert SWEEP.block_flops("memory_plus_shared") == 2 * SWEEP.block_flops("memory_plus")
    assert SWEEP.block_flops("ngram") == SWEEP.block_flops("ngram_random_ids") == 4 * 64 * D + 2 * D
    # Whole model at 1024 facts (vocab 256): attention 8 d^2 + 4 d (T + 1) / 2 + logits 2 d V + FFN.
    assert SWEEP.model_flops("dense_f64", 1024, subject_length=1) == 8 * D * D + 4 * D * 65 // 2 + 2 * D * 256 + 6 * D * 64
    # Parameters of dense_f32 at 1024 facts: tied embedding V d, attention 4 d^2, 3 norms of d, FFN 3 d f.
    cfg = SWEEP.make_config("dense_f32", 1024, steps=10, subject_length=1)
    assert count_params(cfg) == 256 * D + 4 * D * D + 3 * D + 3 * D * 32
    assert count_params(SWEEP.make_config("dense_f32", 65536, steps=10)) == count_params(cfg)  # named subjects
    # pkm adds the values n^2 d, the query d (H k), sub-keys H 2 n k / 2 and the query norm k.
    pkm = SWEEP.make_config("pkm", 1024, steps=10)
    assert count_params(pkm) == 256 * D + 4 * D * D + 3 * D + 64 ** 2 * D + D * 2 * D + 2 * 2 * 64 * D // 2 + D
    assert accounting(pkm)["params_sparse"] == 64 ** 2 * D
    # n-gram tables: orders 2-3 x 2 heads, the 4 smallest primes >= 2053, rows of 16.
    assert accounting(SWEEP.make_config("ngram", 1024, steps=10))["params_sparse"] == (2053 + 2063 + 2069 + 2081) * 16


@pytest.mark.slow  # ~12 s of compiling; the default run checks every entry's config (as tests/test_sweep.py does)
def test_tiny_entry_runs_end_to_end(tmp_path):
    # The cheapest variant (compile time dominates); the controls' blocks: tests/test_ngram_random_ids.py.
    entry = ("tiny_dense", "dense_f32", 256, 2, 3e-3, 1, 0)
    row = run_entry(SWEEP, entry, str(tmp_path))
    assert row["steps"] == 2 and row["num_facts"] == 256 and 0.0 <= row["fact_accuracy"] <= 1.0
    assert 0.0 <= row["train_phrasing_recall"] <= 1.0 and row["subject_length"] == 1
    assert row["block_flops"] == SWEEP.block_flops("dense_f32")
    # The repository's training-FLOPs count (forward + backward) agrees with 3 x the forward count
    # to 1% (it takes the mean causal context as T / 2 instead of (T + 1) / 2).
    assert row["params_sparse"] == 0 and row["params_embedding"] == 128 * D
    assert abs(row["train_flops_repo"] / (3 * row["model_flops"]) - 1) < 0.01
    assert json.loads((tmp_path / "tiny_dense" / "row.json").read_text()) == row
    prefix = str(tmp_path / "fact_capacity")
    md = report([row], prefix)
    assert "dense_f32" in md and "256 facts" in md
    assert all(os.path.getsize(prefix + ext) > 0 for ext in (".json", ".md", ".png"))
