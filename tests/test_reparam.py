"""Stable reparameterisations (StableSSM): eigenvalues stay stable for any raw weight; the naive
``lambda = w`` explodes on a long sequence once a step pushes ``w`` positive.

The long-memory loss is ``mean_t y_t`` of a one-mode real diagonal SSM (``x = 1``, ``B = C = 1``,
``dt = 1``) over ``T = 2000`` steps, in float32. For ``lambda <= 0`` it is at most ``(T + 1) / 2``
and ``|dL/dlambda| <= T^2 / 6``, so the stable parameterisations have ``|dL/dw| < T^2`` whatever
``w`` is (their ``|dlambda/dw|`` is bounded where ``|dL/dlambda|`` is large).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory import reparam
from memjax.memory.ssm import diagonal_ssm

T = 2000


def long_memory_loss(w, name):
    lam = reparam.reparameterize(w, name)  # [H]: one channel per raw weight
    h = w.shape[0]
    x = jnp.ones((1, T, h), jnp.float32)
    ones = jnp.ones((h, 1), jnp.float32)
    y, _ = diagonal_ssm(x, lam[:, None], ones, ones, jnp.ones((h,), jnp.float32), mode="recurrent")
    return jnp.mean(y, axis=(0, 1))  # [H]


def per_channel_grad(w, name):
    # Channels are independent, so the gradient of the sum is each channel's own gradient.
    return jax.jit(jax.grad(lambda w: jnp.sum(long_memory_loss(w, name))))(w)


@pytest.mark.parametrize("name", reparam.STABLE)
def test_stable_reparams_keep_eigenvalues_inside_and_gradients_bounded(name):
    with jax.enable_x64(True):  # the range check in float64: exp(dt * lambda) < 1 exactly
        w64 = jnp.linspace(-20.0, 20.0, 401)
        lam = reparam.reparameterize(w64, name)
        assert bool(jnp.all(lam < 0)) and bool(jnp.all(jnp.abs(jnp.exp(0.1 * lam)) < 1))
    w = jnp.linspace(-8.0, 8.0, 33, dtype=jnp.float32)
    loss = long_memory_loss(w, name)
    g = per_channel_grad(w, name)
    assert bool(jnp.all(jnp.isfinite(loss))) and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.max(jnp.abs(g))) < T ** 2, float(jnp.max(jnp.abs(g)))
    assert float(jnp.max(loss)) <= (T + 1) / 2 * (1 + 1e-5)


def test_naive_parameterisation_explodes_after_a_large_step():
    """All start at the same long memory, lambda = -0.01; one raw step of +1 (a large gradient step)
    leaves the stable ones stable but makes the naive eigenvalue positive: the loss and its
    gradient overflow on a 2000-step sequence."""
    step = 1.0
    for name in ("direct", *reparam.STABLE):
        w0 = reparam.inverse(np.array([-0.01]), name)
        w = jnp.asarray(w0 + step, jnp.float32)
        loss, g = long_memory_loss(w, name), per_channel_grad(w, name)
        finite = bool(jnp.all(jnp.isfinite(loss))) and bool(jnp.all(jnp.isfinite(g)))
        if name == "direct":
            assert float(reparam.reparameterize(w, name)[0]) > 0
            assert not finite, (loss, g)
        else:
            assert finite and float(jnp.max(jnp.abs(g))) < T ** 2, (name, loss, g)


@pytest.mark.parametrize("name", reparam.REPARAMS)
def test_inverse_round_trip(name):
    lam = -np.array([1e-3, 0.05, 0.5, 1.9])
    w = reparam.inverse(lam, name)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(reparam.reparameterize(jnp.asarray(w), name)), lam, rtol=1e-12)
        # JAX (traced) input, as inside a parameter initialiser under jit.
        traced = jax.jit(lambda l: reparam.reparameterize(reparam.inverse(l, name), name))(jnp.asarray(lam))
        np.testing.assert_allclose(np.asarray(traced), lam, rtol=1e-12)


def test_best_has_the_documented_form():
    w = jnp.linspace(-3, 3, 7)
    np.testing.assert_allclose(reparam.reparameterize(w, "best", a=2.0, b=0.25), -1 / (2 * w ** 2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(reparam.get_reparam("softplus")(w), -jnp.log1p(jnp.exp(w)), rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda: reparam.reparameterize(jnp.ones(3), "tanh"), "name must be"),
    (lambda: reparam.reparameterize(jnp.ones(3), "best", b=0.0), "b must be"),
    (lambda: reparam.reparameterize(jnp.ones(3, jnp.complex64), "exp"), "w must be real"),
    (lambda: reparam.inverse(np.array([0.1]), "exp"), "lam must be < 0"),
    (lambda: reparam.inverse(np.array([-3.0]), "best"), r"lam must be in \[-1/b, 0\)"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
