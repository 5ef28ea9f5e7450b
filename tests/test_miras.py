"""Miras (Behrouz et al. 2025, "It's All Connected"): the design-space function, its presets and the
Moneta / Yaad / Memora blocks.

Reference (float64, token by token, written from the paper's equations 24-27; ``S`` is the
``K x V`` memory read as ``S^T x``, ``e = S^T k - v``)::

    Moneta (p = 3, q = 4):  A_t = alpha_t A_{t-1} - eta_t k (3 e |e|)^T;  W_t = A_t / sqrt(sum A_t^4 + eps)
    Yaad:                   W_t = alpha_t W_{t-1} - eta_t k e^T           if ||e||_2 <= delta_t
                                  alpha_t W_{t-1} - eta_t delta_t k sign(e)^T   otherwise
    Memora:                 W_t = c exp(Z) / sum_K exp(Z),  Z = alpha_t log W_{t-1} - eta_t k e^T
    o_t = scale W_t^T q_t

With ``chunk = C`` the same loop takes ``e`` at the memory of the last chunk start, chunks counted
from each document's first token: the chunked form's stated semantics.

Tolerance: relative max error <= 1e-10 in float64 (outputs, final states, gradients w.r.t. every
input and the initial state); presets against the existing functions <= 1e-12.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import bench_miras
from memjax.memory.delta import delta_rule
from memjax.memory.linear import linear_attention
from memjax.memory.miras import PRESETS, MirasSpec, memory_of, miras, preset
from memjax.memory.neural_memory import titans
from memjax.nn.miras import Memora, Moneta, Yaad
from memjax.nn.registry import get_block
from tests.helpers import TOL64, rel_err

MODELS = ("moneta", "yaad", "memora")
B, T, H, K, V = 2, 13, 2, 4, 3
EPS = 1.0  # Moneta's norm floor (the spec's default)

run = jax.jit(miras, static_argnames=("spec", "mode", "chunk_size"))


def reference(name, q, k, v, eta, g, delta, s0, seg, scale, chunk=None, c=1.0):
    """Token loop (``lax.scan`` over t) from the paper's equations (see the module docstring)."""
    b, t, h, dk = q.shape
    reset = jnp.full(s0.shape, c / dk) if name == "memora" else jnp.zeros(s0.shape)
    new_doc = jnp.zeros((b, t), bool) if seg is None else jnp.concatenate(
        [jnp.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    if delta is None:
        delta = jnp.zeros(eta.shape)

    def mem(a):
        return a / jnp.sqrt(jnp.sum(a ** 4, axis=(-2, -1), keepdims=True) + EPS) if name == "moneta" else a

    def step(carry, inp):
        a, base = carry
        i, qt, kt, vt, et, gt, dt, new = inp
        new = new[:, None, None, None]
        a = jnp.where(new, reset, a)
        if chunk is None:
            w = mem(a)
        else:  # the memory at the start of the token's chunk, counted from its document's first token
            base = jnp.where((i % chunk == 0)[:, None, None, None], mem(a), base)
            w = base
        e = jnp.einsum("bhkv,bhk->bhv", w, kt) - vt
        outer = lambda u: kt[..., :, None] * u[..., None, :]
        if name == "moneta":
            grad = outer(3.0 * e * jnp.abs(e))
        elif name == "yaad":
            inside = (jnp.linalg.norm(e, axis=-1) <= dt)[..., None, None]
            grad = jnp.where(inside, outer(e), dt[..., None, None] * outer(jnp.sign(e)))
        else:
            grad = outer(e)
        al, eta_t = jnp.exp(gt)[..., None, None], et[..., None, None]
        if name == "memora":
            z = al * jnp.log(a) - eta_t * grad
            a = c * jnp.exp(z) / jnp.sum(jnp.exp(z), axis=-2, keepdims=True)
        else:
            a = al * a - eta_t * grad
        return (a, base), scale * jnp.einsum("bhkv,bhk->bhv", mem(a), qt)

    tm = lambda x: jnp.moveaxis(x, 1, 0)
    pos = jnp.arange(t) - jax.lax.cummax(jnp.where(new_doc, jnp.arange(t), 0), axis=1)  # in the document
    (a, _), o = jax.lax.scan(step, (s0, mem(s0)), (tm(pos), tm(q), tm(k), tm(v), tm(eta), tm(g), tm(delta),
                                                  tm(new_doc)))
    return tm(o), a


def make(seed=0, t=T, yaad_mix=True):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, B, t, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    v = r.normal(size=(B, t, H, V))
    eta = r.uniform(0.1, 0.6, size=(B, t, H))
    g = -r.uniform(0.0, 0.4, size=(B, t, H))
    # thresholds around the typical error norm, so both Huber branches occur
    delta = r.uniform(0.3, 2.0, size=(B, t, H)) if yaad_mix else None
    s0 = r.normal(size=(B, H, K, V)) * 0.5
    return q, k, v, eta, g, delta, s0


def state0(name, s0):
    """A valid initial state: Memora's columns on the simplex."""
    if name == "memora":
        return jax.nn.softmax(s0, axis=-2)
    return s0


def inputs(name, seed=0, t=T):
    q, k, v, eta, g, delta, s0 = make(seed, t)
    return q, k, v, eta, g, (delta if name == "yaad" else None), state0(name, s0)


SEG = np.array([[0] * 6 + [1] * 7, [0] * 9 + [2] * 4])  # documents starting mid-chunk (C = 4)


def value_and_grads(fn, name):
    """``jit(value_and_grad)`` of a scalar of the outputs and state, w.r.t. every input."""
    argnums = (0, 1, 2, 3, 4, 6) + ((5,) if name == "yaad" else ())

    def loss(*args):
        o, s = fn(*args)
        w = jnp.cos(jnp.arange(o.size, dtype=o.dtype).reshape(o.shape))
        return jnp.sum(o * w) + jnp.sum(jnp.sin(s)), (o, s)

    return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))


