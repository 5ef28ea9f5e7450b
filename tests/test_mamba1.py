"""Mamba-1 selective scan (memjax.memory.mamba1) and its block (memjax.nn.mamba1).

References: a token-by-token jnp loop with the semantics of mamba_ssm's ``selective_scan_ref``
(float64 under the ``x64`` fixture, differentiable, so gradients compare too).

Tolerances: forms vs reference in float64: 1e-10 relative (max abs error / max abs reference;
``TOL64``); bf16 inputs vs the float64 reference: ``BF16_TOL_Y`` / ``BF16_TOL_STATE`` (2.5x the
measured errors, see there); the block (float32): decoding and packed runs match the full-sequence call to 1e-4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.memory.mamba1 import mamba1_scan
from tests.helpers import TOL64, rand, rel_err, uniform

MODES = ("chunked", "scan", "recurrent")


def reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None,
              segment_ids=None, xp=np):
    """selective_scan_ref, token by token: ``[b, T, D]`` layout, ``B, C: [b, T, N]`` or ``[b, T, G, N]``.
    ``xp=np``: NumPy float64 (the inputs are converted); ``xp=jnp``: differentiable jnp."""
    if xp is np:
        f64 = lambda v: None if v is None else np.asarray(v, np.float64)
        u, delta, A, B, C, D, z, delta_bias, initial_state = map(
            f64, (u, delta, A, B, C, D, z, delta_bias, initial_state))
        segment_ids = None if segment_ids is None else np.asarray(segment_ids)
    b, t, d = u.shape
    n = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias
    if delta_softplus:
        delta = xp.log1p(xp.exp(delta))
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    reps = d // B.shape[2]
    B, C = xp.repeat(B, reps, axis=2), xp.repeat(C, reps, axis=2)  # [b, T, D, N]
    h = xp.zeros((b, d, n), u.dtype) if initial_state is None else initial_state
    ys = []
    for i in range(t):
        if segment_ids is not None and i > 0:
            h = xp.where((segment_ids[:, i] != segment_ids[:, i - 1])[:, None, None], 0.0, h)
        h = xp.exp(delta[:, i, :, None] * A) * h + (delta[:, i] * u[:, i])[..., None] * B[:, i]
        y = xp.sum(h * C[:, i], axis=-1)
        if D is not None:
            y = y + D * u[:, i]
        if z is not None:
            y = y * z[:, i] / (1 + xp.exp(-z[:, i]))
        ys.append(y)
    return xp.stack(ys, 1), h


def inputs(seed=0, *, b=2, t=37, d=6, n=4, groups=None, full=True, dtype=jnp.float64):
    """Keyword arguments for mamba1_scan / reference. ``groups``: B, C as [b, T, G, N]."""
    ks = iter(range(seed * 100, seed * 100 + 100))
    bc = (b, t, n) if groups is None else (b, t, groups, n)
    kw = dict(u=rand(next(ks), (b, t, d), dtype), delta=uniform(next(ks), (b, t, d), -3.0, 0.5, dtype),
              A=-uniform(next(ks), (d, n), 0.5, 4.0, dtype), B=rand(next(ks), bc, dtype), C=rand(next(ks), bc, dtype))
    if full:
        kw.update(D=rand(next(ks), (d,), dtype), z=rand(next(ks), (b, t, d), dtype),
                  delta_bias=uniform(next(ks), (d,), -2.0, 0.0, dtype), delta_softplus=True)
    else:  # no bias / softplus: delta itself must be positive
        kw["delta"] = uniform(next(ks), (b, t, d), 0.01, 0.5, dtype)
    return kw


def split_static(kw):
    """(arrays, delta_softplus): jit needs the bool static."""
    arrays = {k: v for k, v in kw.items() if k != "delta_softplus"}
    return arrays, kw.get("delta_softplus", False)


# one jitted entry point: calls of the same shapes and options share a compile across tests
scan = jax.jit(mamba1_scan, static_argnames=("delta_softplus", "mode", "chunk_size"))


def run(mode, chunk_size=8, **kw):
    return scan(**kw, mode=mode, chunk_size=chunk_size)


def ref(kw):
    return reference(**kw)


@pytest.mark.parametrize("full,groups", [(True, None), (True, 3), (False, 2)])
def test_forms_match_reference(x64, full, groups):
    kw = inputs(1, groups=groups, full=full)
    kw["initial_state"] = rand(7, (2, 6, 4), jnp.float64)
    y_ref, s_ref = ref(kw)
    for mode in MODES:
        y, s = run(mode, **kw)
        assert y.dtype == jnp.float64 and s.dtype == jnp.float64 and s.shape == (2, 6, 4)
        assert rel_err(y, y_ref) < TOL64, mode
        assert rel_err(s, s_ref) < TOL64, mode


@pytest.mark.parametrize("chunk_size", [1, 64])
def test_chunk_sizes(x64, chunk_size):
    """One-token chunks and a chunk longer than T (the other tests use ragged last chunks)."""
    kw = inputs(2)
    y_ref, s_ref = ref(kw)
    y, s = run("chunked", chunk_size, **kw)
    assert rel_err(y, y_ref) < TOL64 and rel_err(s, s_ref) < TOL64


def test_gradients_match_reference(x64):
    kw = inputs(3, groups=2, t=11)
    kw["initial_state"] = rand(8, (2, 6, 4), jnp.float64)
    arrays, sp = split_static(kw)
    w = rand(9, (2, 11, 6), jnp.float64)
    ws = rand(10, (2, 6, 4), jnp.float64)

    def loss(f):
        def inner(a):
            y, s = f(a)
            return jnp.sum(y * w) + jnp.sum(s * ws)
        return jax.jit(jax.grad(inner))

    g_ref = loss(lambda a: reference(**a, delta_softplus=sp, xp=jnp))(arrays)
    for mode in MODES:
        g = loss(lambda a: mamba1_scan(**a, delta_softplus=sp, mode=mode, chunk_size=4))(arrays)
        for name in arrays:
            assert rel_err(g[name], g_ref[name]) < TOL64, (mode, name)


@pytest.mark.parametrize("mode", ["chunked", "recurrent"])
def test_chaining_two_halves_equals_one_pass(x64, mode):
    kw = inputs(4)
    y, s = run(mode, **kw)
    t1 = 16
    first = {k: (v[:, :t1] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
    second = {k: (v[:, t1:] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
    y1, s1 = run(mode, **first)
    y2, s2 = run(mode, **second, initial_state=s1)
    assert rel_err(jnp.concatenate([y1, y2], 1), y) < TOL64
    assert rel_err(s2, s) < TOL64


@pytest.mark.parametrize("mode", MODES)
def test_packed_equals_separate_documents(x64, mode):
    """Three documents (lengths 11, 9, 17; boundaries inside chunks) of one row; the initial
    state reaches only the first, the final state is the last document's."""
    kw = inputs(5, b=1, groups=2)
    s0 = rand(11, (1, 6, 4), jnp.float64)
    lengths = [11, 9, 17]
    seg = jnp.asarray(np.repeat([3, 1, 3], lengths))[None].astype(jnp.int32)  # a reused id is a new document
    y, s = run(mode, **kw, initial_state=s0, segment_ids=seg)
    y_ref, s_ref = ref(dict(kw, initial_state=s0, segment_ids=seg))
    assert rel_err(y, y_ref) < TOL64 and rel_err(s, s_ref) < TOL64
    parts, start, state = [], 0, s0
    for i, n in enumerate(lengths):
        part = {k: (v[:, start:start + n] if k in ("u", "delta", "B", "C", "z") else v) for k, v in kw.items()}
        yp, sp = run("recurrent", **part, initial_state=state if i == 0 else None)
        parts.append(yp)
        start += n
    assert rel_err(y, jnp.concatenate(parts, 1)) < TOL64
    assert rel_err(s, sp) < TOL64


