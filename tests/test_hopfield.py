"""Modern Hopfield retrieval: naive reference, convergence, energy descent, the attention identity.

Tolerances: float64 rtol = atol = 1e-12 against the naive formula (1e-6 against
``causal_attention``, whose logits are float32); energy descent checked as
``E(xi_{n+1}) <= E(xi_n) + 1e-10`` per step in float64; bf16 vs float32 relative error < 2e-2.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.attention import causal_attention
from memjax.memory.hopfield import hopfield_energy, hopfield_retrieval

TOL = dict(rtol=1e-12, atol=1e-12)


def naive_update(xi, X, beta, mask=None):
    """One step in the paper's column form for a single state pattern: ``X softmax(beta X^T xi)``
    with ``X: [D, N]`` (numpy, float64)."""
    z = beta * X.T @ xi
    if mask is not None:
        z = np.where(mask, z, -np.inf)
    p = np.exp(z - z.max())
    return X @ (p / p.sum())


def test_matches_naive_update_with_broadcast_mask_and_per_query_beta(x64):
    rng = np.random.default_rng(0)
    b, h, q, n, d = 2, 3, 4, 7, 5
    xi = rng.normal(size=(b, h, q, d))
    pats = rng.normal(size=(h, n, d))  # shared across the batch (learned patterns)
    beta = rng.uniform(0.2, 2.0, size=(b, h, q))
    mask = rng.random((b, 1, q, n)) < 0.7
    mask[..., 0] = True
    out = hopfield_retrieval(jnp.asarray(xi), jnp.asarray(pats), beta=jnp.asarray(beta), steps=3,
                             mask=jnp.asarray(mask))
    for i in range(b):
        for j in range(h):
            for r in range(q):
                x = xi[i, j, r]
                for _ in range(3):
                    x = naive_update(x, pats[j].T, beta[i, j, r], mask[i, 0, r])
                np.testing.assert_allclose(out[i, j, r], x, **TOL)


def test_noisy_query_converges_to_stored_pattern_for_large_beta(x64):
    """16 random patterns in 64 dims (nearly orthogonal): from a query with 30% noise, a few
    steps at beta = 1 recover the pattern to 1e-8; at beta = 0.01 the state is a blend (the
    metastable average) far from every pattern."""
    rng = np.random.default_rng(1)
    n, d = 16, 64
    pats = rng.normal(size=(n, d))
    idx = rng.integers(0, n, size=8)
    noisy = pats[idx] + 0.3 * rng.normal(size=(8, d)) * np.linalg.norm(pats[idx], axis=-1, keepdims=True) / 8
    out = hopfield_retrieval(jnp.asarray(noisy), jnp.asarray(pats), beta=1.0, steps=3)
    np.testing.assert_allclose(out, pats[idx], rtol=0, atol=1e-8)
    blurred = hopfield_retrieval(jnp.asarray(noisy), jnp.asarray(pats), beta=0.01, steps=3)
    dist = np.linalg.norm(np.asarray(blurred)[:, None] - pats[None], axis=-1).min(-1)
    assert (dist > 0.5 * np.linalg.norm(pats, axis=-1).mean()).all()


@pytest.mark.parametrize("seed", range(3))
def test_energy_never_increases(x64, seed):
    """Property of the CCCP update: E(xi_{n+1}) <= E(xi_n) at every step, for random pattern
    sets of mixed norms, random betas (0.05 to 20), masks and starting states."""
    rng = np.random.default_rng(seed)
    b, q, n, d = 4, 6, 12, 8
    pats = jnp.asarray(rng.normal(size=(b, n, d)) * rng.uniform(0.2, 3.0, size=(b, n, 1)))
    xi = jnp.asarray(rng.normal(size=(b, q, d)) * 2.0)
    beta = jnp.asarray(np.exp(rng.uniform(np.log(0.05), np.log(20.0), size=(b, q))))
    mask = jnp.asarray(rng.random((b, q, n)) < 0.6).at[..., 0].set(True)
    energies = [hopfield_energy(xi, pats, beta=beta, mask=mask)]
    for _ in range(8):
        xi = hopfield_retrieval(xi, pats, beta=beta, mask=mask)
        energies.append(hopfield_energy(xi, pats, beta=beta, mask=mask))
    e = np.stack([np.asarray(x) for x in energies])
    assert np.all(np.diff(e, axis=0) <= 1e-10), np.diff(e, axis=0).max()
    assert np.any(np.diff(e, axis=0) < -1e-3)  # and it does move


def test_context_form_is_causal_attention_with_beta_as_inverse_temperature(x64):
    """Stored patterns = past keys (causal mask), read out values: one step equals causal softmax
    attention with scale = beta; gradients agree too."""
    rng = np.random.default_rng(2)
    b, t, h, d = 2, 9, 2, 4
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d))) for _ in range(3))
    beta = 0.7
    causal = jnp.tril(jnp.ones((t, t), bool))

    def hop(q, k, v):
        hm = lambda x: jnp.swapaxes(x, 1, 2)  # [B, H, T, D]
        return jnp.swapaxes(hopfield_retrieval(hm(q), hm(k), beta=beta, mask=causal, values=hm(v)), 1, 2)

    def att(q, k, v):
        return causal_attention(q, k, v, scale=beta)

    # causal_attention forms its logits in float32 (preferred_element_type), hence 1e-6 here.
    tol = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(hop)(q, k, v), jax.jit(att)(q, k, v), **tol)
    ct = jnp.asarray(rng.normal(size=(b, t, h, d)))
    g1 = jax.jit(jax.grad(lambda *a: jnp.sum(hop(*a) * ct), argnums=(0, 1, 2)))(q, k, v)
    g2 = jax.jit(jax.grad(lambda *a: jnp.sum(att(*a) * ct), argnums=(0, 1, 2)))(q, k, v)
    for x, y in zip(g1, g2):
        np.testing.assert_allclose(x, y, **tol)


def test_fully_masked_query_reads_zero_with_finite_gradient():
    xi = jnp.ones((2, 3))
    pats = jnp.arange(12.0).reshape(4, 3) / 10
    mask = jnp.asarray([[True] * 4, [False] * 4])
    out = hopfield_retrieval(xi, pats, beta=1.0, mask=mask)
    assert float(jnp.abs(out[1]).max()) == 0.0
    g = jax.grad(lambda p: jnp.sum(hopfield_retrieval(xi, p, beta=1.0, mask=mask, steps=2)))(pats)
    assert bool(jnp.isfinite(g).all())


def test_bf16_close_to_float32():
    rng = np.random.default_rng(3)
    xi, pats = rng.normal(size=(4, 8, 32)), rng.normal(size=(4, 64, 32))
    o32 = hopfield_retrieval(jnp.asarray(xi, jnp.float32), jnp.asarray(pats, jnp.float32), beta=0.2, steps=2)
    ob = hopfield_retrieval(jnp.asarray(xi, jnp.bfloat16), jnp.asarray(pats, jnp.bfloat16), beta=0.2, steps=2)
    assert ob.dtype == jnp.bfloat16
    assert float(jnp.linalg.norm(ob.astype(jnp.float32) - o32) / jnp.linalg.norm(o32)) < 2e-2


def test_input_validation():
    xi, pats = jnp.ones((2, 3, 4)), jnp.ones((2, 5, 4))
    with pytest.raises(ValueError, match="xi must be"):
        hopfield_retrieval(jnp.ones(4), pats, beta=1.0)
    with pytest.raises(ValueError, match="patterns must be"):
        hopfield_retrieval(xi, jnp.ones((2, 5, 3)), beta=1.0)
    with pytest.raises(ValueError, match="do not broadcast"):
        hopfield_retrieval(xi, jnp.ones((3, 5, 4)), beta=1.0)
    with pytest.raises(ValueError, match="values must be"):
        hopfield_retrieval(xi, pats, beta=1.0, values=jnp.ones((2, 4, 6)))
    with pytest.raises(ValueError, match="mask must be"):
        hopfield_retrieval(xi, pats, beta=1.0, mask=jnp.ones((2, 3, 4), bool))
    with pytest.raises(ValueError, match="mask must be boolean"):
        hopfield_retrieval(xi, pats, beta=1.0, mask=jnp.ones((2, 3, 5)))
    with pytest.raises(ValueError, match="beta must be"):
        hopfield_retrieval(xi, pats, beta=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="steps"):
        hopfield_retrieval(xi, pats, beta=1.0, steps=0)
    with pytest.raises(TypeError, match="hopfield_retrieval: xi must have a floating dtype .*got int32"):
        hopfield_retrieval(xi.astype(jnp.int32), pats, beta=1.0)
    with pytest.raises(TypeError, match="hopfield_energy: patterns must have a floating dtype .*got bool"):
        hopfield_energy(xi, pats.astype(bool), beta=1.0)

