"""The hand-written VJP of chunked linear attention with a scalar (or no) decay
(:mod:`memjax.memory.linear_vjp`), both of its passes (``fused``: one scan step per chunk;
batched: matmuls over all chunks around a state-only scan), against a naive token loop written from
the recurrence ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t`` (state zeroed
before a segment's first token, and where ``exp(g_t) = 0``), in float64: outputs, final state and
the gradients of q, k, v, g and the initial state (tolerance ``TOL64`` relative max error), odd
lengths, packed segments, initial-state chaining, non-finite inputs and a bf16 error bound.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory import linear_vjp
from memjax.memory.linear import linear_attention
from tests.helpers import TOL64, largest_intermediate, rel_err, rel_rmse

B, T, H, K, V, C = 2, 21, 2, 5, 3, 4  # T odd and not a multiple of C: the padded tail is exercised
SEG = np.array([[0] * 5 + [1] * 9 + [2] * 7, [3] * T])


def naive(q, k, v, g, s0, seg, scale):
    """Token-by-token scan straight from the recurrence (decay, reset, write, read)."""
    keep = jnp.ones(q.shape[:2], bool) if seg is None else jnp.asarray(
        np.concatenate([np.ones((seg.shape[0], 1), bool), seg[:, 1:] == seg[:, :-1]], axis=1))
    decay = jnp.ones(q.shape[:3], q.dtype) if g is None else jnp.exp(g)

    def step(S, x):
        qt, kt, vt, dt, kp = x
        S = jnp.where(kp[:, None, None, None], S * dt[:, :, None, None], 0.0) + jnp.einsum("bhk,bhv->bhkv", kt, vt)
        return S, scale * jnp.einsum("bhkv,bhk->bhv", S, qt)

    S, o = jax.lax.scan(step, s0, tuple(jnp.swapaxes(x, 0, 1) for x in (q, k, v, decay, keep)))
    return jnp.swapaxes(o, 0, 1), S


def inputs(seed=0, dtype=np.float64):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, B, T, H, K))
    v = r.normal(size=(B, T, H, V))
    g = np.log(1 / (1 + np.exp(-(r.normal(size=(B, T, H)) + 1.0))))  # log sigmoid: in (-inf, 0)
    g[0, 7, 1] = -np.inf  # a full decay: head 1 of row 0 forgets everything before token 7
    s0 = r.normal(size=(B, H, K, V))
    co, cs = r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))
    return [jnp.asarray(x, dtype) for x in (q, k, v, g, s0, co, cs)]


def grads(fn, q, k, v, g, s0, co, cs):
    """Loss ``<o, co> + <S, cs>`` and its gradients w.r.t. (q, k, v, s0[, g])."""
    def loss(q, k, v, s0, g):
        o, s = fn(q, k, v, g, s0)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

    argnums = (0, 1, 2, 3) if g is None else (0, 1, 2, 3, 4)
    (_, (o, s)), gr = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(q, k, v, s0, g)
    return o, s, gr


@functools.cache
def reference(seed, gated, segmented):
    """The token loop's outputs and gradients in float64 (NumPy), computed once per case."""
    with jax.enable_x64(True):
        q, k, v, g, s0, co, cs = inputs(seed)
        g = (jnp.maximum(g, -5.0) if seed else g) if gated else None
        seg = SEG if segmented else None
        out = grads(lambda q, k, v, g, s0: naive(q, k, v, g, s0, seg, K ** -0.5), q, k, v, g, s0, co, cs)
        return jax.tree.map(np.asarray, out)


def library(fused, seg):
    def fn(q, k, v, g, s0):
        return linear_vjp.chunked_scalar_decay(q, k, v, None if g is None else jnp.where(jnp.exp(g) == 0, 0.0, g),
                                               _resets(g, seg), s0, K ** -0.5, C, fused=fused)
    return fn


def _resets(g, seg):
    """Segment starts and full decays as the resets the chunked pass takes."""
    r = None if seg is None else jnp.asarray(seg[:, 1:] != seg[:, :-1])
    r = None if r is None else jnp.concatenate([jnp.zeros((B, 1), bool), r], axis=1)[..., None]
    full = None if g is None else jnp.exp(g) == 0
    if full is None:
        return None if r is None else jnp.broadcast_to(r, (B, T, H))
    return full if r is None else full | r


@pytest.mark.parametrize("fused", [True, False])
def test_matches_naive_float64(x64, fused):
    """Forward and every gradient (q, k, v, initial state, g) against the token loop, with a gate,
    a full decay, packed segments, an initial state and a padded tail; and without a gate."""
    q, k, v, g, s0, co, cs = inputs()
    for gate, seg in ((g, SEG), (None, None)):
        o, s, gr = grads(library(fused, seg), q, k, v, gate, s0, co, cs)
        ro, rs, rgr = reference(0, gate is not None, seg is not None)
        assert rel_err(o, ro) < TOL64 and rel_err(s, rs) < TOL64
        for name, a, b in zip(["q", "k", "v", "s0", "g"], gr, rgr):
            assert rel_err(a, b) < TOL64, (fused, gate is None, name, rel_err(a, b))


