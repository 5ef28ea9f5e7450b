"""Gated DeltaProduct (memjax.memory.delta_product, memjax.nn.delta_product) and negative-eigenvalue
delta rules (``beta`` in (0, 2], memjax.memory.delta).

References: float64 token-by-token loops written here from the equations (independent of the
interleaving the implementation uses):

    S <- 0 at a new segment;  S <- exp(g_t) S;  for j in 1..n_h: S <- S + k_j (beta_j (v_j - S^T k_j))^T
    o_t = scale * S^T q_t

Tolerances: forms vs reference in float64: ``TOL64`` (1e-10 relative max error) for outputs,
final states and the gradients w.r.t. every input; bf16 and float32 bounds are ~2.5x the errors
measured with these inputs (noted next to each).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.memory.delta import delta_rule
from memjax.memory.delta_product import delta_product
from tests.helpers import TOL64, rel_err

dp = jax.jit(delta_product, static_argnames=("mode", "chunk_size"))
dr = jax.jit(delta_rule, static_argnames=("mode", "chunk_size"))


def reference(q, k, v, beta, g, s0, seg, scale):
    """Token loop (a ``lax.scan`` over tokens, a Python loop over the ``n_h`` sub-steps), jnp so it
    differentiates. ``k: [B, T, n_h, H, K]``, ``beta: [B, T, n_h, H]``."""
    nh = k.shape[2]
    keep = None if seg is None else jnp.concatenate([jnp.ones_like(seg[:, :1]), (seg[:, 1:] == seg[:, :-1])], 1)

    def step(S, x):
        qt, kt, vt, bt, gt, keept = x
        if keept is not None:
            S = S * keept.astype(S.dtype)[:, None, None, None]
        if gt is not None:
            S = S * jnp.exp(gt)[:, :, None, None]
        for j in range(nh):
            pred = jnp.einsum("bhkv,bhk->bhv", S, kt[:, j])
            S = S + jnp.einsum("bhk,bhv->bhkv", kt[:, j], bt[:, j][..., None] * (vt[:, j] - pred))
        return S, scale * jnp.einsum("bhkv,bhk->bhv", S, qt)

    tm = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
    S, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(beta), tm(g), tm(keep)))
    return jnp.swapaxes(o, 0, 1), S


def inputs(B=2, T=37, H=2, K=4, V=3, nh=2, seed=0, beta_range=(0.05, 0.95), decay=True):
    """float64 NumPy ``q, k (unit), v, beta, g, s0`` and cotangents ``co, cs``."""
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, T, H, K))
    k = r.normal(size=(B, T, nh, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = r.normal(size=(B, T, nh, H, V))
    beta = r.uniform(*beta_range, size=(B, T, nh, H))
    g = -r.uniform(0.0, 0.4, size=(B, T, H)) if decay else None
    s0 = r.normal(size=(B, H, K, V))
    return q, k, v, beta, g, s0, r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))


def value_and_grads(fn, q, k, v, beta, g, s0, co, cs):
    """``(o, final_state, grads)`` of ``sum(o co) + sum(s cs)`` w.r.t. q, k, v, beta, (g), s0."""
    def loss(q, k, v, beta, g, s0):
        o, s = fn(q, k, v, beta, g, s0)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

    argnums = (0, 1, 2, 3, 4, 5) if g is not None else (0, 1, 2, 3, 5)
    (_, (o, s)), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(q, k, v, beta, g, s0)
    return o, s, grads


def assert_close(got, ref, tol, label):
    o, s, grads = got
    assert rel_err(o, ref[0]) < tol, (label, "output", rel_err(o, ref[0]))
    assert rel_err(s, ref[1]) < tol, (label, "state", rel_err(s, ref[1]))
    for i, (a, b) in enumerate(zip(grads, ref[2])):
        assert rel_err(a, b) < tol, (label, "grad", i, rel_err(a, b))


SEG37 = np.stack([np.repeat([1, 2, 3], [7, 20, 10]), np.repeat([4, 9], [32, 5])])
SEG13 = np.stack([np.repeat([1, 2, 3], [3, 6, 4]), np.repeat([4, 9], [10, 3])])
FORMS = [("recurrent", 4), ("chunked", 4)]


# ----------------------------------------------------------------------------- delta_product


@pytest.mark.parametrize("nh,packed,T,forms", [
    # (n_h = 1 is also delta_rule bit for bit, a default test; delta_rule has its own reference tests)
    pytest.param(1, False, 13, FORMS, marks=pytest.mark.slow), pytest.param(2, True, 13, FORMS, marks=pytest.mark.slow), (3, False, 13, FORMS),
    pytest.param(2, True, 37, FORMS + [("chunked", 64)], marks=pytest.mark.slow),
    pytest.param(3, True, 37, FORMS + [("chunked", 64)], marks=pytest.mark.slow)])
def test_forms_match_reference_with_gradients(x64, nh, packed, T, forms):
    """T odd; chunk 4 or 8 (padded tail; a token's sub-steps never split: chunks hold C n_h
    sub-steps), 64 (one chunk); recurrent. Outputs, final state, every gradient."""
    q, k, v, beta, g, s0, co, cs = inputs(T=T, nh=nh, seed=nh)
    seg = jnp.asarray(SEG37 if T == 37 else SEG13) if packed else None
    scale = 0.7
    ref = value_and_grads(lambda *a: reference(*a, seg, scale), q, k, v, beta, g, s0, co, cs)
    for mode, c in forms:
        fn = lambda q, k, v, b, g, s0: delta_product(q, k, v, b, g, scale=scale, initial_state=s0, segment_ids=seg,
                                                     mode=mode, chunk_size=c)
        got = value_and_grads(fn, q, k, v, beta, g, s0, co, cs)
        assert got[0].dtype == got[1].dtype == jnp.float64 and got[0].shape == q.shape[:3] + (3,)
        assert_close(got, ref, TOL64, (nh, mode, c))


@pytest.mark.slow
def test_no_decay_default_scale_negative_eigenvalues(x64):
    """g = None, default scale, zero initial state, beta in [1.5, 2] (n_h = 2): the product of two
    near-reflections per token; chunked == recurrent == reference with gradients."""
    q, k, v, beta, _, _, co, cs = inputs(T=41, nh=2, seed=5, beta_range=(1.5, 2.0), decay=False)
    beta[:, ::3] = 2.0  # exact reflections too
    zero = np.zeros(cs.shape)
    ref = value_and_grads(lambda q, k, v, b, g, s0: reference(q, k, v, b, None, s0, None, q.shape[-1] ** -0.5),
                          q, k, v, beta, None, zero, co, cs)
    for mode in ("chunked", "recurrent"):
        fn = lambda q, k, v, b, g, s0: delta_product(q, k, v, b, initial_state=s0, mode=mode, chunk_size=16)
        assert_close(value_and_grads(fn, q, k, v, beta, None, zero, co, cs), ref, TOL64, mode)


@pytest.mark.parametrize("mode", ["chunked", pytest.param("recurrent", marks=pytest.mark.slow)])
def test_one_householder_step_is_the_delta_rule(mode):
    """n_h = 1: delta_product == delta_rule on the same inputs (float32, bit for bit: the same
    computation underneath)."""
    q, k, v, beta, g, s0, _, _ = (None if x is None else jnp.asarray(x, jnp.float32) for x in inputs(T=29, nh=1))
    o1, s1 = dp(q, k, v, beta, g, initial_state=s0, mode=mode, chunk_size=8)
    o2, s2 = dr(q, k[:, :, 0], v[:, :, 0], beta[:, :, 0], g=g, initial_state=s0, mode=mode, chunk_size=8)
    np.testing.assert_array_equal(np.asarray(o1), np.asarray(o2))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))


@pytest.mark.parametrize("mode", ["chunked", pytest.param("recurrent", marks=pytest.mark.slow)])
def test_chaining_two_halves_equals_one_pass(x64, mode):
    q, k, v, beta, g, s0, _, _ = inputs(T=14, nh=3, seed=7)
    o, s = dp(q, k, v, beta, g, initial_state=s0, mode=mode, chunk_size=4)
    a, b = slice(0, 7), slice(7, None)  # (equal halves: one compile for both)
    o1, s1 = dp(q[:, a], k[:, a], v[:, a], beta[:, a], g[:, a], initial_state=s0, mode=mode, chunk_size=4)
    o2, s2 = dp(q[:, b], k[:, b], v[:, b], beta[:, b], g[:, b], initial_state=s1, mode=mode, chunk_size=4)
    assert rel_err(jnp.concatenate([o1, o2], 1), o) < TOL64
    assert rel_err(s2, s) < TOL64


def test_packed_equals_separate_documents(x64):
    """Three documents (a reused id is a new document); initial_state reaches only the first."""
    q, k, v, beta, g, s0, _, _ = inputs(B=1, T=37, nh=2, seed=8)
    lengths = [11, 17, 9]
    seg = jnp.asarray(np.repeat([3, 5, 3], lengths))[None]
    o, s = dp(q, k, v, beta, g, initial_state=s0, segment_ids=seg, chunk_size=8)
    parts, start = [], 0
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        oi, si = dp(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], g[:, sl], initial_state=s0 if i == 0 else None,
                    mode="recurrent")
        parts.append(oi)
        start += n
    assert rel_err(o, jnp.concatenate(parts, 1)) < TOL64
    assert rel_err(s, si) < TOL64


# bf16 q, k, v, beta, g (float32 initial state) vs the float64 reference on the same rounded
# inputs, T = 64, n_h = 2, K = V = 16, chunk 16. Measured (CPU), output / state: beta in (0, 1):
# chunked 3.8e-3 / 3.1e-3, recurrent 2.8e-3 / 1.3e-7; beta in (1, 2): chunked 8.8e-3 / 4.1e-3,
# recurrent 3.1e-3 / 1.2e-7 (the chunked form's bf16 UT operands lose more near beta = 2, see
# memjax.memory.delta). Bounds ~2.5x.
BF16_BOUNDS = {((0.05, 0.95), "chunked"): 1e-2, ((0.05, 0.95), "recurrent"): 7e-3,
               ((1.0, 2.0), "chunked"): 2.2e-2, ((1.0, 2.0), "recurrent"): 8e-3}


@pytest.mark.parametrize("beta_range", [(0.05, 0.95), (1.0, 2.0)])
def test_bf16_error_is_bounded(beta_range):
    q, k, v, beta, g, s0, _, _ = inputs(T=64, K=16, V=16, nh=2, seed=9, beta_range=beta_range)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, beta, g)]
    with jax.enable_x64(True):
        wide = [jnp.asarray(np.asarray(x, np.float64)) for x in bf]
        ref = jax.jit(lambda *a: reference(*a, 16 ** -0.5))(*wide, jnp.asarray(s0), None)
        ref = [np.asarray(x) for x in ref]
    for mode in ("chunked", "recurrent"):
        o, s = dp(*bf, initial_state=jnp.asarray(s0, jnp.float32), mode=mode, chunk_size=16)
        assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
        err = (rel_err(o, ref[0]), rel_err(s, ref[1]))
        bound = BF16_BOUNDS[(beta_range, mode)]
        assert max(err) < bound, (beta_range, mode, err)


def test_nan_at_a_later_token_leaves_earlier_outputs_unchanged():
    q, k, v, beta, g, s0, _, _ = (jnp.asarray(x, jnp.float32) for x in inputs(T=24, nh=2, seed=10))
    o, _ = dp(q, k, v, beta, g, initial_state=s0, chunk_size=8)
    for name, idx in (("k", (slice(None), 17, 1)), ("v", (slice(None), 17, 0)), ("beta", (slice(None), 17, 1)),
                      ("g", (slice(None), 17)), ("q", (slice(None), 17))):
        args = dict(q=q, k=k, v=v, beta=beta, g=g)
        args[name] = args[name].at[idx].set(jnp.nan)
        ob, sb = dp(**args, initial_state=s0, chunk_size=8)
        np.testing.assert_array_equal(np.asarray(ob[:, :17]), np.asarray(o[:, :17]), err_msg=name)
        assert bool(jnp.isnan(ob[:, 17]).all()), name
        if name == "q":  # a read: only its own token
            np.testing.assert_array_equal(np.asarray(ob[:, 18:]), np.asarray(o[:, 18:]))
        else:  # a write: the rest of the document and the final state
            assert bool(jnp.isnan(ob[:, 23]).all()) and bool(jnp.isnan(sb).all()), name


@pytest.mark.slow
def test_gradient_of_earlier_outputs_ignores_a_later_nan():
    q, k, v, beta, g, s0, _, _ = (jnp.asarray(x, jnp.float32) for x in inputs(T=24, nh=2, seed=10))
    grad = jax.jit(jax.grad(lambda k, v: jnp.sum(delta_product(q, k, v, beta, g, chunk_size=8)[0][:, :17]), (0, 1)))
    clean = grad(k, v)
    bad = grad(k.at[:, 20, 1].set(jnp.inf), v.at[:, 19, 0].set(jnp.nan))
    for a, b in zip(clean, bad):
        assert bool(jnp.isfinite(b).all())
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _ok():
    return dict(q=jnp.zeros((2, 8, 3, 4)), k=jnp.zeros((2, 8, 2, 3, 4)), v=jnp.zeros((2, 8, 2, 3, 5)),
                beta=jnp.zeros((2, 8, 2, 3)))


@pytest.mark.parametrize("change,match", [
    (dict(q=jnp.zeros((2, 8, 3))), r"q must have shape \[B, T, H, K\]"),
    (dict(k=jnp.zeros((2, 8, 3, 4))),
     r"k must have shape \[B, T, n_h, H, K\] = \(2, 8, n_h, 3, 4\), got \(2, 8, 3, 4\)"),
    (dict(k=jnp.zeros((2, 8, 0, 3, 4))), r"k must have n_h >= 1"),
    (dict(v=jnp.zeros((2, 8, 1, 3, 5))), r"v must have shape \[B, T, n_h, H, V\] = \(2, 8, 2, 3, V\)"),
    (dict(beta=jnp.zeros((2, 8, 3))), r"beta must have shape \[B, T, n_h, H\] = \(2, 8, 2, 3\), got \(2, 8, 3\)"),
    (dict(beta=None), r"beta must have shape .* got None"),
    (dict(g=jnp.zeros((2, 8, 2, 3))), r"g must have shape \[B, T, H\] = \(2, 8, 3\)"),
    (dict(initial_state=jnp.zeros((2, 3, 4, 4))), r"initial_state must have shape \[B, H, K, V\] = \(2, 3, 4, 5\)"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), r"segment_ids must have shape \[B, T\] = \(2, 8\)"),
    (dict(q=jnp.zeros((2, 0, 3, 4))), r"q has an empty time axis"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(mode="parallel"), "mode must be one of"),
])
def test_bad_inputs_raise(change, match):
    kw = {**_ok(), **change}
    with pytest.raises(ValueError, match="delta_product: " + match):
        delta_product(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("beta"), **kw)


def test_bad_dtypes_raise_type_error():
    kw = _ok()
    with pytest.raises(TypeError, match="delta_product: beta must have a floating dtype .*got int32"):
        delta_product(kw["q"], kw["k"], kw["v"], jnp.ones((2, 8, 2, 3), jnp.int32))
    with pytest.raises(TypeError, match="delta_product: k must have a floating dtype"):
        delta_product(kw["q"], jnp.ones((2, 8, 2, 3, 4), jnp.int32), kw["v"], kw["beta"])


# ----------------------------------------------------------------------------- negative eigenvalues


def _delta_inputs(T, seed, beta_range, decay, low_rank=False):
    """delta_rule inputs ``[B, T, H, .]`` (n_h = 1 of :func:`inputs`); ``low_rank``: keys in a 2-D
    subspace, so the same few directions are reflected again and again (the hardest case for the
    UT transform's conditioning)."""
    q, k, v, beta, g, s0, co, cs = inputs(T=T, K=8, V=6, nh=1, seed=seed, beta_range=beta_range, decay=decay)
    k, v, beta = k[:, :, 0], v[:, :, 0], beta[:, :, 0]
    if low_rank:
        k[..., 2:] = 0.0
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    beta[:, ::5] = 2.0
    return q, k, v, beta, g, s0, co, cs


def _delta_reference(q, k, v, b, g, s0, scale=8 ** -0.5):
    return reference(q, k[:, :, None], v[:, :, None], b[:, :, None], g, s0, None, scale)


@pytest.mark.parametrize("decay,low_rank,forms", [
    (True, False, [("chunked", 16)]),
    pytest.param(False, True, [("recurrent", 64), ("chunked", 16), ("chunked", 64)], marks=pytest.mark.slow)])
def test_delta_rule_negative_eigenvalues_match_reference(x64, decay, low_rank, forms):
    """beta in [1.9, 2] (every 5th exactly 2: a reflection), unit keys, T = 130: chunked (chunk
    16 with a padded tail; 64) == recurrent == reference in float64, with gradients."""
    q, k, v, beta, g, s0, co, cs = _delta_inputs(130, 11, (1.9, 2.0), decay, low_rank)
    ref = value_and_grads(_delta_reference, q, k, v, beta, g, s0, co, cs)
    for mode, c in forms:
        fn = lambda q, k, v, b, g, s0: delta_rule(q, k, v, b, g=g, initial_state=s0, mode=mode, chunk_size=c)
        assert_close(value_and_grads(fn, q, k, v, beta, g, s0, co, cs), ref, TOL64, (mode, c))


# float32 inputs, beta in [1.9, 2], keys in a 2-D subspace, no decay, T = 130, vs the float64
# reference: measured chunked (64) output / state / worst gradient 8.9e-6 / 1.6e-5 / 1.8e-5,
# recurrent 7.1e-7 / 8.0e-7 / 6.5e-7; the same keys at beta in (0, 0.95]: chunked
# 2.8e-7 / 3.5e-7 / 9.6e-7, random keys at beta in [1.9, 2]: chunked 2.6e-6 / 3.4e-6 / 3.2e-6.
# (The UT system's inverse grows with beta: round-off grows with it, still far below bf16's.)
# Bound 2.5x the worst.
F32_TOL = 4.5e-5


@pytest.mark.slow
def test_delta_rule_negative_eigenvalues_float32_accuracy():
    q, k, v, beta, g, s0, co, cs = _delta_inputs(130, 12, (1.9, 2.0), False, True)
    with jax.enable_x64(True):
        ref = value_and_grads(_delta_reference, q, k, v, beta, g, s0, co, cs)
        ref = jax.tree.map(np.asarray, ref)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, beta, s0, co, cs)]
    q, k, v, beta, s0, co, cs = f32
    for mode in ("chunked", "recurrent"):
        fn = lambda q, k, v, b, g, s0: delta_rule(q, k, v, b, initial_state=s0, mode=mode, chunk_size=64)
        got = value_and_grads(fn, q, k, v, beta, None, s0, co, cs)
        assert got[0].dtype == jnp.float32
        assert_close(got, ref, F32_TOL, mode)


