"""Reports: loss-curve and needle figures, the eval-metrics table, the needle grid and its CLI."""
import json
import os
import re

import pytest
from tiny import tiny_config

from memjax.config import ConfigError
from memjax.train.needle import needle_grid
from memjax.eval.plots import (metric_series, metrics_table_markdown, plot_loss_curves,
                               plot_needle_heatmap, read_metrics)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG_MAGIC and os.path.getsize(path) > 1000


def _write_run(wd, losses, eval_every=2, truncated=False):
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": step, "train/loss": loss, "train/accuracy": 0.1}) + "\n")
            if step % eval_every == 0:
                f.write(json.dumps({"step": step, "eval/loss": loss + 0.1, "eval/accuracy": 0.2}) + "\n")
        if truncated:
            f.write('{"step": 99, "train/lo')  # a run still writing its last line


def test_metric_series_sorts_and_keeps_last_value_of_a_repeated_step(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for rec in ({"step": 2, "train/loss": 3.0}, {"step": 1, "train/loss": 4.0},
                    {"step": 2, "train/loss": 2.5}, {"step": 2, "eval/loss": 9.0}):
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 3, "tr')
    records = read_metrics(str(tmp_path))
    assert metric_series(records, "train/loss") == ([1, 2], [4.0, 2.5])
    assert metric_series(records, "eval/loss") == ([2], [9.0])


def test_plot_loss_curves_writes_png(tmp_path):
    runs = {"A": str(tmp_path / "a"), "L": str(tmp_path / "b")}
    _write_run(runs["A"], [4.0, 3.0, 2.0, 1.0])
    _write_run(runs["L"], [4.0, 3.5, 3.2, 3.1], truncated=True)
    out = plot_loss_curves(runs, str(tmp_path / "fig" / "loss.png"), logy=True)
    assert _is_png(out)
    assert _is_png(plot_loss_curves(runs, str(tmp_path / "acc.png"), metric="train/accuracy"))


def test_plot_loss_curves_errors(tmp_path):
    _write_run(str(tmp_path / "a"), [1.0, 0.5])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_loss_curves({"x": str(tmp_path / "missing")}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="'train/perplexity'"):
        plot_loss_curves({"a": str(tmp_path / "a")}, str(tmp_path / "x.png"), metric="train/perplexity")
    with pytest.raises(ValueError, match="workdirs"):
        plot_loss_curves({}, str(tmp_path / "x.png"))
    with pytest.raises(ValueError, match="metric"):
        plot_loss_curves({"a": str(tmp_path / "a")}, str(tmp_path / "x.png"), metric="loss")


def test_plot_needle_heatmap_writes_png(tmp_path):
    results = {(n, d): (n + 10 * d) / 1000 for n in (64, 128, 256) for d in (0.0, 0.5, 1.0)}
    del results[(256, 1.0)]  # a missing cell is left blank
    assert _is_png(plot_needle_heatmap(results, str(tmp_path / "needle.png")))
    with pytest.raises(ValueError, match="accuracy in \\[0, 1\\]"):
        plot_needle_heatmap({(64, 0.5): 1.5}, str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="pairs"):
        plot_needle_heatmap({64: 0.5}, str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="non-empty"):
        plot_needle_heatmap({}, str(tmp_path / "bad.png"))


def _table_rows(md: str) -> dict[str, dict[str, str]]:
    lines = [l for l in md.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_metrics_table_markdown_has_the_numbers():
    metrics = {"step": 40, "loss": 0.123456, "accuracy": 0.98765, "accuracy_dist_0_8": 1.0,
               "accuracy_dist_8_16": 0.5, "len_x2/loss": 1.5, "len_x2/accuracy": 0.25,
               "len_x2/accuracy_dist_16_32": 0.125, "len_x4/skipped": "config key 'data.seq_len' too big"}
    md = metrics_table_markdown(metrics)
    assert "step 40" in md
    rows = _table_rows(md)
    assert list(rows) == ["x1", "x2", "x4"]
    header = list(rows["x1"])
    assert header[:3] == ["length", "loss", "accuracy"] and header[-1] == "note"
    assert rows["x1"]["loss"] == "0.1235" and rows["x1"]["accuracy"] == "0.9877"
    assert rows["x1"]["accuracy_dist_0_8"] == "1.0000" and rows["x1"]["accuracy_dist_8_16"] == "0.5000"
    assert rows["x1"]["accuracy_dist_16_32"] == ""
    assert rows["x2"]["loss"] == "1.5000" and rows["x2"]["accuracy"] == "0.2500"
    assert rows["x2"]["accuracy_dist_16_32"] == "0.1250"
    assert rows["x4"]["loss"] == "" and "too big" in rows["x4"]["note"]
    with pytest.raises(ValueError, match="len_x<int>"):
        metrics_table_markdown({"len_xtwo/loss": 1.0})
    with pytest.raises(ValueError, match="no metric"):
        metrics_table_markdown({"step": 3})


def test_plot_runs_script_labels_by_block(tmp_path):
    from benchmarks.plot_runs import collect_runs, main

    _write_run(str(tmp_path / "A_d64_lr0.01"), [3.0, 2.0])
    _write_run(str(tmp_path / "L_d64_lr0.01"), [3.0, 2.5])
    _write_run(str(tmp_path / "A_d64_lr0.003"), [3.0, 2.9])
    os.makedirs(tmp_path / "empty_d64_lr0.01")  # no metrics.jsonl: not a run
    (tmp_path / "A_d64_lr0.01" / "row.json").write_text(json.dumps({"block": "A"}))
    runs = collect_runs(str(tmp_path), "_lr0.01")
    assert runs == {"A": str(tmp_path / "A_d64_lr0.01"), "L_d64_lr0.01": str(tmp_path / "L_d64_lr0.01")}
    (tmp_path / "A_d64_lr0.003" / "row.json").write_text(json.dumps({"block": "A"}))
    assert set(collect_runs(str(tmp_path))) == {"A (A_d64_lr0.003)", "A (A_d64_lr0.01)", "L_d64_lr0.01"}
    out = main(["--runs", str(tmp_path), "--filter", "_lr0.01", "--out", str(tmp_path / "c.png")])
    assert _is_png(out)


# ----------------------------------------------------------------------------- needle grid


def _passkey_config():
    cfg = tiny_config("A,A", steps=4)
    cfg.data.task = "passkey"
    cfg.data.options = {"key_length": 2, "filler": "random"}
    cfg.data.seq_len = 16
    return cfg


@pytest.fixture(scope="module")
def passkey_run(tmp_path_factory):
    from memjax.train.loop import train_and_evaluate

    wd = tmp_path_factory.mktemp("passkey")
    cfg = _passkey_config()
    train_and_evaluate(cfg, str(wd))
    return cfg, str(wd)


def test_needle_grid_one_entry_per_cell(passkey_run):
    cfg, wd = passkey_run
    res = needle_grid(cfg, wd, context_lengths=[16, 32], depths=[0.0, 0.5, 1.0], num_batches=1)
    assert set(res) == {(n, d) for n in (16, 32) for d in (0.0, 0.5, 1.0)}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in res.values())


def test_needle_grid_rejects_bad_requests(passkey_run):
    cfg, wd = passkey_run
    with pytest.raises(ConfigError, match=r"context length 5: .*'data.seq_len'"):
        needle_grid(cfg, wd, context_lengths=[16, 5], depths=[0.5])
    with pytest.raises(ValueError, match="depths"):
        needle_grid(cfg, wd, context_lengths=[16], depths=[1.5])
    with pytest.raises(ValueError, match="context_lengths"):
        needle_grid(cfg, wd, context_lengths=[0], depths=[0.5])
    mqar = tiny_config("A,A")
    with pytest.raises(ConfigError, match="'data.task'"):
        needle_grid(mqar, wd, context_lengths=[16], depths=[0.5])


def test_eval_cli_needle_grid(passkey_run, tmp_path, capsys):
    from memjax.train.cli import eval_main

    cfg, wd = passkey_run
    config_file = tmp_path / "passkey_tiny.py"
    config_file.write_text(
        "from memjax.config import Config\n\n\n"
        f"def get_config():\n    return Config.from_dict({cfg.to_dict()!r})\n")
    eval_main(["--config", str(config_file), "--workdir", wd, "--set", "train.eval_batches=1",
               "--needle-grid", "--lengths", "16", "--depths", "0,1"])
    out = json.load(open(os.path.join(wd, "needle.json")))
    assert out["step"] == 4 and out["metric"] == "key_accuracy"
    assert [(r["context_length"], r["depth"]) for r in out["results"]] == [(16, 0.0), (16, 1.0)]
    assert _is_png(os.path.join(wd, "needle_heatmap.png"))
    assert re.search(r"length +16 depth 0 +key_accuracy [01]\.\d{4}", capsys.readouterr().out)
    with pytest.raises(SystemExit) as exc:
        eval_main(["--config", str(config_file), "--workdir", wd, "--needle-grid", "--lengths", "4"])
    assert exc.value.code == 2