@pytest.mark.parametrize("fused", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_public_api_chaining_and_poison(x64, monkeypatch, fused):
    """Through linear_attention: two halves chained by the state equal the token loop (outputs,
    final state and every gradient), and a NaN key poisons its document from that token on while
    every earlier output and every gradient stays the clean input's. (The batched pass, XLA:CPU's
    default, is also what tests/test_linear_attention.py and tests/test_causal_safety.py run.)"""
    monkeypatch.setattr(linear_vjp, "fused_default", lambda: fused)
    q, k, v, g, s0, co, cs = inputs(seed=1)
    g = jnp.maximum(g, -5.0)
    la = lambda q, k, v, g, s0: linear_attention(q, k, v, g=g, initial_state=s0, chunk_size=C)

    def halves(q, k, v, g, s0):
        m = 10
        o1, s1 = la(q[:, :m], k[:, :m], v[:, :m], g[:, :m], s0)
        o2, s2 = la(q[:, m:], k[:, m:], v[:, m:], g[:, m:], s1)
        return jnp.concatenate([o1, o2], 1), s2

    oh, sh, grh = grads(halves, q, k, v, g, s0, co, cs)
    ro, rs, rgr = reference(1, True, False)
    assert rel_err(oh, ro) < TOL64 and rel_err(sh, rs) < TOL64
    for a, b in zip(grh, rgr):
        assert rel_err(a, b) < TOL64

    # a NaN in row 0's key at t = 9 (segment 1 spans 5..13); the cotangent only reads t < 9
    seg = jnp.asarray(SEG)
    early = (jnp.arange(T) < 9)[None, :, None, None] | (jnp.arange(B) == 1)[:, None, None, None]

    @jax.jit
    def run(q, k, v, g, s0):
        def loss(q, k, v, g, s0):
            o, _ = linear_attention(q, k, v, g=g, initial_state=s0, segment_ids=seg, chunk_size=C)
            return jnp.sum(jnp.where(early, o, 0.0) * co), o
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, g, s0)

    (_, oc), gc = run(q, k, v, g, s0)
    (_, ob), gb = run(q, k.at[0, 9, 0, 1].set(jnp.nan), v, g, s0)
    assert bool(jnp.all(jnp.isnan(ob[0, 9:14, 0]))) and bool(jnp.all(jnp.isfinite(ob[0, 14:])))
    assert bool(jnp.all(jnp.isfinite(ob[0, 9:14, 1])))  # poison is per head
    np.testing.assert_array_equal(np.asarray(jnp.where(early, ob, 0.0)), np.asarray(jnp.where(early, oc, 0.0)))
    for a, b in zip(gb, gc):
        assert bool(jnp.all(jnp.isfinite(a)))
        assert rel_err(a, b) < TOL64


def test_fused_forward_forms_no_state_stack():
    """The fused forward keeps no ``[B, H, N, K, V]`` stack of per-chunk writes or states (the
    bytes issue 17 counts); the batched pass does (its per-chunk writes), so this can fail."""
    q, k, v = (jnp.ones((1, 64, 1, 16), jnp.float32) for _ in range(3))
    s0 = jnp.zeros((1, 1, 16, 16), jnp.float32)
    run = lambda fused: (lambda q, k, v: linear_vjp.chunked_scalar_decay(q, k, v, None, None, s0, 0.25, 8,
                                                                         fused=fused)[0])
    per_token = 64 * 16  # [B, T, H, V]
    assert largest_intermediate(run(True), q, k, v) <= per_token
    assert largest_intermediate(run(False), q, k, v) >= 2 * per_token  # N K V = 8 * 256


# the fused variant's bf16 bound is slow: both variants share the arithmetic, and their float64 agreement runs by default
@pytest.mark.parametrize("fused", [pytest.param(True, marks=pytest.mark.slow), False])
def test_bf16_error_bound(fused):
    """bf16 q, k, v (states and decays float32): relative RMS error of the output, the final state
    and every gradient against the float64 token loop below 1e-2 (measured ~3e-3)."""
    with jax.enable_x64(True):
        q, k, v, g, s0, co, cs = inputs(seed=2)
    bf = lambda x: jnp.asarray(np.asarray(x), jnp.bfloat16)
    f32 = lambda x: jnp.asarray(np.asarray(x), jnp.float32)
    g = jnp.maximum(f32(g), -5.0)
    o, s, gr = grads(library(fused, SEG), bf(q), bf(k), bf(v), g, f32(s0), bf(co), f32(cs))
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    ro, rs, rgr = reference(2, True, True)
    errs = [rel_rmse(o, ro), rel_rmse(s, rs)] + [rel_rmse(a, b) for a, b in zip(gr, rgr)]
    assert max(errs) < 1e-2, errs


def test_bad_input_raises():
    q = jnp.zeros((1, 8, 1, 4), jnp.bfloat16)
    with pytest.raises(ValueError, match="g"):
        linear_attention(q, q, q, g=jnp.zeros((1, 8, 3), jnp.float32))
    with pytest.raises(TypeError, match="q"):
        linear_attention(q.astype(jnp.int32), q, q)