# ----------------------------------------------------------------------------- blocks

from memjax.nn.associative import AssociativeCache, DeltaNet, GatedDeltaNet  # noqa: E402
from memjax.nn.delta_product import GatedDeltaProduct  # noqa: E402
from memjax.nn.registry import get_block  # noqa: E402

BLOCK_TOL = 1e-4
call = nnx.jit(lambda b, x: b(x))
call_packed = nnx.jit(lambda b, x, seg: b(x, segment_ids=seg))
call_cached = nnx.jit(lambda b, x, cache: b(x, cache=cache))


@pytest.mark.slow
def test_block_prefill_then_steps_match_full_sequence():
    """n_h = 3, negative eigenvalues: prefill 2 tokens (fewer than the conv width), then single
    steps; == the full-sequence (chunked) call."""
    blk = GatedDeltaProduct(32, num_heads=2, num_householder=3, allow_neg_eigval=True, chunk_size=4,
                            rngs=nnx.Rngs(1))
    assert get_block("gated_deltaproduct") is GatedDeltaProduct and get_block("DP") is GatedDeltaProduct
    x = jax.random.normal(jax.random.key(1), (2, 11, 32))
    y = call(blk, x)
    cache0 = blk.init_cache(2, 16)
    assert isinstance(cache0, AssociativeCache) and cache0.memory.shape == (2, 2, 16, 16)
    assert [w.shape for w in cache0.conv] == [(2, 3, 32), (2, 3, 96), (2, 3, 96)]
    y1, cache = call_cached(blk, x[:, :2], cache0)
    ys = [y1]
    for t in range(2, 11):
        yt, cache = call_cached(blk, x[:, t:t + 1], cache)
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), y) < BLOCK_TOL
    assert jax.tree.structure(cache) == jax.tree.structure(cache0)
    with pytest.raises(ValueError, match="segment_ids"):
        blk(x[:, :1], segment_ids=jnp.ones((2, 1), jnp.int32), cache=cache0)


