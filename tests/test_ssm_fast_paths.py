"""Fast paths of the chunked SSMs (issue 18): Mamba-1's chunk-start reference route and its
fallback, and the hand-written transposes shared by Mamba-2 SSD and Mamba-3
(memjax.memory.chunk_products: times_rows, times_cols, repeat_groups, pair_decays, head_chunk_decays).

References: token-by-token loops written from the papers' recurrences (Gu & Dao 2023 for Mamba-1,
Dao & Gu 2024 for SSD), in float64 (``x64`` fixture), differentiated by JAX, so forward values and
gradients both compare. Tolerances: ``TOL64`` (1e-10 relative) between a chunked form and its
reference in float64; Mamba-1's tame route in float32 at the benchmark's gate magnitudes (chunk
total ``|dt A|`` up to ~32) against the float64 reference: ``F32_TOL`` (measured 1.5e-7 relative,
the recurrent form's float32 error 6.5e-8; the reference point costs about ``|K| eps`` per term).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory import mamba1 as m1
from memjax.memory.mamba1 import mamba1_scan
from memjax.memory.chunk_products import (
    head_chunk_decays,
    pair_decays,
    repeat_groups,
    times_cols,
    times_rows,
)
from memjax.memory.ssm import selective_scan
from tests.helpers import TOL64, rand, rel_err, uniform

F32_TOL = 1e-6


def mamba1_reference(u, dt, A, B, C, s0, segment_ids):
    """``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t`` per channel ``d`` and state ``n`` (reset to 0
    at a segment start), ``y_t = sum_n C_t h_t``; ``B, C [b, T, N]`` shared by all channels.
    (A ``lax.scan`` over tokens: one small compiled step.)"""
    starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)

    def step(h, inp):
        ut, dtt, Bt, Ct, st = inp
        h = jnp.where(st[:, None, None], 0.0, h)
        h = jnp.exp(dtt[..., None] * A) * h + (dtt * ut)[..., None] * Bt[:, None, :]
        return h, jnp.sum(h * Ct[:, None, :], axis=-1)

    tm = lambda v: jnp.swapaxes(v, 0, 1)
    h, y = jax.lax.scan(step, s0, (tm(u), tm(dt), tm(B), tm(C), tm(starts)))
    return tm(y), h


def ssd_reference(x, dt, A, B, C, s0, segment_ids):
    """``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`` per head (state ``[P, N]``, reset at a
    segment start), ``y_t = h_t C_t``; ``B, C [b, T, G, N]`` shared by ``H / G`` heads."""
    r = x.shape[2] // B.shape[2]
    B, C = jnp.repeat(B, r, axis=2), jnp.repeat(C, r, axis=2)
    starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)

    def step(h, inp):
        xt, dtt, Bt, Ct, st = inp
        h = jnp.where(st[:, None, None, None], 0.0, h)
        h = jnp.exp(dtt * A)[..., None, None] * h + (dtt[..., None] * xt)[..., None] * Bt[:, :, None]
        return h, jnp.einsum("bhpn,bhn->bhp", h, Ct)

    tm = lambda v: jnp.swapaxes(v, 0, 1)
    h, y = jax.lax.scan(step, s0, (tm(x), tm(dt), tm(B), tm(C), tm(starts)))
    return tm(y), h


SEG = np.array([[0] * 5 + [1] * 9 + [2] * 3, [4] * 17])  # T = 17 (odd): three documents in row 0


def _mamba1_inputs(dtype, *, strong=False, b=2, t=17, d=6, n=4):
    dt = uniform(1, (b, t, d), 0.02, 0.3, dtype)
    if strong:  # a per-chunk total |dt A| far beyond 0.5 log(float max): the general route
        dt = dt.at[:, 3].set(600.0)
    return dict(u=rand(0, (b, t, d), dtype), dt=dt, A=-jnp.exp(rand(2, (d, n), dtype, scale=0.5)),
                B=rand(3, (b, t, n), dtype), C=rand(4, (b, t, n), dtype), s0=rand(5, (b, d, n), dtype))


def _value_and_grads(fn):
    """Jitted value and gradients (w.r.t. every array argument but the last, the segment ids) of
    ``sum(sin(y)) + sum(state^2)``."""
    def loss(*a):
        y, s = fn(*a)
        return jnp.sum(jnp.sin(y)) + jnp.sum(s * s)
    return jax.jit(lambda *a: jax.value_and_grad(loss, argnums=tuple(range(len(a) - 1)))(*a))


# Compiled once per shape and dtype, shared by the tests (both routes run the same program).
MAMBA1_CHUNKED = _value_and_grads(lambda u, dt, A, B, C, s0, seg: mamba1_scan(
    u, dt, A, B, C, initial_state=s0, segment_ids=seg, mode="chunked", chunk_size=4))
MAMBA1_REFERENCE = _value_and_grads(mamba1_reference)


def _mamba1_args(kw):
    return tuple(kw[k] for k in ("u", "dt", "A", "B", "C", "s0"))


def _tame(kw, segment_ids, chunk_size=4):
    """Whether the chunked form takes the tame route for these inputs (its own predicate)."""
    b, t, d = kw["u"].shape
    return bool(m1._route(kw["dt"].reshape(b, t, 1, d), kw["A"].reshape(1, d, -1), segment_ids, chunk_size)[-1])


@pytest.mark.parametrize("strong", [False, True], ids=["tame", "fallback"])
def test_mamba1_both_routes_match_reference(x64, strong):
    kw = _mamba1_inputs(jnp.float64, strong=strong)
    seg = jnp.asarray(SEG)
    assert _tame(kw, seg) is (not strong)
    got = MAMBA1_CHUNKED(*_mamba1_args(kw), seg)
    ref = MAMBA1_REFERENCE(*_mamba1_args(kw), seg)
    for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert rel_err(a, r) < TOL64


@pytest.mark.slow  # (secondary: tests/test_mamba1.py runs packed rows through the chunked form too)
def test_mamba1_tame_packed_equals_separate(x64):
    """Two documents of 8 tokens packed in one row, chunks of 3 (the reset falls inside a chunk),
    against each document run on its own."""
    kw = _mamba1_inputs(jnp.float64, b=1, t=16)
    assert _tame(kw, None, 3)
    run = jax.jit(lambda u, dt, B, C, seg: mamba1_scan(u, dt, kw["A"], B, C, segment_ids=seg, mode="chunked",
                                                       chunk_size=3))
    args = [kw[k] for k in ("u", "dt", "B", "C")]
    y, s = run(*args, jnp.asarray([[0] * 8 + [1] * 8]))
    docs = [run(*(v[:, lo:lo + 8] for v in args), None) for lo in (0, 8)]
    assert rel_err(y, jnp.concatenate([d[0] for d in docs], 1)) < TOL64
    assert rel_err(s, docs[1][1]) < TOL64


def test_mamba1_tame_float32_at_benchmark_magnitudes(x64):
    """The benchmark's gates: softplus(N(0, 1) - 2) steps, A = -exp(N(0, 1) / 2), chunk 16: each
    chunk's total |dt A| up to ~30 (the reference point's exp(44) bound is not the binding one)."""
    b, t, d, n = 1, 32, 16, 8
    dt = jax.nn.softplus(rand(1, (b, t, d), jnp.float64) - 2.0)
    A = (-jnp.exp(rand(2, (d, n), jnp.float64, scale=0.5))).at[0].set(-4.0)  # one strongly decaying channel
    kw = dict(u=rand(0, (b, t, d), jnp.float64), dt=dt, A=A, B=rand(3, (b, t, n), jnp.float64) * n ** -0.5,
              C=rand(4, (b, t, n), jnp.float64) * n ** -0.5)
    y64, s64 = jax.jit(mamba1_reference)(*kw.values(), jnp.zeros((b, d, n)), jnp.zeros((b, t), int))
    f32 = {k: v.astype(jnp.float32) for k, v in kw.items()}
    assert _tame(f32, None, 16)
    span = np.max(np.asarray(dt).reshape(b, t // 16, 16, d).sum(2), axis=(0, 1)) * np.max(-np.asarray(A), -1)
    assert 10 < span.max() < 44  # within the benchmark's range (its largest: ~32)
    y, s = jax.jit(lambda *a: mamba1_scan(*a, mode="chunked", chunk_size=16))(*f32.values())
    assert rel_err(y, y64) < F32_TOL and rel_err(s, s64) < F32_TOL


def test_ssd_chunked_matches_reference_with_full_decay(x64):
    """Packed documents, an initial state, grouped B / C and a decay whose exp underflows to 0 (a
    per-head reset in head_chunk_decays), forward and every gradient (A included)."""
    b, t, h, g, p, n = 2, 17, 4, 2, 3, 5
    x, B, C = rand(0, (b, t, h, p)), rand(1, (b, t, g, n)), rand(2, (b, t, g, n))
    x, B, C = (v.astype(jnp.float64) for v in (x, B, C))
    dt = uniform(3, (b, t, h), 0.05, 1.0, jnp.float64).at[0, 8, 1].set(500.0)
    A = -jnp.linspace(0.5, 2.0, h)
    s0 = rand(4, (b, h, p, n), jnp.float64)
    seg = jnp.asarray(SEG)

    args = (x, dt, A, B, C, s0, seg)
    got = _value_and_grads(lambda *a: selective_scan(*a[:5], initial_state=a[5], segment_ids=a[6], chunk_size=4))(*args)
    ref = _value_and_grads(ssd_reference)(*args)
    for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert rel_err(a, r) < TOL64


@pytest.mark.slow  # (the SSD and Mamba-3 chunked forms' gradients check them end to end by default)
def test_transposes_match_autodiff(x64):
    """Each hand-written transpose against autodiff of the plain expression (float64)."""
    v, w = rand(0, (2, 3, 4, 5), jnp.float64), rand(1, (2, 3, 4), jnp.float64)
    m, G = rand(2, (2, 3, 4, 4), jnp.float64), jnp.cumsum(-uniform(3, (2, 3, 4), 0.1, 1.0, jnp.float64), -1)
    keep = jnp.tril(jnp.ones((4, 4), bool)) & (jnp.arange(4)[:, None] != 2)
    cases = [(times_rows, lambda v, w: v * w[..., None], (v, w)),
             (times_cols, lambda m, w: m * w[..., None, :], (m, w)),
             (lambda v: repeat_groups(v, 3, axis=1), lambda v: jnp.repeat(v, 3, axis=1), (v,)),
             (lambda v: repeat_groups(v, 2, axis=2), lambda v: jnp.repeat(v, 2, axis=2), (v,)),
             (lambda G: pair_decays(G, keep), lambda G: jnp.where(keep, jnp.exp(G[..., :, None] - G[..., None, :]), 0),
              (G,))]
    for fast, plain, args in cases:
        out, vjp = jax.vjp(fast, *args)
        out_ref, vjp_ref = jax.vjp(plain, *args)
        ct = rand(4, out.shape, jnp.float64)
        assert rel_err(out, out_ref) < TOL64
        for a, r in zip(vjp(ct), vjp_ref(ct)):
            assert rel_err(a, r) < TOL64


def test_head_chunk_decays_masks_before_exp():
    """Strong decays and resets: every factor finite, masked entries exactly 0, the chunk decay 0
    across a reset (float32)."""
    g = jnp.array([[[[-1.0, -200.0, -0.5, -50.0]]]])  # [b, H, Z, C]; exp(-200) is 0 in float32: a reset
    seg = jnp.array([[[False, False, False, True]]])  # a segment starts at position 3
    dec = jax.jit(head_chunk_decays, static_argnums=2)(g, seg, jnp.float32)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in dec)
    L = np.asarray(dec.matrix[0, 0, 0])
    assert L[1, 0] == 0 and L[2, 0] == 0 and L[3, 2] == 0 and L[0, 1] == 0  # reset, segment, causal
    assert L[2, 1] == pytest.approx(np.exp(-0.5)) and L[3, 3] == 1.0
    assert float(dec.chunk[0, 0, 0]) == 0.0
    assert float(dec.from_start[0, 0, 0, 0]) == pytest.approx(np.exp(-1.0)) and float(dec.from_start[0, 0, 0, 1]) == 0


@pytest.mark.slow  # (secondary: tests/test_ssm.py bounds SSD's bf16 error too)
def test_ssd_bf16_error_bounded():
    b, t, h, p, n = 1, 17, 2, 8, 8
    x, B, C = rand(0, (b, t, h, p)), rand(1, (b, t, 1, n), scale=n ** -0.5), rand(2, (b, t, 1, n), scale=n ** -0.5)
    dt, A = uniform(3, (b, t, h), 0.05, 0.5), -jnp.array([1.0, 3.0])
    y32, _ = jax.jit(lambda *a: selective_scan(*a, mode="recurrent"))(x, dt, A, B, C)
    bf16 = [v.astype(jnp.bfloat16) for v in (x, dt, B, C)]
    y16, _ = jax.jit(lambda x, dt, B, C: selective_scan(x, dt, A, B, C, chunk_size=8))(*bf16)
    assert y16.dtype == jnp.bfloat16
    assert rel_err(y16, y32) < 0.05


def test_mamba1_bad_inputs_raise():
    kw = _mamba1_inputs(jnp.float32, b=1, t=5)
    with pytest.raises(TypeError, match="u"):
        mamba1_scan(kw["u"].astype(jnp.int32), kw["dt"], kw["A"], kw["B"], kw["C"], mode="chunked")
    with pytest.raises(ValueError, match="chunk_size"):
        mamba1_scan(kw["u"], kw["dt"], kw["A"], kw["B"], kw["C"], mode="chunked", chunk_size=0)
