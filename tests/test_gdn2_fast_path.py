"""GDN-2 / KDA chunked form: the tame-gate fast way (memjax.memory.gdn2_fast) and the general way
it falls back to, each against a token loop written from the equation (float64), forward and
gradients; the lean chunk pass against the scan it replaces.

Reference (per batch and value head; Kimi Linear / GDN-2)::

    S'_t = diag(exp g_t) S_{t-1}   (zero at a new segment);   e_t = S'_t^T (b_t * k_t)
    S_t  = S'_t + k_t (w_t * v_t - e_t)^T;                     o_t = scale S_t^T q_t

KDA is ``b_t = w_t = beta_t``. Which way a call takes is checked with ``_is_tame`` on the same
chunked gates, so each test below exercises the branch it names.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels.chunk_pass import chunk_recurrence
from memjax.memory.chunking import from_head_chunks, to_head_chunks
from memjax.memory.delta import delta_rule
from memjax.memory.gdn2 import _is_tame, gdn2
from memjax.memory.gdn2_fast import lean_chunk_recurrence, tame_chunked
from tests.helpers import TOL64, rel_err

C = 8  # chunk size: T = 29 gives 4 chunks, the last padded
SEG = np.repeat([[0, 1, 2], [4, 4, 5]], [11, 6, 12], axis=1)  # [2, 29]: resets inside chunks


def reference(q, k, v, g, b, w, s0, seg, scale):
    """Token by token from the equation (a scan over time), in the inputs' dtype (float64 here)."""
    bsz, t = q.shape[:2]
    keep = np.ones((bsz, t)) if seg is None else np.concatenate([np.ones((bsz, 1)), seg[:, 1:] == seg[:, :-1]], 1)

    def step(s, x):
        qt, kt, vt, gt, bt, wt, kp = x
        s = s * kp[:, None, None, None] * jnp.exp(gt)[..., :, None]  # diag(exp g_t) S, zero at a new segment
        e = jnp.einsum("bhkv,bhk->bhv", s, bt * kt)
        s = s + kt[..., :, None] * (wt * vt - e)[..., None, :]
        return s, scale * jnp.einsum("bhkv,bhk->bhv", s, qt)

    tm = lambda x: jnp.moveaxis(x, 1, 0)
    s, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(g), tm(b), tm(w), tm(jnp.asarray(keep, q.dtype))))
    return tm(o), s


def make(seed=0, B=2, T=29, H=2, K=4, V=3, g_scale=1.0, dtype=np.float64):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, B, T, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = r.normal(size=(B, T, H, V))
    g = -g_scale * r.uniform(0.0, 1.0, size=(B, T, H, K)) ** 2
    b = r.uniform(0.05, 0.95, size=(B, T, H, K))
    w = r.uniform(0.05, 0.95, size=(B, T, H, V))
    s0 = r.normal(size=(B, H, K, V))
    co, cs = r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))
    return tuple(jnp.asarray(np.asarray(x, dtype)) for x in (q, k, v, g, b, w, s0, co, cs))


def value_and_grads(fn, args):
    """``(o, s, grads w.r.t. q, k, v, g, b, w, s0)`` of ``sum(o co) + sum(s cs)``."""
    *xs, co, cs = args

    def loss(*a):
        o, s = fn(*a)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

    (_, (o, s)), gr = jax.jit(jax.value_and_grad(loss, tuple(range(len(xs))), has_aux=True))(*xs)
    return o, s, gr


def tame(g):
    return bool(_is_tame(to_head_chunks(g, C), g.dtype))


def assert_close(got, want, tol):
    for i, (x, y) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        assert np.all(np.isfinite(np.asarray(x))), i
        assert rel_err(x, y) <= tol, (i, rel_err(x, y))


def ours(seg):
    return jax.jit(lambda q, k, v, g, b, w, s0: gdn2(q, k, v, g, b, w, initial_state=s0, segment_ids=seg,
                                                     chunk_size=C))


