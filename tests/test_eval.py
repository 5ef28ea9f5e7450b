import os

import jax
from tiny import tiny_config

from memjax.train.evaluate import evaluate_checkpoint
from memjax.train.loop import build, evaluate, train_and_evaluate


def test_untrained_model_is_at_chance():
    cfg = tiny_config("A,A")
    setup = build(cfg)
    with jax.set_mesh(setup.mesh):
        state = setup.init_fn()
    m = evaluate(setup, state)
    # 32 possible values (vocab 64 / 2); an untrained model is near 1/32, far from recall.
    assert m["accuracy"] < 0.15 and m["loss"] > 3.0


def test_eval_cli_restores_and_extrapolates(tmp_path):
    cfg = tiny_config("A,A", steps=4)
    cfg.model.vocab_size = 160  # room for MQAR at 2x and 4x the training length
    train_and_evaluate(cfg, str(tmp_path))
    m = evaluate_checkpoint(cfg, str(tmp_path), num_batches=1)
    assert m["step"] == 4
    assert {"accuracy", "len_x2/accuracy", "len_x4/accuracy"} <= set(m)
    assert os.path.exists(tmp_path / "eval_metrics.json")
