import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tiny import tiny_config

from memjax.train.checkpoint import Checkpointer, abstract_like
from memjax.train.loop import NonFiniteLossError, build, train_and_evaluate


def _final_params(workdir, cfg):
    setup = build(cfg)
    with jax.set_mesh(setup.mesh):
        target = setup.init_fn()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    state, data, _ = ckpt.restore(abstract_like(target))
    ckpt.close()
    return jax.tree.map(np.asarray, state), data


def _losses(workdir):
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_loss_falls_on_mqar(tmp_path):
    cfg = tiny_config(steps=60, log_every=10, checkpoint_every=1000)
    train_and_evaluate(cfg, str(tmp_path))
    losses = _losses(tmp_path)
    assert losses[60] < losses[10] - 0.5, losses


def test_resume_is_bitwise_identical(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    cfg = tiny_config(steps=8)
    a = train_and_evaluate(cfg, str(straight))
    half = tiny_config(steps=8, stop_at_step=4)
    train_and_evaluate(half, str(split))  # "killed" after 4 steps (checkpoint at 4)
    b = train_and_evaluate(cfg, str(split))  # a fresh call resumes from step 4
    assert a["step"] == b["step"] == 8
    pa, da = _final_params(straight, cfg)
    pb, db = _final_params(split, cfg)
    assert da == db
    flat_a, flat_b = jax.tree.leaves(pa), jax.tree.leaves(pb)
    assert all((x == y).all() for x, y in zip(flat_a, flat_b))
    assert _losses(straight)[8] == _losses(split)[8]
    assert a["loss"] == b["loss"]


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(steps=12, inject_nan_at_step=6, checkpoint_every=4, log_every=2)
    with pytest.raises(NonFiniteLossError, match="step 6.*Last good checkpoint: step 4"):
        train_and_evaluate(cfg, str(tmp_path))
    state, _ = _final_params(tmp_path, cfg)
    assert int(state["step"]) == 4 and int(state["bad_step"]) == 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_uninterrupted(tmp_path):
    cfg_path = tmp_path / "cfg.py"
    cfg_path.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom tiny import tiny_config\n"
        "def get_config():\n    return tiny_config(steps=400, checkpoint_every=1000, log_every=1)\n"
        % os.path.dirname(__file__))
    run = tmp_path / "run"
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "memjax.train.cli", "--config", str(cfg_path),
                             "--workdir", str(run)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    # Wait until training is under way, then preempt.
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved checkpoint at step" in out
    stopped = int(out.split("SIGTERM: saved checkpoint at step ")[1].split(";")[0])
    assert 0 < stopped < 400

    import importlib.util

    spec = importlib.util.spec_from_file_location("cfgmod", cfg_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
    resumed = train_and_evaluate(cfg, str(run))
    straight = train_and_evaluate(cfg, str(tmp_path / "straight"))
    assert resumed == straight
    pa, _ = _final_params(run, cfg)
    pb, _ = _final_params(tmp_path / "straight", cfg)
    assert all((x == y).all() for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