def mine(name, mode, c):
    seg = jnp.asarray(SEG)
    return lambda q, k, v, eta, g, delta, s0: miras(q, k, v, PRESETS[name], eta=eta, g=g, delta=delta,
                                                    initial_state=s0, segment_ids=seg, mode=mode, chunk_size=c)


def ref(name, c):
    seg = jnp.asarray(SEG)
    return lambda q, k, v, eta, g, delta, s0: reference(name, q, k, v, eta, g, delta, s0, seg, K ** -0.5, chunk=c)


def assert_same(fn, rfn, name, args, *, with_grads=True):
    if with_grads:
        (_, (o, s)), gm = value_and_grads(fn, name)(*args)
        (_, (o_ref, s_ref)), gr = value_and_grads(rfn, name)(*args)
        for a, b_ in zip(gm, gr):
            assert rel_err(a, b_) < TOL64
    else:
        (o, s), (o_ref, s_ref) = jax.jit(fn)(*args), jax.jit(rfn)(*args)
    assert o.dtype == jnp.float64
    assert rel_err(o, o_ref) < TOL64 and rel_err(s, s_ref) < TOL64
    return o


@pytest.mark.parametrize("name", ["moneta", pytest.param("yaad", marks=pytest.mark.slow),
                                  pytest.param("memora", marks=pytest.mark.slow)])
def test_recurrent_matches_reference(x64, name):
    """Recurrent == the paper's token loop (segments, initial state): outputs, state, all gradients."""
    assert_same(mine(name, "recurrent", 1), ref(name, None), name, inputs(name, seed=1))


@pytest.mark.parametrize("name", ["memora", pytest.param("moneta", marks=pytest.mark.slow),
                                  pytest.param("yaad", marks=pytest.mark.slow)])
def test_chunked_matches_stated_semantics(x64, name):
    """Chunked (C = 4, documents starting mid-chunk) == the chunk-start token loop, with gradients;
    and it is a different algorithm from the recurrent one (the check can tell them apart)."""
    args = inputs(name, seed=1)
    o = assert_same(mine(name, "chunked", 4), ref(name, 4), name, args)
    assert rel_err(o, jax.jit(mine(name, "recurrent", 1))(*args)[0]) > 1e-3


