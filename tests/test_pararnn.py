"""ParaRNN (Danieli et al. 2025): Newton-parallel diagonal GRU / LSTM vs ``lax.scan`` of the cell,
and the scan vs a naive NumPy loop written from the paper's equations.

Reference (float64, token by token, ``s = sigmoid``; the previous state is zero at a segment start):
  GRU:  z = s(x_z + a_z h), r = s(x_r + a_r h), c = tanh(x_c + a_c r h), h' = (1 - z) h + z c
  LSTM: f, i, o = s(x_. + a_. h), u = tanh(x_c + a_c h), c' = f c + i u, h' = o tanh(c')
Tolerances: float64 relative max error <= 1e-10 (outputs, final state, gradients w.r.t. x, the
recurrent weights and initial_state); bf16 vs float32 relative RMSE < 5e-3.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.config import ModelConfig
from memjax.memory.pararnn import GRU, LSTM, pararnn, state_shape
from memjax.model.lm import LM
from memjax.nn.pararnn import ParaGRU, ParaLSTM, ParaRNNCache
from memjax.nn.registry import get_block
from tests.helpers import TOL64, rel_err, rel_rmse

run = jax.jit(pararnn, static_argnums=(0,), static_argnames=("mode", "max_iters", "tol", "return_iters"))
B, T, H, D = 2, 33, 2, 4
SEG = np.repeat([[3] * 9 + [5] * 15 + [3] * 9], B, 0)  # id 3 twice: two documents


def sig(v):
    return 1 / (1 + np.exp(-v))


def naive(cell, params, x, h0, seg):
    """NumPy float64 loop over tokens, written from the equations (not from the module's cells)."""
    x, h0 = np.asarray(x, np.float64), np.asarray(h0, np.float64)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    g = cell.gates
    d = x.shape[-1] // g
    xs = [x[..., j * d:(j + 1) * d] for j in range(g)]
    if cell is GRU:
        h, c = h0.copy(), None
    else:
        c, h = h0[..., 0, :].copy(), h0[..., 1, :].copy()
    out = np.zeros(x.shape[:-1] + (d,))
    for t in range(x.shape[1]):
        if t > 0 and seg is not None:
            start = (seg[:, t] != seg[:, t - 1]).reshape((-1,) + (1,) * (h.ndim - 1))
            h = np.where(start, 0.0, h)
            c = None if c is None else np.where(start, 0.0, c)
        xt = [v[:, t] for v in xs]
        if cell is GRU:
            z = sig(xt[0] + p["a_z"] * h)
            r = sig(xt[1] + p["a_r"] * h)
            cand = np.tanh(xt[2] + p["a_c"] * (r * h))
            h = (1 - z) * h + z * cand
        else:
            f, i, o = (sig(xt[j] + p[n] * h) for j, n in enumerate(("a_f", "a_i", "a_o")))
            c = f * c + i * np.tanh(xt[3] + p["a_c"] * h)
            h = o * np.tanh(c)
        out[:, t] = h
    return out, (h if cell is GRU else np.stack([c, h], axis=-2))


def inputs(cell, *, heads=True, a_scale=1.0, seed=0, t=T):
    r = np.random.default_rng(seed)
    feats = (H,) if heads else ()
    x = r.normal(size=(B, t, *feats, cell.gates * D))
    params = {k: r.uniform(-a_scale, a_scale, size=(*feats, D)) for k in cell.params}
    h0 = r.normal(size=state_shape(cell, B, feats, D)) * 0.5
    return x, params, h0


def loss_grads(cell, params, x, h0, seg, **kw):
    """Outputs, final state, the gradients of a random linear functional of both, and the
    Newton iteration count."""
    r = np.random.default_rng(7)
    y_shape = x.shape[:-1] + (x.shape[-1] // cell.gates,)
    co, cs = jnp.asarray(r.normal(size=y_shape)), jnp.asarray(r.normal(size=np.shape(h0)))

    def loss(p, x, h0):
        y, s, iters = pararnn(cell, p, x, initial_state=h0, segment_ids=seg, return_iters=True, **kw)
        return jnp.sum(y * co) + jnp.sum(s * cs), (y, s, iters)

    (_, (y, s, iters)), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(params, x, h0)
    return y, s, g, int(iters)


@pytest.mark.parametrize("cell", [GRU, LSTM], ids=["gru", "lstm"])
def test_sequential_scan_matches_naive_loop(x64, cell):
    x, p, h0 = inputs(cell)
    seg = jnp.asarray(SEG)
    y, s = run(cell, {k: jnp.asarray(v) for k, v in p.items()}, jnp.asarray(x), initial_state=jnp.asarray(h0),
               segment_ids=seg, mode="sequential")
    y_ref, s_ref = naive(cell, p, x, h0, SEG)
    assert y.dtype == jnp.float64 and s.dtype == jnp.float64
    assert rel_err(y, y_ref) < TOL64 and rel_err(s, s_ref) < TOL64


@pytest.mark.parametrize("cell", [GRU, LSTM], ids=["gru", "lstm"])
def test_newton_matches_sequential_forward_and_gradients(x64, cell):
    x, p, h0 = (jax.tree.map(jnp.asarray, v) for v in inputs(cell, seed=1))
    seg = jnp.asarray(SEG)
    y, s, g, iters = loss_grads(cell, p, x, h0, seg, mode="newton", tol=1e-13)
    y_ref, s_ref, g_ref, _ = loss_grads(cell, p, x, h0, seg, mode="sequential")
    # quadratic convergence: a handful of iterations, far fewer than the T = 33 an exact sweep needs
    assert 2 <= iters <= 10, iters
    assert rel_err(y, y_ref) < TOL64 and rel_err(s, s_ref) < TOL64
    for name, a, b in zip(("params", "x", "initial_state"), g, g_ref):
        for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert float(np.max(np.abs(lb))) > 0, name
            assert rel_err(la, lb) < TOL64, name


def test_newton_iteration_k_fixes_the_first_k_tokens(x64):
    """The system is triangular: ``k`` iterations from zero make tokens ``< k`` exact; 2
    iterations of a strongly nonlinear recurrence are visibly not converged."""
    x, p, h0 = (jax.tree.map(jnp.asarray, v) for v in inputs(GRU, a_scale=3.0, seed=2))
    y_ref, _ = naive(GRU, p, x, h0, None)
    y2, _ = run(GRU, p, x, initial_state=h0, max_iters=2)
    assert rel_err(y2[:, :2], y_ref[:, :2]) < TOL64
    assert rel_err(y2, y_ref) > 1e-6


def test_packed_segments_and_initial_state_chaining(x64):
    """Packed documents == each run alone (the first one from initial_state); three passes of 11
    tokens chained through the final state == the naive loop over all 33."""
    x, p, h0 = (jax.tree.map(jnp.asarray, v) for v in inputs(LSTM, heads=False, seed=3))
    seg = jnp.asarray(np.repeat([[4] * 11 + [2] * 11 + [4] * 11], B, 0))
    y, s = run(LSTM, p, x, initial_state=h0, segment_ids=seg, tol=1e-13)
    parts = [run(LSTM, p, x[:, i:i + 11], initial_state=h0 if i == 0 else jnp.zeros_like(h0), tol=1e-13)
             for i in (0, 11, 22)]
    assert rel_err(y, jnp.concatenate([q[0] for q in parts], 1)) < TOL64
    assert rel_err(s, parts[-1][1]) < TOL64
    state, ys = h0, []
    for i in (0, 11, 22):
        yi, state = run(LSTM, p, x[:, i:i + 11], initial_state=state, tol=1e-13)
        ys.append(yi)
    y_ref, s_ref = naive(LSTM, p, x, h0, None)
    assert rel_err(jnp.concatenate(ys, 1), y_ref) < TOL64 and rel_err(state, s_ref) < TOL64


def test_bf16_inputs_error_bounded_and_nonfinite_document_isolated():
    x, p, _ = inputs(GRU, seed=5)
    x32 = jnp.asarray(x, jnp.float32)
    p32 = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    seg = jnp.asarray(SEG)
    y32, s32 = run(GRU, p32, x32, segment_ids=seg, tol=1e-6)
    y16, s16 = run(GRU, p32, x32.astype(jnp.bfloat16), segment_ids=seg, tol=1e-6)
    assert y16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32  # state accumulated in float32
    assert rel_rmse(y16, y32) < 5e-3 and rel_rmse(s16, s32) < 5e-3  # measured 1.9e-3, 1.2e-3
    # a NaN inside document 2 (tokens 9..23) never reaches documents 1 and 3, nor stops their solve
    y_bad, s_bad = run(GRU, p32, x32.at[:, 12].set(jnp.nan), segment_ids=seg, tol=1e-6)
    np.testing.assert_array_equal(np.asarray(y_bad[:, :9]), np.asarray(y32[:, :9]))
    np.testing.assert_array_equal(np.asarray(y_bad[:, 24:]), np.asarray(y32[:, 24:]))
    np.testing.assert_array_equal(np.asarray(s_bad), np.asarray(s32))
    assert bool(jnp.isnan(y_bad[:, 12:24]).all())


def test_bad_inputs_raise():
    x, p, h0 = (jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), v) for v in inputs(GRU))
    with pytest.raises(TypeError, match="cell must be"):
        pararnn("gru", p, x)
    with pytest.raises(ValueError, match="mode must be one of"):
        pararnn(GRU, p, x, mode="parallel")
    with pytest.raises(ValueError, match="max_iters must be a positive int"):
        pararnn(GRU, p, x, max_iters=0)
    with pytest.raises(ValueError, match="tol must be None or a non-negative"):
        pararnn(GRU, p, x, tol=-1.0)
    with pytest.raises(ValueError, match="multiple of the gru cell's 3 gates"):
        pararnn(GRU, p, x[..., :-1])
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, H, G\*D\]"):
        pararnn(GRU, p, x[0, 0])
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        pararnn(GRU, p, x.astype(jnp.int32))
    with pytest.raises(ValueError, match="params must be a dict with the keys"):
        pararnn(LSTM, p, jnp.zeros((B, T, H, 4 * D)))
    with pytest.raises(ValueError, match=r"params\['a_z'\] must have shape \[H, D\] = \(2, 4\)"):
        pararnn(GRU, {**p, "a_z": p["a_z"][0]}, x)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, D\] = \(2, 2, 4\)"):
        pararnn(GRU, p, x, initial_state=h0[:, 0])
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, 2, D\]"):
        pararnn(LSTM, {k: p["a_z"] for k in LSTM.params}, jnp.zeros((B, T, H, 4 * D)), initial_state=h0)
    with pytest.raises(TypeError, match="segment_ids must have an integer dtype"):
        pararnn(GRU, p, x, segment_ids=jnp.zeros((B, T)))


