"""Delta rule / gated delta rule: every form vs a naive loop written from the equation, float64.

Reference: ``S' = exp(g_t) S_{t-1}`` (zeroed at a new segment), ``S_t = S' + k_t (beta_t (v_t -
S'^T k_t))^T``, ``o_t = scale * S_t^T q_t``. Tolerance: relative max error <= 1e-10 (float64) for
outputs, final states and the gradients w.r.t. q, k, v, beta, g and the initial state.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.delta import delta_rule, unit_lower_inverse
from tests.helpers import TOL64, largest_intermediate, rel_err, rel_rmse

dr = jax.jit(delta_rule, static_argnames=("mode", "chunk_size"))


def naive(q, k, v, beta, g, s0, seg, scale):
    """Token loop, straight from the gated delta rule (independent of the implementation)."""
    T = q.shape[1]
    qs, ks, vs, bs = (jnp.unstack(x, axis=1) for x in (q, k, v, beta))
    decays = None if g is None else jnp.unstack(jnp.exp(g), axis=1)
    keep = None if seg is None else jnp.unstack((seg[:, 1:] == seg[:, :-1]).astype(q.dtype), axis=1)
    S = s0
    outs = []
    for t in range(T):
        if g is not None:
            S = S * decays[t][:, :, None, None]
        if seg is not None and t > 0:
            S = S * keep[t - 1][:, None, None, None]
        pred = jnp.einsum("bhkv,bhk->bhv", S, ks[t])
        S = S + jnp.einsum("bhk,bhv->bhkv", ks[t], bs[t][..., None] * (vs[t] - pred))
        outs.append(scale * jnp.einsum("bhkv,bhk->bhv", S, qs[t]))
    return jnp.stack(outs, 1), S


def inputs(B=2, T=63, H=2, K=5, V=4, seed=0, decay=True):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, B, T, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)  # as the blocks feed it: a contraction
    v = r.normal(size=(B, T, H, V))
    beta = r.uniform(0.05, 0.95, size=(B, T, H))
    g = -r.uniform(0.0, 0.5, size=(B, T, H)) if decay else None
    s0 = r.normal(size=(B, H, K, V))
    co = r.normal(size=(B, T, H, V))
    cs = r.normal(size=(B, H, K, V))
    return q, k, v, beta, g, s0, co, cs


def value_and_grads(fn, q, k, v, beta, g, s0, co, cs, jit=True):
    def loss(q, k, v, beta, g, s0):
        o, s = fn(q, k, v, beta, g, s0)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

    argnums = (0, 1, 2, 3, 4, 5) if g is not None else (0, 1, 2, 3, 5)
    f = jax.value_and_grad(loss, argnums, has_aux=True)
    (_, (o, s)), grads = (jax.jit(f) if jit else f)(q, k, v, beta, g, s0)
    return o, s, grads


# Chunk 7 divides T = 63 (no padding), 10 does not (padded tail); 64 >= T is the single-chunk
# (quadratic) form.
REC, C7, C10, C64 = ("recurrent", 64), ("chunked", 7), ("chunked", 10), ("chunked", 64)


@pytest.mark.parametrize("T,packed,forms", [pytest.param(63, False, [REC, C7, C10, C64], marks=pytest.mark.slow),
                                            (63, True, [REC, C10]),
                                            (1, False, [C10])])
def test_forms_match_reference(x64, T, packed, forms):
    q, k, v, beta, g, s0, co, cs = inputs(T=T)
    scale = 0.7
    seg = None
    if packed:
        seg = jnp.asarray(np.stack([np.repeat([1, 2, 3], [7, 20, T - 27]), np.repeat([4, 9], [T - 5, 5])]))
    ref = value_and_grads(lambda q, k, v, b, g, s0: naive(q, k, v, b, g, s0, seg, scale),
                          q, k, v, beta, g, s0, co, cs, jit=False)
    for mode, c in forms:
        fn = lambda q, k, v, b, g, s0: delta_rule(q, k, v, b, g=g, scale=scale, initial_state=s0,
                                                  segment_ids=seg, mode=mode, chunk_size=c)
        o, s, grads = value_and_grads(fn, q, k, v, beta, g, s0, co, cs)
        assert o.dtype == s.dtype == jnp.float64
        assert rel_err(o, ref[0]) < TOL64, (mode, c)
        assert rel_err(s, ref[1]) < TOL64, (mode, c)
        for i, (a, b) in enumerate(zip(grads, ref[2])):
            assert rel_err(a, b) < TOL64, (mode, c, "grad", i)


def test_no_decay_unnormalised_keys_default_scale_packed(x64):
    """g = None (plain DeltaNet), keys of any norm, default scale, zero initial state, packed;
    with gradients. The chunked algorithm is exact for any keys, not only unit-norm ones."""
    q, k, v, beta, _, _, co, cs = inputs(T=63, decay=False)
    k = k * np.random.default_rng(3).uniform(0.2, 1.3, size=k.shape[:3] + (1,))
    seg = jnp.asarray(np.repeat([[1, 2], [3, 3]], [12, 51], axis=1))
    zero = jnp.zeros(cs.shape)
    ref = value_and_grads(lambda q, k, v, b, g, s0: naive(q, k, v, b, None, s0, seg, q.shape[-1] ** -0.5),
                          q, k, v, beta, None, zero, co, cs, jit=False)
    fn = lambda q, k, v, b, g, s0: delta_rule(q, k, v, b, segment_ids=seg, chunk_size=8)
    got = value_and_grads(fn, q, k, v, beta, None, zero, co, cs)
    for a, b in zip(jax.tree.leaves(got[:2]) + list(got[2][:4]), jax.tree.leaves(ref[:2]) + list(ref[2][:4])):
        assert rel_err(a, b) < TOL64


@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
def test_chaining_two_halves_equals_one_pass(x64, mode):
    q, k, v, beta, g, s0, _, _ = inputs(T=50)
    kw = dict(mode=mode, chunk_size=16)
    o, s = dr(q, k, v, beta, g=g, initial_state=s0, **kw)
    a, b = slice(0, 23), slice(23, None)
    o1, s1 = dr(q[:, a], k[:, a], v[:, a], beta[:, a], g=g[:, a], initial_state=s0, **kw)
    o2, s2 = dr(q[:, b], k[:, b], v[:, b], beta[:, b], g=g[:, b], initial_state=s1, **kw)
    assert rel_err(jnp.concatenate([o1, o2], 1), o) < TOL64
    assert rel_err(s2, s) < TOL64


def test_packed_equals_separate_documents(x64):
    q, k, v, beta, g, s0, _, _ = inputs(B=1, T=45)
    lengths = [11, 25, 9]
    seg = jnp.asarray(np.repeat([3, 5, 8], lengths))[None]
    o, s = dr(q, k, v, beta, g=g, initial_state=s0, segment_ids=seg, chunk_size=16)
    start, parts = 0, []
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        init = s0 if i == 0 else None
        oi, si = dr(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], g=g[:, sl], initial_state=init, chunk_size=16)
        parts.append(oi)
        start += n
    assert rel_err(o, jnp.concatenate(parts, 1)) < TOL64
    assert rel_err(s, si) < TOL64


def test_strong_decay_and_resets_stay_finite():
    q, k, v, beta, _, s0, co, cs = inputs(T=100)
    q, k, v, beta, s0, co, cs = (jnp.asarray(x, jnp.float32) for x in (q, k, v, beta, s0, co, cs))
    g = jnp.full(q.shape[:3], -50.0)
    seg = jnp.asarray(np.repeat([[1, 2, 3]], [30, 40, 30], axis=1).repeat(2, 0))
    res = {}
    for m in ("chunked", "recurrent"):
        fn = lambda q, k, v, b, g, s0, m=m: delta_rule(q, k, v, b, g=g, initial_state=s0, segment_ids=seg,
                                                       mode=m, chunk_size=64)
        res[m] = value_and_grads(fn, q, k, v, beta, g, s0, co, cs)
    for leaf in jax.tree.leaves(res["chunked"]):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    for a, b in zip(jax.tree.leaves(res["chunked"]), jax.tree.leaves(res["recurrent"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # dL/dg ~ 1e-21 here: see linear attention


def test_bf16_matches_float32():
    """bf16 inputs (state and arithmetic stay float32): relative RMSE vs the float32 run < 1e-2."""
    q, k, v, beta, g, s0, _, _ = inputs(T=100, K=16, V=16)
    q, k, v, beta, g, s0 = (jnp.asarray(x, jnp.float32) for x in (q, k, v, beta, g, s0))
    o32, s32 = dr(q, k, v, beta, g=g, initial_state=s0, chunk_size=32)
    bf = lambda x: x.astype(jnp.bfloat16)
    o16, s16 = dr(bf(q), bf(k), bf(v), bf(beta), g=bf(g), initial_state=s0, chunk_size=32)
    assert o16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    assert rel_rmse(o16, o32) < 1e-2
    assert rel_rmse(s16, s32) < 1e-2


def test_no_per_token_state_in_chunked_graph():
    B, T, H, K, V = 1, 256, 2, 8, 8
    q = k = jnp.ones((B, T, H, K)) / K ** 0.5
    v = jnp.ones((B, T, H, V))
    beta = g = jnp.full((B, T, H), 0.5)

    def loss(q, k, v, beta, g):
        o, s = delta_rule(q, k, v, beta, g=-g, chunk_size=32)
        return jnp.sum(o) + jnp.sum(s)

    assert largest_intermediate(jax.grad(loss, (0, 1, 2, 3, 4)), q, k, v, beta, g) < B * T * H * K * V
    rec = lambda q, k, v, beta, g: jnp.sum(delta_rule(q, k, v, beta, g=-g, mode="recurrent")[0])
    assert largest_intermediate(jax.grad(rec, (0, 1, 2, 3, 4)), q, k, v, beta, g) >= B * T * H * K * V


def test_unit_lower_inverse(x64):
    """Blocked forward substitution == (I + tril(L, -1))^{-1}, for power-of-two and other sizes."""
    for c in (1, 5, 17, 64):  # 17: one 16-block plus a padded one
        # Entries of size 0.3 (like beta k_i.k_j with unit keys) keep it well conditioned; the upper
        # part is random and must be ignored.
        L = 0.3 * np.random.default_rng(c).normal(size=(2, 3, c, c))
        got = jax.jit(unit_lower_inverse)(jnp.asarray(L))
        ref = np.linalg.inv(np.tril(L, -1) + np.eye(c))
        assert rel_err(got, ref) < 1e-10, c


def test_unit_lower_inverse_rejects_non_square():
    with pytest.raises(ValueError, match="lower must be"):
        unit_lower_inverse(jnp.zeros((3, 4)))


def _ok():
    q = jnp.zeros((2, 8, 3, 4))
    return dict(q=q, k=q, v=jnp.zeros((2, 8, 3, 5)), beta=jnp.zeros((2, 8, 3)))


@pytest.mark.parametrize("change,match", [
    (dict(q=jnp.zeros((2, 8, 3))), r"q must have shape \[B, T, H, K\]"),
    (dict(k=jnp.zeros((2, 8, 2, 4))), "k must have shape"),
    (dict(v=jnp.zeros((1, 8, 3, 5))), "v must have shape"),
    (dict(beta=jnp.zeros((2, 8, 3, 1))),
     r"delta_rule: beta must have shape \[B, T, H\] = \(2, 8, 3\), got \(2, 8, 3, 1\)"),
    (dict(beta=None), r"beta must have shape \[B, T, H\] = \(2, 8, 3\), got None"),
    (dict(g=jnp.zeros((2, 8, 4))), "g must have shape"),
    (dict(initial_state=jnp.zeros((2, 3, 4))), r"initial_state must have shape \[B, H, K, V\] = \(2, 3, 4, 5\)"),
    (dict(segment_ids=jnp.zeros((8,), jnp.int32)), r"segment_ids must have shape \[B, T\] = \(2, 8\)"),
    (dict(chunk_size=-4), "chunk_size"),
    (dict(mode="parallel"), "mode"),
])
def test_bad_inputs_raise(change, match):
    kw = {**_ok(), **change}
    with pytest.raises(ValueError, match=match):
        delta_rule(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("beta"), **kw)


def test_integer_beta_raises_type_error():
    kw = _ok()
    with pytest.raises(TypeError, match="delta_rule: beta must have a floating dtype .*got int32"):
        delta_rule(kw["q"], kw["k"], kw["v"], jnp.ones((2, 8, 3), jnp.int32))