@pytest.mark.slow
def test_chunked_forward_all_models(x64):
    """Forward of the chunked form (C = 4, and C = 1 == recurrent) for the three models."""
    for name in MODELS:
        args = inputs(name, seed=2)
        assert_same(mine(name, "chunked", 4), ref(name, 4), name, args, with_grads=False)
        assert_same(mine(name, "chunked", 1), ref(name, None), name, args, with_grads=False)


def test_yaad_uses_both_huber_branches(x64):
    """The data above exercise both branches: thresholds 0 (all l1) and inf (all l2) both differ."""
    q, k, v, eta, g, delta, s0 = inputs("yaad", seed=1)
    spec = PRESETS["yaad"]
    o = run(q, k, v, spec, eta=eta, g=g, delta=delta, initial_state=s0, mode="recurrent")[0]
    o_l2 = run(q, k, v, spec, eta=eta, g=g, delta=jnp.full_like(delta, 1e9), initial_state=s0, mode="recurrent")[0]
    o_l1 = run(q, k, v, spec, eta=eta, g=g, delta=jnp.zeros_like(delta) + 1e-12, initial_state=s0,
               mode="recurrent")[0]
    assert rel_err(o, o_l2) > 1e-3 and rel_err(o, o_l1) > 1e-3
    # delta -> inf is exactly the l2 bias with l2 retention
    o_plain = run(q, k, v, MirasSpec(bias="l2", retention="l2"), eta=eta, g=g, initial_state=s0, mode="recurrent")[0]
    assert rel_err(o_l2, o_plain) < 1e-12


@pytest.mark.parametrize("mode", ["recurrent", pytest.param("chunked", marks=pytest.mark.slow)])
def test_presets_reproduce_existing_functions(x64, mode):
    """linear attention, (gated) delta rule and Titans (depth 1) through the generic function."""
    q, k, v, eta, g, _, s0 = make(3)
    mu = np.random.default_rng(4).uniform(0.5, 1.0, size=(B, T, H))
    o, s = run(q, k, v, PRESETS["linear_attention"], g=g, initial_state=s0, mode=mode, chunk_size=4)
    o2, s2 = linear_attention(q, k, v, g=g, initial_state=s0, mode="recurrent")
    assert rel_err(o, o2) < 1e-12 and rel_err(s, s2) < 1e-12
    o, s = run(q, k, v, PRESETS["delta_rule"], eta=eta, initial_state=s0, mode=mode, chunk_size=4)
    o2, s2 = delta_rule(q, k, v, eta, initial_state=s0, mode="recurrent")
    assert rel_err(o, o2) < 1e-12 and rel_err(s, s2) < 1e-12
    o, s = run(q, k, v, PRESETS["gated_delta_rule"], eta=eta, g=g, initial_state=s0, mode=mode, chunk_size=4)
    o2, s2 = delta_rule(q, k, v, eta, g=g, initial_state=s0, mode="recurrent")
    assert rel_err(o, o2) < 1e-12 and rel_err(s, s2) < 1e-12
    o, (w, m) = run(q, k, v, PRESETS["titans"], eta=eta, g=g, momentum=mu, scale=1.0, mode=mode, chunk_size=4)
    o2, st = titans(q, k, v, eta / 2, mu, -np.expm1(g), mode=mode, chunk_size=4)
    assert rel_err(o, o2) < 1e-12 and rel_err(w, st.weights[0]) < 1e-12
    assert rel_err(m, st.momentum[0]) < 1e-12


