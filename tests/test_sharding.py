"""A sharded train step equals the single-device step (8 fake CPU devices)."""
import sys

import jax
import numpy as np
import pytest
from tiny import tiny_config

from memjax.config import ConfigError
from memjax.data.pipeline import make_dataset
from memjax.nn.registry import known_names
from memjax.train.loop import build, run_steps

# One representative block per family, used when that family is present in this checkout.
FAMILY_BLOCKS = ["A", "F", "D", "titans_mag", "M2", "R", "M"]


def hybrid_pattern() -> str:
    known = {n.split("=")[0] for n in known_names()}
    return ",".join(b for b in FAMILY_BLOCKS if b in known)


def _one_step(cfg, devices):
    setup = build(cfg, devices=devices)
    with jax.set_mesh(setup.mesh):
        state = setup.init_fn()
    batch = next(iter(make_dataset(cfg, "train")))
    state, metrics = run_steps(setup, state, batch)
    return jax.tree.map(np.asarray, state["params"]), float(metrics["loss"]), setup


def _hybrid_config():
    cfg = tiny_config(hybrid_pattern())
    cfg.model.blocks = {"memory_plus": {"shard": "rows"}} if "M" in cfg.model.pattern.split(",") else {}
    return cfg


@pytest.fixture(scope="module")
def single_device_step():
    params, loss, _ = _one_step(_hybrid_config(), jax.devices()[:1])
    return params, loss


@pytest.mark.parametrize("mesh", [pytest.param((8, 1, 1, 1), marks=pytest.mark.slow),
                                  pytest.param((2, 1, 4, 1), marks=pytest.mark.slow),
                                  pytest.param((1, 2, 2, 2), marks=pytest.mark.slow)])
def test_sharded_step_equals_single_device(mesh, single_device_step):
    """One train step of a hybrid with one block of every family present, on three
    (data, fsdp, seq, tensor) meshes that use every axis; seq > 1 splits the time axis
    (sequence parallelism)."""
    ref_params, ref_loss = single_device_step
    cfg = _hybrid_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.seq, cfg.mesh.tensor = mesh
    params, loss, setup = _one_step(cfg, jax.devices())
    assert dict(setup.mesh.shape) == dict(zip(("data", "fsdp", "seq", "tensor"), mesh))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_parameters_are_sharded_by_logical_rules():
    cfg = tiny_config("A,F")
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
    setup = build(cfg)
    with jax.set_mesh(setup.mesh):
        state = setup.init_fn()
    p = state["params"]
    assert p["embed"].sharding.spec == jax.P("tensor", "fsdp")  # ("vocab", "embed")
    assert p["blocks"][1]["gate"]["kernel"].sharding.spec == jax.P("fsdp", "tensor")  # ("embed", "mlp")
    shard = p["blocks"][1]["gate"]["kernel"].addressable_shards[0].data
    assert shard.shape == (cfg.model.d_model // 2, 4 * cfg.model.d_model // 2)
    # Adam moments follow their parameters.
    mu = state["opt_state"][1][0].mu["embed"]
    assert mu.sharding.spec == jax.P("tensor", "fsdp")


def test_gradient_accumulation_equals_large_batch():
    cfg = tiny_config("A,F")
    ref, ref_loss, _ = _one_step(cfg, jax.devices()[:1])
    cfg.train.microbatches = 4
    acc, loss, _ = _one_step(cfg, jax.devices()[:1])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_axis_that_does_not_divide_is_a_clear_error():
    cfg = tiny_config("A,F")
    cfg.model.d_model, cfg.model.num_heads = 36, 2
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 8, 1
    with pytest.raises(ConfigError, match=r"'embed', size 36\) is not divisible by mesh axes \('fsdp',\)"):
        build(cfg)


def test_mesh_that_does_not_fit_is_a_clear_error():
    cfg = tiny_config("A,F")
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 1
    with pytest.raises(ConfigError, match="does not match the 8 available devices"):
        build(cfg)


def test_sequence_axis_that_does_not_divide_the_length_is_a_clear_error():
    cfg = tiny_config("D,F")
    cfg.data.seq_len = 60
    cfg.mesh.data, cfg.mesh.seq = 1, 8
    with pytest.raises(ConfigError, match=r"'mesh.seq' \(8\) must divide data.seq_len \(60\)"):
        build(cfg)


@pytest.mark.slow
def test_sequence_sharded_step_equals_single_device(monkeypatch):
    """The blocks with a state exchange that the hybrid above lacks (GLA, mixture-of-memories,
    S4D, the sliding-window + SSM hybrid) on a (data 2, seq 4) mesh: the step equals the
    single-device step, and the blocks did run their memories inside shard_map with the state
    exchange (rather than leaving XLA to gather the sequence)."""
    calls = []
    for module in ("delta", "linear", "ssm", "rg_lru"):
        module = sys.modules[f"memjax.memory.{module}"]  # (the package re-exports functions of the same names)
        for name in ("sharded_chunk_recurrence", "sharded_linear_scan"):
            if hasattr(module, name):
                orig = getattr(module, name)
                monkeypatch.setattr(module, name, lambda *a, _o=orig, _n=name, **k: (
                    calls.append((_n, k.get("axis_name"))), _o(*a, **k))[1])
    cfg = tiny_config("G,mom,S,E")
    ref_params, ref_loss, _ = _one_step(cfg, jax.devices()[:1])
    assert {axis for _, axis in calls} == {None}
    calls.clear()
    cfg.mesh.data, cfg.mesh.seq = 2, 4
    params, loss, _ = _one_step(cfg, jax.devices())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert {axis for _, axis in calls} == {"seq"}  # no block fell back to the gathered sequence
    assert {name for name, _ in calls} == {"sharded_chunk_recurrence", "sharded_linear_scan"}


@pytest.mark.slow
def test_long_context_config_trains_with_time_split_over_all_devices():
    """configs/long_context.py (packed text, time over every device) at a small size trains a
    step on the (seq 8) mesh (equality with one device is tested above for the same blocks)."""
    from memjax.config import load_config

    small = ["data.seq_len=256", "model.max_seq_len=256", "model.d_model=64", "model.num_heads=2",
             "model.pattern=D,F,M2,F,R,F", "train.batch_size=2"]
    cfg = load_config("configs/long_context.py", small)
    _, loss, setup = _one_step(cfg, jax.devices())
    assert dict(setup.mesh.shape) == {"data": 1, "fsdp": 1, "seq": 8, "tensor": 1}
    # A byte-level model starts near ln(259) nats per byte.
    assert abs(loss - np.log(259)) < 1.0
