"""Fast paths of the chunked delta-rule family (issue 18): DPLR's factored intra-chunk scores for tame decays
(memjax.memory.dplr._factored_scores, taken by lax.cond; strong decays fall back to the
hierarchical scores).

References (float64, token by token, written from the equations, independent of the library)::

    gated delta rule:  S_t = exp(g_t) S_{t-1};  S_t += k_t (beta_t (v_t - S_t^T k_t))^T;  o_t = scale S_t^T q_t
    DeltaProduct:      n_h such steps per token (g_t before the first), o_t read after the last
    DPLR:              S_t = (diag(exp g_t) + b_t a_t^T) S_{t-1} + k_t v_t^T;  o_t = scale S_t^T q_t

with the state zeroed before the first token of every new segment. Outputs, final states and the
gradients of ``sum(o co) + sum(S cs)`` w.r.t. every input and the initial state: relative max
error <= 1e-10 in float64.
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.delta import delta_rule as _delta_rule
from memjax.memory.dplr import dplr_delta_rule as _dplr_delta_rule
from tests.helpers import TOL64, rel_err

# jitted: eager calls would compile every op on its own
delta_rule = jax.jit(_delta_rule, static_argnames=("chunk_size",))
dplr_delta_rule = jax.jit(_dplr_delta_rule, static_argnames=("chunk_size",))

# (memjax.memory re-exports the functions under the module names, so the modules come by path)
_delta_mod = importlib.import_module("memjax.memory.delta")
_dplr_mod = importlib.import_module("memjax.memory.dplr")
_product_mod = importlib.import_module("memjax.memory.delta_product")

SEG = np.repeat([[0, 1, 2], [4, 4, 5]], [7, 12, 14], axis=1)  # T = 33; starts inside and at chunk edges


def _keep(seg, b, t, dtype):
    if seg is None:
        return jnp.ones((b, t), dtype)
    return jnp.concatenate([jnp.ones((b, 1), dtype), (seg[:, 1:] == seg[:, :-1]).astype(dtype)], 1)


def delta_reference(q, k, v, beta, g, s0, seg, scale):
    """Gated delta rule token by token (Yang, Kautz, Hatamizadeh 2024); ``k: [B, T, H, K]``."""
    tm = lambda x: jnp.moveaxis(x, 1, 0)

    def step(S, inp):
        qt, kt, vt, bt, gt, kp = inp
        S = S * (jnp.exp(gt) * kp[:, None])[..., None, None]
        err = vt - jnp.einsum("bhkv,bhk->bhv", S, kt)
        S = S + jnp.einsum("bhk,bhv->bhkv", kt, bt[..., None] * err)
        return S, scale * jnp.einsum("bhkv,bhk->bhv", S, qt)

    S, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(beta), tm(g), tm(_keep(seg, *q.shape[:2], q.dtype))))
    return tm(o), S


def product_reference(q, k, v, beta, g, s0, seg, scale):
    """Gated DeltaProduct token by token (Siems et al. 2025): ``k, v [B, T, n_h, H, .]``."""
    tm = lambda x: jnp.moveaxis(x, 1, 0)

    def step(S, inp):
        qt, kt, vt, bt, gt, kp = inp
        S = S * (jnp.exp(gt) * kp[:, None])[..., None, None]
        for j in range(kt.shape[1]):
            err = vt[:, j] - jnp.einsum("bhkv,bhk->bhv", S, kt[:, j])
            S = S + jnp.einsum("bhk,bhv->bhkv", kt[:, j], bt[:, j, :, None] * err)
        return S, scale * jnp.einsum("bhkv,bhk->bhv", S, qt)

    S, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(beta), tm(g), tm(_keep(seg, *q.shape[:2], q.dtype))))
    return tm(o), S


def dplr_reference(q, k, v, a, b, g, s0, seg, scale):
    """Diagonal plus low rank (RWKV-7, Peng et al. 2025) token by token; ``g: [B, T, H, K]``."""
    tm = lambda x: jnp.moveaxis(x, 1, 0)

    def step(S, inp):
        qt, kt, vt, at, bt, gt, kp = inp
        S = S * kp[:, None, None, None]
        S = (jnp.exp(gt)[..., None] * S + bt[..., :, None] * jnp.einsum("bhk,bhkv->bhv", at, S)[..., None, :]
             + kt[..., :, None] * vt[..., None, :])
        return S, scale * jnp.einsum("bhkv,bhk->bhv", S, qt)

    xs = (q, k, v, a, b, g, _keep(seg, *q.shape[:2], q.dtype))
    S, o = jax.lax.scan(step, s0, tuple(tm(x) for x in xs))
    return tm(o), S


def value_and_grads(fn, args, co, cs):
    """``(o, S, grads)`` of ``sum(o co) + sum(S cs)`` w.r.t. every argument (jitted)."""
    def loss(*xs):
        o, s = fn(*xs)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

    (_, (o, s)), gr = jax.jit(jax.value_and_grad(loss, tuple(range(len(args))), has_aux=True))(*args)
    return o, s, gr


def assert_close(got, want, tol):
    for i, (x, y) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        assert rel_err(x, y) <= tol, (i, rel_err(x, y))


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- gated delta rule


def delta_inputs(B=2, T=33, H=2, K=6, V=5, seed=0, dtype=np.float64):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, T, H, K))
    k = unit(r.normal(size=(B, T, H, K)))
    v = r.normal(size=(B, T, H, V))
    beta = 2 / (1 + np.exp(-r.normal(size=(B, T, H))))  # (0, 2): negative eigenvalues too
    g = np.log(1 / (1 + np.exp(-r.normal(size=(B, T, H)) - 2)))
    s0 = r.normal(size=(B, H, K, V))
    co, cs = r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))
    return tuple(jnp.asarray(np.asarray(x, dtype)) for x in (q, k, v, beta, g, s0, co, cs))


def test_delta_rule_bad_beta_raises():
    q, k, v, beta, g, _, _, _ = delta_inputs(T=5, dtype=np.float32)
    with pytest.raises(ValueError, match="beta"):
        _delta_rule(q, k, v, beta[:, :4], g=g)


# ----------------------------------------------------------------------------- Gated DeltaProduct


@pytest.mark.slow
def test_delta_product_matches_reference_with_gradients(x64):
    r = np.random.default_rng(1)
    B, T, nh, H, K, V = 2, 21, 2, 2, 4, 3
    q = jnp.asarray(r.normal(size=(B, T, H, K)))
    k = jnp.asarray(unit(r.normal(size=(B, T, nh, H, K))))
    v = jnp.asarray(r.normal(size=(B, T, nh, H, V)))
    beta = jnp.asarray(2 / (1 + np.exp(-r.normal(size=(B, T, nh, H)))))
    g = jnp.asarray(np.log(1 / (1 + np.exp(-r.normal(size=(B, T, H)) - 2))))
    s0 = jnp.asarray(r.normal(size=(B, H, K, V)))
    co, cs = jnp.asarray(r.normal(size=(B, T, H, V))), jnp.asarray(r.normal(size=(B, H, K, V)))
    seg = jnp.asarray(np.repeat([[0, 1], [2, 3]], [6, 15], axis=1))
    ours = lambda *a: _product_mod.delta_product(*a[:5], initial_state=a[5], segment_ids=seg, chunk_size=4)
    ref = lambda *a: product_reference(*a, seg, K ** -0.5)
    assert_close(value_and_grads(ours, (q, k, v, beta, g, s0), co, cs),
                 value_and_grads(ref, (q, k, v, beta, g, s0), co, cs), TOL64)


# ----------------------------------------------------------------------------- DPLR: both branches


def dplr_inputs(B=2, T=33, H=2, K=4, V=3, seed=0, strength=1.0, dtype=np.float64):
    """RWKV-7's regime: ``a = -kappa``, ``b = kappa * a_gate``; ``g`` in ``(-strength e^{-1/2}, 0)``."""
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, B, T, H, K))
    v = r.normal(size=(B, T, H, V))
    kappa = unit(r.normal(size=(B, T, H, K)))
    gate = 1 / (1 + np.exp(-r.normal(size=(B, T, H, 1))))
    g = -strength * np.exp(-0.5) / (1 + np.exp(-2 * r.normal(size=(B, T, H, K))))
    s0 = r.normal(size=(B, H, K, V))
    co, cs = r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))
    return tuple(jnp.asarray(np.asarray(x, dtype)) for x in (q, k, v, -kappa, kappa * gate, g, s0, co, cs))