@pytest.mark.slow
def test_preset_gradients_match_delta_rule(x64):
    """Gradients of the generic recurrent path (not a delegation) against the delta rule's."""
    q, k, v, eta, g, _, s0 = make(3)
    f1 = lambda q, k, v, eta, g, s0: miras(q, k, v, PRESETS["gated_delta_rule"], eta=eta, g=g, initial_state=s0,
                                           mode="recurrent")
    f2 = lambda q, k, v, eta, g, s0: delta_rule(q, k, v, eta, g=g, initial_state=s0, mode="chunked", chunk_size=4)
    lw = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)[0])) + jnp.sum(f(*a)[1] ** 2)
    for a, b_ in zip(jax.grad(lw(f1), argnums=range(6))(q, k, v, eta, g, s0),
                     jax.grad(lw(f2), argnums=range(6))(q, k, v, eta, g, s0)):
        assert rel_err(a, b_) < 1e-11


def test_dot_bias_chunked_equals_recurrent_any_chunk(x64):
    """The dot-product bias's gradient does not depend on the memory: every chunk size agrees."""
    q, k, v, eta, g, _, s0 = make(5)
    o_r, s_r = run(q, k, v, PRESETS["linear_attention"], eta=eta, g=g, initial_state=s0, mode="recurrent")
    o_c, s_c = run(q, k, v, PRESETS["linear_attention"], eta=eta, g=g, initial_state=s0, mode="chunked",
                   chunk_size=5)
    assert rel_err(o_c, o_r) < 1e-12 and rel_err(s_c, s_r) < 1e-12


@pytest.mark.slow
def test_moneta_p2_q2_is_l2_gradient_descent(x64):
    """l_p with p = 2 and l_q with q = 2 is the l2 bias (gradient 2 e) with l2 retention."""
    q, k, v, eta, g, _, s0 = make(6)
    o1, s1 = run(q, k, v, preset("moneta", p=2.0, q=2.0), eta=eta, g=g, initial_state=s0, mode="chunked",
                 chunk_size=4)
    o2, s2 = run(q, k, v, PRESETS["yaad"]._replace(bias="l2"), eta=2 * eta, g=g, initial_state=s0, mode="chunked",
                 chunk_size=4)
    assert rel_err(o1, o2) < 1e-12 and rel_err(s1, s2) < 1e-12


@pytest.mark.parametrize("mode", ["recurrent", pytest.param("chunked", marks=pytest.mark.slow)])
def test_segments_equal_separate_documents(x64, mode):
    """A packed row == its documents run one by one (documents starting at multiples of C here; any
    start: test_chunked_packed_equals_separate_documents_at_any_start)."""
    name = "memora" if mode == "chunked" else "yaad"
    q, k, v, eta, g, delta, _ = inputs(name, seed=7, t=12)
    spec = PRESETS[name]
    seg = jnp.asarray(np.array([[0] * 4 + [1] * 8, [3] * 8 + [4] * 4]))
    o, _ = run(q, k, v, spec, eta=eta, g=g, delta=delta, segment_ids=seg, mode=mode, chunk_size=4)
    for row, cut in ((0, 4), (1, 8)):
        for lo, hi in ((0, cut), (cut, 12)):
            sl = lambda x: None if x is None else x[row:row + 1, lo:hi]
            od, _ = run(sl(q), sl(k), sl(v), spec, eta=sl(eta), g=sl(g), delta=sl(delta), mode=mode, chunk_size=4)
            assert rel_err(o[row:row + 1, lo:hi], od) < 1e-12


ODD_DOCS = ((0, 5), (5, 11), (11, 13))  # C = 4: documents starting at odd offsets inside a block


@pytest.mark.parametrize("name", ["yaad", pytest.param("moneta", marks=pytest.mark.slow),
                                  pytest.param("memora", marks=pytest.mark.slow)])
