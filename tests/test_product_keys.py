"""Product-key top-k vs brute force over all n^2 slots; the multi-head lookup vs a dense reference.

Tolerance: float64 (x64 fixture), 1e-12 relative; indices must match exactly.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.product_keys import product_key_lookup, slot_usage, topk


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-300))


def brute_force(query, subkeys, k):
    """Score every slot (i, j) = <q1, K1_i> + <q2, K2_j> with loops, then sort (NumPy float64)."""
    q, keys = np.asarray(query, np.float64), np.asarray(subkeys, np.float64)
    h, _, n, half = keys.shape
    lead = q.shape[:-2]
    scores = np.zeros(lead + (h, k))
    idx = np.zeros(lead + (h, k), np.int64)
    for pos in itertools.product(*[range(s) for s in lead]):
        for head in range(h):
            qq = q[pos + (head,)]
            full = np.array([qq[:half] @ keys[head, 0, i] + qq[half:] @ keys[head, 1, j]
                             for i in range(n) for j in range(n)])
            order = np.argsort(-full, kind="stable")[:k]
            scores[pos + (head,)] = full[order]
            idx[pos + (head,)] = order  # flat slot index i * n + j
    return scores, idx


@pytest.mark.parametrize("n,k,heads,lead", [(4, 1, 1, (3,)), (5, 3, 2, (2, 3)), (8, 8, 3, (4,)), (16, 5, 4, (2,))])
def test_topk_equals_brute_force(x64, n, k, heads, lead):
    rng = np.random.default_rng(n * 100 + k)  # NumPy data: no x64 RNG compilations
    d = 6
    query = jnp.asarray(rng.standard_normal(lead + (heads, d)))
    subkeys = jnp.asarray(rng.standard_normal((heads, 2, n, d // 2)))
    scores, idx = jax.jit(topk, static_argnums=2)(query, subkeys, k)
    ref_s, ref_i = brute_force(query, subkeys, k)
    assert scores.shape == idx.shape == lead + (heads, k) and idx.dtype == jnp.int32
    assert rel(scores, ref_s) < 1e-12
    np.testing.assert_array_equal(np.asarray(idx), ref_i)


def dense_lookup(query, subkeys, values, k):
    """Independent form: all n^2 scores, top-k, softmax, gather (differentiable the same way)."""
    h, _, n, half = subkeys.shape
    s1 = jnp.einsum("...hd,hnd->...hn", query[..., :half], subkeys[:, 0])
    s2 = jnp.einsum("...hd,hnd->...hn", query[..., half:], subkeys[:, 1])
    full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], n * n)
    s, i = jax.lax.top_k(full, k)
    w = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("...hk,...hkd->...d", w, values[i])


def test_lookup_and_gradients_match_dense_reference(x64):
    rng = np.random.default_rng(0)
    h, n, d, k, dv = 3, 6, 8, 4, 5
    query, subkeys, values, cot = (jnp.asarray(rng.standard_normal(s)) for s in
                                   [(2, 7, h, d), (h, 2, n, d // 2), (n * n, dv), (2, 7, dv)])

    def loss(fn):
        return lambda q, kk, v: jnp.sum(fn(q, kk, v) * cot)

    ours = lambda q, kk, v: product_key_lookup(q, kk, v, k, impl="xla")[0]
    out, idx = jax.jit(product_key_lookup, static_argnums=3)(query, subkeys, values, k)
    assert out.shape == (2, 7, dv) and idx.shape == (2, 7, h, k)
    assert rel(out, dense_lookup(query, subkeys, values, k)) < 1e-12
    g = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(query, subkeys, values)
    g_ref = jax.jit(jax.grad(loss(lambda q, kk, v: dense_lookup(q, kk, v, k)), argnums=(0, 1, 2)))(
        query, subkeys, values)
    for a, b in zip(g, g_ref):
        assert rel(a, b) < 1e-12
    # Any lookup with the embedding-bag signature plugs in (e.g. the sharded ones).
    calls = []
    custom = product_key_lookup(query, subkeys, values, k,
                                lookup=lambda v, i, w: calls.append(i.shape) or jnp.einsum("bk,bkd->bd", w, v[i]))[0]
    assert calls == [(14, h * k)] and rel(custom, out) < 1e-12


def test_validation():
    q, keys = jnp.zeros((2, 3, 8)), jnp.zeros((3, 2, 5, 4))
    with pytest.raises(ValueError, match="subkeys must be"):
        topk(q, jnp.zeros((3, 5, 4)), 2)
    with pytest.raises(ValueError, match="query must be"):
        topk(jnp.zeros((2, 3, 6)), keys, 2)
    with pytest.raises(ValueError, match="query must be"):
        topk(jnp.zeros((2, 4, 8)), keys, 2)
    with pytest.raises(ValueError, match="k must be"):
        topk(q, keys, 6)
    with pytest.raises(ValueError, match="k must be"):
        topk(q, keys, 0)
    with pytest.raises(ValueError, match="values must be"):
        product_key_lookup(q, keys, jnp.zeros((24, 3)), 2)


def test_slot_usage():
    idx = jnp.array([[0, 3, 3], [7, 0, 9]])
    assert float(slot_usage(idx, 10)) == pytest.approx(0.4)
    assert float(slot_usage(jnp.arange(10), 10)) == 1.0
    with pytest.raises(ValueError, match="num_slots"):
        slot_usage(idx, 0)