@pytest.mark.slow
def test_block_packed_equals_separate_documents():
    blk = GatedDeltaProduct(32, num_heads=2, chunk_size=4, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(2), (1, 18, 32))
    y = call_packed(blk, x, jnp.asarray(np.repeat([1, 2, 3], 6))[None])
    parts = [call(blk, x[:, i:i + 6]) for i in (0, 6, 12)]
    assert rel_err(y, jnp.concatenate(parts, 1)) < BLOCK_TOL


@pytest.mark.parametrize("cls", [DeltaNet, GatedDeltaNet, GatedDeltaProduct])
def test_allow_neg_eigval_doubles_beta(cls):
    x = 3.0 * jax.random.normal(jax.random.key(3), (1, 5, 16))
    plain, neg = (cls(16, num_heads=2, allow_neg_eigval=a, rngs=nnx.Rngs(0)) for a in (False, True))
    b0, b1 = plain._gates(x)[0], neg._gates(x)[0]
    np.testing.assert_allclose(np.asarray(b1), 2 * np.asarray(b0), rtol=1e-6)
    assert float(b1.max()) > 1.0 and float(b1.max()) < 2.0 and float(b0.max()) < 1.0
    n = 2 if cls is GatedDeltaProduct else None
    assert b0.shape == ((1, 5, n, 2) if n else (1, 5, 2))


def test_block_bad_options_raise():
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="GatedDeltaProduct: num_householder must be a positive int"):
            GatedDeltaProduct(32, num_householder=bad, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="GatedDeltaProduct: mode must be one of"):
        GatedDeltaProduct(32, mode="parallel", rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_sequence_parallel_equals_single_device(x64):
    """seq_axis: time split over 4 (fake CPU) devices inside shard_map == one device."""
    from jax.sharding import PartitionSpec as P
    q, k, v, beta, g, s0, _, _ = inputs(T=32, nh=2, seed=12)
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    local = lambda q, k, v, beta, g, s0: delta_product(q, k, v, beta, g, initial_state=s0, chunk_size=4,
                                                       seq_axis="seq")
    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "seq"),) * 5 + (P(),),
                                    out_specs=(P(None, "seq"), P())))
    o, s = sharded(q, k, v, beta, g, s0)
    o_ref, s_ref = dp(q, k, v, beta, g, initial_state=s0, chunk_size=4)
    assert rel_err(o, o_ref) < TOL64 and rel_err(s, s_ref) < TOL64