def test_chunked_packed_equals_separate_documents_at_any_start(x64, name):
    """Chunked (C = 4): a row packing documents that start at 5 and 11 == each document alone in
    its own row (zero-padded at the end, which is causal), outputs and every gradient."""
    q, k, v, eta, g, delta, _ = inputs(name, seed=15)
    row = lambda x: None if x is None else x[:1]
    q, k, v, eta, g, delta = map(row, (q, k, v, eta, g, delta))
    seg = jnp.asarray(np.concatenate([np.full(hi - lo, i) for i, (lo, hi) in enumerate(ODD_DOCS)])[None])
    spec = PRESETS[name]
    w = jnp.cos(jnp.arange(T * H * V, dtype=jnp.float64).reshape(1, T, H, V))

    def alone(x):  # [1, T, ...] -> [3, T, ...]: document i moved to the front of row i, zeros after
        if x is None:
            return None
        rows = [jnp.pad(x[:, lo:hi], [(0, 0), (0, T - hi + lo)] + [(0, 0)] * (x.ndim - 2)) for lo, hi in ODD_DOCS]
        return jnp.concatenate(rows, axis=0)

    def loss(args, seg, weights):
        q, k, v, eta, g, delta = args
        o, _ = miras(q, k, v, spec, eta=eta, g=g, delta=delta, segment_ids=seg, mode="chunked", chunk_size=4)
        return jnp.sum(o * weights), o

    vg = jax.jit(jax.value_and_grad(loss, has_aux=True))
    args = (q, k, v, eta, g, delta)
    (_, o), grads = vg(args, seg, w)
    (_, o_sep), grads_sep = vg(tuple(map(alone, args)), None, alone(w))
    assert rel_err(alone(o), o_sep) < TOL64
    for a, b_ in zip(grads, grads_sep):
        if a is not None:
            assert rel_err(alone(a), b_) < TOL64


@pytest.mark.parametrize("mode,names", [("chunked", ("memora",)),
                                        pytest.param("chunked", MODELS, marks=pytest.mark.slow),
                                        pytest.param("recurrent", MODELS, marks=pytest.mark.slow)])
def test_initial_state_chaining(x64, mode, names):
    """Two calls chained through the final state equal one call (the cut at a multiple of C)."""
    for name in names:
        q, k, v, eta, g, delta, s0 = inputs(name, seed=8)
        spec = PRESETS[name]
        kw = lambda lo, hi: dict(eta=eta[:, lo:hi], g=g[:, lo:hi], delta=None if delta is None else delta[:, lo:hi],
                                 mode=mode, chunk_size=4)
        o, s = run(q, k, v, spec, initial_state=s0, **kw(0, T))
        o1, s1 = run(q[:, :8], k[:, :8], v[:, :8], spec, initial_state=s0, **kw(0, 8))
        o2, s2 = run(q[:, 8:], k[:, 8:], v[:, 8:], spec, initial_state=s1, **kw(8, T))
        assert rel_err(jnp.concatenate([o1, o2], 1), o) < 1e-12 and rel_err(s2, s) < 1e-12
        if name == "memora":  # every column of the memory on the simplex (c = 1)
            assert bool(jnp.all(s > 0)) and float(jnp.max(jnp.abs(jnp.sum(s, axis=-2) - 1.0))) < 1e-12


@pytest.mark.slow
def test_memora_stays_on_the_scaled_simplex(x64):
    q, k, v, eta, g, _, _ = make(9)
    _, s = run(q, k, v, preset("memora", c=2.5), eta=eta * 4, g=g, mode="chunked", chunk_size=4)
    assert bool(jnp.all(s > 0))
    np.testing.assert_allclose(np.asarray(jnp.sum(s, axis=-2)), 2.5, rtol=1e-12)
    w = memory_of(jnp.ones((1, 1, 2, 2)) * 3.0, PRESETS["moneta"])  # A / sqrt(sum A^4 + eps)
    np.testing.assert_allclose(np.asarray(w), 3.0 / np.sqrt(4 * 81 + EPS), rtol=1e-6)


