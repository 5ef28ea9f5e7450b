"""The diagonal-plus-low-rank delta rule (memjax.memory.dplr) and the RWKV-7 block (memjax.nn.rwkv7).

Reference (float64, token by token, written from the equation with the transition as a matrix)::

    S_t = (diag(exp g_t) + b_t a_t^T) S_{t-1} + k_t v_t^T,     o_t = scale S_t^T q_t

with the state zeroed where a new segment starts (before that token's transition). Tolerance:
relative max error <= 1e-10 in float64 (outputs, final states, gradients w.r.t. q, k, v, a, b, g
and the initial state). Two regimes: RWKV-7's (``a = -kappa``, ``b = kappa * a_gate``, unit
``kappa``, ``g in (-e^{-1/2}, 0)``) and random small ``a, b`` with stronger decays.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.memory.dplr import dplr_delta_rule
from memjax.memory.linear import linear_attention
from memjax.nn.layers import token_shift
from memjax.nn.registry import get_block
from memjax.nn.rwkv7 import RWKV7
from memjax.nn.vector_gated import RWKV6Cache
from tests.helpers import TOL64, largest_intermediate, rel_err

dplr = jax.jit(dplr_delta_rule, static_argnames=("mode", "chunk_size"))


def reference(q, k, v, a, b, g, s0, seg, scale):
    """Token scan from the equation; ``g: [B, T, H, K]`` or ``[B, T, H]``."""
    bsz, t, h, dk = q.shape
    g = jnp.broadcast_to(g if g.ndim == 4 else g[..., None], q.shape)
    trans = jnp.exp(g)[..., :, None] * jnp.eye(dk, dtype=q.dtype) + b[..., :, None] * a[..., None, :]  # [B,T,H,K,K]
    keep = jnp.ones((bsz, t), q.dtype) if seg is None else jnp.concatenate(
        [jnp.ones((bsz, 1), q.dtype), (seg[:, 1:] == seg[:, :-1]).astype(q.dtype)], 1)

    def step(S, inp):
        qt, kt, vt, mt, kp = inp
        S = jnp.einsum("bhij,bhjv->bhiv", mt, S * kp[:, None, None, None]) + jnp.einsum("bhk,bhv->bhkv", kt, vt)
        return S, scale * jnp.einsum("bhkv,bhk->bhv", S, qt)

    tm = lambda x: jnp.moveaxis(x, 1, 0)
    S, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(trans), tm(keep)))
    return tm(o), S


def make(B=2, T=37, H=2, K=4, V=3, seed=0, regime="rwkv", per_head=False, dtype=np.float64):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, B, T, H, K))
    v = r.normal(size=(B, T, H, V))
    if regime == "rwkv":
        kappa = r.normal(size=(B, T, H, K))
        kappa /= np.linalg.norm(kappa, axis=-1, keepdims=True)
        gate = 1 / (1 + np.exp(-r.normal(size=(B, T, H, 1))))
        a, b = -kappa, kappa * gate
        g = -np.exp(-0.5) / (1 + np.exp(-2 * r.normal(size=(B, T, H, K))))
    else:  # random small a, b, decays down to -2 per step
        a, b = 0.3 * r.normal(size=(2, B, T, H, K))
        g = -2 * r.uniform(0.0, 1.0, size=(B, T, H, K)) ** 2
    if per_head:
        g = g[..., 0]
    s0 = r.normal(size=(B, H, K, V))
    co, cs = r.normal(size=(B, T, H, V)), r.normal(size=(B, H, K, V))
    cast = lambda x: jnp.asarray(np.asarray(x, dtype))
    return tuple(cast(x) for x in (q, k, v, a, b, g, s0, co, cs))


def grads_of(fn, q, k, v, a, b, g, s0, co, cs):
    """``(o, s, grads)`` of ``sum(o co) + sum(s cs)`` w.r.t. q, k, v, a, b, g, s0 (jitted)."""
    def loss(*args):
        o, s = fn(*args)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

    (_, (o, s)), gr = jax.jit(jax.value_and_grad(loss, tuple(range(7)), has_aux=True))(q, k, v, a, b, g, s0)
    return o, s, gr


def ours(mode, chunk=16, seg=None):
    return lambda q, k, v, a, b, g, s0: dplr(q, k, v, a, b, g, initial_state=s0, segment_ids=seg, mode=mode,
                                             chunk_size=chunk)


def ref_fn(seg=None):
    return lambda q, k, v, a, b, g, s0: reference(q, k, v, a, b, g, s0, seg, q.shape[-1] ** -0.5)


def assert_all_close(got, want, tol, what=""):
    for i, (x, y) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        assert rel_err(x, y) <= tol, (what, i, rel_err(x, y))


SEG = np.repeat([[0, 1, 2, 3], [5, 5, 6, 7]], [9, 7, 16, 5], axis=1)  # starts inside and at chunk edges


# ----------------------------------------------------------------------------- forms vs reference


@pytest.mark.parametrize("regime,per_head,packed", [
    ("random", False, True),
    pytest.param("rwkv", False, False, marks=pytest.mark.slow),
    pytest.param("rwkv", True, True, marks=pytest.mark.slow)])
def test_chunked_recurrent_reference_agree_with_gradients(x64, regime, per_head, packed):
    # T = 37 with chunk 16: a padded tail; K = 4 channels with different decays.
    args = make(regime=regime, per_head=per_head)
    seg = jnp.asarray(SEG) if packed else None
    want = grads_of(ref_fn(seg), *args)
    for mode in ("chunked", "recurrent"):
        assert_all_close(grads_of(ours(mode, seg=seg), *args), want, TOL64, mode)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [7, 12, 64])
def test_chunk_sizes_and_larger_heads(x64, chunk):
    """Chunks of odd length (7: explicit base blocks of 7), 12 (= 3 * 4: two levels and base blocks
    of 3) and one chunk longer than T; K = 16 > V = 8."""
    q, k, v, a, b, g, s0, _, _ = make(K=16, V=8, regime="random", seed=3)
    want = reference(q, k, v, a, b, g, s0, None, 0.25)
    assert_all_close(dplr(q, k, v, a, b, g, initial_state=s0, mode="chunked", chunk_size=chunk), want, TOL64)


@pytest.mark.slow
def test_initial_state_chaining(x64):
    q, k, v, a, b, g, s0, _, _ = make(regime="random", seed=1)
    for mode in ("chunked", "recurrent"):
        o, s = dplr(q, k, v, a, b, g, initial_state=s0, mode=mode, chunk_size=16)
        first = lambda x: x[:, :20]
        last = lambda x: x[:, 20:]
        o1, s1 = dplr(*map(first, (q, k, v, a, b, g)), initial_state=s0, mode=mode, chunk_size=16)
        o2, s2 = dplr(*map(last, (q, k, v, a, b, g)), initial_state=s1, mode=mode, chunk_size=16)
        assert_all_close((jnp.concatenate([o1, o2], 1), s2), (o, s), TOL64, mode)


@pytest.mark.slow
def test_packed_segments_equal_separate_documents(x64):
    q, k, v, a, b, g, _, _, _ = make(B=1, T=30, seed=2)
    seg = jnp.asarray(np.repeat([[3, 1, 3]], [11, 13, 6], axis=1))  # id 3 twice: two documents
    for mode in ("chunked", "recurrent"):
        o, s = dplr(q, k, v, a, b, g, segment_ids=seg, mode=mode, chunk_size=8)
        parts = [dplr(*(x[:, lo:hi] for x in (q, k, v, a, b, g)), mode=mode, chunk_size=8)
                 for lo, hi in ((0, 11), (11, 24), (24, 30))]
        assert_all_close((o, s), (jnp.concatenate([p[0] for p in parts], 1), parts[-1][1]), TOL64, mode)


def test_zero_low_rank_is_gated_linear_attention(x64):
    q, k, v, a, b, g, s0, _, _ = make(seed=4)
    want = linear_attention(q, k, v, g=g, initial_state=s0, mode="recurrent")
    for mode in ("chunked", "recurrent"):
        got = dplr(q, k, v, jnp.zeros_like(a), jnp.zeros_like(b), g, initial_state=s0, mode=mode, chunk_size=16)
        assert_all_close(got, want, TOL64, mode)


@pytest.mark.slow
def test_no_decay_and_explicit_scale(x64):
    q, k, v, a, b, g, s0, _, _ = make(seed=5)
    want = reference(q, k, v, a, b, jnp.zeros_like(g), s0, None, 1.0)
    for mode in ("chunked", "recurrent"):
        got = dplr_delta_rule(q, k, v, a, b, None, scale=1.0, initial_state=s0, mode=mode, chunk_size=8)
        assert_all_close(got, want, TOL64, mode)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.slow
def test_strong_and_infinite_decays_stay_finite_float32():
    """Log decays of -30 per step (the whole-chunk factorisation would overflow float32 at once)
    and -inf (that channel's diagonal part drops to 0; the rank-one read still sees the state):
    finite outputs and gradients, chunked == recurrent."""
    q, k, v, a, b, g, s0, co, cs = make(T=40, regime="random", dtype=np.float32)
    g = jnp.full_like(g, -30.0).at[:, ::3].set(-1e-3).at[0, 10, 1, 2].set(-jnp.inf).at[1, 17, 0, :].set(-jnp.inf)
    res = {m: grads_of(ours(m), q, k, v, a, b, g, s0, co, cs) for m in ("chunked", "recurrent")}
    for leaf in jax.tree.leaves(res):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert_all_close(res["chunked"][:2], res["recurrent"][:2], 1e-5)
    assert_all_close(res["chunked"][2], res["recurrent"][2], 1e-4)


@pytest.mark.slow
def test_float32_long_rwkv_regime_is_accurate():
    """T = 300, chunk 64, K = V = 16 in float32: chunked vs the float64 reference."""
    args = make(B=1, T=300, H=2, K=16, V=16, seed=6)
    with jax.enable_x64(True):
        want = reference(*args[:7], None, 0.25)
    f32 = [x.astype(jnp.float32) for x in args[:7]]
    for mode in ("chunked", "recurrent"):
        o, s = dplr(*f32[:6], initial_state=f32[6], mode=mode, chunk_size=64)
        assert o.dtype == jnp.float32 and s.dtype == jnp.float32
        assert rel_err(o, want[0]) < 2e-5 and rel_err(s, want[1]) < 2e-5, (mode, rel_err(o, want[0]))


def test_bf16_inputs_are_close_to_float64():
    args = make(seed=7)
    with jax.enable_x64(True):
        want = reference(*args[:7], None, 0.5)
    bf = lambda x: x.astype(jnp.bfloat16)
    q, k, v, a, b = (bf(x) for x in args[:5])
    for mode in ("chunked", "recurrent"):
        o, s = dplr(q, k, v, a, b, args[5].astype(jnp.float32), initial_state=args[6].astype(jnp.float32),
                    mode=mode, chunk_size=16)
        assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
        # bf16 rounding of q, k, v, a, b (2^-8 relative) and of the output
        assert rel_err(o, want[0]) < 3e-2 and rel_err(s, want[1]) < 3e-2, (mode, rel_err(o, want[0]))


@pytest.mark.slow
def test_nonfinite_later_token_stays_causal():
    q, k, v, a, b, g, _, _, _ = make(dtype=np.float32)
    for mode in ("chunked", "recurrent"):
        o, _ = dplr(q, k, v, a, b, g, mode=mode, chunk_size=16)
        ob, sb = dplr(q, k, v, a.at[0, 20, 1, 2].set(jnp.nan), b, g.at[0, 25, 0, 0].set(jnp.inf), mode=mode,
                      chunk_size=16)
        np.testing.assert_array_equal(ob[0, :20], o[0, :20])
        np.testing.assert_array_equal(ob[0, :25, 0], o[0, :25, 0])
        np.testing.assert_array_equal(ob[1], o[1])
        assert bool(jnp.all(jnp.isnan(ob[0, 20:, 1]))) and bool(jnp.all(jnp.isnan(sb[0, 1])))
        # the gradient of the earlier outputs ignores the later NaN
        loss = lambda a: jnp.sum(dplr(q, k, v, a, b, g, mode=mode, chunk_size=16)[0][:, :20])
        ga = jax.grad(loss)(a.at[0, 20, 1, 2].set(jnp.nan))
        np.testing.assert_array_equal(ga, jax.grad(loss)(a))


def test_no_per_token_state_in_the_chunked_form():
    q, k, v, a, b, g, s0, _, _ = make(B=1, T=64, H=1, K=8, V=8, dtype=np.float32)
    fn = lambda *x: dplr_delta_rule(*x, mode="chunked", chunk_size=16)
    # per token states would be T K V = 4096 numbers; per chunk (N = 4) K V = 64 each
    assert largest_intermediate(fn, q, k, v, a, b, g) < 64 * 8 * 8


@pytest.mark.parametrize("change, err, match", [
    (dict(a=jnp.zeros((2, 37, 2, 3))), ValueError, r"dplr_delta_rule: a must have shape \[B, T, H, K\]"),
    (dict(b=jnp.zeros((2, 37, 2, 4), jnp.int32)), TypeError, "dplr_delta_rule: b must have a floating"),
    (dict(g=jnp.zeros((2, 37, 2, 3))), ValueError, r"dplr_delta_rule: g must have shape \[B, T, H\]"),
    (dict(initial_state=jnp.zeros((2, 2, 4, 4))), ValueError, "initial_state"),
    (dict(mode="parallel"), ValueError, "mode"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(seq_axis="seq"), ValueError, "seq_axis 'seq' is not a mapped axis"),
    (dict(segment_ids=jnp.zeros((2, 37))), TypeError, "segment_ids"),
])
def test_bad_inputs_raise(change, err, match):
    q, k, v, a, b, g, _, _, _ = make(dtype=np.float32)
    kw = dict(q=q, k=k, v=v, a=a, b=b, g=g)
    kw.update(change)
    with pytest.raises(err, match=match):
        args = [kw.pop(n) for n in ("q", "k", "v", "a", "b", "g")]
        dplr_delta_rule(*args, **kw)


# ----------------------------------------------------------------------------- RWKV-7 block

call = nnx.jit(lambda m, x: m(x))
call_packed = nnx.jit(lambda m, x, s: m(x, segment_ids=s))
call_cached = nnx.jit(lambda m, x, c: m(x, cache=c))


def test_block_registered_defaults_and_bad_options():
    assert get_block("rwkv7") is RWKV7 and get_block("R7") is RWKV7
    blk = RWKV7(d_model=64, rngs=nnx.Rngs(0))  # d_model and rngs suffice
    assert (blk.h, blk.dk, blk.w1.shape[1], blk.g1.shape[1]) == (4, 16, 32, 32)
    with pytest.raises(ValueError, match="RWKV7: num_heads"):
        RWKV7(d_model=30, num_heads=7, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="RWKV7: mode must be one of"):
        RWKV7(d_model=32, mode="parallel", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="RWKV7: decay_rank must be positive"):
        RWKV7(d_model=32, decay_rank=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="RWKV7: num_heads \\* head_dim must equal d_model"):
        RWKV7(d_model=32, num_heads=2, head_dim=8, rngs=nnx.Rngs(0))


def test_block_memory_inputs_follow_rwkv7():
    blk = RWKV7(d_model=32, num_heads=2, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (2, 9, 32))
    r, k, v, a, b, g, gate = blk._time_mix(x, token_shift(x, None, None))
    kappa = -a
    np.testing.assert_allclose(jnp.linalg.norm(kappa, axis=-1), 1.0, rtol=1e-4)
    a_gate = b / kappa  # b = kappa * a_gate with a_gate in (0, 1), one per channel
    assert float(a_gate.min()) > 0 and float(a_gate.max()) < 1
    assert float(g.max()) < 0 and float(g.min()) > -np.exp(-0.5)


def test_block_prefill_then_steps_equal_forward():  # rwkv7's default decode test (tests/test_decoding.py: slow)
    blk = RWKV7(d_model=32, num_heads=2, chunk_size=4, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(1), (2, 11, 32))
    y = call(blk, x)
    rec = RWKV7(d_model=32, num_heads=2, mode="recurrent", rngs=nnx.Rngs(2))
    assert rel_err(call(rec, x), y) < 1e-5
    cache0 = blk.init_cache(2, 16)
    assert isinstance(cache0, RWKV6Cache) and cache0.memory.shape == (2, 2, 16, 16)
    y1, cache = call_cached(blk, x[:, :6], cache0)
    ys = [y1]
    for t in range(6, 11):
        yt, cache = call_cached(blk, x[:, t:t + 1], cache)
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), y) < 1e-5
    assert jax.tree.structure(cache) == jax.tree.structure(cache0)
    with pytest.raises(ValueError, match="segment_ids"):
        blk(x[:, :1], segment_ids=jnp.ones((2, 1), jnp.int32), cache=cache0)


@pytest.mark.slow
def test_block_packed_equals_separate_documents():
    blk = RWKV7(d_model=32, num_heads=2, chunk_size=4, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(2), (1, 14, 32))
    y = call_packed(blk, x, jnp.asarray([[4] * 6 + [1] * 8]))
    assert rel_err(y[:, :6], call(blk, x[:, :6])) < 1e-5
    assert rel_err(y[:, 6:], call(blk, x[:, 6:])) < 1e-5


@pytest.mark.slow
def test_block_gradients_reach_every_parameter():
    blk = RWKV7(d_model=32, num_heads=2, chunk_size=8, rngs=nnx.Rngs(4))
    x = jax.random.normal(jax.random.key(3), (2, 10, 32))
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2)))(blk)
    flat = nnx.to_flat_state(nnx.state(grads, nnx.Param))
    assert len(flat) > 10
    for path, leaf in flat:
        val = leaf[...] if hasattr(leaf, "__getitem__") else leaf
        assert bool(jnp.all(jnp.isfinite(val))), path
        if path[-1] != "r_k":  # (r_k starts at zero but its gradient need not vanish: checked anyway)
            assert float(jnp.abs(val).max()) > 0, path


@pytest.mark.slow
def test_two_layer_rwkv7_model_learns_mqar():
    from tiny import mqar_first_last

    first, last = mqar_first_last("R7,R7", {"rwkv7": {"chunk_size": 16}}, steps=40, lr=1e-2)
    assert last < first - 0.5, (first, last)
