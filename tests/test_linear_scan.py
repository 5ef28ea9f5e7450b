"""The parallel linear scan and its custom backward against a sequential loop, in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from memjax.memory.linear_scan import linear_scan


@pytest.fixture(autouse=True)
def _x64():
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


def loop(a, b, h0, axis):
    """``h_t = a_t h_{t-1} + b_t`` by ``lax.scan`` (autodiff through the loop is the reference)."""
    a, b = jnp.moveaxis(jnp.broadcast_to(a, b.shape), axis, 0), jnp.moveaxis(b, axis, 0)
    h0 = jnp.zeros_like(b[0]) if h0 is None else h0.astype(b.dtype)

    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    return jnp.moveaxis(jax.lax.scan(step, h0, (a, b))[1], 0, axis)


def _inputs(shape, complex_, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.2, 1.0, shape)
    b = rng.normal(size=shape)
    h0 = rng.normal(size=shape[:1] + shape[2:])
    if complex_:
        a = a * np.exp(1j * rng.uniform(-1, 1, shape))
        b = b + 1j * rng.normal(size=shape)
        h0 = h0 + 1j * rng.normal(size=h0.shape)
    return jnp.asarray(a), jnp.asarray(b), jnp.asarray(h0)


# default: each length, real and complex, with and without remat once; the rest of the product is slow
_DEFAULT_CASES = {(1, False, False), (2, True, True), (37, False, True), (37, True, False)}


@pytest.mark.parametrize("t,complex_,remat", [
    (t, c, r) if (t, c, r) in _DEFAULT_CASES else pytest.param(t, c, r, marks=pytest.mark.slow)
    for t in (1, 2, 37) for c in (False, True) for r in (False, True)])
def test_values_and_gradients_match_loop(t, complex_, remat):
    a, b, h0 = _inputs((2, t, 3), complex_)
    scan = lambda a, b, h0: linear_scan(a, b, h0, remat=remat)
    np.testing.assert_allclose(scan(a, b, h0), loop(a, b, h0, 1), atol=1e-12)
    w = jnp.asarray(np.random.default_rng(1).normal(size=b.shape))
    loss = lambda f: lambda a, b, h0: jnp.sum(jnp.real(f(a, b, h0) * w)) + jnp.sum(jnp.imag(f(a, b, h0)) ** 2)
    got = jax.grad(loss(scan), argnums=(0, 1, 2))(a, b, h0)
    ref = jax.grad(loss(lambda a, b, h0: loop(a, b, h0, 1)), argnums=(0, 1, 2))(a, b, h0)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=1e-11)


def test_remat_along_another_axis_with_broadcast_decay():
    rng = np.random.default_rng(2)
    b = jnp.asarray(rng.normal(size=(3, 4, 9)))
    a = jnp.asarray(rng.uniform(0.1, 1.0, (1, 4, 9)))  # broadcast over the batch axis
    scan = lambda a, b: linear_scan(a, b, None, axis=-1, remat=True)
    np.testing.assert_allclose(scan(a, b), loop(a, b, None, 2), atol=1e-12)
    check_grads(scan, (a, b), order=1, modes=("rev",))
    ref = jax.grad(lambda a: jnp.sum(jnp.sin(loop(a, b, None, 2))))(a)
    np.testing.assert_allclose(jax.grad(lambda a: jnp.sum(jnp.sin(scan(a, b))))(a), ref, atol=1e-11)
