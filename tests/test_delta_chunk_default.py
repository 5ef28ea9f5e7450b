"""The delta-rule family's default chunk length follows the platform compiled for."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.config import ModelConfig
from memjax.memory.chunking import delta_chunk_size
from memjax.memory.delta import delta_rule
from memjax.memory.dplr import dplr_delta_rule
from memjax.train import compile as plan_lib
from memjax.train.flops import flops_per_token


def test_default_by_platform():
    assert delta_chunk_size(None, "cpu") == 32
    assert delta_chunk_size(None, "tpu") == delta_chunk_size(None, "gpu") == 64
    assert delta_chunk_size(48, "cpu") == delta_chunk_size(48, "tpu") == 48  # an explicit size wins
    assert delta_chunk_size(None) == (32 if jax.default_backend() == "cpu" else 64)


def test_mesh_of_tpu_devices_gets_the_tpu_default():
    # a compile-only TPU device (libtpu): the mesh names the target, not this CPU host
    try:
        devices = plan_lib.topology_devices("v5p:1x1x1")
    except Exception as e:  # noqa: BLE001 - no libtpu here
        pytest.skip(f"no compile-only TPU topology: {e}")
    mesh = jax.make_mesh((1,), ("x",), devices=devices[:1], axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert delta_chunk_size(None) == 64


def test_default_is_the_cpu_chunk_on_cpu():
    if jax.default_backend() != "cpu":
        return
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal((1, 70, 2, 8)), jnp.float32) for _ in range(3))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.nn.sigmoid(jnp.asarray(r.standard_normal((1, 70, 2)), jnp.float32))
    g = -jax.nn.softplus(jnp.asarray(r.standard_normal((1, 70, 2)), jnp.float32))
    both = jax.jit(lambda *a: (delta_rule(*a[:4], g=a[4]), delta_rule(*a[:4], g=a[4], chunk_size=32)))
    (o, s), (o32, s32) = both(q, k, v, beta, g)
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o32))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s32))
    gv = jnp.broadcast_to(g[..., None], q.shape) * 0.1
    dplr = jax.jit(lambda *a: (dplr_delta_rule(*a), dplr_delta_rule(*a, chunk_size=32)))
    (od, _), (od32, _) = dplr(q, k, v, -k, 0.5 * k, gv)
    np.testing.assert_array_equal(np.asarray(od), np.asarray(od32))


def test_flops_model_uses_the_target_platforms_chunk():
    cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern="D")
    cpu = flops_per_token(cfg, 256, 1000, backend="cpu")["terms"]["delta_rule"]
    tpu = flops_per_token(cfg, 256, 1000, backend="tpu")["terms"]["delta_rule"]
    assert cpu < tpu  # the intra-chunk work per token grows with C
    cfg64 = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern="D",
                        blocks={"gated_deltanet": {"chunk_size": 64}})
    assert flops_per_token(cfg64, 256, 1000, backend="cpu")["terms"]["delta_rule"] == tpu
