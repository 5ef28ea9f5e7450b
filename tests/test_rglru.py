"""RG-LRU (Griffin): scan and recurrent forms vs a naive loop written from the paper's equations.

Reference: ``a_t = sigmoid(Lambda) ** (c sigmoid(gate_a_t))`` (power form, not log space),
``h_t = a_t h_{t-1} + sqrt(1 - a_t^2) sigmoid(gate_x_t) x_t``; at a segment start ``h_{t-1} := 0``
(and, in RecurrentGemma's convention, the token enters un-normalised).
Tolerances: float64 relative max error <= 1e-10 (outputs, final state, every gradient); bf16 vs
float32 relative RMSE < 1e-2.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.rg_lru import rglru
from tests.helpers import TOL64, rel_err, rel_rmse

C = 8.0
run = jax.jit(rglru, static_argnames=("mode", "normalize_at_reset", "c"))


def naive(x, ga, gx, lam, h0, seg, normalize_at_reset=True):
    sig = lambda v: 1 / (1 + jnp.exp(-v))
    base = sig(lam)
    start = jnp.zeros(x.shape[:2], bool)
    if seg is not None:
        start = start.at[:, 1:].set(seg[:, 1:] != seg[:, :-1])
    if not normalize_at_reset and h0 is None:
        start = start.at[:, 0].set(True)
    h = jnp.zeros((x.shape[0], x.shape[2]), x.dtype) if h0 is None else h0

    def step(h, inp):
        xt, gat, gxt, st = inp
        a = base ** (C * sig(gat))
        mult = jnp.sqrt(1 - a * a)
        if not normalize_at_reset:
            mult = jnp.where(st[:, None], 1.0, mult)
        h = a * jnp.where(st[:, None], 0.0, h) + mult * sig(gxt) * xt
        return h, h

    tm = lambda v: jnp.swapaxes(v, 0, 1)
    h, y = jax.lax.scan(step, h, (tm(x), tm(ga), tm(gx), tm(start)))
    return tm(y), h


def inputs(B=2, T=63, D=6, seed=0):
    r = np.random.default_rng(seed)
    x, ga, gx = r.normal(size=(3, B, T, D))
    radius = np.sqrt(r.uniform(0.9 ** 2, 0.999 ** 2, size=D))  # Griffin's init of a = sigmoid(Lambda)
    lam = np.log(radius / (1 - radius))
    h0 = r.normal(size=(B, D))
    co, cs = r.normal(size=(B, T, D)), r.normal(size=(B, D))
    return (x, ga, gx, lam, h0), co, cs


def grads_of(fn, args, co, cs):
    def loss(*a):
        y, s = fn(*a)
        return jnp.sum(y * co) + jnp.sum(s * cs), (y, s)

    (_, (y, s)), g = jax.jit(jax.value_and_grad(loss, tuple(range(len(args))), has_aux=True))(*args)
    return y, s, g


def check_all(got, ref, what):
    assert rel_err(got[0], ref[0]) < TOL64, (what, "y")
    assert rel_err(got[1], ref[1]) < TOL64, (what, "state")
    for i, (a, b) in enumerate(zip(got[2], ref[2])):
        assert rel_err(a, b) < TOL64, (what, "grad", i, rel_err(a, b))


def packed_ids(T):
    return jnp.asarray(np.stack([np.repeat([1, 2, 3], [7, 20, T - 27]), np.repeat([4, 9], [T - 5, 5])]))


@pytest.mark.parametrize("T,packed,modes", [(63, False, ("scan", "recurrent")), (1, False, ("scan",)),
                                             (37, True, ("scan", "recurrent"))])
def test_forms_match_reference(x64, T, packed, modes):
    args, co, cs = inputs(T=T)
    seg = packed_ids(T) if packed else None
    ref = grads_of(lambda *a: naive(*a, seg), args, co, cs)
    for mode in modes:
        got = grads_of(lambda x, ga, gx, lam, h0: rglru(x, ga, gx, lam, c=C, initial_state=h0, segment_ids=seg,
                                                       mode=mode), args, co, cs)
        assert got[0].dtype == got[1].dtype == jnp.float64
        check_all(got, ref, mode)


def test_recurrentgemma_convention_no_normalisation_at_document_starts(x64):
    """normalize_at_reset=False: each document's first token (and t = 0 without initial_state)
    enters as i_t x_t; chaining with the first half's state still equals one pass."""
    (x, ga, gx, lam, _), co, cs = inputs(T=37)
    seg = packed_ids(37)
    ref = grads_of(lambda x, ga, gx, lam: naive(x, ga, gx, lam, None, seg, False), (x, ga, gx, lam), co, cs)
    got = grads_of(lambda x, ga, gx, lam: rglru(x, ga, gx, lam, segment_ids=seg, normalize_at_reset=False),
                   (x, ga, gx, lam), co, cs)
    check_all(got, ref, "scan")
    y_rec, _ = run(x, ga, gx, lam, segment_ids=seg, mode="recurrent", normalize_at_reset=False)
    assert rel_err(y_rec, ref[0]) < TOL64
    x, ga, gx = x[:, :36], ga[:, :36], gx[:, :36]  # no segments from here on
    y, s = run(x, ga, gx, lam, normalize_at_reset=False)
    assert rel_err(y[:, 0], jax.nn.sigmoid(gx[:, 0]) * x[:, 0]) < 1e-14  # un-normalised first token
    y1, s1 = run(x[:, :18], ga[:, :18], gx[:, :18], lam, normalize_at_reset=False)
    y2, s2 = run(x[:, 18:], ga[:, 18:], gx[:, 18:], lam, initial_state=s1, normalize_at_reset=False)
    assert rel_err(jnp.concatenate([y1, y2], 1), y) < TOL64 and rel_err(s2, s) < TOL64