# ----------------------------------------------------------------------------------------------- blocks

call = nnx.jit(lambda b, x: b(x))
call_packed = nnx.jit(lambda b, x, seg: b(x, segment_ids=seg))
call_cached = nnx.jit(lambda b, x, cache: b(x, cache=cache))


def test_block_prefill_then_steps_match_forward():
    assert get_block("PL") is ParaLSTM and get_block("pararnn_lstm") is ParaLSTM
    assert get_block("PG") is ParaGRU and get_block("pararnn_gru") is ParaGRU
    blk = ParaLSTM(16, num_heads=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 13, 16))
    y = call(blk, x)
    cache0 = blk.init_cache(2, 16)
    assert isinstance(cache0, ParaRNNCache) and cache0.rnn.shape == (2, 2, 2, 8) and cache0.rnn.dtype == jnp.float32
    # token by token (the sequential cell step) == the Newton forward; prefill with T > 1 continues
    # from initial_state, which test_packed_segments_and_initial_state_chaining covers
    ys, cache = [], cache0
    for t in range(13):
        yt, cache = call_cached(blk, x[:, t:t + 1], cache)
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), y) < 1e-5
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(cache, cache0))
    with pytest.raises(ValueError, match="segment_ids"):
        blk(x[:, :1], segment_ids=jnp.ones((2, 1), jnp.int32), cache=cache0)


