"""The route of the chunked GDN-2 / KDA and the gated delta rule's chunked form against a token
loop written from the equation (float64), forward and gradients:

- the gated delta rule (scalar ``g``) with packed segments, full decays (``g = -inf``) and strong
  decays (slow by default: tests/test_delta_rule.py covers the chunked form against its reference);
- GDN-2 / KDA: the route between the tame and the general way as a ``custom_vjp``
  (``memjax.memory.gdn2._routed``), both branches, and a traced read scale (a differentiable
  argument of the route).

Reference (per batch and head)::

    S'_t = exp(g_t) S_{t-1}  (zero at a new segment);   S_t = S'_t + k_t (beta_t (v_t - S'_t^T k_t))^T
    o_t  = scale S_t^T q_t                                (Yang, Kautz, Hatamizadeh 2024)

and for GDN-2 ``S_t = S'_t + k_t (w_t * v_t - S'_t^T (b_t * k_t))^T`` with ``S'_t = diag(exp g_t) S_{t-1}``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.chunking import to_head_chunks
from memjax.memory.delta import delta_rule
from memjax.memory.gdn2 import _is_tame, gdn2
from tests.helpers import TOL64, rel_err

C = 8  # T = 29: 4 chunks, the last padded
SEG = np.repeat([[0, 1, 2], [4, 4, 5]], [11, 6, 12], axis=1)  # [2, 29]: resets inside chunks


def reference(q, k, u, a, g, s0, seg, scale):
    """``S'_t = diag(exp g_t) S_{t-1}`` (zero at a new segment), ``S_t = S'_t + k_t (u_t - S'_t^T a_t)^T``,
    ``o_t = scale S_t^T q_t``; ``g: [B, T, H]`` or ``[B, T, H, K]``; a scan over time in float64."""
    bsz, t = q.shape[:2]
    keep = np.concatenate([np.ones((bsz, 1)), seg[:, 1:] == seg[:, :-1]], 1)
    if g.ndim == 3:
        g = jnp.broadcast_to(g[..., None], k.shape)

    def step(s, x):
        qt, kt, ut, at, gt, kp = x
        s = s * kp[:, None, None, None] * jnp.exp(gt)[..., :, None]
        s = s + kt[..., :, None] * (ut - jnp.einsum("bhkv,bhk->bhv", s, at))[..., None, :]
        return s, scale * jnp.einsum("bhkv,bhk->bhv", s, qt)

    tm = lambda x: jnp.moveaxis(x, 1, 0)
    s, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(u), tm(a), tm(g), tm(jnp.asarray(keep, q.dtype))))
    return tm(o), s


def data(seed, g_shape, g_scale, B=2, T=29, H=2, K=4, V=3):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, B, T, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = r.normal(size=(B, T, H, V))
    g = -g_scale * r.uniform(0.0, 1.0, size=(B, T, H, *g_shape)) ** 2
    s0 = r.normal(size=(B, H, K, V))
    co, cs = r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))
    beta = r.uniform(0.05, 1.95, size=(B, T, H))
    b, w = r.uniform(0.05, 0.95, size=(B, T, H, K)), r.uniform(0.05, 0.95, size=(B, T, H, V))
    return {n: jnp.asarray(x) for n, x in dict(q=q, k=k, v=v, g=g, s0=s0, co=co, cs=cs, beta=beta, b=b, w=w).items()}


_JITTED = {}


def grads(fn, d, names):
    """``(o, s, grads)`` of ``sum(o co) + sum(s cs)`` w.r.t. ``names`` (one compilation per ``fn``:
    the parametrised cases share it, the route or the decays differing only at run time)."""
    if fn not in _JITTED:
        def loss(co, cs, *xs):
            o, s = fn(*xs)
            return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

        _JITTED[fn] = jax.jit(jax.value_and_grad(loss, tuple(range(2, 2 + len(names))), has_aux=True))
    (_, (o, s)), gr = _JITTED[fn](d["co"], d["cs"], *(d[n] for n in names))
    return o, s, gr


def assert_close(got, want, tol=TOL64):
    for i, (x, y) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        assert np.all(np.isfinite(np.asarray(x))), i
        assert rel_err(x, y) <= tol, (i, rel_err(x, y))


def _delta_ours(q, k, v, beta, g, s0):
    return delta_rule(q, k, v, beta, g=g, initial_state=s0, segment_ids=jnp.asarray(SEG), chunk_size=C)


def _delta_ref(q, k, v, beta, g, s0):
    bt = beta[..., None]
    return reference(q, k, bt * v, bt * k, g, s0, SEG, q.shape[-1] ** -0.5)


def _gdn2_ours(q, k, v, g, b, w, s0, scale):
    return gdn2(q, k, v, g, b, w, scale=scale, initial_state=s0, segment_ids=jnp.asarray(SEG), chunk_size=C)


def _gdn2_ref(q, k, v, g, b, w, s0, scale):
    return reference(q, k, w * v, b * k, g, s0, SEG, scale)


@pytest.mark.slow
@pytest.mark.parametrize("g_scale", [1.0, 60.0])
def test_gated_delta_rule_chunked_matches_token_loop(x64, g_scale):
    """Scalar g (mild, then strong with some full decays g = -inf), packed segments, an initial
    state, beta in (0, 2): the pair decays' own gradient and the lean chunk pass."""
    d = data(0, (), g_scale)
    if g_scale > 1:
        d["g"] = d["g"].at[0, 5, 1].set(-jnp.inf).at[1, 20, 0].set(-jnp.inf)
    names = ("q", "k", "v", "beta", "g", "s0")
    assert_close(grads(_delta_ours, d, names), grads(_delta_ref, d, names))


@pytest.mark.parametrize("g_scale", [1.0, 400.0])
def test_gdn2_route_both_ways_and_a_traced_scale(x64, g_scale):
    """g_scale 1: tame gates (the fast way); 400: per-chunk decays past log(float64 max) / 2 (the
    general way). The read scale is an argument of the differentiated function (traced)."""
    d = data(2, (4,), g_scale)
    d["scale"] = jnp.asarray(0.7)
    assert bool(_is_tame(to_head_chunks(d["g"], C), jnp.float64)) == (g_scale == 1.0)
    names = ("q", "k", "v", "g", "b", "w", "s0", "scale")
    got, want = grads(_gdn2_ours, d, names), grads(_gdn2_ref, d, names)
    assert_close(got, want)
    assert abs(float(want[2][-1])) > 0.1  # the scale's gradient is exercised


@pytest.mark.slow
def test_kda_float32_tame_way_close_to_float64():
    """KDA (per-key-channel g) in float32 through the route: error bounded against float64."""
    d = data(3, (4,), 1.0)
    names = ("q", "k", "v", "beta", "g", "s0")
    ours = lambda q, k, v, beta, g, s0: delta_rule(q, k, v, beta, g=g, initial_state=s0, chunk_size=C)
    ours64 = lambda *a: ours(*a)  # (its own compilation under float64)
    with jax.enable_x64(True):
        d64 = {n: jnp.asarray(np.asarray(x), jnp.float64) for n, x in d.items()}
        want = jax.tree.map(np.asarray, grads(ours64, d64, names))
    d32 = {n: jnp.asarray(np.asarray(x), jnp.float32) for n, x in d.items()}
    got = grads(ours, d32, names)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert x.dtype == jnp.float32
        assert rel_err(x, y) <= 1e-4