# bf16 u, delta, B, C, z (float32 A, D, delta_bias) vs the float64 reference on the same (rounded)
# inputs, T = 64, chunk 16: measured max relative error of the bf16 output 1.8e-3 (the same in all
# three forms: the output's own rounding, 2^-9 relative, dominates) and of the float32 final state
# 3.9e-7 (chunked; 5e-8 scan / recurrent). Bounds 2.5x.
BF16_TOL_Y, BF16_TOL_STATE = 4.5e-3, 1e-6


def test_bf16_error_is_bounded():
    kw = inputs(6, groups=3, t=64, d=12, dtype=jnp.bfloat16)
    for k in ("A", "D", "delta_bias"):
        kw[k] = kw[k].astype(jnp.float32)
    y_ref, s_ref = ref(kw)  # NumPy float64 on the rounded inputs
    errs = {}
    for mode in MODES:
        y, s = run(mode, 16, **kw)
        assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
        errs[mode] = (rel_err(y, y_ref), rel_err(s, s_ref))
        assert errs[mode][0] < BF16_TOL_Y and errs[mode][1] < BF16_TOL_STATE, errs


def test_nan_at_t30_leaves_earlier_outputs_bit_identical():
    kw = inputs(7, t=40, dtype=jnp.float32)
    y, _ = run("chunked", 16, **kw)
    for name in ("u", "delta", "B", "C", "z"):
        bad = dict(kw, **{name: kw[name].at[:, 30].set(jnp.nan)})
        yb, sb = run("chunked", 16, **bad)
        np.testing.assert_array_equal(np.asarray(yb[:, :30]), np.asarray(y[:, :30]), err_msg=name)
        assert bool(jnp.isnan(yb[:, 30]).any()), name
        if name in ("u", "delta", "B"):  # a write: the rest of the document is poisoned, the state too
            assert bool(jnp.isnan(yb[:, 39]).all()) and bool(jnp.isnan(sb).all()), name
        else:  # a read: only its own token
            np.testing.assert_array_equal(np.asarray(yb[:, 31:]), np.asarray(y[:, 31:]), err_msg=name)


