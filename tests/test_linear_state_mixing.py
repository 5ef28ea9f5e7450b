"""The loop-free chunk-state pass (issue 17 item 4): the states before every chunk as one matmul over
the chunk index, ``S_n = W[n-1, -1] S_0 + sum_{m<n} W[n-1, m] dS_m`` with log-space weights, in
chunked linear attention / scalar GLA (:func:`memjax.memory.linear_vjp._mix_states`, forward and its
transposed backward) and in the mLSTM (:func:`memjax.memory.mlstm._mix_chunks`, with its max
stabiliser). Each against a naive token loop written from the recurrence, in float64: outputs,
final state and every gradient, with an initial state, segment resets, ``-inf`` gates (a full
decay) and a padded tail; the scan route agrees to round-off; no loop is left in the program; and
the weights stay exact in float32 after a long stretch of strong decays (where a difference of
whole-sequence prefix sums would not).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import memjax.memory.mlstm  # noqa: F401  (the module itself, in sys.modules: mix_default is patched there)
from memjax.memory import linear_vjp
from memjax.memory.linear import linear_attention
from memjax.memory.mlstm import MLSTMState, _chunked, empty_state, mlstm
from tests.helpers import TOL64, rel_err

B, T, H, K, V, C = 2, 19, 2, 4, 3, 4  # T odd, not a multiple of C
SEG = np.array([[0] * 6 + [1] * 8 + [2] * 5, [4] * T])


def _rng_inputs(seed):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, B, T, H, K))
    v = r.normal(size=(B, T, H, V))
    g = np.log(1 / (1 + np.exp(-(r.normal(size=(B, T, H)) + 1.0))))
    g[0, 9, 1] = -np.inf  # a full decay: head 1 of row 0 forgets everything before token 9
    s0 = r.normal(size=(B, H, K, V))
    co, cs = r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))
    return q, k, v, g, s0, co, cs


def _naive_linear(q, k, v, g, s0, seg, scale):
    """``S_t = exp(g_t) S_{t-1} + k_t v_t^T`` (zeroed before a document's first token), ``o_t = scale S_t^T q_t``."""
    keep = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] == seg[:, :-1]], axis=1)

    def step(s, x):
        qt, kt, vt, gt, kp = x
        s = jnp.where(kp[:, None, None, None], jnp.exp(gt)[:, :, None, None] * s, 0.0) + kt[..., :, None] * vt[..., None, :]
        return s, scale * jnp.einsum("bhkv,bhk->bhv", s, qt)

    s, o = jax.lax.scan(step, s0, tuple(jnp.swapaxes(jnp.asarray(x), 0, 1) for x in (q, k, v, g, keep)))
    return jnp.swapaxes(o, 0, 1), s


def _loss_grads(fn, args, co, cs):
    def loss(*a):
        o, s = fn(*a)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)
    (_, (o, s)), gr = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True))(*args)
    return [o, s, *gr]


def test_linear_mixing_matches_naive_float64(x64):
    """Public API (the batched pass with the mixing: XLA:CPU's default): outputs, final state and the
    gradients of q, k, v, g and the initial state against the token loop, with segment resets, a
    -inf gate and a padded tail; the same through the scan route to round-off."""
    q, k, v, g, s0, co, cs = (jnp.asarray(x) for x in _rng_inputs(0))
    seg = jnp.asarray(SEG)
    la = lambda q, k, v, g, s0: linear_attention(q, k, v, g=g, initial_state=s0, segment_ids=seg, chunk_size=C)
    got = _loss_grads(la, (q, k, v, g, s0), co, cs)
    ref = _loss_grads(lambda *a: _naive_linear(*a, SEG, K ** -0.5), (q, k, v, g, s0), co, cs)
    for name, a, b in zip(["o", "S", "q", "k", "v", "g", "s0"], got, ref):
        assert np.all(np.isfinite(np.asarray(a))), name
        assert rel_err(a, b) < TOL64, (name, rel_err(a, b))

    def direct(mix):  # the same chunked pass with the mixing or with the scan carrying the state
        r = jnp.asarray(np.concatenate([np.zeros((B, 1), bool), SEG[:, 1:] != SEG[:, :-1]], axis=1))[..., None]
        full = jnp.isneginf(g)
        return lambda q, k, v, s0: linear_vjp.chunked_scalar_decay(q, k, v, jnp.where(full, 0.0, g), full | r, s0,
                                                                   K ** -0.5, C, fused=False, mix=mix)
    mixed, scanned = (jax.jit(direct(m))(q, k, v, s0) for m in (True, False))
    for a, b in zip(mixed, scanned):
        assert rel_err(a, b) < TOL64


