"""The sweep script: its configs expand to valid runs, and the table keeps the best learning rate."""
import importlib.util
import os

import pytest

from benchmarks.sweep import load_results, lr_sensitivity, write_lr_table, write_table
from memjax.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("sweep", ["mqar_blocks.py", "mqar_lengths.py", "mqar_mixture.py", "selective_copying.py"])
def test_sweep_entries_are_valid_configs_with_unique_names(sweep):
    spec = importlib.util.spec_from_file_location("sweep_cfg", os.path.join(ROOT, "configs", "sweeps", sweep))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    entries = mod.get_sweep()
    assert len({name for name, *_ in entries}) == len(entries)
    assert len(entries) == len(mod.BLOCKS) * len(mod.GRID) * len(mod.LEARNING_RATES)
    for name, base, overrides, label in entries:
        cfg = load_config(os.path.join(ROOT, base), overrides)
        d, seq = cfg.model.d_model, cfg.data.seq_len
        assert name.startswith(f"{label}_d{d}_T{seq}_")
        assert cfg.model.pattern.count(",") == 1  # two layers of one block


def test_table_keeps_best_learning_rate_and_only_run_points(tmp_path):
    import json

    rows = [
        {"name": "A_1", "block": "A", "d_model": 64, "seq_len": 64, "num_kv_pairs": 4, "lr": 0.01, "accuracy": 0.2, "state_size": 10},
        {"name": "A_2", "block": "A", "d_model": 64, "seq_len": 64, "num_kv_pairs": 4, "lr": 0.003, "accuracy": 0.9, "state_size": 10},
        {"name": "D_1", "block": "D", "d_model": 128, "seq_len": 64, "num_kv_pairs": 8, "lr": 0.01, "accuracy": 0.5, "state_size": 7},
    ]
    for r in rows:  # one row.json per run directory, as run_sweep writes them
        os.makedirs(tmp_path / r["name"])
        (tmp_path / r["name"] / "row.json").write_text(json.dumps(r))
    md = write_table(load_results(str(tmp_path)), str(tmp_path))
    lines = md.splitlines()
    assert lines[0].count("kv=") == 2  # (64, 64, 4) and (128, 64, 8) only, not their cross product
    assert "| A | 0.900 (0.003) |  |" in md
    assert "| D |  | 0.500 (0.01) |" in md
    sens = lr_sensitivity(load_results(str(tmp_path)))
    assert sens["A", 64, 64, 4] == {"accuracy": {0.01: 0.2, 0.003: 0.9}, "best": 0.9, "good": 1}
    lr_md = write_lr_table(load_results(str(tmp_path)), str(tmp_path))
    assert "| A | 64 | 64 | 4 | 0.900 | 0.200 | 1/2 |" in lr_md  # columns in increasing lr: 0.003, 0.01
    assert "| D | 128 | 64 | 8 |  | 0.500 | 1/1 |" in lr_md
    assert (tmp_path / "lr_sensitivity.md").read_text().strip() == lr_md
