"""Titans neural memory: both algorithms against naive loops written from the paper's equations.

Tolerances: float64 comparisons use rtol = atol = 1e-10 (outputs, states, gradients); the bf16
run is compared with float32 by relative RMSE < 2e-2.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.neural_memory import TitansCache, TitansState, titans, titans_decode, titans_init_cache
from tests.helpers import rel_rmse

TOL = dict(rtol=1e-10, atol=1e-10)
# Jitted once per shape: far cheaper on CPU than op-by-op dispatch of the chunk bookkeeping.
jtitans = jax.jit(titans, static_argnames=("depth", "activation", "mode", "chunk_size"))
ACT = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}


# ----------------------------------------------------------------------------- naive reference


def _mlp(ws, x, act):
    """Per-(batch, head) MLP: ``x [B, H, D]``, ``ws`` tuple of ``[B, H, D_in, D_out]``."""
    for i, w in enumerate(ws):
        x = jnp.einsum("bhd,bhde->bhe", x, w)
        if i < len(ws) - 1:
            x = act(x)
    return x


def reference(q, k, v, theta, eta, alpha, *, params0, state, act, chunk, segment_ids=None):
    """Token loop (a ``lax.scan`` over tokens, to keep compile times small). Gradients by
    autodiff of ``||M(k_t) - v_t||^2`` at the weights of the start of the token's
    (document-relative) chunk; ``chunk = 1`` is the exact per-token update."""
    b, t = q.shape[:2]
    seg = np.ones((b, t), int) if segment_ids is None else np.asarray(segment_ids)
    new_doc = np.concatenate([np.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    pos = np.zeros((b, t), int)
    for i in range(1, t):
        pos[:, i] = np.where(new_doc[:, i], 0, pos[:, i - 1] + 1)
    at_start = pos % chunk == 0

    def step(carry, inp):
        ws, ms, w_start = carry
        qt, kt, vt, th, e, al, reset, cstart = inp
        r = reset[:, None, None, None]
        ws = [jnp.where(r, p[None], w) for p, w in zip(params0, ws)]
        ms = [jnp.where(r, 0.0, m) for m in ms]
        w_start = [jnp.where(cstart[:, None, None, None], w, w0) for w, w0 in zip(ws, w_start)]
        grads = jax.grad(lambda w_: jnp.sum((_mlp(w_, kt, act) - vt) ** 2))(w_start)
        e, th, al = (z[..., None, None] for z in (e, th, al))
        ms = [e * m - th * g for m, g in zip(ms, grads)]
        ws = [(1 - al) * w + m for w, m in zip(ws, ms)]
        return (ws, ms, w_start), _mlp(ws, qt, act)

    tm = lambda z: jnp.swapaxes(jnp.asarray(z), 0, 1)
    init = (list(state[0]), list(state[1]), list(state[0]))
    (ws, ms, _), o = jax.lax.scan(step, init, tuple(map(tm, (q, k, v, theta, eta, alpha, new_doc, at_start))))
    return jnp.swapaxes(o, 0, 1), (tuple(ws), tuple(ms))


# ----------------------------------------------------------------------------- inputs


def make_inputs(seed, b=2, t=11, h=2, dk=3, dv=4, hidden=(5,), dtype=np.float64):
    rng = np.random.default_rng(seed)
    dims = [dk, *hidden, dv]
    f = lambda *s, scale=1.0: jnp.asarray(rng.normal(size=s) * scale, dtype)
    x = dict(q=f(b, t, h, dk), k=f(b, t, h, dk, scale=0.6), v=f(b, t, h, dv),
             theta=jnp.asarray(rng.uniform(0.0, 0.3, (b, t, h)), dtype),
             eta=jnp.asarray(rng.uniform(0.3, 0.95, (b, t, h)), dtype),
             alpha=jnp.asarray(rng.uniform(0.0, 0.2, (b, t, h)), dtype))
    params0 = tuple(f(h, i, o, scale=i ** -0.5) for i, o in zip(dims[:-1], dims[1:]))
    state = TitansState(tuple(f(b, h, i, o, scale=0.5 * i ** -0.5) for i, o in zip(dims[:-1], dims[1:])),
                        tuple(f(b, h, i, o, scale=0.1) for i, o in zip(dims[:-1], dims[1:])))
    return x, params0, state


def _outputs_and_grads(run, *args):
    """One compiled function: the outputs and the gradients of a random-cotangent loss through
    the output and the final state, w.r.t. every argument."""

    @jax.jit
    def f(*args):
        out, vjp = jax.vjp(run, *args)
        rng = np.random.default_rng(1)
        ct = jax.tree.map(lambda l: jnp.asarray(rng.normal(size=l.shape), l.dtype), out)
        return out, vjp(ct)

    return f(*args)


def _assert_tree_close(a, b, tol=TOL):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def _check_against_reference(x, params0, state, *, act, mode, chunk, segment_ids=None):
    def impl(x, params0, state):
        return titans(**x, params0=params0, initial_state=state, activation=act, mode=mode,
                      chunk_size=chunk, segment_ids=segment_ids)

    def ref(x, params0, state):
        return reference(**x, params0=params0, state=state, act=ACT[act], chunk=chunk, segment_ids=segment_ids)

    out1, g1 = _outputs_and_grads(impl, x, params0, state)
    out2, g2 = _outputs_and_grads(ref, x, params0, state)
    _assert_tree_close(out1, out2)
    _assert_tree_close(g1, g2)
    # Every input is used (params0 only where a document restarts from it).
    used = (g1[0], g1[2]) if segment_ids is None else g1
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(used))


# ----------------------------------------------------------------------------- tests


def test_chunked_matches_chunk_start_gradient_reference(x64):
    """Depth-2 GELU memory, T = 11 with chunks of 4 (a padded tail), non-zero initial momentum."""
    x, params0, state = make_inputs(0)
    _check_against_reference(x, params0, state, act="gelu", mode="chunked", chunk=4)


def test_recurrent_matches_per_token_reference(x64):
    x, params0, state = make_inputs(1, t=7, hidden=(4, 3))  # depth 3, SiLU
    _check_against_reference(x, params0, state, act="silu", mode="recurrent", chunk=1)


def test_chunk_size_one_is_recurrent(x64):
    x, params0, state = make_inputs(2, t=9)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 3], [5, 5, 5, 5, 5, 5, 6, 6, 6]])
    a = jtitans(**x, params0=params0, initial_state=state, mode="chunked", chunk_size=1, segment_ids=seg)
    b = jtitans(**x, params0=params0, initial_state=state, mode="recurrent", segment_ids=seg)
    _assert_tree_close(a, b)


def test_depth1_chunked_matches_reference_from_zero_state(x64):
    """Linear memory ``M(x) = x W`` from zero weights (no params0), T = 13 with chunks of 5."""
    x, _, _ = make_inputs(3, t=13, dk=4, dv=3, hidden=())
    b, _, h = x["theta"].shape
    zero = TitansState((jnp.zeros((b, h, 4, 3)),), (jnp.zeros((b, h, 4, 3)),))
    o1, s1 = jtitans(**x, mode="chunked", chunk_size=5)
    o2, s2 = reference(**x, params0=(jnp.zeros((h, 4, 3)),), state=zero, act=ACT["silu"], chunk=5)
    _assert_tree_close((o1, s1), (o2, s2))


def test_packed_documents_equal_separate_runs(x64):
    """Document-relative chunks: a packed row equals its documents run one by one from params0
    (the recurrent form's resets are covered by the chunk_size=1 test). Also checked against
    the reference loop: outputs and final state (= the last document's). Gradients are those of
    plain autodiff through the same code paths, checked without segments above."""
    x, params0, _ = make_inputs(4, t=17)
    t = 17
    lens = [[5, 9, 3], [2, 12, 3]]
    seg = jnp.asarray([sum(([i + 1] * n for i, n in enumerate(row)), []) for row in lens])
    # Each document as its own batch row, starting at position 0 and zero-padded to T (the
    # padding comes after it, so it cannot change its outputs).
    docs, where = [], []
    for r, row in enumerate(lens):
        start = 0
        for n in row:
            docs.append({name: jnp.pad(val[r, start:start + n], [(0, t - n)] + [(0, 0)] * (val.ndim - 2))
                         for name, val in x.items()})
            where.append((r, start, n))
            start += n
    docs = {name: jnp.stack([d[name] for d in docs]) for name in x}
    o, st = jtitans(**x, params0=params0, segment_ids=seg, chunk_size=3)
    o_docs, _ = jtitans(**docs, params0=params0, chunk_size=3)
    for i, (r, start, n) in enumerate(where):
        np.testing.assert_allclose(o[r, start:start + n], o_docs[i, :n], **TOL)
    state = TitansState(tuple(jnp.broadcast_to(p, (2,) + p.shape) for p in params0),
                        tuple(jnp.zeros((2,) + p.shape) for p in params0))
    ref = jax.jit(lambda x: reference(**x, params0=params0, state=state, act=ACT["silu"], chunk=3,
                                      segment_ids=seg))
    _assert_tree_close((o, st), ref(x))


def test_initial_state_chaining(x64):
    x, params0, state = make_inputs(5, t=14)
    first = {n: a[:, :8] for n, a in x.items()}
    second = {n: a[:, 8:] for n, a in x.items()}
    for mode in ("chunked", "recurrent"):
        o, st = jtitans(**x, params0=params0, initial_state=state, mode=mode, chunk_size=4)
        o1, st1 = jtitans(**first, params0=params0, initial_state=state, mode=mode, chunk_size=4)
        o2, st2 = jtitans(**second, params0=params0, initial_state=st1, mode=mode, chunk_size=4)
        _assert_tree_close((o, st), (jnp.concatenate([o1, o2], 1), st2))


def _gated_delta_rule(q, k, v, beta, g, s):
    """``S = exp(g) S; S += k (beta (v - S^T k))^T; o = S^T q`` (no read scale)."""
    outs = []
    for i in range(q.shape[1]):
        s = jnp.exp(g[:, i])[..., None, None] * s
        err = v[:, i] - jnp.einsum("bhkv,bhk->bhv", s, k[:, i])
        s = s + jnp.einsum("bhk,bhv->bhkv", k[:, i], beta[:, i][..., None] * err)
        outs.append(jnp.einsum("bhkv,bhk->bhv", s, q[:, i]))
    return jnp.stack(outs, 1), s


def test_depth1_without_momentum_is_gated_delta_rule(x64):
    """eta = 0: W_t = (1 - a) W - 2 th k (k^T W - v^T) = gated delta rule with g = log(1 - a),
    beta = 2 th / (1 - a) and values (1 - a) v."""
    x, _, _ = make_inputs(6, t=10, dk=4, dv=3, hidden=())
    x["eta"] = jnp.zeros_like(x["eta"])
    b, _, h = x["eta"].shape
    s0 = jnp.asarray(np.random.default_rng(0).normal(size=(b, h, 4, 3)))
    state = TitansState((s0,), (jnp.zeros_like(s0),))
    o, st = jtitans(**x, initial_state=state, mode="recurrent")
    a = x["alpha"]
    o2, s2 = _gated_delta_rule(x["q"], x["k"], (1 - a)[..., None] * x["v"], 2 * x["theta"] / (1 - a),
                               jnp.log(1 - a), s0)
    np.testing.assert_allclose(o, o2, **TOL)
    np.testing.assert_allclose(st.weights[0], s2, **TOL)


def test_depth1_chunked_equals_recurrent_for_orthogonal_keys_in_chunk(x64):
    """With eta = alpha = 0 and keys orthogonal inside each chunk, k_t^T W_{t-1} = k_t^T W_{t'},
    so the chunk-start gradients are the exact ones; with generic keys the two forms differ."""
    rng = np.random.default_rng(7)
    b, t, h, dk, dv, c = 1, 12, 2, 4, 3, 4
    x, _, _ = make_inputs(7, b=b, t=t, h=h, dk=dk, dv=dv, hidden=())
    x["eta"], x["alpha"] = jnp.zeros_like(x["eta"]), jnp.zeros_like(x["alpha"])
    basis = np.linalg.qr(rng.normal(size=(b, t // c, h, dk, dk)))[0]  # orthonormal columns
    keys = np.moveaxis(basis, -1, -3).reshape(b, t, h, dk) * rng.uniform(0.5, 1.0, (b, t, h, 1))
    ortho = dict(x, k=jnp.asarray(keys))
    oc, sc = jtitans(**ortho, mode="chunked", chunk_size=c)
    orr, sr = jtitans(**ortho, mode="recurrent")
    _assert_tree_close((oc, sc), (orr, sr))
    oc2, _ = jtitans(**x, mode="chunked", chunk_size=c)
    or2, _ = jtitans(**x, mode="recurrent")
    assert float(jnp.abs(oc2 - or2).max()) > 1e-4


def test_decode_continues_the_chunked_form(x64):
    """A prompt, then single tokens, then a few more: the outputs of one chunked call; the
    cache holds the state at the last chunk boundary plus the buffered tokens."""
    x, params0, _ = make_inputs(8, t=13)
    c = 4
    o_full, _ = jtitans(**x, params0=params0, chunk_size=c)
    cache = titans_init_cache(2, 2, 3, 4, params0=params0, chunk_size=c, dtype=jnp.float64)
    step = jax.jit(lambda part, cache: titans_decode(**part, cache=cache, chunk_size=c))
    outs = []
    for lo, hi in ((0, 6),) + tuple((i, i + 1) for i in range(6, 13)):
        o, cache = step({n: a[:, lo:hi] for n, a in x.items()}, cache)
        outs.append(o)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), o_full, **TOL)
    assert int(cache.count) == 13 % c
    _, st12 = jtitans(**{n: a[:, :12] for n, a in x.items()}, params0=params0, chunk_size=c)
    _assert_tree_close(cache.state, st12)
    np.testing.assert_allclose(cache.k[:, :1], x["k"][:, 12:13], **TOL)


def test_bf16_close_to_float32():
    x, params0, state = make_inputs(9, b=2, t=40, h=2, dk=16, dv=16, hidden=(32,), dtype=np.float32)
    x["k"] = x["k"] / jnp.linalg.norm(x["k"], axis=-1, keepdims=True)  # a stable step size
    o32, s32 = jtitans(**x, params0=params0, initial_state=state, chunk_size=8)
    xb = {n: a.astype(jnp.bfloat16) for n, a in x.items()}
    ob, sb = jtitans(**xb, params0=params0, initial_state=state, chunk_size=8)
    assert ob.dtype == jnp.bfloat16 and sb.weights[0].dtype == jnp.float32
    assert rel_rmse(ob, o32) < 2e-2, rel_rmse(ob, o32)
    assert rel_rmse(sb.weights[1], s32.weights[1]) < 2e-2


@pytest.mark.slow
def test_extreme_gates_stay_finite():
    """Tiny eta and 1 - alpha (log factors near the dtype's limit) over long chunks, with packed
    documents (all three gradient bases of a chunk in use): no NaN/inf in the output or in any
    gradient, including those of params0 and the initial state."""
    x, params0, state = make_inputs(10, t=32, hidden=(), dtype=np.float32)
    x["eta"] = x["eta"].at[:, ::3].set(1e-30)
    x["alpha"] = x["alpha"].at[:, 1::4].set(1.0 - 1e-7)
    seg = jnp.asarray(np.repeat([[1, 2, 3, 4]], 2, 0).repeat([5, 17, 3, 7], axis=1))

    @jax.jit
    def loss(x, params0, state):
        o, st = titans(**x, params0=params0, initial_state=state, chunk_size=8, segment_ids=seg)
        return jnp.sum(o) + sum(jnp.sum(w) for w in jax.tree.leaves(st))

    val, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, params0, state)
    assert np.isfinite(float(val))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_input_validation():
    x, params0, state = make_inputs(11, t=5, dtype=np.float32)
    with pytest.raises(ValueError, match="q must have shape"):
        titans(**dict(x, q=x["q"][0]), params0=params0)
    with pytest.raises(ValueError, match="k must have shape"):
        titans(**dict(x, k=x["k"][:, :, :, :2]), params0=params0)
    with pytest.raises(ValueError, match="v must have shape"):
        titans(**dict(x, v=x["v"][:, :3]), params0=params0)
    with pytest.raises(ValueError, match="theta must have shape"):
        titans(**dict(x, theta=x["theta"][..., None]), params0=params0)
    with pytest.raises(ValueError, match="chunk_size"):
        titans(**x, params0=params0, chunk_size=0)
    with pytest.raises(ValueError, match="mode"):
        titans(**x, params0=params0, mode="parallel")
    with pytest.raises(ValueError, match="activation"):
        titans(**x, params0=params0, activation="tanh")
    with pytest.raises(ValueError, match="depth=2 needs params0"):
        titans(**x, depth=2)
    with pytest.raises(ValueError, match="depth=3"):
        titans(**x, params0=params0, depth=3)
    with pytest.raises(ValueError, match=r"params0\[1\]"):
        titans(**x, params0=(params0[0], params0[1][:, :2]))
    with pytest.raises(ValueError, match="expected K=3 -> V=2"):
        titans(**dict(x, v=x["v"][..., :2]), params0=params0)
    with pytest.raises(ValueError, match=r"initial_state.momentum\[0\]"):
        titans(**x, initial_state=TitansState(state.weights, (state.momentum[0][:1], state.momentum[1])))
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        titans(**x, params0=params0, segment_ids=jnp.zeros((2, 4), jnp.int32))
    cache = titans_init_cache(2, 2, 3, 4, params0=params0, chunk_size=4)
    with pytest.raises(ValueError, match=r"cache.k must have shape \[B, chunk_size, H, K\] = \(2, 8, 2, 3\)"):
        titans_decode(**x, cache=cache, chunk_size=8)
    with pytest.raises(ValueError, match="TitansCache"):
        titans_decode(**x, cache=cache.state, chunk_size=4)
    assert isinstance(cache, TitansCache)
    with pytest.raises(TypeError, match="titans: alpha must have a floating dtype .*got int32"):
        titans(**dict(x, alpha=jnp.zeros(x["alpha"].shape, jnp.int32)), params0=params0)
    with pytest.raises(TypeError, match=r"titans: params0\[0\] must have a floating dtype"):
        titans(**x, params0=(params0[0].astype(jnp.int32), params0[1]))
