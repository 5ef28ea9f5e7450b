"""GDN-2 (channel-wise decay, erase and write gates): every form vs a token loop written from the
equation, float64; KDA as its special case ``b = w = beta``.

Reference (q/k head ``j // (HV / H)`` serves value head ``j``)::

    S' = diag(exp g_t) S_{t-1}  (zeroed at a new segment);  e_t = S'^T (b_t * k_t);
    S_t = S' + k_t (w_t * v_t - e_t)^T;   o_t = scale S_t^T q_t

Tolerance: relative max error <= 1e-10 in float64 (outputs, final states and the gradients w.r.t.
q, k, v, g, b, w and the initial state).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.delta import delta_rule
from memjax.memory.gdn2 import gdn2
from tests.helpers import TOL64, rel_err

jg = jax.jit(gdn2, static_argnames=("mode", "chunk_size"))


def reference(q, k, v, g, b, w, s0, seg, scale):
    """Token scan from the equation (``g``: ``[B, T, HV, K]`` or ``[B, T, HV]``)."""
    bsz, t, h, _ = q.shape
    hv = v.shape[2]
    q, k = (jnp.repeat(x, hv // h, axis=2) for x in (q, k))
    e = jnp.exp(g)
    dec = e[..., :, None] if e.ndim == 4 else e[..., None, None]
    keep = jnp.ones((bsz, t), q.dtype) if seg is None else jnp.concatenate(
        [jnp.ones((bsz, 1), q.dtype), (seg[:, 1:] == seg[:, :-1]).astype(q.dtype)], 1)

    def step(S, inp):
        qt, kt, vt, dt, bt, wt, kp = inp
        S = S * dt * kp[:, None, None, None]
        erase = jnp.einsum("bhkv,bhk->bhv", S, bt * kt)
        S = S + jnp.einsum("bhk,bhv->bhkv", kt, wt * vt - erase)
        return S, scale * jnp.einsum("bhkv,bhk->bhv", S, qt)

    tm = lambda x: jnp.moveaxis(x, 1, 0)
    S, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(dec), tm(b), tm(w), tm(keep)))
    return tm(o), S


def make(B=2, T=37, H=2, HV=2, K=4, V=3, seed=0, vector=True, dtype=np.float64):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, B, T, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = r.normal(size=(B, T, HV, V))
    g = -2 * r.uniform(0.0, 1.0, size=(B, T, HV, K) if vector else (B, T, HV)) ** 2
    b = r.uniform(0.05, 0.95, size=(B, T, HV, K))
    w = r.uniform(0.05, 0.95, size=(B, T, HV, V))
    s0 = r.normal(size=(B, HV, K, V))
    co, cs = r.normal(size=(B, T, HV, V)), r.normal(size=(B, HV, K, V))
    return tuple(jnp.asarray(np.asarray(x, dtype)) for x in (q, k, v, g, b, w, s0, co, cs))


def grads_of(fn, q, k, v, g, b, w, s0, co, cs):
    """``(o, s, grads)`` of ``sum(o co) + sum(s cs)`` w.r.t. q, k, v, g, b, w, s0 (jitted)."""
    def loss(*a):
        o, s = fn(*a)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

    (_, (o, s)), gr = jax.jit(jax.value_and_grad(loss, tuple(range(7)), has_aux=True))(q, k, v, g, b, w, s0)
    return o, s, gr


def ours(mode, chunk=16, seg=None):
    return lambda q, k, v, g, b, w, s0: gdn2(q, k, v, g, b, w, initial_state=s0, segment_ids=seg, mode=mode,
                                             chunk_size=chunk)


def assert_all_close(got, want, tol, what=""):
    for i, (x, y) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        assert rel_err(x, y) <= tol, (what, i, rel_err(x, y))


SEG = np.repeat([[0, 1, 2, 3], [5, 5, 6, 7]], [9, 7, 16, 5], axis=1)


@pytest.mark.parametrize("HV,packed,vector,forms", [
    (4, True, True, [("recurrent", 16), ("chunked", 16)]),
    pytest.param(2, False, True, [("chunked", 7), ("chunked", 64)], marks=pytest.mark.slow),
    pytest.param(2, True, False, [("recurrent", 16), ("chunked", 16)], marks=pytest.mark.slow),
])
def test_forms_match_reference_with_gradients(x64, HV, packed, vector, forms):
    """T = 37 (chunk 16: padded tail; 7: prime; 64: one chunk of four sub-chunks); HV = 4 value
    heads over 2 q/k heads; per-channel and per-head g."""
    args = make(HV=HV, vector=vector)
    seg = jnp.asarray(SEG) if packed else None
    want = grads_of(lambda q, k, v, g, b, w, s0: reference(q, k, v, g, b, w, s0, seg, 0.5), *args)
    for mode, c in forms:
        assert_all_close(grads_of(ours(mode, c, seg), *args), want, TOL64, (mode, c))


@pytest.mark.slow
def test_equal_gates_are_kda(x64):
    """b = w = beta (broadcast) == delta_rule with the per-channel g (outputs and gradients)."""
    q, k, v, g, _, _, s0, co, cs = make(HV=4)
    beta = jnp.asarray(np.random.default_rng(5).uniform(0.05, 0.95, size=v.shape[:3]))

    def loss(fn, q, k, v, g, beta, s0):
        o, s = fn(q, k, v, g, beta, s0)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

    for mode in ("chunked", "recurrent"):
        as_gdn2 = lambda q, k, v, g, beta, s0: gdn2(
            q, k, v, g, jnp.broadcast_to(beta[..., None], g.shape), jnp.broadcast_to(beta[..., None], v.shape),
            initial_state=s0, mode=mode, chunk_size=16)
        as_kda = lambda q, k, v, g, beta, s0: delta_rule(q, k, v, beta, g=g, initial_state=s0, mode=mode,
                                                         chunk_size=16)
        got, want = (jax.jit(jax.value_and_grad(lambda *a, f=f: loss(f, *a), tuple(range(6)), has_aux=True))(
            q, k, v, g, beta, s0) for f in (as_gdn2, as_kda))
        assert_all_close(got, want, TOL64, mode)


def test_equal_gates_are_kda_forward(x64):
    q, k, v, g, _, _, s0, _, _ = make(HV=4)
    beta = jnp.asarray(np.random.default_rng(5).uniform(0.05, 0.95, size=v.shape[:3]))
    bk, bv = jnp.broadcast_to(beta[..., None], g.shape), jnp.broadcast_to(beta[..., None], v.shape)
    got = jg(q, k, v, g, bk, bv, initial_state=s0, chunk_size=16)
    want = jax.jit(delta_rule, static_argnames="chunk_size")(q, k, v, beta, g=g, initial_state=s0, chunk_size=16)
    assert_all_close(got, want, TOL64)


@pytest.mark.slow
def test_initial_state_chaining_and_packing(x64):
    q, k, v, g, b, w, s0, _, _ = make(B=1, T=30)
    o, s = jg(q, k, v, g, b, w, initial_state=s0, chunk_size=8)
    cut = lambda x, sl: x[:, sl]
    a, c = slice(0, 13), slice(13, None)
    o1, s1 = jg(*(cut(x, a) for x in (q, k, v, g, b, w)), initial_state=s0, chunk_size=8)
    o2, s2 = jg(*(cut(x, c) for x in (q, k, v, g, b, w)), initial_state=s1, chunk_size=8)
    assert_all_close((jnp.concatenate([o1, o2], 1), s2), (o, s), TOL64)
    seg = jnp.asarray(np.repeat([3, 1, 3], [11, 13, 6]))[None]
    for mode in ("chunked", "recurrent"):
        op, sp = jg(q, k, v, g, b, w, initial_state=s0, segment_ids=seg, mode=mode, chunk_size=8)
        parts, start = [], 0
        for i, n in enumerate((11, 13, 6)):
            sl = slice(start, start + n)
            oi, si = jg(*(cut(x, sl) for x in (q, k, v, g, b, w)), initial_state=s0 if i == 0 else None, mode=mode,
                        chunk_size=8)
            parts.append(oi)
            start += n
        assert_all_close((op, sp), (jnp.concatenate(parts, 1), si), TOL64, mode)


@pytest.mark.slow
def test_strong_decay_and_minus_inf_are_finite_float32():
    q, k, v, g, b, w, s0, co, cs = make(T=40, dtype=np.float32)
    g = jnp.full_like(g, -30.0).at[:, ::3].set(-1e-3).at[0, 10, 0, 1].set(-jnp.inf)
    res = {m: grads_of(ours(m), q, k, v, g, b, w, s0, co, cs) for m in ("chunked", "recurrent")}
    for m, (o, s, gr) in res.items():
        for leaf in jax.tree.leaves((o, s, gr[:3], gr[4:])):
            assert bool(jnp.all(jnp.isfinite(leaf))), m
    assert_all_close(res["chunked"][:2], res["recurrent"][:2], 1e-5)
    assert_all_close(res["chunked"][2][:3] + res["chunked"][2][4:], res["recurrent"][2][:3] + res["recurrent"][2][4:],
                     1e-4)


@pytest.mark.slow
def test_bf16_inputs_are_close_to_float64():
    q, k, v, g, b, w, s0, _, _ = make(T=64, K=16, V=16)
    with jax.enable_x64(True):
        want = reference(*(jnp.asarray(x, jnp.float64) for x in (q, k, v, g, b, w, s0)), None, 0.25)
    bf = lambda x: x.astype(jnp.bfloat16)
    o, s = jg(bf(q), bf(k), bf(v), bf(g), bf(b), bf(w), initial_state=s0.astype(jnp.float32), chunk_size=16)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    # bf16 operands carry ~3 significant digits (measured: ~4e-3 relative max error)
    assert rel_err(o, want[0]) < 1.5e-2 and rel_err(s, want[1]) < 1.5e-2


@pytest.mark.slow
def test_nonfinite_write_gate_stays_causal(x64):
    q, k, v, g, b, w, _, _, _ = make()
    bad = w.at[0, 20, 1, 2].set(jnp.nan)
    for mode in ("chunked", "recurrent"):
        o, _ = jg(q, k, v, g, b, w, mode=mode, chunk_size=16)
        ob, sb = jg(q, k, v, g, b, bad, mode=mode, chunk_size=16)
        np.testing.assert_array_equal(ob[0, :20], o[0, :20])
        np.testing.assert_array_equal(ob[1], o[1])
        np.testing.assert_array_equal(ob[0, :, 0], o[0, :, 0])
        assert bool(jnp.all(jnp.isnan(ob[0, 20:, 1]))) and bool(jnp.all(jnp.isnan(sb[0, 1])))


def test_bad_inputs_raise():
    q, k, v, g, b, w, _, _, _ = make(HV=4, dtype=np.float32)
    with pytest.raises(ValueError,
                       match=r"gdn2: b must have shape \[B, T, HV, K\] = \(2, 37, 4, 4\), got \(2, 37, 4\)"):
        gdn2(q, k, v, g, b[..., 0], w)
    with pytest.raises(ValueError, match=r"gdn2: w must have shape \[B, T, HV, V\] = \(2, 37, 4, 3\)"):
        gdn2(q, k, v, g, b, w[..., :2])
    with pytest.raises(ValueError, match=r"gdn2: g must have shape \[B, T, H\] = \(2, 37, 4\), got None"):
        gdn2(q, k, v, None, b, w)
    with pytest.raises(ValueError, match=r"gdn2: v must have a positive multiple of H"):
        gdn2(q, k, v[:, :, :3], g[:, :, :3], b[:, :, :3], w[:, :, :3])
    with pytest.raises(ValueError, match=r"gdn2: initial_state must have shape \[B, H, K, V\] = \(2, 4, 4, 3\)"):
        gdn2(q, k, v, g, b, w, initial_state=jnp.zeros((2, 2, 4, 3)))
    with pytest.raises(ValueError, match="gdn2: mode must be one of"):
        gdn2(q, k, v, g, b, w, mode="parallel")
    with pytest.raises(ValueError, match="gdn2: seq_axis 'seq' is not a mapped axis"):
        gdn2(q, k, v, g, b, w, seq_axis="seq")
    with pytest.raises(ValueError, match="gdn2: impl='pallas' is not available"):
        gdn2(q, k, v, g, b, w, impl="pallas")
    with pytest.raises(TypeError, match="gdn2: w must have a floating dtype"):
        gdn2(q, k, v, g, b, jnp.ones(w.shape, jnp.int32))