@pytest.mark.parametrize("names", [("moneta",), pytest.param(MODELS, marks=pytest.mark.slow)])
def test_bf16_error_bounded(names):
    """bf16 inputs: bf16 output, float32 state; error against the float64 reference bounded."""
    for name in names:
        q, k, v, eta, g, delta, s0 = inputs(name, seed=10)
        o_ref, _ = jax.jit(lambda *a, name=name: reference(name, *a, None, K ** -0.5, chunk=4),
                           )(*(jnp.asarray(x, jnp.float32) if x is not None else None
                               for x in (q, k, v, eta, g, delta, s0)))
        bf = lambda x: None if x is None else jnp.asarray(x, jnp.bfloat16)
        o, s = run(bf(q), bf(k), bf(v), PRESETS[name], eta=jnp.asarray(eta, jnp.float32),
                   g=jnp.asarray(g, jnp.float32), delta=None if delta is None else jnp.asarray(delta, jnp.float32),
                   initial_state=jnp.asarray(s0, jnp.float32), mode="chunked", chunk_size=4)
        assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
        assert rel_err(o, o_ref) < 3e-2, (name, rel_err(o, o_ref))


def test_bad_inputs_raise():
    q, k, v, eta, g, delta, s0 = (None if x is None else jnp.asarray(x, jnp.float32) for x in make(11, t=5))
    spec = PRESETS["yaad"]
    with pytest.raises(ValueError, match="delta"):
        miras(q, k, v, spec, eta=eta)
    with pytest.raises(TypeError, match="spec"):
        miras(q, k, v, "yaad", eta=eta, delta=delta)
    with pytest.raises(TypeError, match="q"):
        miras(q.astype(jnp.int32), k, v, PRESETS["moneta"])
    with pytest.raises(ValueError, match=r"eta must have shape \[B, T, H\]"):
        miras(q, k, v, PRESETS["moneta"], eta=eta[:, :3])
    with pytest.raises(ValueError, match="takes no g"):
        miras(q, k, v, PRESETS["delta_rule"], g=g)
    with pytest.raises(ValueError, match="momentum"):
        miras(q, k, v, PRESETS["titans"])
    with pytest.raises(ValueError, match="delta is only used"):
        miras(q, k, v, PRESETS["memora"], delta=delta)
    with pytest.raises(ValueError, match="spec.p"):
        miras(q, k, v, preset("moneta", p=0.5))
    with pytest.raises(ValueError, match="spec.bias"):
        miras(q, k, v, MirasSpec(bias="cosine"))
    with pytest.raises(ValueError, match="retain_first"):
        miras(q, k, v, MirasSpec(bias="lp", retain_first=True))
    with pytest.raises(ValueError, match="initial_state"):
        miras(q, k, v, PRESETS["moneta"], initial_state=s0[:, :, :2])
    with pytest.raises(ValueError, match="initial_state of a momentum"):
        miras(q, k, v, PRESETS["titans"], momentum=eta, initial_state=s0)
    with pytest.raises(ValueError, match="mode"):
        miras(q, k, v, PRESETS["moneta"], mode="parallel")
    with pytest.raises(ValueError, match="chunk_size"):
        miras(q, k, v, PRESETS["moneta"], chunk_size=0)
    with pytest.raises(ValueError, match="name must be one of"):
        preset("hebbian")


# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("cls,mode", [(Yaad, "chunked"), pytest.param(Moneta, "chunked", marks=pytest.mark.slow),
                                      pytest.param(Memora, "chunked", marks=pytest.mark.slow),
                                      pytest.param(Yaad, "recurrent", marks=pytest.mark.slow)])