def test_both_ways_match_the_reference(x64):
    """Packed segments, an initial state, T = 29 (padded tail); g_scale 1: tame (the fast way),
    g_scale 400: per-chunk decays past 354 = log(float64 max) / 2 (the general way); one compiled
    function, the branch chosen at run time."""
    seg = jnp.asarray(SEG)
    fn = ours(seg)
    ref = lambda q, k, v, g, b, w, s0: reference(q, k, v, g, b, w, s0, SEG, 0.5)
    for g_scale, is_tame in ((1.0, True), (400.0, False)):
        args = make(g_scale=g_scale)
        assert tame(args[3]) is is_tame
        assert_close(value_and_grads(fn, args), value_and_grads(ref, args), TOL64)


@pytest.mark.slow
def test_fast_way_alone_matches_the_reference(x64):
    """tame_chunked called directly (so a dispatch bug cannot hide a fast-way bug), per-channel
    gates without segments."""
    args = make(seed=1)

    def fast(q, k, v, g, b, w, s0):
        ch = lambda x: to_head_chunks(x, C)
        o, s = tame_chunked(ch(q), ch(k), ch(w * v), ch(b * k), ch(g), s0, None, 0.5, impl="auto", interpret=None)
        return from_head_chunks(o, q.shape[1]), s

    ref = lambda q, k, v, g, b, w, s0: reference(q, k, v, g, b, w, s0, None, 0.5)
    assert_close(value_and_grads(jax.jit(fast), args), value_and_grads(ref, args), TOL64)


@pytest.mark.slow
def test_float32_at_the_bound_and_past_it():
    """float32, per-chunk decay 40 per channel (tame: exp(+-40) factors, the fast way) and 48 (the
    general way): both finite and within float32 round-off of the float64 reference."""
    base = make(seed=2, dtype=np.float64)
    fn = ours(None)
    for per_token, is_tame in ((40.0 / C, True), (48.0 / C, False)):
        args = list(base)
        args[3] = jnp.full_like(base[3], -per_token) + 0.1 * base[3]  # ~constant strong decay
        g32 = args[3].astype(jnp.float32)
        assert tame(g32) is is_tame
        with jax.enable_x64(True):
            want = value_and_grads(lambda q, k, v, g, b, w, s0: reference(q, k, v, g, b, w, s0, None, 0.5),
                                   tuple(jnp.asarray(x, jnp.float64) for x in args))
        got = value_and_grads(fn, tuple(jnp.asarray(x, jnp.float32) for x in args))
        assert_close(got, want, 2e-4)