def test_block_packed_equals_separate_documents():
    blk = ParaGRU(16, num_heads=2, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(1), (1, 18, 16))
    seg = jnp.asarray(np.repeat([1, 2], 9))[None]
    y = call_packed(blk, x, seg)
    parts = [call(blk, x[:, i:i + 9]) for i in (0, 9)]
    assert rel_err(y, jnp.concatenate(parts, 1)) < 1e-5


def test_block_bad_options_raise():
    with pytest.raises(ValueError, match="ParaGRU: mode must be one of"):
        ParaGRU(16, mode="parallel", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ParaLSTM: max_iters must be positive"):
        ParaLSTM(16, max_iters=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ParaGRU(16, num_heads=3, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_block_prefill_and_lm_gradient():
    """Prefill (Newton with initial_state) then steps; an LM with pattern "PG,F" gets finite
    gradients on the recurrent weights."""
    blk = ParaGRU(16, num_heads=2, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(2), (2, 13, 16))
    y = call(blk, x)
    y1, cache = call_cached(blk, x[:, :7], blk.init_cache(2, 16))
    ys = [y1]
    for t in range(7, 13):
        yt, cache = call_cached(blk, x[:, t:t + 1], cache)
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), y) < 1e-5
    cfg = ModelConfig(vocab_size=48, d_model=32, num_heads=2, pattern="PG,F")
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
    for name in ("a_z", "a_r", "a_c"):
        assert any(name in k and float(jnp.abs(g).max()) > 0 for k, g in flat.items()), name
