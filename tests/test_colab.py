"""Runs the code cells of colab/quickstart.ipynb in one namespace (as a kernel would).

Shell lines (``!pip ...``) and magics become ``pass``: memjax is installed here, so the
guarded install branch is never taken. nbclient is not required.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from memjax.model.lm import block_names

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab", "quickstart.ipynb")


def code_cells(path: str) -> list[str]:
    with open(path) as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4
    out = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        lines = []
        for line in src.splitlines():
            stripped = line.lstrip()
            if stripped.startswith(("!", "%")):
                line = line[: len(line) - len(stripped)] + "pass  # " + stripped
            lines.append(line)
        out.append("\n".join(lines) + "\n")
    return out


def test_notebook_has_badge_install_guard_and_fake_devices():
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    first = "".join(nb["cells"][0]["source"])
    assert nb["cells"][0]["cell_type"] == "markdown" and "colab-badge.svg" in first
    cells = code_cells(NOTEBOOK)
    assert "except ImportError:" in cells[0] and "pass  # !pip install" in cells[0]
    assert "--xla_force_host_platform_device_count=8" in cells[1]
    assert all(not c.lstrip().startswith("!") for c in cells)


@pytest.mark.slow
def test_quickstart_notebook_runs(capsys):
    env = dict(os.environ)  # the fake-device cell edits os.environ: keep other tests' env intact
    ns = {"__name__": "__main__"}
    try:
        for i, src in enumerate(code_cells(NOTEBOOK)):
            exec(compile(src, f"{NOTEBOOK}[code cell {i}]", "exec"), ns)
    finally:
        os.environ.clear()
        os.environ.update(env)
        if "WORKDIR" in ns:
            shutil.rmtree(ns["WORKDIR"], ignore_errors=True)
    out = capsys.readouterr().out
    assert jax.device_count() == 8
    cfg = ns["cfg"]
    assert len(block_names(cfg.model)) == 4 and {"attention", "gated_deltanet"} <= set(block_names(cfg.model))
    assert ns["final"]["step"] == cfg.train.steps
    losses = [r["train/loss"] for r in ns["train_log"]]
    assert losses[-1] < losses[0] - 0.1, losses  # the 50 steps trained something
    assert "len_x2/loss" in ns["metrics"] and np.isfinite(ns["metrics"]["len_x2/loss"])
    decoded, full = np.asarray(ns["decoded"]), np.asarray(ns["full"])
    assert decoded.shape == full.shape == (1, cfg.data.seq_len, cfg.model.vocab_size)
    np.testing.assert_allclose(decoded, full, atol=2e-4 * np.abs(full).max(), rtol=0)
    assert out.count("query key") == cfg.data.options["num_kv_pairs"]