@pytest.mark.slow  # (the public API's default tests run this route too: XLA:CPU's default)
def test_linear_mixing_without_gate_or_resets(x64):
    """Plain linear attention (no decay: every weight 1) with an initial state, against the loop."""
    q, k, v, _, s0, co, cs = (jnp.asarray(x) for x in _rng_inputs(1))
    ones = np.zeros(SEG.shape, int)
    got = _loss_grads(lambda q, k, v, s0: linear_attention(q, k, v, initial_state=s0, chunk_size=C), (q, k, v, s0), co, cs)
    ref = _loss_grads(lambda q, k, v, s0: _naive_linear(q, k, v, jnp.zeros((B, T, H)), s0, ones, K ** -0.5),
                      (q, k, v, s0), co, cs)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < TOL64


def _no_loop(fn, *args):
    text = str(jax.make_jaxpr(fn)(*args))
    return "scan" not in text and "while" not in text


def test_mixing_leaves_no_loop_forward_or_backward():
    """The state pass is a matmul: neither the forward nor the VJP of the mixing route holds a loop
    (the scan route does, so this can fail), for linear attention and the mLSTM."""
    q, k, v = (jnp.ones((1, 16, 1, 4), jnp.float32) for _ in range(3))
    g = jnp.full((1, 16, 1), -0.1)
    s0 = jnp.zeros((1, 1, 4, 4))
    lin = lambda mix: (lambda q, k, v, g: jnp.sum(linear_vjp.chunked_scalar_decay(
        q, k, v, g, None, s0, 0.5, 4, fused=False, mix=mix)[0]))
    assert _no_loop(jax.grad(lin(True), argnums=(0, 1, 2, 3)), q, k, v, g)
    assert not _no_loop(jax.grad(lin(False), argnums=(0, 1, 2, 3)), q, k, v, g)
    ml = lambda mix: (lambda q, k, v, i, f: jnp.sum(_chunked(q, k, v, i, jax.nn.log_sigmoid(f), empty_state(1, 1, 4, 4),
                                                             None, 0.5, jnp.float32, 4, mix=mix)[0]))
    assert _no_loop(jax.grad(ml(True), argnums=(0, 1, 2, 3, 4)), q, k, v, g, g)
    assert not _no_loop(jax.grad(ml(False), argnums=(0, 1, 2, 3, 4)), q, k, v, g, g)


def test_weights_stay_exact_after_strong_decays():
    """float32: 40 tokens of strong decay (g = -300; the cumulative sum reaches -12000) and then weak
    ones. The mixing weights near 1 late in the sequence must equal the scan's products to float32
    round-off; as a difference of whole-sequence prefix sums their exponents would be off by
    ~12000 * 6e-8 = 7e-4."""
    t, c = 96, 4
    r = np.random.default_rng(5)
    q, k, v = (jnp.asarray(r.normal(size=(1, t, 1, 8)), jnp.float32) for _ in range(3))
    g = np.full((1, t, 1), -0.01, np.float32)
    g[:, :40] = -300.0
    s0 = jnp.asarray(r.normal(size=(1, 1, 8, 8)), jnp.float32)
    run = lambda mix: jax.jit(lambda q, k, v, g: linear_vjp.chunked_scalar_decay(q, k, v, g, None, s0, 0.3, c, fused=False,
                                                                                  mix=mix))(q, k, v, jnp.asarray(g))
    (om, sm), (os_, ss) = run(True), run(False)
    assert rel_err(om, os_) < 2e-6 and rel_err(sm, ss) < 2e-6, (rel_err(om, os_), rel_err(sm, ss))


# ----------------------------------------------------------------------------- mLSTM


def _naive_mlstm(q, k, v, i, f, c0, n0, seg):
    """The unstabilised mLSTM (Beck et al. 2024): ``C_t = sigmoid(f_t) C_{t-1} + exp(i_t) k'_t v_t^T``,
    ``n_t`` alike, ``h_t = C_t^T q_t / max(|n_t^T q_t|, 1)``, ``k' = k / sqrt(K)``; state zeroed at a
    document start; ``(c0, n0)`` the unstabilised state before t = 0."""
    keep = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] == seg[:, :-1]], axis=1)

    def step(carry, x):
        c, n = carry
        qt, kt, vt, it, ft, kp = x
        fs, es = jax.nn.sigmoid(ft), jnp.exp(it)
        c = jnp.where(kp[:, None, None, None], fs[..., None, None] * c, 0.0) + (es[..., None] * kt / np.sqrt(K))[..., :, None] * vt[..., None, :]
        n = jnp.where(kp[:, None, None], fs[..., None] * n, 0.0) + es[..., None] * kt / np.sqrt(K)
        den = jnp.maximum(jnp.abs(jnp.einsum("bhk,bhk->bh", n, qt)), 1.0)
        return (c, n), jnp.einsum("bhkv,bhk->bhv", c, qt) / den[..., None]

    (c, n), y = jax.lax.scan(step, (c0, n0), tuple(jnp.swapaxes(jnp.asarray(x), 0, 1) for x in (q, k, v, i, f, keep)))
    return jnp.swapaxes(y, 0, 1), c, n