def test_gradient_of_earlier_outputs_ignores_a_later_nan():
    kw = inputs(8, t=24, dtype=jnp.float32)
    arrays, sp = split_static(kw)
    bad = dict(arrays, u=arrays["u"].at[:, 20].set(jnp.inf), delta=arrays["delta"].at[:, 21].set(jnp.nan))
    grad = jax.jit(jax.grad(lambda a: jnp.sum(mamba1_scan(**a, delta_softplus=sp, chunk_size=8)[0][:, :20])))
    g, gb = grad(arrays), grad(bad)
    for name in arrays:
        assert bool(jnp.isfinite(gb[name]).all()), name
    np.testing.assert_array_equal(np.asarray(gb["u"][:, :20]), np.asarray(g["u"][:, :20]))


def test_strong_decay_stays_finite():
    kw = inputs(9, full=False, dtype=jnp.float32)
    kw["delta"] = kw["delta"] * 1e4  # delta A down to -2e4 per token: exp of sums would overflow
    for mode in MODES:
        y, s = run(mode, 16, **kw)
        assert bool(jnp.isfinite(y).all()) and bool(jnp.isfinite(s).all()), mode


def _ok():
    return dict(u=jnp.zeros((2, 8, 6)), delta=jnp.zeros((2, 8, 6)), A=-jnp.ones((6, 4)), B=jnp.zeros((2, 8, 4)),
                C=jnp.zeros((2, 8, 4)))


@pytest.mark.parametrize("change,match", [
    (dict(u=jnp.zeros((2, 8))), r"u must have shape \[batch, T, D\]"),
    (dict(delta=jnp.zeros((2, 8, 5))), r"delta must have shape \[batch, T, D\] = \(2, 8, 6\)"),
    (dict(A=-jnp.ones((5, 4))), r"A must have shape \[D, N\] = \(6, N\)"),
    (dict(B=jnp.zeros((2, 8, 3))), r"B must have shape \[batch, T, N\] = \(2, 8, 4\)"),
    (dict(C=jnp.zeros((2, 8, 1, 4))), r"C must have shape \[batch, T, N\]"),
    (dict(B=jnp.zeros((2, 8, 4, 4)), C=jnp.zeros((2, 8, 4, 4))),
     r"the number of channels D = 6 .* divisible by the number of groups G = 4"),
    (dict(B=jnp.zeros((2, 8, 2, 4)), C=jnp.zeros((2, 8, 3, 4))), r"C must have shape \[batch, T, G, N\]"),
    (dict(D=jnp.zeros((5,))), r"D must have shape \[D\] = \(6,\)"),
    (dict(z=jnp.zeros((2, 7, 6))), r"z must have shape"),
    (dict(delta_bias=jnp.zeros((6, 1))), r"delta_bias must have shape"),
    (dict(initial_state=jnp.zeros((2, 6, 3))), r"initial_state must have shape \[batch, D, N\] = \(2, 6, 4\)"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), r"segment_ids must have shape"),
    (dict(mode="parallel"), r"mode must be one of"),
    (dict(chunk_size=0), r"chunk_size must be a positive int"),
    (dict(u=jnp.zeros((2, 0, 6)), delta=jnp.zeros((2, 0, 6)), B=jnp.zeros((2, 0, 4)), C=jnp.zeros((2, 0, 4))),
     r"u has an empty time axis"),
])
def test_bad_inputs_raise(change, match):
    with pytest.raises(ValueError, match="mamba1_scan: " + match):
        mamba1_scan(**dict(_ok(), **change))


def test_bad_dtypes_raise_type_error():
    with pytest.raises(TypeError, match="mamba1_scan: u must have a floating dtype"):
        mamba1_scan(**dict(_ok(), u=jnp.zeros((2, 8, 6), jnp.int32)))
    with pytest.raises(TypeError, match="mamba1_scan: B must have a floating dtype"):
        mamba1_scan(**dict(_ok(), B=jnp.zeros((2, 8, 4), jnp.int32)))
    with pytest.raises(TypeError, match="mamba1_scan: segment_ids must have an integer dtype"):
        mamba1_scan(**_ok(), segment_ids=jnp.zeros((2, 8)))


