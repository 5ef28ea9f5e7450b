"""memjax.nn.dense: the materialised-input projection equals jnp.dot in value and gradient, and
the training step takes it on CPU without changing what it computes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.nn.dense import dense, materialized_inputs


@pytest.mark.parametrize("dtype, pet", [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, jnp.float32)])
def test_materialized_dense_matches_dot_values_and_gradients(dtype, pet):
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (3, 5, 8), dtype)
    w = jax.random.normal(ks[1], (8, 6), dtype)
    ct = jax.random.normal(ks[2], (3, 5, 6), jnp.float32)

    def loss(x, w, on):
        with materialized_inputs(on):
            y = dense(jnp.tanh(x), w, preferred_element_type=pet)
        return jnp.sum(y.astype(jnp.float32) * ct), y

    (l0, y0), g0 = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w, False)
    (l1, y1), g1 = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)(x, w, True)
    assert y1.dtype == y0.dtype == (pet or dtype)
    assert [g.dtype for g in g1] == [dtype, dtype]
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(y1), np.float32(y0), rtol=tol, atol=tol)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol * 4)


def test_context_is_off_by_default_and_restored():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    plain = jax.make_jaxpr(lambda x, w: dense(x, w))(x, w)
    assert "optimization_barrier" not in str(plain)
    with materialized_inputs():
        guarded = jax.make_jaxpr(lambda x, w: dense(x, w))(x, w)
        with materialized_inputs(False):
            off = jax.make_jaxpr(lambda x, w: dense(x, w))(x, w)
    assert "custom_vjp" in str(guarded) and "custom_vjp" not in str(off)
    assert "custom_vjp" not in str(jax.make_jaxpr(lambda x, w: dense(x, w))(x, w))


@pytest.mark.slow  # (two builds of the train step: ~10-20 s; the default suite trains with the guard elsewhere)
def test_cpu_train_step_with_and_without_the_guard_agree(monkeypatch):
    import contextlib
    import importlib

    from memjax.config import load_config
    from memjax.data.pipeline import make_dataset

    loop = importlib.import_module("memjax.train.loop")
    cfg = load_config("configs/mqar_tiny.py", ["model.pattern=D", "model.d_model=32", "data.seq_len=32",
                                               "train.batch_size=8", "train.steps=3"])
    batches = [b for _, b in zip(range(2), iter(make_dataset(cfg, "train")))]

    def run():
        setup = loop.build(cfg, devices=jax.devices()[:1])
        with jax.set_mesh(setup.mesh):
            state = setup.init_fn()
        text = setup.train_step.lower(state, loop.to_global(setup, batches[0])).as_text()
        losses = []
        for b in batches:
            state, m = loop.run_steps(setup, state, b)
            losses.append(float(m["loss"]))
        return text, losses, jax.tree.leaves(state["params"])

    guarded_text, guarded, p1 = run()
    monkeypatch.setattr(loop, "materialized_inputs", lambda enabled=True: contextlib.nullcontext())
    plain_text, plain, p0 = run()
    assert "optimization_barrier" in guarded_text and "optimization_barrier" not in plain_text
    np.testing.assert_allclose(guarded, plain, rtol=1e-5)
    for a, b in zip(p1, p0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