@pytest.mark.parametrize("mode", ["scan", "recurrent"])
def test_chaining_two_halves_equals_one_pass(x64, mode):
    (x, ga, gx, lam, h0), _, _ = inputs(T=50)
    y, s = run(x, ga, gx, lam, initial_state=h0, mode=mode)
    y1, s1 = run(x[:, :25], ga[:, :25], gx[:, :25], lam, initial_state=h0, mode=mode)  # equal halves: one compile
    y2, s2 = run(x[:, 25:], ga[:, 25:], gx[:, 25:], lam, initial_state=s1, mode=mode)
    assert rel_err(jnp.concatenate([y1, y2], 1), y) < TOL64 and rel_err(s2, s) < TOL64


def test_packed_equals_separate_documents(x64):
    (x, ga, gx, lam, h0), _, _ = inputs(B=1, T=40)
    seg = jnp.asarray(np.repeat([2, 7], [29, 11]))[None]
    y, s = run(x, ga, gx, lam, initial_state=h0, segment_ids=seg)
    ya, _ = run(x[:, :29], ga[:, :29], gx[:, :29], lam, initial_state=h0)
    yb, sb = run(x[:, 29:], ga[:, 29:], gx[:, 29:], lam)
    assert rel_err(y, jnp.concatenate([ya, yb], 1)) < TOL64 and rel_err(s, sb) < TOL64


def test_long_memory_normaliser_is_accurate_in_float32():
    """a_t within 1e-6 of 1: sqrt(1 - a^2) from -expm1(2 log a) matches float64 to 1e-5 relative,
    where 1 - a * a in float32 would be off by several percent."""
    x = jnp.ones((1, 4, 3), jnp.float32)
    ga = jnp.zeros_like(x)
    gx = jnp.full_like(x, 30.0)  # input gate ~1
    lam = jnp.array([14.0, 15.0, 16.0], jnp.float32)
    y32, _ = run(x, ga, gx, lam)
    with jax.enable_x64(True):
        y64, _ = run(*(v.astype(jnp.float64) for v in (x, ga, gx, lam)))
        lam64 = lam.astype(jnp.float64)
        a64 = jnp.exp(-C * 0.5 * jax.nn.softplus(-lam64))
        naive32 = np.sqrt(1 - np.float32(a64) ** 2)  # the cancelling formula, in float32
        exact = np.sqrt(np.asarray(-jnp.expm1(2 * jnp.log(a64))))
    assert rel_err(y32, y64) < 1e-5
    assert np.max(np.abs(naive32 - exact) / exact) > 1e-2  # the alternative really is inaccurate


