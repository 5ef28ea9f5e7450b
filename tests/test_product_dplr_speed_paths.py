"""The token-chunked form of Gated DeltaProduct (memjax.memory.delta_product, ``n_h >= 2``, one
device, XLA chunk pass): chunks of ``C`` tokens / ``C n_h`` sub-steps, outputs read at the tokens
only, a hand-written backward for the chunk-to-chunk pass, and the default chunk
(``chunk_size=None``: 32 sub-steps).

Reference: a float64 token loop written here from the paper's recurrence (Siems et al. 2025)::

    S <- 0 at a new segment;  S <- exp(g_t) S;  for j in 1..n_h: S <- S + k_j (beta_j (v_j - S^T k_j))^T
    o_t = scale * S^T q_t

Tolerances: float64 ``TOL64`` (1e-10 relative max error) for outputs, final states and the
gradients w.r.t. every input; the float32 comparison with the interleaved delta-rule route (the
previous chunked form, still taken under ``seq_axis`` and by the kernels) allows 2e-5 (measured
~5e-7 on these inputs).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.delta import delta_rule
from memjax.memory.delta_product import delta_product
from tests.helpers import TOL64, rel_err


def reference(q, k, v, beta, g, s0, seg, scale):
    """Token loop (``lax.scan`` over tokens, a Python loop over the ``n_h`` sub-steps); jnp so it
    differentiates. A ``g = -inf`` token clears the state (``exp(-inf) = 0``)."""
    nh = k.shape[2]
    keep = jnp.concatenate([jnp.ones_like(seg[:, :1]), (seg[:, 1:] == seg[:, :-1])], 1)

    def step(S, x):
        qt, kt, vt, bt, gt, kp = x
        S = jnp.where(kp[:, None, None, None], S, 0.0)
        S = jnp.where(jnp.isneginf(gt)[:, :, None, None], 0.0, S * jnp.exp(jnp.maximum(gt, -1e300))[:, :, None, None])
        for j in range(nh):
            pred = jnp.einsum("bhkv,bhk->bhv", S, kt[:, j])
            S = S + jnp.einsum("bhk,bhv->bhkv", kt[:, j], bt[:, j][..., None] * (vt[:, j] - pred))
        return S, scale * jnp.einsum("bhkv,bhk->bhv", S, qt)

    tm = lambda x: jnp.swapaxes(x, 0, 1)
    S, o = jax.lax.scan(step, s0, tuple(tm(x) for x in (q, k, v, beta, g, keep)))
    return tm(o), S


def inputs(B=2, T=21, H=2, K=5, V=3, nh=2, seed=0, strong=False):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, T, H, K))
    k = r.normal(size=(B, T, nh, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = r.normal(size=(B, T, nh, H, V))
    beta = r.uniform(0.05, 1.95, size=(B, T, nh, H))  # negative eigenvalues too
    g = -r.uniform(0.0, 8.0 if strong else 0.4, size=(B, T, H))
    s0 = r.normal(size=(B, H, K, V))
    return q, k, v, beta, g, s0, r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))


def value_and_grads(fn, q, k, v, beta, g, s0, co, cs):
    def loss(q, k, v, beta, g, s0):
        o, s = fn(q, k, v, beta, g, s0)
        return jnp.sum(jnp.where(jnp.isfinite(co), o * co, 0.0)) + jnp.sum(s * cs), (o, s)

    (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3, 4, 5), has_aux=True))(q, k, v, beta, g, s0)
    return o, s, grads


SEG = np.stack([np.repeat([1, 2, 3], [5, 9, 7]), np.repeat([4, 9], [17, 4])])


@pytest.mark.parametrize("chunk,strong", [pytest.param(4, False, marks=pytest.mark.slow), (None, True)])
def test_token_chunks_match_reference_with_gradients(x64, chunk, strong):
    """Packed documents, a -inf gate (a full reset) inside a document, T = 21 (a partial last
    chunk for C = 4 and for the default 16 tokens), forward and every gradient, float64."""
    q, k, v, beta, g, s0, co, cs = inputs(strong=strong)
    g[0, 11, 1] = -np.inf
    seg = jnp.asarray(SEG)
    ref = value_and_grads(lambda *a: reference(*a[:5], a[5], seg, 0.5), q, k, v, beta, g, s0, co, cs)
    got = value_and_grads(lambda q, k, v, b, g, s0: delta_product(q, k, v, b, g, scale=0.5, initial_state=s0,
                                                                    segment_ids=seg, chunk_size=chunk),
                          q, k, v, beta, g, s0, co, cs)
    assert rel_err(got[0], ref[0]) < TOL64, rel_err(got[0], ref[0])
    assert rel_err(got[1], ref[1]) < TOL64, rel_err(got[1], ref[1])
    for i, (a, b) in enumerate(zip(got[2], ref[2])):
        if i == 4:  # d/dg at the -inf gate is 0 in both (exp(-inf) = 0); compare the finite ones
            a, b = np.where(np.isneginf(g), 0.0, a), np.where(np.isneginf(g), 0.0, b)
        assert rel_err(a, b) < TOL64, ("grad", i, rel_err(a, b))
    assert np.all(np.isfinite(got[2][4]))


@pytest.mark.slow
def test_token_chunks_match_the_interleaved_delta_rule_float32():
    """n_h = 3, float32: the token-chunked form against the delta rule on the interleaved
    sub-step sequence (the route seq_axis and the kernels take), outputs, state and gradients."""
    q, k, v, beta, g, s0, co, cs = (jnp.asarray(x, jnp.float32) for x in inputs(T=19, nh=3, seed=1))
    b, t, nh, _, dk = k.shape

    def interleaved(q, k, v, beta, g, s0):
        steps = lambda x: x.reshape(b, t * nh, *x.shape[3:])
        on = lambda x, j: steps(jnp.stack([x if i == j else jnp.zeros_like(x) for i in range(nh)], axis=2))
        o, s = delta_rule(on(q, nh - 1), steps(k), steps(v), steps(beta), g=on(g, 0), scale=dk ** -0.5,
                          initial_state=s0, chunk_size=4 * nh)
        return o[:, nh - 1::nh], s

    ref = value_and_grads(interleaved, q, k, v, beta, g, s0, co, cs)
    got = value_and_grads(lambda *a: delta_product(*a[:5], initial_state=a[5], chunk_size=4), q, k, v, beta, g, s0,
                          co, cs)
    for a, r in zip((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
        assert rel_err(a, r) < 2e-5, rel_err(a, r)