# ----------------------------------------------------------------------------- the block

from memjax.config import ModelConfig  # noqa: E402
from memjax.nn.layers import logical_axes  # noqa: E402
from memjax.nn.mamba1 import Mamba1, Mamba1Cache  # noqa: E402
from memjax.nn.registry import get_block  # noqa: E402

BLOCK_TOL = 1e-4
call = nnx.jit(lambda b, x: b(x))
call_packed = nnx.jit(lambda b, x, seg: b(x, segment_ids=seg))
call_cached = nnx.jit(lambda b, x, cache: b(x, cache=cache))


def test_block_builds_from_d_model_and_rngs_with_mamba_init():
    blk = Mamba1(32, rngs=nnx.Rngs(0))
    assert get_block("M1") is Mamba1 and get_block("mamba1") is Mamba1
    assert blk.d_inner == 64 and blk.n == 16 and blk.dt_rank == 2
    y = call(blk, jax.random.normal(jax.random.key(0), (2, 5, 32)))
    assert y.shape == (2, 5, 32) and y.dtype == jnp.float32 and bool(jnp.isfinite(y).all())
    np.testing.assert_allclose(np.asarray(blk.a_log[...][7]), np.log(np.arange(1, 17)), rtol=1e-6)
    dt = np.asarray(jax.nn.softplus(blk.dt_bias[...]))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    np.testing.assert_array_equal(np.asarray(blk.skip[...]), 1.0)
    for path, var in nnx.to_flat_state(nnx.state(blk, nnx.Param)):
        axes = logical_axes(var)
        assert axes is not None and len(axes) == var[...].ndim, path


def test_block_prefill_then_steps_match_full_sequence():
    """Prefill 2 tokens (fewer than the conv width), prefill 9 more, then 10 single steps."""
    blk = Mamba1(32, d_state=8, mode="chunked", chunk_size=4, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(1), (2, 21, 32))
    y = call(blk, x)
    cache0 = blk.init_cache(2, 32)
    assert isinstance(cache0, Mamba1Cache) and cache0.ssm.shape == (2, 64, 8) and cache0.conv.shape == (2, 3, 64)
    y1, cache = call_cached(blk, x[:, :2], cache0)
    y2, cache = call_cached(blk, x[:, 2:11], cache)
    ys = [y1, y2]
    for t in range(11, 21):
        yt, cache = call_cached(blk, x[:, t:t + 1], cache)
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), y) < BLOCK_TOL
    assert jax.tree.structure(cache) == jax.tree.structure(cache0)
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(cache, cache0))
    with pytest.raises(ValueError, match="segment_ids"):
        blk(x[:, :1], segment_ids=jnp.ones((2, 1), jnp.int32), cache=cache0)


def test_block_packed_equals_separate_documents():
    blk = Mamba1(32, d_state=8, mode="chunked", chunk_size=4, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(2), (1, 27, 32))
    seg = jnp.asarray(np.repeat([1, 2, 3], 9))[None]
    y = call_packed(blk, x, seg)
    parts = [call(blk, x[:, i:i + 9]) for i in (0, 9, 18)]
    assert rel_err(y, jnp.concatenate(parts, 1)) < BLOCK_TOL


def test_block_bad_options_raise():
    with pytest.raises(ValueError, match="Mamba1: mode must be one of"):
        Mamba1(32, mode="conv", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Mamba1: d_state must be positive"):
        Mamba1(32, d_state=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Mamba1: dt_rank must be >= 0"):
        Mamba1(32, dt_rank=-1, rngs=nnx.Rngs(0))


@pytest.mark.slow  # the block's gradients are tested against the reference; tests/test_model_api.py builds it in an LM
def test_lm_with_mamba1_forward_and_gradient():
    """``pattern="M1,F"`` builds an LM; one forward and one gradient (no training run)."""
    from memjax.model.lm import LM
    cfg = ModelConfig(vocab_size=48, d_model=32, num_heads=2, pattern="M1,F", blocks={"mamba1": {"d_state": 8}})
    model = LM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 48)

    @nnx.jit
    def loss_and_grad(model, tokens):
        def loss(model):
            logits = model(tokens[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
        return nnx.value_and_grad(loss)(model)

    loss, grads = loss_and_grad(model, tokens)
    assert np.isfinite(float(loss)) and abs(float(loss) - np.log(48)) < 1.0
    flat = {jax.tree_util.keystr(p): g for p, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))}
    assert all(bool(jnp.isfinite(g).all()) for g in flat.values())
    for name in ("a_log", "dt_bias", "skip", "conv_bias"):  # the scan's parameters learn
        assert any(name in k and float(jnp.abs(g).max()) > 0 for k, g in flat.items()), name