def test_gradient_finite_when_the_gate_saturates():
    """sigmoid(gate_a) == 0 in float32 gives a_t = 1 exactly; the capped sqrt derivative keeps grads finite."""
    (x, ga, gx, lam, h0), co, cs = inputs(T=20)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    ga = f32(ga).at[:, 5:9].set(-200.0)
    fn = lambda x, ga, gx, lam, h0: rglru(x, ga, gx, lam, initial_state=h0, mode="scan")
    got = grads_of(fn, (f32(x), ga, f32(gx), f32(lam), f32(h0)), f32(co), f32(cs))
    for leaf in jax.tree.leaves(got):
        assert bool(jnp.all(jnp.isfinite(leaf)))


def test_bf16_matches_float32():
    (x, ga, gx, lam, h0), _, _ = inputs(T=100, D=32)
    x, ga, gx, lam, h0 = (jnp.asarray(v, jnp.float32) for v in (x, ga, gx, lam, h0))
    y32, s32 = run(x, ga, gx, lam, initial_state=h0)
    bf = lambda v: v.astype(jnp.bfloat16)
    y16, s16 = run(bf(x), bf(ga), bf(gx), lam, initial_state=h0)
    assert y16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    assert rel_rmse(y16, y32) < 1e-2 and rel_rmse(s16, s32) < 1e-2


def _ok():
    z = jnp.zeros((2, 8, 4))
    return dict(x=z, gate_a=z, gate_x=z, lam=jnp.zeros(4))


@pytest.mark.parametrize("change,match", [
    (dict(x=jnp.zeros((8, 4))), r"rglru: x must have shape \[batch, T, D\], got \(8, 4\)"),
    (dict(gate_a=jnp.zeros((2, 8, 3))), r"gate_a must have shape \[batch, T, D\] = \(2, 8, 4\), got \(2, 8, 3\)"),
    (dict(gate_x=jnp.zeros((2, 7, 4))), "gate_x must have shape"),
    (dict(lam=jnp.zeros((2, 4))), r"lam must have shape \[D\] = \(4,\)"),
    (dict(initial_state=jnp.zeros((2, 5))), r"initial_state must have shape \[batch, D\] = \(2, 4\)"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), "segment_ids must have shape"),
    (dict(mode="chunked"), "mode"),
    (dict(c=0.0), "c must be"),
])
def test_bad_inputs_raise(change, match):
    kw = {**_ok(), **change}
    with pytest.raises(ValueError, match=match):
        rglru(kw.pop("x"), kw.pop("gate_a"), kw.pop("gate_x"), kw.pop("lam"), **kw)


@pytest.mark.parametrize("change,match", [
    (dict(segment_ids=jnp.zeros((2, 8), jnp.float32)), "rglru: segment_ids must have an integer dtype, got float32"),
    (dict(x=jnp.zeros((2, 8, 4), jnp.int32)), "rglru: x must have a floating dtype .*got int32"),
    (dict(gate_a=jnp.zeros((2, 8, 4), bool)), "gate_a must have a floating dtype .*got bool"),
])
def test_bad_dtypes_raise_type_error(change, match):
    kw = {**_ok(), **change}
    with pytest.raises(TypeError, match=match):
        rglru(kw.pop("x"), kw.pop("gate_a"), kw.pop("gate_x"), kw.pop("lam"), **kw)