def test_mlstm_mixing_matches_naive_float64(x64, monkeypatch):
    """mLSTM chunked (the mixing) against the unstabilised loop: outputs, the final state (C~, n~
    rescaled by exp(m)) and the gradients of q, k, v, i, f and the initial state, with packed
    documents, an initial state (given with m = 0.7) and a padded tail; and the scan route agrees to
    round-off (outputs and the final C~, n~, m)."""
    monkeypatch.setattr(sys.modules["memjax.memory.mlstm"], "mix_default", lambda: True)  # (CPUs default to the scan)
    r = np.random.default_rng(3)
    q, k = (jnp.asarray(x) for x in r.normal(size=(2, B, T, H, K)))
    v = jnp.asarray(r.normal(size=(B, T, H, V)))
    i, f = jnp.asarray(r.normal(size=(B, T, H))), jnp.asarray(r.normal(size=(B, T, H)) + 2.0)
    c0, n0 = jnp.asarray(r.normal(size=(B, H, K, V))), jnp.asarray(r.normal(size=(B, H, K)))
    m0 = jnp.full((B, H), 0.7)
    seg = jnp.asarray(SEG)
    cy, cc, cn = (jnp.asarray(x) for x in r.normal(size=(3,)))  # loss weights

    def ours(q, k, v, i, f, c0, n0):
        y, (c, n, m) = mlstm(q, k, v, i, f, initial_state=(c0 * jnp.exp(-m0)[..., None, None],
                                                                     n0 * jnp.exp(-m0)[..., None], m0),
                                       segment_ids=seg, chunk_size=C)
        return y, c * jnp.exp(m)[..., None, None], n * jnp.exp(m)[..., None]

    def loss(fn):
        def l(*a):
            y, c, n = fn(*a)
            return cy * jnp.sum(jnp.sin(y)) + cc * jnp.sum(c) + cn * jnp.sum(n ** 2), (y, c, n)
        return jax.jit(jax.value_and_grad(l, argnums=tuple(range(7)), has_aux=True))

    args = (q, k, v, i, f, c0, n0)
    (_, got), g_got = loss(ours)(*args)
    (_, ref), g_ref = loss(lambda *a: _naive_mlstm(*a, SEG))(*args)
    for name, a, b in zip(["y", "C", "n"], got, ref):
        assert rel_err(a, b) < TOL64, (name, rel_err(a, b))
    for name, a, b in zip(["q", "k", "v", "i", "f", "C0", "n0"], g_got, g_ref):
        assert rel_err(a, b) < TOL64, (name, rel_err(a, b))

    # the scan route: the same chunked pass with the loop carrying (C~, n~, m)
    log_f, resets = jax.nn.log_sigmoid(f), jnp.asarray(np.concatenate(
        [np.zeros((B, 1), bool), SEG[:, 1:] != SEG[:, :-1]], axis=1))
    st = MLSTMState(c0, n0, m0)
    run = lambda mix: jax.jit(lambda *a: _chunked(*a, st, resets, K ** -0.5, jnp.float64, C, mix=mix))(
        q, k, v, i, log_f)
    for a, b in zip(jax.tree.leaves(run(True)), jax.tree.leaves(run(False))):
        assert rel_err(a, b) < TOL64


@pytest.mark.slow
def test_mlstm_mixing_large_input_gate_float32():
    """float32 with input gates up to 60 (exp(60) overflows; the stabiliser keeps every exponent <= 0)
    and an empty incoming state: the mixing equals the scan route to float32 round-off, finite."""
    r = np.random.default_rng(7)
    t = 24
    q, k, v = (jnp.asarray(r.normal(size=(1, t, 2, 8)), jnp.float32) for _ in range(3))
    i = jnp.asarray(r.uniform(0, 60, size=(1, t, 2)), jnp.float32)
    log_f = jax.nn.log_sigmoid(jnp.asarray(r.normal(size=(1, t, 2)) + 1.0, jnp.float32))
    st = empty_state(1, 2, 8, 8)
    run = lambda mix: jax.jit(lambda *a: _chunked(*a, st, None, 8 ** -0.5, jnp.float32, 4, mix=mix))(q, k, v, i, log_f)
    (ym, fm), (ys, fs) = run(True), run(False)
    assert np.all(np.isfinite(np.asarray(ym))) and rel_err(ym, ys) < 1e-5
    for a, b in zip(fm, fs):
        assert rel_err(a, b) < 1e-5