@pytest.mark.parametrize("scalar", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_lean_chunk_pass_matches_the_scan(x64, scalar):
    """lean_chunk_recurrence (own reverse pass) == chunk_recurrence (autodiff of the scan), float64,
    per-key-channel or scalar chunk decays: outputs, final state and every gradient."""
    r = np.random.default_rng(3)
    b, h, n, c, k, v = 1, 2, 3, 4, 3, 2
    qg, w, ke = (jnp.asarray(r.normal(size=(b, h, n, c, k))) for _ in range(3))
    p = jnp.asarray(r.normal(size=(b, h, n, c, c)))
    u = jnp.asarray(r.normal(size=(b, h, n, c, v)))
    s0 = jnp.asarray(r.normal(size=(b, h, k, v)))
    co, cs = jnp.asarray(r.normal(size=(b, h, n, c, v))), jnp.asarray(r.normal(size=(b, h, k, v)))
    a = jnp.asarray(r.uniform(0.5, 1.0, size=(b, h, n) if scalar else (b, h, n, k)))

    def loss(fn, *xs):
        o, s = fn(*xs)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

    lean = lambda qg, p, u, w, ke, a, s0: lean_chunk_recurrence(qg, p, u, w, ke, a, s0)
    scan = lambda qg, p, u, w, ke, a, s0: chunk_recurrence(qg, p, u, ke, a, s0, w=w, impl="xla")
    got, want = (jax.jit(jax.value_and_grad(lambda *xs, f=f: loss(f, *xs), tuple(range(7)), has_aux=True))(
        qg, p, u, w, ke, a, s0) for f in (lean, scan))
    assert_close(got, want, TOL64)


@pytest.mark.slow
def test_nan_poisons_only_its_document_on_the_fast_way():
    """A NaN value in the second document: the first document's outputs are those of a clean run
    (bit for bit), the poisoned ones NaN, on tame gates."""
    q, k, v, g, b, w, s0, _, _ = make(seed=4, dtype=np.float32)
    assert tame(g)
    seg = jnp.asarray(SEG)
    fn = ours(seg)
    clean = fn(q, k, v, g, b, w, s0)[0]
    bad = fn(q, k, v.at[0, 13, 1, 0].set(jnp.nan), g, b, w, s0)[0]
    np.testing.assert_array_equal(np.asarray(bad[0, :11]), np.asarray(clean[0, :11]))
    np.testing.assert_array_equal(np.asarray(bad[1]), np.asarray(clean[1]))
    assert np.all(np.isnan(np.asarray(bad[0, 13:17, 1])))


def test_bad_gate_raises():
    q, k, v, g, b, w, s0, _, _ = make(dtype=np.float32)
    with pytest.raises(TypeError, match="gdn2: g must have a floating dtype"):
        gdn2(q, k, v, g.astype(jnp.int32), b, w)


@pytest.mark.slow
def test_kda_both_ways_match_the_reference(x64):
    """KDA (delta_rule with per-channel g): b = w = beta; tame gates, and strong gates with a -inf
    (a full reset of one channel), forward and gradients (beta included)."""
    q, k, v, g, _, _, s0, co, cs = make(seed=5)
    beta = jnp.asarray(np.random.default_rng(6).uniform(0.05, 1.9, size=v.shape[:3]))
    fn = jax.jit(lambda q, k, v, g, beta, s0: delta_rule(q, k, v, beta, g=g, initial_state=s0, chunk_size=C))
    ref = lambda q, k, v, g, beta, s0: reference(q, k, v, g, jnp.broadcast_to(beta[..., None], g.shape),
                                                 jnp.broadcast_to(beta[..., None], v.shape), s0, None, 0.5)
    for gates, is_tame in ((g, True), (g.at[1, 9, 0, 2].set(-jnp.inf), False)):
        assert tame(gates) is is_tame
        assert_close(value_and_grads(fn, (q, k, v, gates, beta, s0, co, cs)),
                     value_and_grads(ref, (q, k, v, gates, beta, s0, co, cs)), TOL64)


@pytest.mark.slow
def test_packed_equals_separate_documents():
    """Packed segment ids (fast way) == each document run on its own, float32."""
    q, k, v, g, b, w, _, _, _ = make(seed=7, dtype=np.float32)
    seg = jnp.asarray(SEG)
    o = ours(seg)(q, k, v, g, b, w, jnp.zeros((2, 2, 4, 3)))[0]
    bounds = [(0, 0, 11), (0, 11, 17), (0, 17, 29), (1, 0, 17), (1, 17, 29)]
    for row, lo, hi in bounds:
        cut = lambda x, row=row, lo=lo, hi=hi: x[row:row + 1, lo:hi]
        alone = gdn2(cut(q), cut(k), cut(v), cut(g), cut(b), cut(w), chunk_size=C)[0]
        assert rel_err(o[row:row + 1, lo:hi], alone) <= 1e-5, (row, lo)


@pytest.mark.slow
def test_bf16_error_is_bounded():
    """bf16 inputs on the fast way: relative max error against the float64 reference <= 3e-2."""
    args = make(seed=8, T=64, K=16, V=16)
    q, k, v, g, b, w, s0, _, _ = args
    with jax.enable_x64(True):
        want = reference(q, k, v, g, b, w, s0, None, 0.25)[0]
    lo = lambda x: jnp.asarray(x, jnp.bfloat16)
    assert tame(lo(g).astype(jnp.float32))
    got = gdn2(lo(q), lo(k), lo(v), lo(g), lo(b), lo(w), initial_state=jnp.asarray(s0, jnp.float32), chunk_size=16)[0]
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, want) <= 3e-2
