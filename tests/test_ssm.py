"""Diagonal SSM (S4D/S5) and selective SSM (Mamba-2 SSD): every form vs a naive loop written from
the equations, in float64, for outputs, final states and the gradients w.r.t. every input.

References:
  diagonal:  s_t = exp(dt A) s_{t-1} + (exp(dt A) - 1) / A * B x_t,  y_t = Re(sum_n C s_t) + D x_t
  selective: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T (B_t of the head's group),  y_t = h_t C_t + D x_t
  with segment ids the state is zeroed before the first token of each new segment.
Tolerance: relative max error (max|x - ref| / max|ref|) <= 1e-10 in float64; bf16 runs vs float32:
relative RMSE < 1e-2.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.ssm import diagonal_ssm, linear_scan, selective_scan
from tests.helpers import TOL64, largest_intermediate, rel_err, rel_rmse

sel = jax.jit(selective_scan, static_argnames=("mode", "chunk_size"))
diag = jax.jit(diagonal_ssm, static_argnames=("mode", "chunk_size"))


def grads_of(fn, args, co, cs):
    """Output, state and d(sum(y co) + Re sum(s conj(cs)))/d(every arg)."""
    def loss(*a):
        y, s = fn(*a)
        return jnp.sum(y * co) + jnp.sum(jnp.real(s * jnp.conj(cs))), (y, s)

    f = jax.value_and_grad(loss, tuple(range(len(args))), has_aux=True)
    (_, (y, s)), g = jax.jit(f)(*args)
    return y, s, g


def check_all(got, ref, what):
    y, s, g = got
    assert rel_err(y, ref[0]) < TOL64, (what, "y", rel_err(y, ref[0]))
    assert rel_err(s, ref[1]) < TOL64, (what, "state", rel_err(s, ref[1]))
    for i, (a, b) in enumerate(zip(g, ref[2])):
        assert rel_err(a, b) < TOL64, (what, "grad", i, rel_err(a, b))


def packed_ids(T, B=2):
    """Boundaries not aligned with any chunk size, a different layout per row."""
    rows = [np.repeat([1, 2, 3], [7, 20, T - 27]), np.repeat([4, 9], [T - 5, 5])]
    return jnp.asarray(np.stack(rows[:B]))


# ----------------------------------------------------------------------------- diagonal SSM


def diag_naive(x, A, B, C, dt, D, s0, seg):
    Abar = jnp.exp(dt[:, None] * A)
    Bbar = (Abar - 1) / A * B
    keep = jnp.ones(x.shape[:2]) if seg is None else jnp.concatenate(
        [jnp.ones_like(seg[:, :1]), seg[:, 1:] == seg[:, :-1]], 1).astype(x.dtype)

    def step(s, inp):  # one token, straight from the equations
        xt, kt = inp
        s = Abar * (s * kt[:, None, None]) + Bbar * xt[:, :, None]
        return s, jnp.real(jnp.sum(C * s, -1)) + D * xt

    s, y = jax.lax.scan(step, s0, (jnp.swapaxes(x, 0, 1), keep.T))
    return jnp.swapaxes(y, 0, 1), s


def diag_inputs(B=2, T=50, H=3, N=4, seed=0, complex_=True):
    r = np.random.default_rng(seed)
    cplx = lambda *s: r.normal(size=s) + (1j * r.normal(size=s) if complex_ else 0)
    x = r.normal(size=(B, T, H))
    A = -r.uniform(0.1, 1.0, size=(H, N)) + (1j * r.normal(size=(H, N)) * 3 if complex_ else 0)
    dt = r.uniform(0.05, 0.5, size=H)
    D = r.normal(size=H)
    s0 = cplx(B, H, N)
    co, cs = r.normal(size=(B, T, H)), cplx(B, H, N)
    return (x, A, cplx(H, N), cplx(H, N), dt, D, s0), co, cs


@pytest.mark.parametrize("T,complex_", [(50, True), (1, False)])
def test_diagonal_forms_match_reference(x64, T, complex_):
    args, co, cs = diag_inputs(T=T, complex_=complex_)
    ref = grads_of(lambda *a: diag_naive(*a, None), args, co, cs)
    for mode in ("conv", "scan", "recurrent"):
        got = grads_of(lambda x, A, B, C, dt, D, s0: diagonal_ssm(x, A, B, C, dt, D=D, initial_state=s0, mode=mode),
                       args, co, cs)
        assert got[0].dtype == jnp.float64 and got[1].dtype == (jnp.complex128 if complex_ else jnp.float64)
        check_all(got, ref, mode)


# by default: T = 1 (real) and T = 100 (packed, complex, a padded tail at both chunk sizes); the two
# T = 63 cases repeat that coverage and run with -m slow
@pytest.mark.parametrize("T,packed,complex_", [(1, False, False), pytest.param(63, False, False, marks=pytest.mark.slow),
                                               pytest.param(63, True, True, marks=pytest.mark.slow),
                                               (100, True, True)])
def test_diagonal_chunked_matches_reference(x64, T, packed, complex_):
    """Chunk sizes 16 and 64: T = 63 and 100 are multiples of neither (padded tail); T = 1 caps the chunk."""
    args, co, cs = diag_inputs(T=T, complex_=complex_)
    seg = packed_ids(T) if packed else None
    ref = grads_of(lambda *a: diag_naive(*a, seg), args, co, cs)
    for c in (16, 64):
        got = grads_of(lambda x, A, B, C, dt, D, s0: diagonal_ssm(x, A, B, C, dt, D=D, initial_state=s0, segment_ids=seg,
                                                                mode="chunked", chunk_size=c), args, co, cs)
        assert got[0].dtype == jnp.float64 and got[1].dtype == (jnp.complex128 if complex_ else jnp.float64)
        check_all(got, ref, ("chunked", c))


def test_diagonal_chunked_packed_equals_separate_documents(x64):
    """Chunk 8; documents start at 14 (mid-chunk), 16 and 32 (chunk edges): a 2-token document too."""
    (x, A, B, C, dt, D, s0), _, _ = diag_inputs(B=1, T=48)
    lengths = [16, 16, 16]  # equal lengths: one compile for the separate runs
    seg = jnp.asarray(np.repeat([3, 5, 8], lengths))[None]
    seg = seg.at[0, 14:16].set(4)  # a 2-token document inside chunk 1
    y, s = diag(x, A, B, C, dt, D=D, initial_state=s0, segment_ids=seg, mode="chunked", chunk_size=8)
    bounds = [0, 14, 16, 32, 48]
    ys, ss = [], []
    for i in range(4):
        sl = slice(bounds[i], bounds[i + 1])
        yi, si = diagonal_ssm(x[:, sl], A, B, C, dt, D=D, initial_state=s0 if i == 0 else None, mode="recurrent")
        ys.append(yi)
        ss.append(si)
    assert rel_err(y, jnp.concatenate(ys, 1)) < TOL64 and rel_err(s, ss[-1]) < TOL64


def test_diagonal_chunked_has_no_per_token_state():
    """With chunk 8 < N = 16 the largest intermediate of the chunked gradient (packed input) is below
    one [batch, T, H, N] state per token, which the associative scan does materialise."""
    b, t, h, n = 2, 64, 4, 16
    x = jnp.ones((b, t, h))
    A = jnp.full((h, n), -0.5 + 1j)
    Bm = jnp.ones((h, n), jnp.complex64)
    seg = jnp.asarray(np.repeat([[1, 2]], [20, 44], axis=1).repeat(b, 0))

    def loss(x, Bm, mode):
        y, s = diagonal_ssm(x, A, Bm, Bm, jnp.ones(h), segment_ids=seg, mode=mode, chunk_size=8)
        return jnp.sum(y) + jnp.sum(jnp.abs(s))

    assert largest_intermediate(jax.grad(lambda *a: loss(*a, "chunked"), (0, 1)), x, Bm) < b * t * h * n
    assert largest_intermediate(jax.grad(lambda *a: loss(*a, "scan"), (0, 1)), x, Bm) >= b * t * h * n


def test_diagonal_packed_matches_reference_and_separate_documents(x64):
    args, co, cs = diag_inputs(T=37)
    seg = packed_ids(37)
    ref = grads_of(lambda *a: diag_naive(*a, seg), args, co, cs)
    got = grads_of(lambda x, A, B, C, dt, D, s0: diagonal_ssm(x, A, B, C, dt, D=D, initial_state=s0,
                                                            segment_ids=seg, mode="scan"), args, co, cs)
    check_all(got, ref, "scan")
    y_rec, s_rec = diag(*args[:5], D=args[5], initial_state=args[6], segment_ids=seg, mode="recurrent")
    assert rel_err(y_rec, ref[0]) < TOL64 and rel_err(s_rec, ref[1]) < TOL64
    # Packed == each document on its own (initial_state reaches only the first document).
    x, A, B, C, dt, D, s0 = args
    y, _ = diag(x[1:], A, B, C, dt, D=D, initial_state=s0[1:], segment_ids=seg[1:], mode="scan")
    parts, start = [], 0
    for i, n in enumerate([32, 5]):
        yi, _ = diag(x[1:, start:start + n], A, B, C, dt, D=D, initial_state=s0[1:] if i == 0 else None, mode="conv")
        parts.append(yi)
        start += n
    assert rel_err(y, jnp.concatenate(parts, 1)) < TOL64


@pytest.mark.parametrize("mode", ["conv", "scan", "chunked"])
def test_diagonal_chaining_two_halves_equals_one_pass(x64, mode):
    (x, A, B, C, dt, D, s0), _, _ = diag_inputs(T=42)
    kw = dict(D=D, mode=mode, chunk_size=16)  # halves of 21: a padded last chunk
    y, s = diag(x, A, B, C, dt, initial_state=s0, **kw)
    y1, s1 = diag(x[:, :21], A, B, C, dt, initial_state=s0, **kw)  # equal halves: one compile
    y2, s2 = diag(x[:, 21:], A, B, C, dt, initial_state=s1, **kw)
    assert rel_err(jnp.concatenate([y1, y2], 1), y) < TOL64 and rel_err(s2, s) < TOL64


def test_diagonal_bf16_matches_float32():
    (x, A, B, C, dt, D, s0), _, _ = diag_inputs(T=200, H=8, N=16)
    f32 = lambda v: jnp.asarray(v, jnp.complex64 if np.iscomplexobj(v) else jnp.float32)
    A, B, C, dt, D, s0 = map(f32, (A, B, C, dt, D, s0))
    x32 = f32(x)
    for mode in ("conv", "chunked"):
        y32, s32 = diag(x32, A, B, C, dt, D=D, initial_state=s0, mode=mode)
        y16, s16 = diag(x32.astype(jnp.bfloat16), A, B, C, dt, D=D, initial_state=s0, mode=mode)
        assert y16.dtype == jnp.bfloat16 and s16.dtype == jnp.complex64
        assert rel_rmse(y16, y32) < 1e-2 and rel_rmse(s16, s32) < 1e-2, mode


def test_diagonal_zero_eigenvalue_is_finite(x64):
    """Bbar = (exp(dt A) - 1) / A has the limit dt B at A = 0 (a pure integrator), with finite gradients."""
    x, one, dt = jnp.ones((1, 5, 1)), jnp.ones((1, 1)), jnp.full((1,), 0.5)
    y, s = diag(x, jnp.zeros((1, 1)), one, one, dt)
    np.testing.assert_allclose(y[0, :, 0], 0.5 * np.arange(1, 6), rtol=1e-12)
    g = jax.jit(jax.grad(lambda a: jnp.sum(diagonal_ssm(x, a, one, one, dt, mode="scan")[0])))(jnp.zeros((1, 1)))
    assert bool(jnp.all(jnp.isfinite(g)))


def _diag_ok():
    return dict(x=jnp.zeros((2, 8, 3)), A=-jnp.ones((3, 4)), B=jnp.ones((3, 4)), C=jnp.ones((3, 4)), dt=jnp.ones(3))


@pytest.mark.parametrize("change,match", [
    (dict(x=jnp.zeros((8, 3))), r"diagonal_ssm: x must have shape \[batch, T, H\], got \(8, 3\)"),
    (dict(A=-jnp.ones((2, 4))), r"A must have shape \[H, N\] = \(3, N\)"),
    (dict(B=jnp.ones((3, 5))), r"B must have shape \[H, N\] = \(3, 4\)"),
    (dict(C=jnp.ones((4,))), "C must have shape"),
    (dict(dt=jnp.ones((2, 8, 3))), r"dt must have shape \[H\] = \(3,\)"),
    (dict(D=jnp.ones((4,))), "D must have shape"),
    (dict(initial_state=jnp.zeros((2, 3, 5))), r"initial_state must have shape \[batch, H, N\] = \(2, 3, 4\)"),
    (dict(segment_ids=jnp.zeros((2, 8), jnp.int32)), "segment_ids are not supported with mode='conv'"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32), mode="scan"), "segment_ids must have shape"),
    (dict(seq_axis="seq"), "seq_axis needs mode='scan'"),
    (dict(mode="parallel"), "mode"),
    (dict(mode="chunked", chunk_size=0), "chunk_size"),
    (dict(mode="chunked", chunk_size=True), "chunk_size"),
    (dict(mode="chunked", chunk_size=8.0), "chunk_size"),
])
def test_diagonal_bad_inputs_raise(change, match):
    kw = {**_diag_ok(), **change}
    with pytest.raises(ValueError, match=match):
        diagonal_ssm(kw.pop("x"), kw.pop("A"), kw.pop("B"), kw.pop("C"), kw.pop("dt"), **kw)


# ----------------------------------------------------------------------------- selective SSM


def sel_naive(x, dt, A, B, C, D, s0, seg):
    H, G = x.shape[2], B.shape[2]
    group = np.arange(H) // (H // G)  # head h reads group h // (H / G)
    keep = jnp.ones(x.shape[:2]) if seg is None else jnp.concatenate(
        [jnp.ones_like(seg[:, :1]), seg[:, 1:] == seg[:, :-1]], 1).astype(x.dtype)

    def step(s, inp):  # one token, straight from the equations
        xt, dtt, Bt, Ct, kt = inp
        s = s * (jnp.exp(dtt * A) * kt[:, None])[:, :, None, None]
        Bh, Ch = Bt[:, group], Ct[:, group]  # [batch, H, N]
        s = s + dtt[:, :, None, None] * xt[:, :, :, None] * Bh[:, :, None, :]
        return s, jnp.einsum("bhpn,bhn->bhp", s, Ch) + D[:, None] * xt

    tm = lambda v: jnp.swapaxes(v, 0, 1)
    s, y = jax.lax.scan(step, s0, (tm(x), tm(dt), tm(B), tm(C), keep.T))
    return tm(y), s


def sel_inputs(B=2, T=63, H=4, P=3, G=2, N=5, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(B, T, H, P))
    dt = r.uniform(0.05, 1.0, size=(B, T, H))
    A = -r.uniform(0.2, 1.5, size=H)
    Bm, Cm = r.normal(size=(2, B, T, G, N))
    D = r.normal(size=H)
    s0 = r.normal(size=(B, H, P, N))
    co, cs = r.normal(size=(B, T, H, P)), r.normal(size=(B, H, P, N))
    return (x, dt, A, Bm, Cm, D, s0), co, cs


@pytest.mark.parametrize("T,packed,forms", [
    (63, False, [("recurrent", 64), ("chunked", 16), ("chunked", 10)]),  # neither chunk size divides T
    (1, False, [("recurrent", 64), ("chunked", 16)]),
    (37, True, [("recurrent", 64), ("chunked", 10)]),
])
def test_selective_forms_match_reference(x64, T, packed, forms):
    args, co, cs = sel_inputs(T=T)
    seg = packed_ids(T) if packed else None
    ref = grads_of(lambda *a: sel_naive(*a, seg), args, co, cs)
    for mode, c in forms:
        fn = lambda x, dt, A, B, C, D, s0: selective_scan(x, dt, A, B, C, D=D, initial_state=s0, segment_ids=seg,
                                                          mode=mode, chunk_size=c)
        got = grads_of(fn, args, co, cs)
        assert got[0].dtype == got[1].dtype == jnp.float64
        check_all(got, ref, (mode, c))


@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
def test_selective_chaining_two_halves_equals_one_pass(x64, mode):
    (x, dt, A, B, C, D, s0), _, _ = sel_inputs(T=50)
    kw = dict(D=D, mode=mode, chunk_size=16)
    y, s = sel(x, dt, A, B, C, initial_state=s0, **kw)
    y1, s1 = sel(x[:, :25], dt[:, :25], A, B[:, :25], C[:, :25], initial_state=s0, **kw)  # equal halves: one compile
    y2, s2 = sel(x[:, 25:], dt[:, 25:], A, B[:, 25:], C[:, 25:], initial_state=s1, **kw)
    assert rel_err(jnp.concatenate([y1, y2], 1), y) < TOL64 and rel_err(s2, s) < TOL64


def test_selective_packed_equals_separate_documents(x64):
    (x, dt, A, B, C, D, s0), _, _ = sel_inputs(B=1, T=45)
    lengths = [15, 15, 15]  # equal lengths: one compile for the separate runs; no boundary on a chunk edge
    seg = jnp.asarray(np.repeat([3, 5, 8], lengths))[None]
    y, s = sel(x, dt, A, B, C, D=D, initial_state=s0, segment_ids=seg, chunk_size=16)
    start, parts = 0, []
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        yi, si = sel(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], D=D, initial_state=s0 if i == 0 else None,
                     chunk_size=16)
        parts.append(yi)
        start += n
    assert rel_err(y, jnp.concatenate(parts, 1)) < TOL64 and rel_err(s, si) < TOL64


def test_selective_strong_decay_stays_finite():
    """In-chunk cumulative log decays reach -3200: only differences G_i - G_j <= 0 are exponentiated."""
    (x, dt, A, B, C, D, s0), co, cs = sel_inputs(T=100)
    x, B, C, s0, co, cs = (jnp.asarray(v, jnp.float32) for v in (x, B, C, s0, co, cs))
    dt = jnp.full(x.shape[:3], 50.0)
    A = -jnp.ones(4)
    seg = jnp.asarray(np.repeat([[1, 2, 3]], [30, 40, 30], axis=1).repeat(2, 0))
    res = {m: grads_of(lambda x, dt, A, B, C, s0, m=m: selective_scan(x, dt, A, B, C, initial_state=s0, segment_ids=seg,
                                                                       mode=m, chunk_size=64),
                       (x, dt, A, B, C, s0), co, cs) for m in ("chunked", "recurrent")}
    for leaf in jax.tree.leaves(res["chunked"]):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    for a, b in zip(jax.tree.leaves(res["chunked"]), jax.tree.leaves(res["recurrent"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_selective_bf16_matches_float32():
    """bf16 inputs (state and arithmetic in float32): relative RMSE vs the float32 run < 1e-2."""
    args, _, _ = sel_inputs(T=100, P=16, N=16)
    x, dt, A, B, C, D, s0 = (jnp.asarray(v, jnp.float32) for v in args)
    y32, s32 = sel(x, dt, A, B, C, D=D, initial_state=s0, chunk_size=32)
    bf = lambda v: v.astype(jnp.bfloat16)
    y16, s16 = sel(bf(x), bf(dt), A, bf(B), bf(C), D=D, initial_state=s0, chunk_size=32)
    assert y16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    assert rel_rmse(y16, y32) < 1e-2 and rel_rmse(s16, s32) < 1e-2


def test_no_per_token_state_in_chunked_graph():
    """Neither the chunked forward nor its gradient materialises a [T, P, N]-sized state."""
    b, t, h, p, g, n = 1, 256, 2, 8, 1, 8
    x = jnp.ones((b, t, h, p))
    dt = jnp.ones((b, t, h))
    A = -jnp.ones(h)
    Bm = jnp.ones((b, t, g, n))

    def loss(x, dt, Bm, mode):
        y, s = selective_scan(x, dt, A, Bm, Bm, mode=mode, chunk_size=32)
        return jnp.sum(y) + jnp.sum(s)

    chunked = jax.grad(lambda *a: loss(*a, "chunked"), (0, 1, 2))
    assert largest_intermediate(chunked, x, dt, Bm) < b * t * h * p * n
    recurrent = jax.grad(lambda *a: loss(*a, "recurrent"), (0, 1, 2))  # the probe does see per-token states
    assert largest_intermediate(recurrent, x, dt, Bm) >= b * t * h * p * n


def _sel_ok():
    return dict(x=jnp.zeros((2, 8, 4, 3)), dt=jnp.ones((2, 8, 4)), A=-jnp.ones(4), B=jnp.zeros((2, 8, 2, 5)),
                C=jnp.zeros((2, 8, 2, 5)))


@pytest.mark.parametrize("change,match", [
    (dict(x=jnp.zeros((2, 8, 12))), r"selective_scan: x must have shape \[batch, T, H, P\]"),
    (dict(dt=jnp.ones((2, 8))), r"dt must have shape \[batch, T, H\] = \(2, 8, 4\), got \(2, 8\)"),
    (dict(dt=jnp.ones((2, 8, 3))), "dt must have shape"),
    (dict(A=-jnp.ones((4, 1))), r"A must have shape \[H\] = \(4,\)"),
    (dict(B=jnp.zeros((2, 8, 5))), r"B must have shape \[batch, T, G, N\] = \(2, 8, G, N\)"),
    (dict(C=jnp.zeros((2, 8, 2, 4))), r"C must have shape \[batch, T, G, N\] = \(2, 8, 2, 5\)"),
    (dict(B=jnp.zeros((2, 8, 3, 5)), C=jnp.zeros((2, 8, 3, 5))), "must be divisible by the number of groups G = 3"),
    (dict(D=jnp.ones((4, 3))), "D must have shape"),
    (dict(initial_state=jnp.zeros((2, 4, 5, 3))), r"initial_state must have shape \[batch, H, P, N\] = \(2, 4, 3, 5\)"),
    (dict(segment_ids=jnp.zeros((2, 5), jnp.int32)), "segment_ids must have shape"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(mode="parallel"), "mode"),
    (dict(impl="triton"), "impl must be one of"),
])
def test_selective_bad_inputs_raise(change, match):
    kw = {**_sel_ok(), **change}
    with pytest.raises(ValueError, match=match):
        selective_scan(kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"), **kw)


def test_bad_dtypes_raise_type_error():
    with pytest.raises(TypeError, match="selective_scan: segment_ids must have an integer dtype, got float32"):
        selective_scan(**_sel_ok(), segment_ids=jnp.zeros((2, 8)))
    with pytest.raises(TypeError, match="selective_scan: x must have a floating dtype .*got int32"):
        selective_scan(**dict(_sel_ok(), x=jnp.zeros((2, 8, 4, 3), jnp.int32)))
    with pytest.raises(TypeError, match="diagonal_ssm: x must have a floating dtype .*got complex64"):
        diagonal_ssm(**dict(_diag_ok(), x=jnp.zeros((2, 8, 3), jnp.complex64)))
    with pytest.raises(TypeError, match="diagonal_ssm: dt must have a floating dtype .*got int32"):
        diagonal_ssm(**dict(_diag_ok(), dt=jnp.ones(3, jnp.int32)))


def test_linear_scan_matches_loop(x64):
    r = np.random.default_rng(3)
    a, b = r.uniform(-1, 1, size=(2, 2, 9, 3))
    h0 = r.normal(size=(2, 3))
    h, ref = h0, []
    for t in range(9):
        h = a[:, t] * h + b[:, t]
        ref.append(h)
    assert rel_err(linear_scan(jnp.asarray(a), jnp.asarray(b), jnp.asarray(h0)), jnp.stack(ref, 1)) < 1e-13
