"""Kimi Delta Attention: ``delta_rule`` with a per-key-channel ``g`` and grouped value heads; the
kda block.

Reference (float64, token by token, written from the equation; q/k head ``j // (HV / H)`` serves
value head ``j``)::

    S' = diag(exp g_t) S_{t-1}  (zeroed at a new segment);  S_t = S' + k_t (beta_t (v_t - S'^T k_t))^T;
    o_t = scale S_t^T q_t

Tolerance: relative max error <= 1e-10 in float64 (outputs, final states and the gradients w.r.t.
q, k, v, beta, g and the initial state).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from memjax.config import ModelConfig
from memjax.memory.delta import delta_rule
from memjax.model.lm import LM
from memjax.nn.associative import AssociativeCache
from memjax.nn.kda import GatedDeltaNet2, KimiDeltaAttention
from memjax.nn.registry import get_block
from tests.helpers import TOL64, largest_intermediate, rel_err

dr = jax.jit(delta_rule, static_argnames=("mode", "chunk_size"))


def reference(q, k, v, beta, g, s0, seg, scale):
    """Token scan from the equation (``g``: ``[B, T, HV, K]`` or ``[B, T, HV]``)."""
    b, t, h, _ = q.shape
    hv = v.shape[2]
    q, k = (jnp.repeat(x, hv // h, axis=2) for x in (q, k))
    e = jnp.exp(g)
    dec = e[..., :, None] if e.ndim == 4 else e[..., None, None]  # [B, T, HV, K or 1, 1]
    keep = jnp.ones((b, t), q.dtype) if seg is None else jnp.concatenate(
        [jnp.ones((b, 1), q.dtype), (seg[:, 1:] == seg[:, :-1]).astype(q.dtype)], 1)

    def step(S, inp):
        qt, kt, vt, bt, dt, kp = inp
        S = S * dt * kp[:, None, None, None]
        pred = jnp.einsum("bhkv,bhk->bhv", S, kt)
        S = S + jnp.einsum("bhk,bhv->bhkv", kt, bt[..., None] * (vt - pred))
        return S, scale * jnp.einsum("bhkv,bhk->bhv", S, qt)

    tm = lambda x: jnp.moveaxis(x, 1, 0)
    S, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(beta), tm(dec), tm(keep)))
    return tm(o), S


def make(B=2, T=37, H=2, HV=2, K=4, V=3, seed=0, beta_range=(0.05, 0.95), vector=True, dtype=np.float64):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, B, T, H, K))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)  # as the block feeds it
    v = r.normal(size=(B, T, HV, V))
    beta = r.uniform(*beta_range, size=(B, T, HV))
    g = -2 * r.uniform(0.0, 1.0, size=(B, T, HV, K) if vector else (B, T, HV)) ** 2
    s0 = r.normal(size=(B, HV, K, V))
    co, cs = r.normal(size=(B, T, HV, V)), r.normal(size=(B, HV, K, V))
    return tuple(jnp.asarray(np.asarray(x, dtype)) for x in (q, k, v, beta, g, s0, co, cs))


def grads_of(fn, q, k, v, beta, g, s0, co, cs):
    """``(o, s, grads)`` of ``sum(o co) + sum(s cs)`` w.r.t. q, k, v, beta, g, s0 (jitted)."""
    def loss(q, k, v, beta, g, s0):
        o, s = fn(q, k, v, beta, g, s0)
        return jnp.sum(o * co) + jnp.sum(s * cs), (o, s)

    (_, (o, s)), gr = jax.jit(jax.value_and_grad(loss, tuple(range(6)), has_aux=True))(q, k, v, beta, g, s0)
    return o, s, gr


def ours(mode, chunk=16, seg=None):
    return lambda q, k, v, beta, g, s0: delta_rule(q, k, v, beta, g=g, initial_state=s0, segment_ids=seg,
                                                   mode=mode, chunk_size=chunk)


def assert_all_close(got, want, tol, what=""):
    for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        assert rel_err(a, b) <= tol, (what, i, rel_err(a, b))


SEG = np.repeat([[0, 1, 2, 3], [5, 5, 6, 7]], [9, 7, 16, 5], axis=1)  # starts inside and at chunk edges


# ----------------------------------------------------------------------------- forms vs reference


@pytest.mark.parametrize("HV,packed,beta_range,forms", [
    pytest.param(2, False, (0.05, 0.95), [("recurrent", 16), ("chunked", 16)], marks=pytest.mark.slow),
    (4, True, (0.05, 0.95), [("recurrent", 16), ("chunked", 16)]),
    pytest.param(2, True, (1.9, 2.0), [("chunked", 7), ("chunked", 64), ("recurrent", 1)], marks=pytest.mark.slow),
])
def test_forms_match_reference_with_gradients(x64, HV, packed, beta_range, forms):
    """T = 37: chunk 16 pads the tail, 7 is prime (one-position sub-chunks), 64 is one chunk of four
    sub-chunks. HV = 4 value heads share 2 q/k heads. beta near 2: negative eigenvalues."""
    args = make(HV=HV, beta_range=beta_range)
    seg = jnp.asarray(SEG) if packed else None
    want = grads_of(lambda q, k, v, b, g, s0: reference(q, k, v, b, g, s0, seg, 0.5), *args)
    for mode, c in forms:
        assert_all_close(grads_of(ours(mode, c, seg), *args), want, TOL64, (mode, c))


@pytest.mark.slow
def test_initial_state_chaining(x64):
    q, k, v, beta, g, s0, _, _ = make(HV=4)
    o, s = dr(q, k, v, beta, g=g, initial_state=s0, chunk_size=16)
    a, b = slice(0, 20), slice(20, None)
    o1, s1 = dr(q[:, a], k[:, a], v[:, a], beta[:, a], g=g[:, a], initial_state=s0, chunk_size=16)
    o2, s2 = dr(q[:, b], k[:, b], v[:, b], beta[:, b], g=g[:, b], initial_state=s1, chunk_size=16)
    assert_all_close((jnp.concatenate([o1, o2], 1), s2), (o, s), TOL64)


@pytest.mark.slow
def test_packed_segments_equal_separate_documents(x64):
    q, k, v, beta, g, s0, _, _ = make(B=1, T=30)
    lengths = [11, 13, 6]
    seg = jnp.asarray(np.repeat([3, 1, 3], lengths))[None]
    for mode in ("chunked", "recurrent"):
        o, s = dr(q, k, v, beta, g=g, initial_state=s0, segment_ids=seg, mode=mode, chunk_size=8)
        parts, start = [], 0
        for i, n in enumerate(lengths):
            sl = slice(start, start + n)
            oi, si = dr(q[:, sl], k[:, sl], v[:, sl], beta[:, sl], g=g[:, sl], initial_state=s0 if i == 0 else None,
                        mode=mode, chunk_size=8)
            parts.append(oi)
            start += n
        assert_all_close((o, s), (jnp.concatenate(parts, 1), si), TOL64, mode)


@pytest.mark.slow
def test_grouped_value_heads_scalar_g_equal_repeated_qk(x64):
    """The per-head (scalar g) path with HV = 2 H: == repeating q and k, gradients included."""
    args = make(HV=4, vector=False)
    rep = lambda x: jnp.repeat(x, 2, axis=2)
    for mode in ("chunked", "recurrent"):
        got = grads_of(ours(mode), *args)
        o, s, (dq, dk, dv, db, dg, ds0) = grads_of(lambda q, k, *a: ours(mode)(rep(q), rep(k), *a), *args)
        assert_all_close(got, (o, s, (dq, dk, dv, db, dg, ds0)), TOL64, mode)
    q, k, v, beta, g, s0, _, _ = args
    want = reference(q, k, v, beta, g, s0, None, 0.5)
    assert_all_close(dr(q, k, v, beta, g=g, initial_state=s0, chunk_size=16), want, TOL64)


@pytest.mark.slow
def test_minus_inf_resets_a_channel(x64):
    q, k, v, beta, g, s0, co, cs = make()
    g = g.at[0, 10, 0, 1].set(-jnp.inf).at[1, 16, 1, :].set(-jnp.inf).at[0, 31, 1, 3].set(-jnp.inf)
    want = reference(q, k, v, beta, g, s0, None, 0.5)
    for mode in ("chunked", "recurrent"):
        o, s, gr = grads_of(ours(mode), q, k, v, beta, g, s0, co, cs)
        assert_all_close((o, s), want, TOL64, mode)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in gr[:4] + gr[5:]), mode


@pytest.mark.slow
def test_strong_decay_is_finite_float32():
    q, k, v, beta, g, s0, co, cs = make(T=40, dtype=np.float32)
    g = jnp.full_like(g, -30.0).at[:, ::3].set(-1e-3)  # exp(-30 * 16) underflows if ever formed
    res = {m: grads_of(ours(m), q, k, v, beta, g, s0, co, cs) for m in ("chunked", "recurrent")}
    for leaf in jax.tree.leaves(res):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert_all_close(res["chunked"], res["recurrent"], 1e-4)


@pytest.mark.slow
def test_bf16_inputs_are_close_to_float64():
    q, k, v, beta, g, s0, _, _ = make(T=64, K=16, V=16)
    with jax.enable_x64(True):
        want = reference(*(jnp.asarray(x, jnp.float64) for x in (q, k, v, beta, g, s0)), None, 0.25)
    bf = lambda x: x.astype(jnp.bfloat16)
    o, s = dr(bf(q), bf(k), bf(v), bf(beta), g=bf(g), initial_state=s0.astype(jnp.float32), chunk_size=16)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    # bf16 operands carry ~3 significant digits (measured: ~5e-3 relative max error)
    assert rel_err(o, want[0]) < 1.5e-2 and rel_err(s, want[1]) < 1.5e-2


@pytest.mark.slow
def test_nonfinite_vector_gate_stays_causal(x64):
    q, k, v, beta, g, _, _, _ = make()
    bad = g.at[0, 20, 1, 2].set(jnp.nan)
    for mode in ("chunked", "recurrent"):
        o, _ = dr(q, k, v, beta, g=g, mode=mode, chunk_size=16)
        ob, sb = dr(q, k, v, beta, g=bad, mode=mode, chunk_size=16)
        np.testing.assert_array_equal(ob[0, :20], o[0, :20])
        np.testing.assert_array_equal(ob[1], o[1])
        np.testing.assert_array_equal(ob[0, :, 0], o[0, :, 0])
        assert bool(jnp.all(jnp.isnan(ob[0, 20:, 1]))) and bool(jnp.all(jnp.isnan(sb[0, 1])))


def test_no_per_token_state_in_chunked_graph():
    # The largest intermediates are O(T C) scores and the O(T s K) intra-sub-chunk decays (s = 16):
    # below the T K V of per-token states once V > s.
    B, T, H, K, V = 1, 256, 2, 32, 32
    q = k = jnp.ones((B, T, H, K)) / K ** 0.5
    v = jnp.ones((B, T, H, V))
    beta = jnp.full((B, T, H), 0.5)
    g = jnp.full((B, T, H, K), 0.1)

    def loss(q, k, v, beta, g):
        o, s = delta_rule(q, k, v, beta, g=-g, chunk_size=32)
        return jnp.sum(o) + jnp.sum(s)

    assert largest_intermediate(jax.grad(loss, (0, 1, 2, 3, 4)), q, k, v, beta, g) < B * T * H * K * V


def test_bad_inputs_raise():
    q, k, v, beta, g, _, _, _ = make(HV=4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"delta_rule: g must have shape \[B, T, H\] = \(2, 37, 4\).*per key channel"):
        delta_rule(q, k, v, beta, g=g[..., :3])
    with pytest.raises(ValueError, match=r"delta_rule: v must have a positive multiple of H"):
        delta_rule(q, k, v[:, :, :3], beta[:, :, :3])
    with pytest.raises(ValueError, match=r"delta_rule: beta must have shape \[B, T, H\] = \(2, 37, 4\)"):
        delta_rule(q, k, v, beta[:, :, :2], g=g)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, K, V\] = \(2, 4, 4, 3\)"):
        delta_rule(q, k, v, beta, g=g, initial_state=jnp.zeros((2, 2, 4, 3)))
    with pytest.raises(ValueError, match="delta_rule: seq_axis 'seq' is not a mapped axis"):
        delta_rule(q, k, v, beta, g=g, seq_axis="seq")
    with pytest.raises(ValueError, match="delta_rule: impl='pallas' is not available with per-key-channel"):
        delta_rule(q, k, v, beta, g=g, impl="pallas")


# ----------------------------------------------------------------------------- blocks

call = nnx.jit(lambda blk, x, seg=None: blk(x, segment_ids=seg))
decode = nnx.jit(lambda blk, x, cache: blk(x, cache=cache))


@pytest.mark.slow  # (four compiles; tests/test_decoding.py covers every registered block by default)
@pytest.mark.parametrize("cls,opts", [(KimiDeltaAttention, {"num_v_heads": 4, "allow_neg_eigval": True}),
                                      (GatedDeltaNet2, {"num_v_heads": 4, "expand_v": 0.5})])
def test_block_prefill_then_steps_match_full_sequence(cls, opts):
    """Prefill 2 tokens (fewer than the conv window), then 9, then single steps: == the forward."""
    blk = cls(32, num_heads=2, chunk_size=8, **opts, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 19, 32))
    y = call(blk, x)
    cache = blk.init_cache(2, 32)
    assert isinstance(cache, AssociativeCache) and cache.memory.shape == (2, 4, 16, blk.dv)
    ys, start = [], 0
    for n in (2, 9):
        yp, cache = decode(blk, x[:, start:start + n], cache)
        ys.append(yp)
        start += n
    for t in range(start, 19):
        yt, cache = decode(blk, x[:, t:t + 1], cache)
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), y) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("cls", [KimiDeltaAttention, GatedDeltaNet2])
def test_block_packed_equals_separate_documents(cls):
    blk = cls(32, num_heads=2, chunk_size=4, mode="recurrent" if cls is GatedDeltaNet2 else "chunked",
              rngs=nnx.Rngs(2))
    lengths = [7, 11]
    x = jax.random.normal(jax.random.key(2), (1, sum(lengths), 32))
    y = call(blk, x, jnp.asarray(np.repeat([1, 2], lengths))[None])
    parts = [call(blk, x[:, :7]), call(blk, x[:, 7:])]
    assert rel_err(y, jnp.concatenate(parts, 1)) < 1e-4


def test_block_registration_defaults_and_gates():
    assert get_block("kda") is KimiDeltaAttention and get_block("KDA") is KimiDeltaAttention
    assert get_block("gdn2") is GatedDeltaNet2 and get_block("GDN2") is GatedDeltaNet2
    blk = KimiDeltaAttention(64, rngs=nnx.Rngs(0))  # d_model and rngs suffice
    assert (blk.h, blk.hv, blk.dk, blk.dv, blk.chunk_size) == (4, 4, 16, 16, None)  # None: the platform default
    assert blk.wf1.kernel.shape == (64, 16) and blk.wf2.kernel.shape == (16, 64)  # rank = value head dim
    x = 3.0 * jax.random.normal(jax.random.key(3), (1, 5, 64))
    gates = nnx.jit(lambda m, x: m._gates(x))  # (one compile instead of op-by-op dispatch)
    beta, g = gates(blk, x)
    assert beta.shape == (1, 5, 4) and g.shape == (1, 5, 4, 16) and float(g.max()) < 0
    neg = KimiDeltaAttention(64, allow_neg_eigval=True, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(gates(neg, x)[0]), 2 * np.asarray(beta), rtol=1e-6)
    (erase, write), g2 = gates(GatedDeltaNet2(64, num_v_heads=8, rngs=nnx.Rngs(0)), x)
    assert erase.shape == (1, 5, 8, 16) and write.shape == (1, 5, 8, 16) and g2.shape == (1, 5, 8, 16)


def test_block_bad_options_raise():
    for cls in (KimiDeltaAttention, GatedDeltaNet2):
        name = cls.__name__
        for bad in (3, 0, 2.0, True):
            with pytest.raises(ValueError, match=f"{name}: num_v_heads must be a positive multiple"):
                cls(32, num_heads=2, num_v_heads=bad, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=f"{name}: gate_rank"):
            cls(32, gate_rank=0, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=f"{name}: kernel='pallas'"):
            cls(32, kernel="pallas", rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match=f"{name}: mode must be one of"):
            cls(32, mode="parallel", rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_blocks_decode_and_train_inside_the_model():
    """Pattern "KDA,GDN2,F": decoding through the LM == its forward; Adam steps lower the loss on
    a fixed batch, with finite gradients."""
    cfg = ModelConfig(vocab_size=48, d_model=32, num_heads=2, pattern="KDA,GDN2,F", max_seq_len=64,
                      blocks={"kda": {"chunk_size": 8, "num_v_heads": 4}, "gdn2": {"chunk_size": 8}})
    model = LM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 48)
    full = nnx.jit(lambda m, x: m(x))(model, tokens)
    run = nnx.jit(lambda m, x, c: m(x, cache=c))
    logits, cache = run(model, tokens[:, :12], model.init_cache(2, 32))
    outs = [logits]
    for t in range(12, 17):
        lt, cache = run(model, tokens[:, t:t + 1], cache)
        outs.append(lt)
    assert rel_err(jnp.concatenate(outs, 1), full) < 2e-4

    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x):
        def loss_fn(model):
            logp = jax.nn.log_softmax(model(x[:, :-1]))
            return -jnp.mean(jnp.take_along_axis(logp, x[:, 1:, None], -1))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss, grads

    losses = []
    for _ in range(3):
        loss, grads = step(model, opt, tokens)
        losses.append(float(loss))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))
    assert losses[-1] < losses[0], losses