def test_block_decoding_equals_forward(cls, mode):
    """Prefill then one token at a time (across chunk boundaries) == the forward pass."""
    x = jnp.asarray(np.random.default_rng(12).normal(size=(2, 10, 16)), jnp.float32)
    blk = cls(16, num_heads=2, chunk_size=4, mode=mode, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(blk, x)
    step = nnx.jit(lambda m, x, c: m(x, cache=c))  # one compile per input length (5, then 1)
    yt, cache = step(blk, x[:, :5], blk.init_cache(2, 10))
    outs = [yt]
    for t in range(5, 10):
        yt, cache = step(blk, x[:, t:t + 1], cache)
        outs.append(yt)
    assert int(cache.count) == (10 % 4 if mode == "chunked" else 0)
    assert rel_err(jnp.concatenate(outs, 1), y) < 1e-5
    assert bool(jnp.all(jnp.isfinite(y)))


@pytest.mark.slow
def test_block_segments_reset_and_registry():
    x = jnp.asarray(np.random.default_rng(13).normal(size=(1, 8, 16)), jnp.float32)
    blk = get_block("MON")(16, num_heads=2, chunk_size=4, rngs=nnx.Rngs(1))
    assert isinstance(blk, Moneta) and get_block("YAAD") is Yaad and get_block("MEMORA") is Memora
    assert get_block("moneta") is Moneta and get_block("memora") is Memora and get_block("yaad") is Yaad
    seg = jnp.asarray([[0] * 4 + [1] * 4])
    y, y_all = blk(x, segment_ids=seg), blk(x)
    assert rel_err(y[:, :4], y_all[:, :4]) < 1e-6 and rel_err(y[:, 4:], blk(x[:, 4:])) < 1e-5
    assert rel_err(y[:, 4:], y_all[:, 4:]) > 1e-3  # without the reset the second document differs
    with pytest.raises(ValueError, match="segment_ids"):
        blk(x, segment_ids=seg, cache=blk.init_cache(1, 8))
    with pytest.raises(ValueError, match="q must be in"):
        Moneta(16, q=1.0, rngs=nnx.Rngs(0))


def test_yaad_delta_bias_init():
    """``delta_bias_init`` sets the bias of the threshold ``delta = softplus(x W_d + b)``; default 0."""
    assert float(jnp.max(jnp.abs(Yaad(16, num_heads=2, rngs=nnx.Rngs(0)).d_bias[...]))) == 0.0
    blk = Yaad(16, num_heads=2, delta_bias_init=6.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(blk.d_bias[...]), np.full(2, 6.0, np.float32))


@pytest.mark.slow
def test_block_gradients_finite():
    x = jnp.asarray(np.random.default_rng(14).normal(size=(2, 12, 16)), jnp.float32)
    for cls in (Moneta, Yaad, Memora):
        blk = cls(16, num_heads=2, chunk_size=4, rngs=nnx.Rngs(2))
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(blk)
        leaves = jax.tree.leaves(grads)
        assert all(bool(jnp.all(jnp.isfinite(l))) for l in leaves)
        assert max(float(jnp.abs(l).max()) for l in leaves) > 0


# ----------------------------------------------------------------------------- non-finite inputs

NF_T, NF_AT = 17, 13  # a NaN at t = 13 (mid-block with C = 4)
NF_DOCS = ((0, 5), (5, 11), (11, 17))  # documents at odd offsets; a NaN at t = 7 sits in the second
NF_SEG = jnp.asarray(np.repeat(np.concatenate([np.full(hi - lo, i) for i, (lo, hi) in enumerate(NF_DOCS)])[None],
                               B, axis=0))
_NF = {}


def _nf_case(name, mode):
    """float32 inputs and ``jit((x, seg, keep [B, T]) -> (o, grads of sum(o[keep])))``."""
    if (name, mode) not in _NF:
        q, k, v, eta, g, delta, _ = (None if x is None else jnp.asarray(x, jnp.float32)
                                     for x in inputs(name, seed=16, t=NF_T))
        x = dict(q=q, k=k, v=v, eta=eta, g=g) | ({"delta": delta} if delta is not None else {})

        @jax.jit
        def f(x, seg, keep):
            fn = lambda x: miras(x["q"], x["k"], x["v"], PRESETS[name], eta=x["eta"], g=x["g"], delta=x.get("delta"),
                                 segment_ids=seg, mode=mode, chunk_size=4)[0]
            o, vjp = jax.vjp(fn, x)
            return o, vjp(jnp.broadcast_to(keep[..., None, None], o.shape).astype(o.dtype))[0]

        _NF[name, mode] = (x, f)
    return _NF[name, mode]


def _assert_bit_identical(clean, dirty, keep):
    (o_c, g_c), (o_d, g_d) = clean, dirty
    assert np.isfinite(np.asarray(o_c)).all()
    np.testing.assert_array_equal(np.asarray(o_d)[:, keep], np.asarray(o_c)[:, keep], err_msg="output")
    assert np.isnan(np.asarray(o_d)[:, ~keep]).any()  # the bad token itself is NaN
    for n in g_c:
        np.testing.assert_array_equal(np.asarray(g_d[n])[:, keep], np.asarray(g_c[n])[:, keep], err_msg=n)


@pytest.mark.parametrize("name,mode", [("memora", "chunked"),
                                       pytest.param("moneta", "recurrent", marks=pytest.mark.slow),
                                       pytest.param("yaad", "chunked", marks=pytest.mark.slow),
                                       pytest.param("moneta", "chunked", marks=pytest.mark.slow),
                                       pytest.param("memora", "recurrent", marks=pytest.mark.slow),
                                       pytest.param("yaad", "recurrent", marks=pytest.mark.slow)])
def test_non_finite_token_changes_no_earlier_or_other_document_output(name, mode):
    """NaN / inf in any per-token input at t leaves the outputs before t, and the gradients of
    their sum, bit-identical (one document); in a packed row a NaN in document 2 leaves
    documents 1 and 3 bit-identical (forward and gradient)."""
    x, f = _nf_case(name, mode)
    one_doc = jnp.zeros((B, NF_T), jnp.int32)
    keep = np.arange(NF_T) < NF_AT
    clean = f(x, one_doc, jnp.broadcast_to(jnp.asarray(keep), (B, NF_T)))
    for n, bad in zip(x, (jnp.nan, jnp.inf, -jnp.inf, jnp.nan, jnp.inf, jnp.nan)):
        dirty = f(dict(x, **{n: x[n].at[:, NF_AT].set(bad)}), one_doc, jnp.broadcast_to(jnp.asarray(keep), (B, NF_T)))
        _assert_bit_identical(clean, dirty, keep)
        if n != "q":  # a bad write poisons the rest of the document
            assert np.isnan(np.asarray(dirty[0])[:, NF_AT:]).all(), n
    keep = np.ones(NF_T, bool)
    keep[NF_DOCS[1][0]:NF_DOCS[1][1]] = False
    keep_b = jnp.broadcast_to(jnp.asarray(keep), (B, NF_T))
    clean = f(x, NF_SEG, keep_b)
    for n in x:
        _assert_bit_identical(clean, f(dict(x, **{n: x[n].at[:, 7].set(jnp.nan)}), NF_SEG, keep_b), keep)


@pytest.mark.slow
def test_minus_inf_log_gate_is_not_poison(x64):
    """``g = -inf`` (alpha = 0) is a valid full decay, not a non-finite input: finite outputs, and
    the chunked form at C = 1 == the recurrent one."""
    q, k, v, eta, g, delta, s0 = inputs("yaad", seed=17)
    g = g.copy()
    g[:, 6] = -np.inf
    outs = [run(q, k, v, PRESETS["yaad"], eta=eta, g=g, delta=delta, initial_state=s0, mode=m, chunk_size=c)[0]
            for m, c in (("recurrent", 1), ("chunked", 1))]
    assert np.isfinite(np.asarray(outs[0])).all() and rel_err(outs[1], outs[0]) < 1e-12


@pytest.mark.slow
def test_bench_miras_mqar_smoke(tmp_path):
    """``python -m benchmarks.bench_miras --mqar`` at toy size: one row per block and rate, JSON written."""
    md = bench_miras.main(["--mqar", "--blocks", "MON", "--lrs", "0.01", "--d-model", "16", "--seq-len", "16",
                           "--kv", "2", "--steps", "2", "--batch", "4", "--eval-examples", "8",
                           "--out-dir", str(tmp_path)])
    assert "| MON | 0.01 |" in md
    rows = json.loads((tmp_path / "miras_mqar.json").read_text())["rows"]
    assert len(rows) == 1 and 0.0 <= rows[0]["accuracy"] <= 1.0 and np.isfinite(rows[0]["eval_loss"])
