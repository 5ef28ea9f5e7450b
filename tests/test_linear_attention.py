"""Linear attention: every form vs a naive loop written from the equation, in float64.

Reference: ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``; with segment ids
the state is zeroed before the first token of each new segment. Tolerance: relative max error
(``max|x - ref| / max|ref|``) <= 1e-10 in float64 for outputs, final states and all gradients.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory import feature_maps as fm
from memjax.memory.linear import linear_attention
from tests.helpers import TOL64, largest_intermediate, rel_err, rel_rmse

# Jitted once per shape: eager dispatch of the chunked form compiles every op separately (slow).
la = jax.jit(linear_attention, static_argnames=("mode", "chunk_size"))


def naive(q, k, v, g, s0, seg, scale):
    """Token loop, straight from the recurrence (independent of the implementation)."""
    T = q.shape[1]
    qs, ks, vs = jnp.unstack(q, axis=1), jnp.unstack(k, axis=1), jnp.unstack(v, axis=1)
    decays = [None] * T if g is None else jnp.unstack(jnp.exp(g), axis=1)
    keep = None if seg is None else jnp.unstack((seg[:, 1:] == seg[:, :-1]).astype(q.dtype), axis=1)
    S = s0
    outs = []
    for t in range(T):
        if g is not None:
            S = S * decays[t][:, :, None, None]
        if seg is not None and t > 0:
            S = S * keep[t - 1][:, None, None, None]
        S = S + jnp.einsum("bhk,bhv->bhkv", ks[t], vs[t])
        outs.append(scale * jnp.einsum("bhkv,bhk->bhv", S, qs[t]))
    return jnp.stack(outs, 1), S


def inputs(B=2, T=63, H=2, K=5, V=4, seed=0, decay=True):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, B, T, H, K))
    v = r.normal(size=(B, T, H, V))
    g = -r.uniform(0.0, 0.5, size=(B, T, H)) if decay else None
    s0 = r.normal(size=(B, H, K, V))
    co = r.normal(size=(B, T, H, V))  # random cotangents for the output and final state
    cs = r.normal(size=(B, H, K, V))
    return q, k, v, g, s0, co, cs


def value_and_grads(fn, q, k, v, g, s0, co, cs, jit=True):
    def loss(q, k, v, g, s0):
        o, s = fn(q, k, v, g, s0)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

    argnums = (0, 1, 2, 3, 4) if g is not None else (0, 1, 2, 4)
    f = jax.value_and_grad(loss, argnums, has_aux=True)
    (_, (o, s)), grads = (jax.jit(f) if jit else f)(q, k, v, g, s0)
    return o, s, grads


# Chunk 7 divides T = 63 (no padding), 10 does not (padded tail); every case also runs chunk 10.
REC, PAR, C7, C10 = ("recurrent", 64), ("parallel", 64), ("chunked", 7), ("chunked", 10)


@pytest.mark.parametrize("T,packed,forms", [(63, False, [REC, PAR, C7, C10]),
                                            (63, True, [REC, PAR, C10]),
                                            (1, False, [PAR, C10])])
def test_forms_match_reference(x64, T, packed, forms):
    q, k, v, g, s0, co, cs = inputs(T=T)
    scale = 0.7
    seg = None
    if packed:  # boundaries not aligned with any chunk size, and a different layout per row
        seg = jnp.asarray(np.stack([np.repeat([1, 2, 3], [7, 20, T - 27]), np.repeat([4, 9], [T - 5, 5])]))
    # The reference runs eagerly: compiling a T-step unrolled loop would dominate the test time.
    ref = value_and_grads(lambda q, k, v, g, s0: naive(q, k, v, g, s0, seg, scale), q, k, v, g, s0, co, cs, jit=False)
    for mode, c in forms:
        fn = lambda q, k, v, g, s0: linear_attention(q, k, v, g=g, scale=scale, initial_state=s0,
                                                     segment_ids=seg, mode=mode, chunk_size=c)
        o, s, grads = value_and_grads(fn, q, k, v, g, s0, co, cs)
        assert o.dtype == s.dtype == jnp.float64
        assert rel_err(o, ref[0]) < TOL64, (mode, c)
        assert rel_err(s, ref[1]) < TOL64, (mode, c)
        for i, (a, b) in enumerate(zip(grads, ref[2])):
            assert rel_err(a, b) < TOL64, (mode, c, "grad", i)


def test_no_decay_default_scale_packed(x64):
    """g = None (plain linear attention), default scale, zero initial state, packed; with gradients."""
    q, k, v, _, _, co, cs = inputs(T=63, decay=False)
    seg = jnp.asarray(np.repeat([[1, 2], [3, 3]], [12, 51], axis=1))
    zero = jnp.zeros(cs.shape)
    ref = value_and_grads(lambda q, k, v, g, s0: naive(q, k, v, None, s0, seg, q.shape[-1] ** -0.5),
                          q, k, v, None, zero, co, cs, jit=False)
    fn = lambda q, k, v, g, s0: linear_attention(q, k, v, segment_ids=seg, chunk_size=8)
    got = value_and_grads(fn, q, k, v, None, zero, co, cs)
    for a, b in zip(jax.tree.leaves(got[:2]) + list(got[2][:3]), jax.tree.leaves(ref[:2]) + list(ref[2][:3])):
        assert rel_err(a, b) < TOL64


@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
def test_chaining_two_halves_equals_one_pass(x64, mode):
    q, k, v, g, s0, _, _ = inputs(T=50)
    kw = dict(mode=mode, chunk_size=16)
    o, s = la(q, k, v, g=g, initial_state=s0, **kw)
    o1, s1 = la(q[:, :23], k[:, :23], v[:, :23], g=g[:, :23], initial_state=s0, **kw)
    o2, s2 = la(q[:, 23:], k[:, 23:], v[:, 23:], g=g[:, 23:], initial_state=s1, **kw)
    assert rel_err(jnp.concatenate([o1, o2], 1), o) < TOL64
    assert rel_err(s2, s) < TOL64


def test_packed_equals_separate_documents(x64):
    q, k, v, g, s0, _, _ = inputs(B=1, T=45)
    lengths = [11, 25, 9]
    seg = jnp.asarray(np.repeat([3, 5, 8], lengths))[None]
    o, s = la(q, k, v, g=g, initial_state=s0, segment_ids=seg, chunk_size=16)
    start, parts = 0, []
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        init = s0 if i == 0 else None  # initial_state reaches only the first document
        oi, si = la(q[:, sl], k[:, sl], v[:, sl], g=g[:, sl], initial_state=init, chunk_size=16)
        parts.append(oi)
        start += n
    assert rel_err(o, jnp.concatenate(parts, 1)) < TOL64
    assert rel_err(s, si) < TOL64


def test_strong_decay_and_resets_stay_finite():
    """Cumulative log decays of -3000 inside a chunk: only differences G_i - G_j <= 0 are exponentiated."""
    q, k, v, _, s0, co, cs = inputs(T=100)
    q, k, v, s0, co, cs = (jnp.asarray(x, jnp.float32) for x in (q, k, v, s0, co, cs))
    g = jnp.full(q.shape[:3], -50.0)
    seg = jnp.asarray(np.repeat([[1, 2, 3]], [30, 40, 30], axis=1).repeat(2, 0))
    fns = {m: (lambda q, k, v, g, s0, m=m: linear_attention(q, k, v, g=g, initial_state=s0, segment_ids=seg,
                                                            mode=m, chunk_size=64)) for m in ("chunked", "recurrent")}
    res = {m: value_and_grads(f, q, k, v, g, s0, co, cs) for m, f in fns.items()}
    for leaf in jax.tree.leaves(res["chunked"]):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    # Absolute tolerance: dL/dg here is ~1e-21 (every decay is exp(-50)); float32 cancellation
    # in either form is far larger than that relative to the leaf but tiny in absolute terms.
    for a, b in zip(jax.tree.leaves(res["chunked"]), jax.tree.leaves(res["recurrent"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_matches_float32():
    """bf16 inputs (state and arithmetic stay float32): relative RMSE vs the float32 run < 1e-2."""
    q, k, v, g, s0, _, _ = inputs(T=100, K=16, V=16)
    q, k, v, g, s0 = (jnp.asarray(x, jnp.float32) for x in (q, k, v, g, s0))
    o32, s32 = la(q, k, v, g=g, initial_state=s0, chunk_size=32)
    bf = lambda x: x.astype(jnp.bfloat16)
    o16, s16 = la(bf(q), bf(k), bf(v), g=bf(g), initial_state=s0, chunk_size=32)
    assert o16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    assert rel_rmse(o16, o32) < 1e-2
    assert rel_rmse(s16, s32) < 1e-2


def test_no_per_token_state_in_chunked_graph():
    """Neither the chunked forward nor its gradient materialises a [T, K, V]-sized state."""
    B, T, H, K, V = 1, 256, 2, 8, 8
    q = k = jnp.ones((B, T, H, K))
    v = jnp.ones((B, T, H, V))
    g = jnp.zeros((B, T, H))

    def loss(q, k, v, g):
        o, s = linear_attention(q, k, v, g=g, chunk_size=32)
        return jnp.sum(o) + jnp.sum(s)

    assert largest_intermediate(jax.grad(loss, (0, 1, 2, 3)), q, k, v, g) < B * T * H * K * V
    # Sanity check of the probe itself: the recurrent form's gradient does store one state per token.
    rec = lambda q, k, v, g: jnp.sum(linear_attention(q, k, v, g=g, mode="recurrent")[0])
    assert largest_intermediate(jax.grad(rec, (0, 1, 2, 3)), q, k, v, g) >= B * T * H * K * V


def _ok():
    q = jnp.zeros((2, 8, 3, 4))
    return dict(q=q, k=q, v=jnp.zeros((2, 8, 3, 5)))


@pytest.mark.parametrize("change,match", [
    (dict(q=jnp.zeros((8, 3, 4))), r"q must have shape \[B, T, H, K\], got \(8, 3, 4\)"),
    (dict(k=jnp.zeros((2, 8, 3, 5))), r"k must have shape \[B, T, H, K\] = \(2, 8, 3, 4\), got \(2, 8, 3, 5\)"),
    (dict(v=jnp.zeros((2, 7, 3, 5))), r"v must have shape \[B, T, H, V\] = \(2, 8, 3, V\)"),
    (dict(g=jnp.zeros((2, 8))), r"linear_attention: g must have shape \[B, T, H\] = \(2, 8, 3\), got \(2, 8\)"),
    (dict(initial_state=jnp.zeros((2, 3, 5, 4))), "initial_state must have shape"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), "segment_ids must have shape"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(mode="fused"), "mode"),
    (dict(scale=jnp.ones(3)), "scale"),
    (dict(impl="triton"), "impl must be one of"),
])
def test_bad_inputs_raise(change, match):
    kw = {**_ok(), **change}
    with pytest.raises(ValueError, match=match):
        linear_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)


@pytest.mark.parametrize("change,match", [
    (dict(q=jnp.zeros((2, 8, 3, 4), jnp.int32)), "linear_attention: q must have a floating dtype .*got int32"),
    (dict(v=jnp.zeros((2, 8, 3, 5), bool)), "v must have a floating dtype .*got bool"),
    (dict(g=jnp.zeros((2, 8, 3), jnp.int32)), "g must have a floating dtype"),
    (dict(segment_ids=jnp.zeros((2, 8))), "segment_ids must have an integer dtype, got float32"),
])
def test_bad_dtypes_raise_type_error(change, match):
    kw = {**_ok(), **change}
    with pytest.raises(TypeError, match=match):
        linear_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)


# ----------------------------------------------------------------------------- feature maps


def test_taylor_feature_map_is_second_order_exp_kernel(x64):
    r = np.random.default_rng(1)
    d = 6
    x, y = r.normal(size=(2, 3, d))
    px, py = fm.taylor(jnp.asarray(x)), fm.taylor(jnp.asarray(y))
    assert px.shape == (3, fm.feature_dim("taylor", d)) == (3, 1 + d + d * d)
    dot = np.sum(x * y, -1)
    expected = 1 + dot / np.sqrt(d) + dot ** 2 / (2 * d)
    np.testing.assert_allclose(np.sum(np.asarray(px) * np.asarray(py), -1), expected, rtol=1e-12)


def test_simple_feature_maps():
    x = jnp.asarray([-3.0, -0.5, 0.0, 2.0])
    np.testing.assert_allclose(fm.elu_plus_one(x), [np.exp(-3.0), np.exp(-0.5), 1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(fm.relu(x), [0, 0, 0, 2.0])
    np.testing.assert_allclose(fm.identity(x), x)
    assert fm.feature_dim("elu", 7) == 7
    with pytest.raises(ValueError, match="feature map"):
        fm.get_feature_map("softmax")
