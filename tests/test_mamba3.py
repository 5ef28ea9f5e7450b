"""Mamba-3 (memjax.memory.mamba3, memjax.nn.mamba3).

Reference: a float64 token loop written here from the paper's complex (rotating) recurrence, in the
*fixed* frame, with the state itself rotated every step (no cumulative angles, no RoPE trick, no
shifted weights)::

    new segment: h <- 0, pending <- 0
    h <- Rot(dt_t theta_t) (alpha_t h + beta_t B_{t-1} X_{t-1}^T) + gamma_t B_t X_t^T
    Y_t = scale h^T C_t + D X_t

and converted to the implementation's rotating-frame state (``Rot(Phi)^T h``) only at entry and exit.
Tolerances: float64 forms vs reference ``TOL64`` (outputs, every field of the final state, gradients
w.r.t. every input); bf16 bounds ~2.5x the measured errors (noted at the test).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.memory.mamba3 import Mamba3State, mamba3
from memjax.memory.ssm import selective_scan
from tests.helpers import TOL64, rel_err

m3 = jax.jit(mamba3, static_argnames=("mode", "chunk_size", "scale"))
ssd = jax.jit(selective_scan, static_argnames=("mode", "chunk_size"))


def _rot(v, phi, sign):
    """Turn the pairs ``(2m, 2m+1)`` of ``v [..., N]`` (axis -1) by ``sign * phi [..., M]``."""
    mm = phi.shape[-1]
    a, c = v[..., 0:2 * mm:2], v[..., 1:2 * mm:2]
    cos, sin = jnp.cos(phi), sign * jnp.sin(phi)
    turned = jnp.stack([cos * a - sin * c, sin * a + cos * c], -1).reshape(*v.shape[:-1], 2 * mm)
    return jnp.concatenate([turned, v[..., 2 * mm:]], -1)


def reference(x, dt, A, B, C, lam, theta, D, s0, seg, scale=1.0):
    """``x [b, T, H, R, P]``, ``B, C [b, T, G, R, N]``, ``A [H]`` or ``[b, T, H]``; ``lam``/``theta``
    may be None. Returns ``(y [b, T, H, R, P], Mamba3State)``."""
    b, t, h, r, p = x.shape
    g = B.shape[2]
    B, C = (jnp.repeat(v, h // g, axis=2) for v in (B, C))
    A = jnp.broadcast_to(A, (b, t, h))
    lam = jnp.ones((b, t, h), x.dtype) if lam is None else lam
    theta = jnp.zeros((b, t, h, 0), x.dtype) if theta is None else theta
    keep = jnp.ones((b, t), bool) if seg is None else jnp.concatenate(
        [jnp.ones_like(seg[:, :1], bool), seg[:, 1:] == seg[:, :-1]], 1)
    # entry: the fixed-frame state and pending B from the rotating-frame initial state
    rot_nd = lambda v, phi, s: jnp.swapaxes(_rot(jnp.swapaxes(v, -1, -2), phi[:, :, None], s), -1, -2)
    h0 = rot_nd(jnp.swapaxes(s0.ssm, -1, -2), s0.angle, 1.0)  # [b, H, N, P]
    bp0 = _rot(s0.k, s0.angle[:, :, None], 1.0)

    def step(carry, inp):
        hs, bp, xp, phi = carry
        xt, dtt, at, bt, ct, lt, tht, kt = inp
        k = kt[:, None, None, None]
        hs, bp, xp = hs * k, bp * k, xp * k
        phi = phi * kt[:, None, None]
        alpha = jnp.exp(dtt * at)
        beta, gamma = (1 - lt) * dtt * alpha, lt * dtt
        pend = beta[..., None, None] * jnp.einsum("bhrn,bhrp->bhnp", bp, xp)
        hs = rot_nd(alpha[..., None, None] * hs + pend, dtt[..., None] * tht, 1.0)
        hs = hs + gamma[..., None, None] * jnp.einsum("bhrn,bhrp->bhnp", bt, xt)
        y = scale * jnp.einsum("bhnp,bhrn->bhrp", hs, ct)
        if D is not None:
            y = y + D[:, None, None] * xt
        return (hs, bt, xt, phi + dtt[..., None] * tht), y

    tm = lambda v: jnp.swapaxes(v, 0, 1)
    (hs, bp, xp, phi), y = jax.lax.scan(step, (h0, bp0, s0.x, s0.angle),
                                        tuple(tm(v) for v in (x, dt, A, B, C, lam, theta, keep)))
    ssm = jnp.swapaxes(rot_nd(hs, phi, -1.0), -1, -2)
    return tm(y), Mamba3State(ssm, _rot(bp, phi[:, :, None], -1.0), xp, phi)


def inputs(b=2, t=37, h=2, p=3, n=6, r=1, g=1, m=2, seed=0, per_token_a=True, lam=True):
    """float64 NumPy inputs (``x [b, T, H, R, P]``, ``B, C [b, T, G, R, N]``), an initial state and
    cotangents for every output."""
    rg = np.random.default_rng(seed)
    x = rg.normal(size=(b, t, h, r, p))
    dt = rg.uniform(0.05, 0.6, (b, t, h))
    A = -rg.uniform(0.3, 2.0, (b, t, h) if per_token_a else (h,))
    B, C = rg.normal(size=(b, t, g, r, n)), rg.normal(size=(b, t, g, r, n))
    lm = rg.uniform(0.0, 1.0, (b, t, h)) if lam else None
    theta = rg.normal(size=(b, t, h, m)) * 2.0 if m else None
    D = rg.normal(size=(h,))
    s0 = Mamba3State(rg.normal(size=(b, h, p, n)), rg.normal(size=(b, h, r, n)), rg.normal(size=(b, h, r, p)),
                     rg.uniform(-7, 7, (b, h, m)))
    cot = (rg.normal(size=(b, t, h, r, p)), Mamba3State(rg.normal(size=(b, h, p, n)), rg.normal(size=(b, h, r, n)),
                                                        rg.normal(size=(b, h, r, p)), rg.normal(size=(b, h, 2 * m))))
    return dict(x=x, dt=dt, A=A, B=B, C=C, lam=lm, theta=theta, D=D, s0=s0), cot


def siso(args):
    """The SISO layout of rank-1 inputs (``x [b, T, H, P]``, ``B, C [b, T, G, N]``, state unchanged)."""
    return {**args, "x": args["x"][:, :, :, 0], "B": args["B"][:, :, :, 0], "C": args["C"][:, :, :, 0]}


def value_and_grads(fn, args, cot):
    """``(y, state, grads)`` of ``<y, cy> + <state, cs>`` (the angle through cos and sin, so the
    ``2 pi`` wrap is invisible) w.r.t. every array in ``args``."""
    cy, cs = cot
    names = [k for k, v in args.items() if v is not None]

    def loss(*vals):
        y, s = fn(**{**args, **dict(zip(names, vals))})
        mm = s.angle.shape[-1]
        ang = jnp.sum(jnp.cos(s.angle) * cs.angle[..., :mm]) + jnp.sum(jnp.sin(s.angle) * cs.angle[..., mm:])
        out = jnp.sum(y * cy.reshape(y.shape)) + ang
        out = out + sum(jnp.sum(getattr(s, f) * getattr(cs, f)) for f in ("ssm", "k", "x"))
        return out, (y, s)

    (_, (y, s)), grads = jax.jit(jax.value_and_grad(loss, tuple(range(len(names))), has_aux=True))(
        *[args[k] for k in names])
    return y, s, dict(zip(names, grads))


def assert_close(got, ref, tol, label):
    (y, s, grads), (y0, s0, grads0) = got, ref
    assert rel_err(y, np.asarray(y0).reshape(y.shape)) < tol, (label, "y", rel_err(y, y0))
    for f in ("ssm", "k", "x"):
        assert rel_err(getattr(s, f), getattr(s0, f)) < tol, (label, f)
    for fnc in (jnp.cos, jnp.sin):
        assert rel_err(fnc(s.angle), fnc(s0.angle)) < tol, (label, "angle")
    for k in grads0:
        a, b = jax.tree.leaves(grads[k]), jax.tree.leaves(grads0[k])
        for i, (ga, gb) in enumerate(zip(a, b)):
            assert rel_err(ga, np.asarray(gb).reshape(ga.shape)) < tol, (label, "grad", k, i, rel_err(ga, gb))


SEG37 = np.stack([np.repeat([1, 2, 3], [7, 20, 10]), np.repeat([4, 9], [32, 5])])
SEG13 = np.stack([np.repeat([1, 2, 3], [3, 6, 4]), np.repeat([4, 9], [10, 3])])


def _ref_fn(seg, scale=1.0):
    return lambda x, dt, A, B, C, lam, theta, D, s0: reference(x, dt, A, B, C, lam, theta, D, s0, seg, scale)


def _fn(mode, c, seg, rank1, scale=None):
    def fn(x, dt, A, B, C, lam, theta, D, s0):
        if rank1:
            x, B, C = x[:, :, :, 0], B[:, :, :, 0], C[:, :, :, 0]
        return mamba3(x, dt, A, B, C, lam=lam, theta=theta, D=D, scale=scale, initial_state=s0,
                      segment_ids=seg, mode=mode, chunk_size=c)
    return fn


@pytest.mark.parametrize("r,g,packed,per_token_a,t,forms", [
    (2, 2, True, True, 13, [("recurrent", 4), ("chunked", 4)]),
    pytest.param(1, 1, True, True, 37, [("recurrent", 16), ("chunked", 16)], marks=pytest.mark.slow),
    pytest.param(2, 2, False, False, 13, [("recurrent", 4), ("chunked", 4)], marks=pytest.mark.slow),
    pytest.param(3, 1, True, True, 37, [("recurrent", 16), ("chunked", 16), ("chunked", 64)], marks=pytest.mark.slow),
    pytest.param(1, 2, False, False, 37, [("chunked", 8), ("chunked", 64)], marks=pytest.mark.slow)])
def test_forms_match_reference_with_gradients(x64, r, g, packed, per_token_a, t, forms):
    """T odd (padded last chunk), chunk 64 > T (one chunk); SISO (r = 1 in its own layout) and MIMO;
    outputs, every field of the final state, gradients w.r.t. x, dt, A, B, C, lam, theta, D and the
    initial state."""
    args, cot = inputs(t=t, r=r, g=g, h=2, seed=r + 3 * g, per_token_a=per_token_a)
    seg = (jnp.asarray(SEG37 if t == 37 else SEG13)) if packed else None
    ref = value_and_grads(_ref_fn(seg), args, cot)
    for mode, c in forms:
        got = value_and_grads(_fn(mode, c, seg, r == 1), args, cot)
        assert got[0].dtype == jnp.float64 and got[0].shape == ((2, t, 2, 3) if r == 1 else (2, t, 2, r, 3))
        assert_close(got, ref, TOL64, (r, g, mode, c))


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_every_state_pair_rotating_matches_reference(x64, mode):
    """``M = N / 2`` angles (the block's ``rope_fraction=1.0``: no pair left unturned), packed, with
    an initial state: outputs, final state and gradients against the float64 reference."""
    args, cot = inputs(t=13, r=1, g=1, h=2, n=6, m=3, seed=7)
    seg = jnp.asarray(SEG13)
    ref = value_and_grads(_ref_fn(seg), args, cot)
    assert_close(value_and_grads(_fn(mode, 4, seg, True), args, cot), ref, TOL64, mode)


@pytest.mark.parametrize("mode,ones", [("chunked", False), pytest.param("chunked", True, marks=pytest.mark.slow),
                                       pytest.param("recurrent", False, marks=pytest.mark.slow),
                                       pytest.param("recurrent", True, marks=pytest.mark.slow)])
def test_euler_lam_and_no_rotation_is_mamba2(x64, mode, ones):
    """lam = None (or ones) and no theta: the Mamba-2 recurrence, == selective_scan (its own
    reference tests), for y and the state; the pending write in the initial state is never used."""
    args, _ = inputs(t=21, r=1, m=0, seed=4, per_token_a=False, lam=False)
    a = siso(args)
    lam = np.ones_like(a["dt"]) if ones else None
    y, s = m3(a["x"], a["dt"], a["A"], a["B"], a["C"], lam=lam, D=a["D"], initial_state=a["s0"], mode=mode,
              chunk_size=8)
    y2, s2 = ssd(a["x"], a["dt"], a["A"], a["B"], a["C"], D=a["D"], initial_state=a["s0"].ssm, mode=mode,
                 chunk_size=8)
    assert rel_err(y, y2) < TOL64 and rel_err(s.ssm, s2) < TOL64


@pytest.mark.parametrize("mode", ["chunked", pytest.param("recurrent", marks=pytest.mark.slow)])
def test_chaining_two_halves_equals_one_pass(x64, mode):
    """The final state (SSM, pending write, angle) carries everything: [0:11] then [11:22] == one run."""
    args, _ = inputs(t=22, r=2, seed=7)
    a = args
    run = lambda sl, s0: m3(a["x"][:, sl], a["dt"][:, sl], a["A"][:, sl], a["B"][:, sl], a["C"][:, sl],
                            lam=a["lam"][:, sl], theta=a["theta"][:, sl], D=a["D"], initial_state=s0, mode=mode,
                            chunk_size=4)
    y, s = run(slice(None), a["s0"])
    y1, s1 = run(slice(0, 11), a["s0"])
    y2, s2 = run(slice(11, None), s1)
    assert rel_err(jnp.concatenate([y1, y2], 1), y) < TOL64
    for f in ("ssm", "k", "x"):
        assert rel_err(getattr(s2, f), getattr(s, f)) < TOL64, f
    assert rel_err(jnp.exp(1j * s2.angle), jnp.exp(1j * s.angle)) < TOL64
    assert float(jnp.abs(s.angle).max()) <= 2 * np.pi  # kept modulo 2 pi for long decoding


def test_packed_equals_separate_documents(x64):
    """Three documents (a reused id is a new document); the initial state (with its pending write
    and angle) reaches only the first."""
    args, _ = inputs(b=1, t=37, r=2, seed=8)
    a = args
    lengths = [12, 12, 13]
    seg = jnp.asarray(np.repeat([3, 5, 3], lengths))[None]
    kw = lambda sl: dict(lam=a["lam"][:, sl], theta=a["theta"][:, sl], D=a["D"])
    cut = lambda sl: (a["x"][:, sl], a["dt"][:, sl], a["A"][:, sl], a["B"][:, sl], a["C"][:, sl])
    y, s = m3(*cut(slice(None)), **kw(slice(None)), initial_state=a["s0"], segment_ids=seg, chunk_size=8)
    parts, start = [], 0
    for i, ln in enumerate(lengths):
        sl = slice(start, start + ln)
        s0 = a["s0"] if i == 0 else Mamba3State(*(np.zeros_like(v) for v in a["s0"]))
        yi, si = m3(*cut(sl), **kw(sl), initial_state=s0, mode="recurrent")
        parts.append(yi)
        start += ln
    assert rel_err(y, jnp.concatenate(parts, 1)) < TOL64
    for f in si._fields:
        assert rel_err(getattr(s, f), getattr(si, f)) < TOL64, f


# bf16 x, dt, A, B, C, lam, theta (float32 initial state) vs the float64 reference on the same
# rounded inputs, T = 64, N = 16, P = 8, R = 2, M = 4, chunk 16. Measured (CPU) output / ssm state:
# chunked 3.9e-3 / 2.2e-3, recurrent 3.9e-3 / 1.1e-3 (the output error is its bf16 rounding; float32
# inputs give 1.5e-7 / 2.0e-7). Bounds ~2.5x.
BF16_BOUNDS = {"chunked": (1e-2, 5.5e-3), "recurrent": (1e-2, 2.8e-3)}


@pytest.mark.parametrize("mode", ["chunked", pytest.param("recurrent", marks=pytest.mark.slow)])
def test_bf16_error_is_bounded(mode):
    args, _ = inputs(t=64, n=16, p=8, r=2, m=4, seed=9)
    names = ("x", "dt", "A", "B", "C", "lam", "theta")
    bf = {k: jnp.asarray(args[k], jnp.bfloat16) for k in names}
    s0 = Mamba3State(*(jnp.asarray(v, jnp.float32) for v in args["s0"]))
    with jax.enable_x64(True):
        wide = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in bf.items()}
        s64 = Mamba3State(*(jnp.asarray(np.asarray(v, np.float64)) for v in s0))
        y0, st0 = jax.jit(_ref_fn(None))(**wide, D=None, s0=s64)
        y0, st0 = np.asarray(y0), np.asarray(st0.ssm)
    y, s = m3(bf["x"], bf["dt"], bf["A"], bf["B"], bf["C"], lam=bf["lam"], theta=bf["theta"], initial_state=s0,
              mode=mode, chunk_size=16)
    assert y.dtype == jnp.bfloat16 and all(v.dtype == jnp.float32 for v in s)
    err = (rel_err(y, y0), rel_err(s.ssm, st0))
    assert all(e < bound for e, bound in zip(err, BF16_BOUNDS[mode])), (mode, err)


def test_trapezoid_is_second_order():
    """On ``h' = a h + x(t)`` (``x = cos t``, one channel, no rotation) the trapezoidal rule
    (``lam = 1/2``) converges at order 2 and the exponential-Euler rule (``lam = 1``, Mamba-2) at
    order 1: halving ``dt`` divides the error at ``t = 2`` by ~4 and ~2."""
    a = -0.7

    def err(lam, steps):
        with jax.enable_x64(True):
            dt = 2.0 / steps
            ts = dt * np.arange(1, steps + 1)
            x = np.cos(ts)[None, :, None, None]  # x_t at t = 1..steps; the pending x_0 = cos 0 in the state
            s0 = Mamba3State(np.zeros((1, 1, 1, 1)), np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1)), np.zeros((1, 1, 0)))
            y, _ = m3(x, np.full((1, steps, 1), dt), np.array([a]), np.ones((1, steps, 1, 1)),
                      np.ones((1, steps, 1, 1)), lam=np.full((1, steps, 1), lam), initial_state=s0, mode="recurrent")
            exact = (-a * np.cos(2.0) + np.sin(2.0) + a * np.exp(2.0 * a)) / (1 + a * a)  # h(0) = 0
            return abs(float(y[0, -1, 0, 0]) - exact)

    trap = err(0.5, 40) / err(0.5, 80)
    euler = err(1.0, 40) / err(1.0, 80)
    assert 3.6 < trap < 4.4 and 1.8 < euler < 2.2, (trap, euler)


def test_nan_at_a_later_token_leaves_earlier_outputs_unchanged():
    """A non-finite input at t = 17 (dt and lam also enter token 16's trapezoid weight, for *later*
    reads): outputs before 17 are bit-identical (their gradients: the next test)."""
    args, _ = inputs(t=24, r=2, seed=10)
    base = {k: jnp.asarray(args[k], jnp.float32) for k in ("x", "dt", "A", "B", "C", "lam", "theta")}
    s0 = Mamba3State(*(jnp.asarray(v, jnp.float32) for v in args["s0"]))
    run = lambda **kw: m3(**{**base, **kw}, initial_state=s0, chunk_size=8)
    y, _ = run()
    for name, idx in (("x", (slice(None), 17, 1)), ("dt", (slice(None), 17)), ("A", (slice(None), 17, 0)),
                      ("B", (slice(None), 17, 0)), ("lam", (slice(None), 17, 1)), ("theta", (slice(None), 17, 0)),
                      ("C", (slice(None), 17))):
        yb, sb = run(**{name: base[name].at[idx].set(jnp.nan)})
        np.testing.assert_array_equal(np.asarray(yb[:, :17]), np.asarray(y[:, :17]), err_msg=name)
        assert bool(jnp.isnan(yb[:, 17]).any()), name
        if name == "C":  # a read: only its own token
            np.testing.assert_array_equal(np.asarray(yb[:, 18:]), np.asarray(y[:, 18:]))
        else:  # a write: the rest of the document and the final state
            assert bool(jnp.isnan(yb[:, 23]).any()) and bool(jnp.isnan(sb.ssm).any()), name


@pytest.mark.slow
def test_gradient_of_earlier_outputs_ignores_a_later_nan():
    args, _ = inputs(t=24, r=2, seed=10)
    base = {k: jnp.asarray(args[k], jnp.float32) for k in ("x", "dt", "A", "B", "C", "lam", "theta")}
    s0 = Mamba3State(*(jnp.asarray(v, jnp.float32) for v in args["s0"]))
    grad = jax.jit(jax.grad(lambda dt, lam: jnp.sum(mamba3(**{**base, "dt": dt, "lam": lam}, initial_state=s0,
                                                           chunk_size=8)[0][:, :17]), (0, 1)))
    clean = grad(base["dt"], base["lam"])
    dirty = grad(base["dt"].at[:, 17].set(jnp.inf), base["lam"].at[:, 18].set(jnp.nan))
    for u, v in zip(clean, dirty):
        assert bool(jnp.isfinite(v).all())
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _ok():
    return dict(x=jnp.zeros((2, 8, 4, 3)), dt=jnp.zeros((2, 8, 4)), A=jnp.zeros((4,)), B=jnp.zeros((2, 8, 2, 6)),
                C=jnp.zeros((2, 8, 2, 6)))


@pytest.mark.parametrize("change,match", [
    (dict(x=jnp.zeros((2, 8, 4))), r"x must have shape \[batch, T, H, P\]"),
    (dict(dt=jnp.zeros((2, 8))), r"dt must have shape \[batch, T, H\] = \(2, 8, 4\)"),
    (dict(A=jnp.zeros((3,))), r"A must have shape \[H\] = \(4,\) or \[batch, T, H\] = \(2, 8, 4\), got \(3,\)"),
    (dict(B=jnp.zeros((2, 8, 2, 1, 6))), r"B must have shape \[batch, T, G, N\]"),
    (dict(C=jnp.zeros((2, 8, 2, 5))), r"C must have shape \[batch, T, G, N\] = \(2, 8, 2, 6\)"),
    (dict(B=jnp.zeros((2, 8, 3, 6)), C=jnp.zeros((2, 8, 3, 6))),
     r"the number of heads H = 4 \(x.shape\[2\]\) must be divisible by the number of groups G = 3"),
    (dict(x=jnp.zeros((2, 8, 4, 2, 3))), r"B must have shape \[batch, T, G, R, N\] = \(2, 8, G, 2, N\)"),
    (dict(lam=jnp.zeros((2, 8, 1))), r"lam must have shape \[batch, T, H\] = \(2, 8, 4\)"),
    (dict(theta=jnp.zeros((2, 8, 4, 4))), r"theta must have 1 <= M <= N // 2 = 3 angles"),
    (dict(theta=jnp.zeros((2, 8, 4))), r"theta must have shape \[batch, T, H, M\]"),
    (dict(D=jnp.zeros((2,))), r"D must have shape \[H\] = \(4,\)"),
    (dict(initial_state=jnp.zeros((2, 4, 3, 6))), r"initial_state must be a Mamba3State"),
    (dict(initial_state=Mamba3State.zeros(2, 4, 3, 6, angles=1)),
     r"initial_state.angle must have shape \[batch, H, M\] = \(2, 4, 0\)"),
    (dict(initial_state=Mamba3State.zeros(2, 4, 3, 5)), r"initial_state.ssm must have shape \[batch, H, P, N\]"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), r"segment_ids must have shape \[batch, T\] = \(2, 8\)"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(mode="parallel"), "mode must be one of"),
    (dict(x=jnp.zeros((2, 0, 4, 3))), "x has an empty time axis"),
])
def test_bad_inputs_raise(change, match):
    kw = {**_ok(), **change}
    with pytest.raises(ValueError, match="mamba3: " + match):
        mamba3(kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"), **kw)
    with pytest.raises(TypeError, match="mamba3: lam must have a floating dtype"):
        mamba3(**_ok(), lam=jnp.ones((2, 8, 4), jnp.int32))


# ----------------------------------------------------------------------------- block

import optax  # noqa: E402

from memjax.config import ModelConfig  # noqa: E402
from memjax.model.lm import LM  # noqa: E402
from memjax.nn.mamba3 import Mamba3, Mamba3Cache  # noqa: E402
from memjax.nn.registry import get_block  # noqa: E402

BLOCK_TOL = 1e-4
call = nnx.jit(lambda blk, x: blk(x))
call_cached = nnx.jit(lambda blk, x, cache: blk(x, cache=cache))


@pytest.mark.slow  # tests/test_decoding.py decodes every registered block by default
@pytest.mark.parametrize("rank", [1, 2])
def test_block_prefill_then_steps_match_full_sequence(rank):
    blk = Mamba3(32, num_heads=2, d_state=8, mimo_rank=rank, chunk_size=4, rngs=nnx.Rngs(rank))
    assert get_block("mamba3") is Mamba3 and get_block("M3") is Mamba3
    x = jax.random.normal(jax.random.key(1), (2, 11, 32))
    y = call(blk, x)
    cache0 = blk.init_cache(2, 16)
    assert isinstance(cache0, Mamba3Cache) and cache0.ssm.shape == (2, 2, 32, 8) and cache0.angle.shape == (2, 2, 2)
    y1, cache = call_cached(blk, x[:, :5], cache0)
    ys = [y1]
    for t in range(5, 11):
        yt, cache = call_cached(blk, x[:, t:t + 1], cache)
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), y) < BLOCK_TOL
    assert jax.tree.structure(cache) == jax.tree.structure(cache0)
    with pytest.raises(ValueError, match="segment_ids"):
        blk(x[:, :1], segment_ids=jnp.ones((2, 1), jnp.int32), cache=cache0)


@pytest.mark.slow  # (the function's packed test runs by default)
def test_block_packed_equals_separate_documents():
    blk = Mamba3(32, num_heads=2, d_state=8, mimo_rank=2, chunk_size=4, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(2), (1, 18, 32))
    y = nnx.jit(lambda b, x, s: b(x, segment_ids=s))(blk, x, jnp.asarray(np.repeat([1, 2, 3], 6))[None])
    parts = [call(blk, x[:, i:i + 6]) for i in (0, 6, 12)]
    assert rel_err(y, jnp.concatenate(parts, 1)) < BLOCK_TOL


def test_block_bad_options_raise():
    for kw, match in ((dict(mimo_rank=0), "mimo_rank must be a positive int"),
                      (dict(mimo_rank=1.5), "mimo_rank must be a positive int"),
                      (dict(mode="parallel"), "mode must be one of"),
                      (dict(rope_fraction=1.5), r"rope_fraction must be in \[0.0, 1.0\]"),
                      (dict(num_heads=3), r"expand: d_inner = 64 must be divisible by num_heads \(3\)"),
                      (dict(n_groups=3), r"n_groups \(3\) must divide num_heads"),
                      (dict(kernel="triton"), "kernel must be one of"),
                      (dict(d_state=0), "d_state must be positive")):
        with pytest.raises(ValueError, match="Mamba3: " + match):
            Mamba3(32, **kw, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_lm_with_mamba3_trains():
    """``pattern="M3,F"`` builds an LM whose every Mamba-3 parameter gets a gradient; a few Adam
    steps on one batch lower its loss."""
    cfg = ModelConfig(vocab_size=48, d_model=32, num_heads=2, pattern="M3,F",
                      blocks={"mamba3": {"d_state": 8, "mimo_rank": 2, "chunk_size": 8}})
    model = LM(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    tokens = jax.random.randint(jax.random.key(3), (4, 17), 0, 48)

    def loss(model):
        logits = model(tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    @nnx.jit
    def step(model, opt):
        value, grads = nnx.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value, grads

    first, grads = step(model, opt)
    flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))}
    assert all(bool(jnp.isfinite(g).all()) for g in flat.values())
    for name in ("b_bias", "c_bias", "dt_bias", "skip", "wtheta", "wgates", "mimo_x", "mimo_z", "mimo_o", "b_norm"):
        assert any(name in k and float(jnp.abs(g).max()) > 0 for k, g in flat.items()), name
    for _ in range(8):
        last, _ = step(model, opt)
    assert np.isfinite(float(last)) and float(last) < float(first) - 0.3, (float(first), float(last))
