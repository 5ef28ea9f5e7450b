"""The xLSTM mLSTM memory (memjax.memory.mlstm) and block (memjax.nn.mlstm): both forms against an
unstabilised NumPy reference, chaining, packed documents, overflow-free large input gates,
gradients, dtypes, errors, and the block's decoding cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.memory.mlstm import empty_state, mlstm
from memjax.nn.mlstm import MLSTM, MLSTMCache
from memjax.nn.registry import get_block
from tests.helpers import TOL64, rand, rel_err, rel_rmse

B, H, K, V = 2, 3, 8, 5


def _inputs(seed, t, dtype=jnp.float64, i_scale=2.0):
    q, k = rand(seed, (B, t, H, K), dtype), rand(seed + 1, (B, t, H, K), dtype)
    v = rand(seed + 2, (B, t, H, V), dtype)
    i = rand(seed + 3, (B, t, H), dtype, scale=i_scale)
    f = rand(seed + 4, (B, t, H), dtype) + 2.0
    return q, k, v, i, f


def _segments(t, seed=0):
    return jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, 4, size=(B, t)), axis=1), jnp.int32)


def _reference(q, k, v, i, f, segment_ids=None):
    """The unstabilised recurrence (float64 NumPy): exp(i) and sigmoid(f) as written."""
    q, k, v, i, f = (np.asarray(x, np.float64) for x in (q, k, v, i, f))
    k = k / np.sqrt(q.shape[-1])
    b, t, h = i.shape
    out = np.zeros(v.shape)
    for bb in range(b):
        for hh in range(h):
            c, n = np.zeros((q.shape[-1], v.shape[-1])), np.zeros(q.shape[-1])
            for s in range(t):
                if segment_ids is not None and s > 0 and segment_ids[bb, s] != segment_ids[bb, s - 1]:
                    c, n = 0 * c, 0 * n
                fs, es = 1 / (1 + np.exp(-f[bb, s, hh])), np.exp(i[bb, s, hh])
                c = fs * c + es * np.outer(k[bb, s, hh], v[bb, s, hh])
                n = fs * n + es * k[bb, s, hh]
                out[bb, s, hh] = c.T @ q[bb, s, hh] / max(abs(n @ q[bb, s, hh]), 1.0)
    return out


FORMS = [("recurrent", 64), pytest.param("chunked", 64, marks=pytest.mark.slow),
         pytest.param("chunked", 8, marks=pytest.mark.slow), ("chunked", 5)]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode, chunk", FORMS)
def test_forms_match_reference(x64, mode, chunk, packed):
    t = 29
    q, k, v, i, f = _inputs(0, t)
    seg = _segments(t) if packed else None
    ref = _reference(q, k, v, i, f, None if seg is None else np.asarray(seg))
    y, (c, n, m) = mlstm(q, k, v, i, f, segment_ids=seg, mode=mode, chunk_size=chunk)
    assert y.shape == (B, t, H, V) and c.shape == (B, H, K, V) and n.shape == (B, H, K) and m.shape == (B, H)
    assert rel_err(y, ref) < TOL64
    # the final state is the same triple in both forms (the stabiliser is the same max)
    yr, sr = mlstm(q, k, v, i, f, segment_ids=seg, mode="recurrent")
    for a, b_ in zip((c, n, m), sr):
        assert rel_err(a, b_) < TOL64


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_chaining_two_halves_equals_one_pass(x64, mode):
    t, cut = 40, 17
    q, k, v, i, f = _inputs(5, t)
    y, s = mlstm(q, k, v, i, f, mode=mode, chunk_size=8)
    first = lambda x: x[:, :cut]  # noqa: E731
    last = lambda x: x[:, cut:]  # noqa: E731
    y1, s1 = mlstm(*map(first, (q, k, v, i, f)), mode=mode, chunk_size=8)
    y2, s2 = mlstm(*map(last, (q, k, v, i, f)), initial_state=s1, mode=mode, chunk_size=8)
    assert rel_err(jnp.concatenate([y1, y2], 1), y) < TOL64
    for a, b_ in zip(s2, s):
        assert rel_err(a, b_) < TOL64


@pytest.mark.slow
def test_packed_equals_separate_documents_and_initial_state_reaches_only_the_first(x64):
    t = 24
    q, k, v, i, f = _inputs(9, t)
    seg = jnp.asarray(np.repeat([[3, 3, 7, 1]], B, 0).repeat([5, 5, 9, 5], axis=1), jnp.int32)  # 3, 7, 1
    _, s0 = mlstm(*_inputs(20, 6), mode="recurrent")
    for mode in ("recurrent", "chunked"):
        y, s = mlstm(q, k, v, i, f, segment_ids=seg, initial_state=s0, mode=mode, chunk_size=4)
        bounds = [(0, 10), (10, 19), (19, 24)]
        for d, (a, b_) in enumerate(bounds):
            part = lambda x: x[:, a:b_]  # noqa: E731
            yd, sd = mlstm(*map(part, (q, k, v, i, f)), initial_state=s0 if d == 0 else None, mode="recurrent")
            assert rel_err(y[:, a:b_], yd) < TOL64, (mode, d)
        for a, b_ in zip(s, sd):
            assert rel_err(a, b_) < TOL64


@pytest.mark.slow
def test_empty_state_is_the_default_and_zero_m_gives_the_same_outputs(x64):
    q, k, v, i, f = _inputs(3, 12)
    y, _ = mlstm(q, k, v, i, f)
    y_empty, _ = mlstm(q, k, v, i, f, initial_state=empty_state(B, H, K, V, jnp.float64))
    zero_m = empty_state(B, H, K, V, jnp.float64)._replace(m=jnp.zeros((B, H), jnp.float64))
    for mode in ("recurrent", "chunked"):
        y_zero, _ = mlstm(q, k, v, i, f, initial_state=zero_m, mode=mode, chunk_size=4)
        assert rel_err(y_zero, y) < TOL64
    np.testing.assert_array_equal(y_empty, y)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_large_input_gate_does_not_overflow(mode):
    """``i = 50`` (``exp(50) ~ 5e21``, and ``exp(100)`` overflows float32 outright): finite, and
    equal to the float64 reference."""
    t = 20
    q, k, v, i, f = _inputs(11, t, jnp.float32)
    i = i.at[:, 3].set(50.0).at[:, 11].set(100.0).at[:, 15].set(1e4)
    y, (c, n, m) = mlstm(q, k, v, i, f, mode=mode, chunk_size=8)
    for x in (y, c, n, m):
        assert bool(jnp.isfinite(x).all())
    assert float(m.min()) >= 1e4 - 10
    ref = _reference(q, k, v, jnp.minimum(i, 100.0), f)  # 1e4 saturates the same way in the reference
    # after i = 1e4 the memory holds that token only (all others are exp(-1e4) times smaller)
    assert rel_err(y[:, :15], ref[:, :15]) < 1e-4
    g = jax.grad(lambda q, k, v, i, f: mlstm(q, k, v, i, f, mode=mode, chunk_size=8)[0].sum(),
                 argnums=(0, 1, 2, 3, 4))(q, k, v, i, f)
    assert all(bool(jnp.isfinite(x).all()) for x in g)


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gradients_agree_between_forms(x64, packed):
    t = 21
    args = _inputs(13, t)
    seg = _segments(t, 1) if packed else None
    _, s0 = mlstm(*_inputs(30, 5), mode="recurrent")

    def loss(mode):
        def fn(q, k, v, i, f, s):
            y, (c, n, m) = mlstm(q, k, v, i, f, initial_state=s, segment_ids=seg, mode=mode, chunk_size=6)
            return jnp.sum(jnp.sin(y)) + jnp.sum(c * c) + jnp.sum(n)
        return jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3, 4, 5)))(*args, s0)

    gr, gc = loss("recurrent"), loss("chunked")
    for a, b_ in zip(jax.tree.leaves(gr), jax.tree.leaves(gc)):
        assert rel_err(b_, a) < 1e-9


@pytest.mark.slow
def test_gradient_matches_finite_differences(x64):
    q, k, v, i, f = _inputs(17, 9)
    fn = lambda i, f: jnp.sum(jnp.cos(mlstm(q, k, v, i, f, chunk_size=4)[0]))  # noqa: E731
    gi, gf = jax.grad(fn, argnums=(0, 1))(i, f)
    eps = 1e-6
    for idx in [(0, 0, 0), (1, 4, 2), (0, 8, 1)]:
        di = (fn(i.at[idx].add(eps), f) - fn(i.at[idx].add(-eps), f)) / (2 * eps)
        df = (fn(i, f.at[idx].add(eps)) - fn(i, f.at[idx].add(-eps))) / (2 * eps)
        np.testing.assert_allclose(gi[idx], di, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(gf[idx], df, rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_bf16_matches_float32_and_dtypes():
    q, k, v, i, f = _inputs(19, 33, jnp.float32)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))  # the same numbers in both runs
    y32, _ = mlstm(*(x.astype(jnp.float32) for x in (q, k, v)), i, f, chunk_size=16)
    y16, (c, n, m) = mlstm(q, k, v, i, f, chunk_size=16)
    assert y16.dtype == jnp.bfloat16 and c.dtype == n.dtype == m.dtype == jnp.float32
    assert rel_rmse(y16, y32) < 2e-2


@pytest.mark.slow
def test_custom_scale_scales_k(x64):
    q, k, v, i, f = _inputs(23, 10)
    y, _ = mlstm(q, k, v, i, f, scale=0.3, chunk_size=4)
    ref = _reference(q, k * (0.3 * np.sqrt(K)), v, i, f)
    assert rel_err(y, ref) < TOL64


@pytest.mark.slow  # by default tests/test_causal_safety_sharded.py checks mlstm's NaN positions against one device
def test_nan_in_a_future_token_changes_no_earlier_output():
    q, k, v, i, f = _inputs(29, 16, jnp.float32)
    for mode in ("recurrent", "chunked"):
        y, _ = mlstm(q, k, v, i, f, mode=mode, chunk_size=8)
        yb, _ = mlstm(q, k.at[:, 10].set(jnp.nan), v, i, f.at[:, 12].set(jnp.inf), mode=mode, chunk_size=8)
        np.testing.assert_array_equal(yb[:, :10], y[:, :10])
        assert bool(jnp.isnan(yb[:, 10:]).all())


@pytest.mark.parametrize("change, err, match", [
    (dict(mode="parallel"), ValueError, "mode"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(i=jnp.zeros((B, 4))), ValueError, r"i must have shape \[B, T, H\]"),
    (dict(initial_state=jnp.zeros((B, H, K, V))), ValueError, "triple"),
    (dict(initial_state=(jnp.zeros((B, H, K, V)), jnp.zeros((B, H, K)), jnp.zeros((B,)))), ValueError,
     "initial_state m"),
    (dict(segment_ids=jnp.zeros((B, 4))), TypeError, "segment_ids"),
    (dict(f=jnp.zeros((B, 4, H), jnp.int32)), TypeError, "f must have a floating"),
])
def test_bad_inputs_raise(change, err, match):
    q, k, v, i, f = _inputs(0, 4, jnp.float32)
    kw = dict(q=q, k=k, v=v, i=i, f=f)
    kw.update(change)
    with pytest.raises(err, match=match):
        mlstm(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("i"), kw.pop("f"), **kw)


# ----------------------------------------------------------------------------- block


def test_block_is_registered():
    assert get_block("mlstm") is MLSTM and get_block("mL") is MLSTM


@pytest.mark.slow
def test_block_forget_gate_starts_near_one():
    blk = MLSTM(d_model=32, num_heads=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    _, _, _, i, f, _, _, _ = blk._inputs(x)
    sig = jax.nn.sigmoid(f)
    assert float(sig.min()) > 0.9
    np.testing.assert_allclose(blk.wf.bias[...], np.linspace(3, 6, 4), rtol=1e-6)


@pytest.mark.parametrize("conv_width", [0, 4])
@pytest.mark.slow
def test_block_prefill_then_steps_equal_forward_and_forms_agree(conv_width):
    blk = MLSTM(d_model=32, num_heads=2, conv_width=conv_width, chunk_size=4, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (2, 13, 32))
    y = blk(x)
    blk_rec = MLSTM(d_model=32, num_heads=2, conv_width=conv_width, mode="recurrent", rngs=nnx.Rngs(1))
    np.testing.assert_allclose(blk_rec(x), y, rtol=1e-4, atol=1e-5)
    cache = blk.init_cache(2, 16)
    assert isinstance(cache, MLSTMCache) and bool(jnp.isneginf(cache.m).all())
    y1, cache = blk(x[:, :6], cache=cache)
    outs = [y1]
    for t in range(6, 13):
        yt, cache = blk(x[:, t:t + 1], cache=cache)
        outs.append(yt)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y, rtol=1e-4, atol=1e-5)
    assert jax.tree.structure(cache) == jax.tree.structure(blk.init_cache(2, 16))
    with pytest.raises(ValueError, match="segment_ids"):
        blk(x[:, :1], cache=cache, segment_ids=jnp.zeros((2, 1), jnp.int32))


@pytest.mark.slow
def test_block_packed_equals_separate_documents():
    blk = MLSTM(d_model=32, num_heads=2, chunk_size=4, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (2, 14, 32))
    seg = jnp.asarray([[0] * 6 + [1] * 8] * 2, jnp.int32)
    y = blk(x, segment_ids=seg)
    np.testing.assert_allclose(y[:, :6], blk(x[:, :6]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y[:, 6:], blk(x[:, 6:]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_block_gradients_are_finite_and_reach_every_parameter():
    blk = MLSTM(d_model=32, num_heads=2, rngs=nnx.Rngs(5))
    x = jax.random.normal(jax.random.key(6), (2, 10, 32))
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(blk)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert leaves and all(bool(jnp.isfinite(g).all()) for g in leaves)
    # the zero-initialised gate weights get a gradient (the gates learn)
    assert float(jnp.abs(grads.wi.kernel[...]).max()) > 0 and float(jnp.abs(grads.wf.kernel[...]).max()) > 0


def test_block_bad_options_raise():
    with pytest.raises(ValueError, match="num_heads"):
        MLSTM(d_model=30, num_heads=7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mode"):
        MLSTM(d_model=32, mode="parallel", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kernel must be one of"):
        MLSTM(d_model=32, kernel="pallas", rngs=nnx.Rngs(0))
