"""Per-key-channel (vector) decays, RWKV-6's bonus and grouped value heads in ``linear_attention``;
the vector chunk decay of ``chunk_recurrence``; the gla_vec / hgrn2 / rwkv6 blocks.

Reference (float64, token by token, written from the equations)::

    GLA:    S_t = diag(exp g_t) S_{t-1} + k_t v_t^T,        o_t = scale S_t^T q_t
    RWKV-6: o_t = scale (S_{t-1} + diag(u) k_t v_t^T)^T q_t,  S_t = diag(exp g_t) S_{t-1} + k_t v_t^T

with the state zeroed where a new segment starts (before that token's update, and before its
read in the bonus form). Tolerance: relative max error <= 1e-10 in float64 (outputs, final states,
gradients w.r.t. q, k, v, g, u and the initial state).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.kernels.chunk_pass import chunk_recurrence
from memjax.memory.linear import linear_attention
from tests.helpers import TOL64, rel_err

la = jax.jit(linear_attention, static_argnames=("mode", "chunk_size", "impl"))


def reference(q, k, v, g, u, s0, seg, scale):
    """Token scan from the equations (any ``g`` of ``[B, T, HV(, K)]``)."""
    b, t, h, dk = q.shape
    hv = v.shape[2]
    q, k = (jnp.repeat(x, hv // h, axis=2) for x in (q, k))
    if u is not None:
        u = jnp.repeat(u, hv // u.shape[0], axis=0)
    g = jnp.zeros(v.shape[:3], q.dtype) if g is None else g
    e = jnp.exp(g)
    dec = e[..., None, None] if e.ndim == 3 else e[..., :, None]  # [B, T, HV, K or 1, 1]
    keep = jnp.ones((b, t), q.dtype) if seg is None else jnp.concatenate(
        [jnp.ones((b, 1), q.dtype), (seg[:, 1:] == seg[:, :-1]).astype(q.dtype)], 1)

    def step(S, inp):
        qt, kt, vt, dt, kp = inp
        kv = jnp.einsum("bhk,bhv->bhkv", kt, vt)
        kp = kp[:, None, None, None]
        if u is None:
            S = S * dt * kp + kv
            return S, scale * jnp.einsum("bhkv,bhk->bhv", S, qt)
        S = S * kp
        o = scale * jnp.einsum("bhkv,bhk->bhv", S + u[..., :, None] * kv, qt)
        return S * dt + kv, o

    tm = lambda x: jnp.moveaxis(x, 1, 0)
    S, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(dec), tm(keep)))
    return tm(o), S


def make(B=2, T=37, H=2, HV=2, K=4, V=3, seed=0, vector=True, bonus=False, dtype=np.float64):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, B, T, H, K))
    v = r.normal(size=(B, T, HV, V))
    g = -r.uniform(0.0, 1.0, size=(B, T, HV, K) if vector else (B, T, HV)) ** 2 * 2
    u = r.normal(size=(H, K)) if bonus else None
    s0 = r.normal(size=(B, HV, K, V))
    co, cs = r.normal(size=(B, T, HV, V)), r.normal(size=(B, HV, K, V))
    cast = lambda x: None if x is None else jnp.asarray(np.asarray(x, dtype))
    return tuple(cast(x) for x in (q, k, v, g, u, s0, co, cs))


def grads_of(fn, q, k, v, g, u, s0, co, cs):
    """``(o, s, grads)`` of ``sum(o co) + sum(s cs)`` w.r.t. q, k, v, g, u, s0 (jitted)."""
    def loss(q, k, v, g, u, s0):
        o, s = fn(q, k, v, g, u, s0)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

    argnums = tuple(i for i, x in enumerate((q, k, v, g, u, s0)) if x is not None)
    (_, (o, s)), gr = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(q, k, v, g, u, s0)
    return o, s, gr


def ours(mode, chunk=16, seg=None):
    return lambda q, k, v, g, u, s0: la(q, k, v, g=g, bonus=u, initial_state=s0, segment_ids=seg, mode=mode,
                                        chunk_size=chunk)


def ref_fn(seg=None, scale=None):
    return lambda q, k, v, g, u, s0: reference(q, k, v, g, u, s0, seg, scale or q.shape[-1] ** -0.5)


def assert_all_close(got, want, tol, what=""):
    for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        assert rel_err(a, b) <= tol, (what, i, rel_err(a, b))


# ----------------------------------------------------------------------------- forms vs reference


@pytest.mark.parametrize("vector,bonus,packed", [pytest.param(True, False, False, marks=pytest.mark.slow), (True, True, True),
                                                 pytest.param(False, True, False, marks=pytest.mark.slow)])
def test_chunked_recurrent_reference_agree(x64, vector, bonus, packed):
    # T = 37 with chunk 16: a padded tail; K = 4 channels with different decays; with packing
    # the segments start inside and at the edge of chunks and sub-chunks.
    args = make(vector=vector, bonus=bonus)
    seg = jnp.asarray(np.repeat([[0, 1, 2, 3], [5, 5, 6, 7]], [9, 7, 16, 5], axis=1)) if packed else None
    want = grads_of(ref_fn(seg), *args)
    for mode in ("chunked", "recurrent"):
        assert_all_close(grads_of(ours(mode, seg=seg), *args), want, TOL64, mode)
    q, k, v, g, u, s0 = args[:6]
    o, s = la(q, k, v, g=g, bonus=u, initial_state=s0, segment_ids=seg, mode="parallel", chunk_size=64)
    assert_all_close((o, s), want[:2], TOL64, "parallel")


def test_initial_state_chaining_and_chunk_sizes(x64):
    q, k, v, g, u, s0, _, _ = make(bonus=True)
    o, s = la(q, k, v, g=g, bonus=u, initial_state=s0, mode="chunked", chunk_size=16)
    o1, s1 = la(q[:, :20], k[:, :20], v[:, :20], g=g[:, :20], bonus=u, initial_state=s0, mode="chunked",
                chunk_size=16)
    o2, s2 = la(q[:, 20:], k[:, 20:], v[:, 20:], g=g[:, 20:], bonus=u, initial_state=s1, mode="chunked",
                chunk_size=16)
    assert_all_close((jnp.concatenate([o1, o2], 1), s2), (o, s), TOL64)
    o7, s7 = la(q, k, v, g=g, bonus=u, initial_state=s0, mode="chunked", chunk_size=7)  # prime: sub-chunk 1
    assert_all_close((o7, s7), (o, s), TOL64)


# recurrent: slow by default, as test_chunked_recurrent_reference_agree[True-True-True] already holds
# the recurrent form with packed segments to the reference
@pytest.mark.parametrize("mode", ["chunked", pytest.param("recurrent", marks=pytest.mark.slow)])
def test_packed_segments_equal_separate_documents(x64, mode):
    q, k, v, g, u, _, _, _ = make(B=1, T=30, bonus=True)
    seg = jnp.asarray(np.repeat([[3, 1, 3]], [11, 13, 6], axis=1))
    o, _ = la(q, k, v, g=g, bonus=u, segment_ids=seg, mode=mode, chunk_size=8)
    parts = []
    for lo, hi in ((0, 11), (11, 24), (24, 30)):
        parts.append(la(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g=g[:, lo:hi], bonus=u, mode=mode,
                        chunk_size=8)[0])
    assert_all_close(o, jnp.concatenate(parts, 1), TOL64, mode)


@pytest.mark.slow
def test_minus_inf_resets_a_channel(x64):
    q, k, v, g, u, s0, co, cs = make(bonus=False)
    g = g.at[0, 10, 0, 1].set(-jnp.inf).at[1, 16, 1, :].set(-jnp.inf).at[0, 31, 1, 3].set(-jnp.inf)
    want = reference(q, k, v, g, None, s0, None, 0.5)
    for mode in ("chunked", "recurrent"):
        o, s, gr = grads_of(lambda *a: linear_attention(*a[:3], g=a[3], initial_state=a[5], mode=mode,
                                                        chunk_size=16), q, k, v, g, None, s0, co, cs)
        assert_all_close((o, s), want, TOL64, mode)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in gr), mode
    # the reset channel forgets exactly: the state row of channel 1 after t = 10 ignores t <= 10
    o_a, s_a = la(q, k, v, g=g, mode="chunked", chunk_size=16)
    o_b, s_b = la(q, k.at[0, :10, :, 1].set(7.0), v, g=g, mode="chunked", chunk_size=16)
    np.testing.assert_array_equal(s_a[0, 0, 1], s_b[0, 0, 1])


@pytest.mark.slow
def test_strong_decay_is_finite_float32():
    q, k, v, g, u, s0, co, cs = make(T=40, bonus=True, dtype=np.float32)
    g = jnp.full_like(g, -30.0).at[:, ::3].set(-1e-3)
    res = {m: grads_of(ours(m), q, k, v, g, u, s0, co, cs) for m in ("chunked", "recurrent")}
    for leaf in jax.tree.leaves(res):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert_all_close(res["chunked"], res["recurrent"], 1e-4)


def test_bf16_inputs_are_close_to_float64():
    q, k, v, g, u, s0, _, _ = make(bonus=True)
    with jax.enable_x64(True):
        want = reference(q, k, v, g, u, s0, None, 0.5)
    bf = lambda x: x.astype(jnp.bfloat16)
    o, s = la(bf(q), bf(k), bf(v), g=g.astype(jnp.float32), bonus=u.astype(jnp.float32),
              initial_state=s0.astype(jnp.float32), mode="chunked", chunk_size=16)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    # bf16 operands carry ~3 significant digits: 2^-8 relative rounding of q, k, v and the factors
    assert rel_err(o, want[0]) < 3e-2 and rel_err(s, want[1]) < 3e-2


@pytest.mark.slow
def test_grouped_value_heads_equal_repeated_qk(x64):
    q, k, v, g, u, s0, co, cs = make(H=2, HV=4, bonus=True)
    rep = lambda x: jnp.repeat(x, 2, axis=2)
    for mode in ("chunked", "recurrent"):
        o, s, (dq, dk, dv, dg, du, ds0) = grads_of(ours(mode), q, k, v, g, u, s0, co, cs)
        o2, s2, (dq2, dk2, dv2, dg2, du2, ds02) = grads_of(
            lambda q, k, v, g, u, s0: ours(mode)(rep(q), rep(k), v, g, jnp.repeat(u, 2, 0), s0), q, k, v, g, u, s0,
            co, cs)
        assert_all_close((o, s, dq, dk, dv, dg, du, ds0), (o2, s2, dq2, dk2, dv2, dg2, du2, ds02), TOL64, mode)
    want = reference(q, k, v, g, u, s0, None, 0.5)
    assert_all_close(la(q, k, v, g=g, bonus=u, initial_state=s0, mode="chunked", chunk_size=16), want, TOL64)


def test_nonfinite_vector_gate_stays_causal(x64):
    q, k, v, g, u, _, _, _ = make(bonus=True)
    bad = g.at[0, 20, 1, 2].set(jnp.nan)
    for mode in ("chunked", "recurrent"):
        o, _ = la(q, k, v, g=g, bonus=u, mode=mode, chunk_size=16)
        ob, sb = la(q, k, v, g=bad, bonus=u, mode=mode, chunk_size=16)
        np.testing.assert_array_equal(ob[0, :20], o[0, :20])
        np.testing.assert_array_equal(ob[1], o[1])
        assert bool(jnp.all(jnp.isnan(ob[0, 20:, 1]))) and bool(jnp.all(jnp.isnan(sb[0, 1])))


def test_bad_shapes_raise_naming_the_argument():
    q, k, v, g, u, _, _, _ = make(dtype=np.float32, bonus=True)
    with pytest.raises(ValueError, match=r"linear_attention: g must have shape \[B, T, H\] .* \(or per key channel \[B, T, H, K\]"):
        linear_attention(q, k, v, g=g[..., :3])
    with pytest.raises(ValueError, match=r"linear_attention: bonus must have shape \[H, K\]"):
        linear_attention(q, k, v, g=g, bonus=u[:, :3])
    with pytest.raises(ValueError, match=r"linear_attention: v must have a positive multiple of H"):
        linear_attention(q, k, jnp.concatenate([v, v[:, :, :1]], 2))
    with pytest.raises(TypeError, match="bonus"):
        linear_attention(q, k, v, g=g, bonus=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention(q, k, v, g=g, initial_state=jnp.zeros((2, 1, 4, 3)))


# ----------------------------------------------------------------------------- chunk_recurrence


def test_chunk_recurrence_vector_decay(x64):
    r = np.random.default_rng(1)
    b, h, n, c, k, v = 1, 2, 3, 4, 5, 3
    qg, ke = r.normal(size=(2, b, h, n, c, k))
    p = r.normal(size=(b, h, n, c, c))
    uu = r.normal(size=(b, h, n, c, v))
    s0 = r.normal(size=(b, h, k, v))
    a = r.uniform(0.2, 1.0, size=(b, h, n))
    o1, s1 = chunk_recurrence(qg, p, uu, ke, a, s0, impl="xla")
    o2, s2 = chunk_recurrence(qg, p, uu, ke, np.repeat(a[..., None], k, -1), s0, impl="auto")
    assert_all_close((o2, s2), (o1, s1), 1e-14)
    av = r.uniform(0.2, 1.0, size=(b, h, n, k))  # per channel, vs a loop over chunks
    o, s = chunk_recurrence(qg, p, uu, ke, av, s0)
    S, outs = s0, []
    for i in range(n):
        outs.append(qg[:, :, i] @ S + p[:, :, i] @ uu[:, :, i])
        S = av[:, :, i, :, None] * S + np.swapaxes(ke[:, :, i], -1, -2) @ uu[:, :, i]
    assert_all_close((o, s), (np.stack(outs, 2), S), TOL64)
    with pytest.raises(ValueError, match="does not support per-key-channel"):
        chunk_recurrence(qg, p, uu, ke, av, s0, impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="chunk_recurrence: a must have shape"):
        chunk_recurrence(qg, p, uu, ke, av[..., :2], s0)


# ----------------------------------------------------------------------------- blocks


@pytest.mark.slow  # (tests/test_decoding.py and tests/test_model_api.py cover the blocks by default)
@pytest.mark.parametrize("name", ["gla_vec", "hgrn2", "rwkv6"])
def test_block_prefill_and_steps_equal_forward(name):
    from memjax.nn.registry import get_block

    blk = get_block(name)(d_model=16, num_heads=2, chunk_size=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 11, 16))
    y = nnx.jit(lambda m, x: m(x))(blk, x)
    run = nnx.jit(lambda m, x, c: m(x, cache=c))
    cache = blk.init_cache(2, 16)
    y1, cache = run(blk, x[:, :7], cache)
    outs = [y1]
    for t in range(7, 11):
        yt, cache = run(blk, x[:, t:t + 1], cache)
        outs.append(yt)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y, rtol=2e-4, atol=2e-4)
    # packed rows: each document as if alone
    seg = jnp.asarray(np.repeat([[0, 1]], [6, 5], axis=1))
    yp = nnx.jit(lambda m, x, s: m(x, segment_ids=s))(blk, x[:1], seg)
    np.testing.assert_allclose(yp[:, 6:], nnx.jit(lambda m, x: m(x))(blk, x[:1, 6:]), rtol=2e-4,
                               atol=2e-4)