def _tame(g, c):
    gt = jnp.reshape(jnp.pad(g, ((0, 0), (0, -g.shape[1] % c), (0, 0), (0, 0))), (g.shape[0], -1, c, *g.shape[2:]))
    return bool(_dplr_mod._is_tame(gt, g.dtype))


# tame: the factored scores; strong: the fallback (the old hierarchical scores, which tests/test_dplr.py and
# tests/test_causal_safety.py cover by default)
@pytest.mark.parametrize("strength", [1.0, pytest.param(200.0, marks=pytest.mark.slow)])
def test_dplr_both_branches_match_reference_with_gradients(x64, strength):
    q, k, v, a, b, g, s0, co, cs = dplr_inputs(strength=strength)
    assert _tame(g, 8) == (strength == 1.0)  # the branch this case is meant to take
    seg = jnp.asarray(SEG)
    ours = lambda *x: dplr_delta_rule(*x[:6], initial_state=x[6], segment_ids=seg, chunk_size=8)
    ref = lambda *x: dplr_reference(*x, seg, q.shape[-1] ** -0.5)
    assert_close(value_and_grads(ours, (q, k, v, a, b, g, s0), co, cs),
                 value_and_grads(ref, (q, k, v, a, b, g, s0), co, cs), TOL64)


@pytest.mark.slow
def test_dplr_tame_packed_documents_run_separately_and_nan_stays_in_its_document(x64):
    q, k, v, a, b, g, s0, _, _ = dplr_inputs()
    seg = jnp.asarray(SEG)
    run = lambda k, sl=slice(None), seg=seg, s=s0: dplr_delta_rule(q[:, sl], k[:, sl], v[:, sl], a[:, sl], b[:, sl],
                                                                    g[:, sl], initial_state=s, segment_ids=seg,
                                                                    chunk_size=8)
    o, _ = run(k)
    alone, _ = run(k, slice(7, 19), None, None)  # row 0's second document from a zero state
    assert rel_err(o[0, 7:19], alone[0]) <= TOL64
    o_nan, _ = run(k.at[0, 10].set(jnp.nan))  # a NaN key in row 0's second document
    assert np.all(np.isnan(np.asarray(o_nan[0, 10:19])))
    assert rel_err(o_nan[0, :7], o[0, :7]) == 0 and rel_err(o_nan[0, 19:], o[0, 19:]) <= TOL64
    assert rel_err(o_nan[1], o[1]) == 0


@pytest.mark.slow
def test_dplr_tame_bf16_error_is_bounded(x64):
    q, k, v, a, b, g, s0, _, _ = dplr_inputs(T=33, K=8, V=8)
    want, _ = dplr_reference(q, k, v, a, b, g, s0, None, 8 ** -0.5)
    bf = lambda x: x.astype(jnp.bfloat16)
    got, _ = dplr_delta_rule(bf(q), bf(k), bf(v), bf(a), bf(b), g.astype(jnp.float32), initial_state=s0.astype(jnp.float32),
                             chunk_size=8)
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, want) <= 5e-2


def test_dplr_bad_low_rank_shape_raises():
    q, k, v, a, b, g, _, _, _ = dplr_inputs(T=5, dtype=np.float32)
    with pytest.raises(ValueError, match="b"):
        _dplr_delta_rule(q, k, v, a, b[..., :2], g)
