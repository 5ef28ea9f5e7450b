"""Forgetting Attention (FoX): ``causal_attention(..., forget_gate=g)`` against a float64 reference
that builds the bias matrix ``D_ts = sum_{s < l <= t} g_l`` by explicit sums (no cumsum), forward
and gradients, with GQA, window and packed documents; the KV-cache form (cumulative gates) step by
step; causality under non-finite inputs; the cuDNN argument mapping; and the ``fox`` block."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.memory.attention import causal_attention, cudnn_unsupported, fused_attention
from memjax.nn import ForgettingAttention
from memjax.nn.cache import ForgetKVCache
from memjax.nn.registry import get_block
from tests.helpers import TOL64, rel_err

attention_module = sys.modules["memjax.memory.attention"]
# jitted: one compile per case instead of an eager dispatch (and compile) of every op
fox = jax.jit(causal_attention, static_argnames=("scale", "window", "impl"))

B, T, H, D = 2, 9, 4, 8
SEG = np.array([[1] * 4 + [2] * 5, [3] * 2 + [4] * 7])


def inputs(hkv=2, dtype=jnp.float64, seed=0, t=T):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    q, k, v = f(B, t, H, D), f(B, t, hkv, D), f(B, t, hkv, D)
    g = jnp.asarray(np.log(1 / (1 + np.exp(-(rng.standard_normal((B, t, H)) + 1.0)))), dtype)  # log_sigmoid
    return q, k, v, g


def visible(t, window=0, seg=None):
    """``[B, T, S]`` bool of the pairs a query may see (causal, window, same document)."""
    i = np.arange(t)
    m = i[None, :] <= i[:, None]
    if window:
        m &= i[None, :] > i[:, None] - window
    m = np.broadcast_to(m, (B, t, t))
    if seg is not None:
        m = m & (seg[:, :, None] == seg[:, None, :])
    return m


def sum_matrix(t):
    """``M[t, s, l] = 1`` iff ``s < l <= t``: ``D = M g`` without a cumulative sum."""
    i = np.arange(t)
    return ((i[None, :, None] < i[None, None, :]) & (i[None, None, :] <= i[:, None, None])).astype(np.float64)


def numpy_fox(q, k, v, g, window=0, seg=None):
    """Float64 NumPy reference with the explicit bias matrix (-inf gates give -inf bias)."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    t, r = q.shape[1], q.shape[2] // k.shape[2]
    mask = visible(t, window, seg)
    o = np.zeros(q.shape[:3] + (v.shape[3],))
    for b in range(B):
        for h in range(q.shape[2]):
            bias = np.array([[g[b, s + 1:i + 1, h].sum() for s in range(t)] for i in range(t)])
            logits = np.where(mask[b], q[b, :, h] @ k[b, :, h // r].T * D ** -0.5 + bias, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            o[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // r]
    return o


def jax_fox(q, k, v, g, window=0, seg=None):
    """The same reference in jnp (float64, differentiable): bias ``D = M g`` by an einsum."""
    t, r = q.shape[1], q.shape[2] // k.shape[2]
    mask = jnp.asarray(visible(t, window, seg))[:, None]  # [B, 1, T, S]
    kk, vv = jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)
    bias = jnp.einsum("tsl,blh->bhts", jnp.asarray(sum_matrix(t)), g)
    logits = jnp.einsum("bthk,bshk->bhts", q, kk) * D ** -0.5 + bias
    p = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bshv->bthv", p, vv)


CASES = {"mha": (4, 0, None), "gqa": (2, 0, None), "gqa-window3": (2, 3, None), "gqa-segments": (2, 0, SEG),
         "mqa-window4-segments": (1, 4, SEG)}


@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(x64, case):
    hkv, window, seg = CASES[case]
    q, k, v, g = inputs(hkv)
    got = fox(q, k, v, forget_gate=g, window=window, segment_ids=None if seg is None else jnp.asarray(seg),
              impl="xla")
    np.testing.assert_allclose(got, numpy_fox(q, k, v, g, window, seg), rtol=TOL64, atol=TOL64)


@pytest.mark.slow  # secondary: the block equals its equation by default
def test_zero_gate_is_plain_attention():
    q, k, v, g = inputs(dtype=jnp.float32)
    seg = jnp.asarray(SEG)
    for kw in ({}, {"window": 3}, {"segment_ids": seg}):  # two programs: XLA may fuse them differently
        np.testing.assert_allclose(fox(q, k, v, forget_gate=jnp.zeros_like(g), impl="xla", **kw),
                                   fox(q, k, v, impl="xla", **kw), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["gqa", "mqa-window4-segments"])
def test_gradients_match_reference(x64, case):
    hkv, window, seg = CASES[case]
    q, k, v, g = inputs(hkv)
    ct = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape))
    segs = None if seg is None else jnp.asarray(seg)
    ours = lambda *a: jnp.sum(causal_attention(*a[:3], forget_gate=a[3], window=window, segment_ids=segs,
                                               impl="xla") * ct)
    ref = lambda *a: jnp.sum(jax_fox(*a, window=window, seg=seg) * ct)
    np.testing.assert_allclose(jax_fox(q, k, v, g, window, seg), numpy_fox(q, k, v, g, window, seg), rtol=TOL64,
                               atol=TOL64)  # the differentiable reference is the NumPy one
    got, want = (jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(q, k, v, g) for f in (ours, ref))
    for name, a, b in zip("qkvg", got, want):
        assert rel_err(a, b) < TOL64, name
    assert float(jnp.abs(got[3]).max()) > 1e-3  # the gate does get a gradient


def test_minus_inf_gate_is_a_full_reset(x64):
    """``g_l = -inf``: queries from ``l`` on see no key before ``l`` (bias -inf in the reference);
    finite outputs and gradients, no ``-inf - -inf``."""
    q, k, v, g = inputs()
    g = g.at[:, 3, 1].set(-jnp.inf).at[:, 6].set(-jnp.inf)
    got = fox(q, k, v, forget_gate=g, impl="xla")
    np.testing.assert_allclose(got, numpy_fox(q, k, v, g), rtol=TOL64, atol=TOL64)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(causal_attention(*a[:3], forget_gate=a[3], impl="xla")),
                     argnums=(0, 1, 2, 3)))(q, k, v, g)
    for a in grads:
        assert np.isfinite(np.asarray(a)).all()


def test_cache_form_step_by_step_equals_forward():
    """The KV-cache form: cumulative gates of queries and cached keys, prompt then one token at a
    time into a zero-padded cache, == the self-attention form (GQA, window)."""
    q, k, v, g = inputs(dtype=jnp.float32)
    full = fox(q, k, v, forget_gate=g, window=4, impl="xla")
    cum = jnp.cumsum(g, axis=1)
    length = T + 3  # the cache is longer than the sequence: empty slots are masked

    @jax.jit
    def step(kc, vc, cc, start, qt, kt, vt, ct):
        n = qt.shape[1]
        kc, vc, cc = (jax.lax.dynamic_update_slice(a, x, (0, start) + (0,) * (a.ndim - 2))
                      for a, x in ((kc, kt), (vc, vt), (cc, ct)))
        q_pos = start + jnp.broadcast_to(jnp.arange(n), (B, n))
        k_pos = jnp.broadcast_to(jnp.arange(length), (B, length))
        o = causal_attention(qt, kc, vc, window=4, q_positions=q_pos, k_positions=k_pos, k_valid=k_pos < start + n,
                             q_gate_cumsum=ct, k_gate_cumsum=cc)
        return o, kc, vc, cc

    kc, vc = (jnp.zeros((B, length) + x.shape[2:], x.dtype) for x in (k, v))
    cc = jnp.zeros((B, length, H), jnp.float32)
    outs = []
    for a, b in ((0, 5), *((t, t + 1) for t in range(5, T))):
        o, kc, vc, cc = step(kc, vc, cc, a, q[:, a:b], k[:, a:b], v[:, a:b], cum[:, a:b])
        outs.append(o)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- non-finite inputs

TN, POISON_T = 13, 9


@pytest.fixture(scope="module")
def run_fox():
    @jax.jit
    def run(a, seg, keep):
        f = lambda a: causal_attention(a["q"], a["k"], a["v"], forget_gate=a["g"], segment_ids=seg, window=0,
                                       impl="xla")
        out, vjp = jax.vjp(f, a)
        return out, vjp(jnp.where(keep[:, :, None, None], 1.0, 0.0) * jnp.ones_like(out))[0]

    q, k, v, g = inputs(dtype=jnp.float32, t=TN)
    return dict(q=q, k=k, v=v, g=g), run


@pytest.mark.parametrize("name,value", [("q", np.nan), ("k", np.nan), ("v", np.inf), ("g", np.nan),
                                        ("g", np.inf), ("g", -np.inf)])
def test_non_finite_future_token_changes_no_earlier_output_or_gradient(run_fox, name, value):
    x, run = run_fox
    keep = jnp.broadcast_to(jnp.arange(TN) < POISON_T, (B, TN))
    clean = run(x, None, keep)
    dirty = run(dict(x, **{name: x[name].at[:, POISON_T].set(value)}), None, keep)
    assert np.isfinite(np.asarray(clean[0])).all()
    np.testing.assert_array_equal(dirty[0][:, :POISON_T], clean[0][:, :POISON_T])
    for n in x:
        np.testing.assert_array_equal(dirty[1][n][:, :POISON_T], clean[1][n][:, :POISON_T], err_msg=n)
    if value is np.nan or value == np.inf:  # a broken write is loud from there on in its head
        assert np.isnan(np.asarray(dirty[0][:, POISON_T:])).any()


def test_nan_gate_in_one_document_reaches_no_other(run_fox):
    x, run = run_fox
    seg = jnp.asarray([[1] * 4 + [2] * 5 + [3] * 4] * B)
    keep = (seg != 2)
    clean = run(x, seg, keep)
    dirty = run(dict(x, g=x["g"].at[:, 6].set(jnp.nan)), seg, keep)
    kept = np.asarray(keep[0])
    np.testing.assert_array_equal(dirty[0][:, kept], clean[0][:, kept])
    for n in x:
        np.testing.assert_array_equal(dirty[1][n][:, kept], clean[1][n][:, kept], err_msg=n)


# ----------------------------------------------------------------------------- errors, dispatch, bf16


def test_errors_name_the_argument():
    q, k, v, g = inputs(dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"forget_gate must have shape \[B, T, H\] = \(2, 9, 4\), got \(2, 9, 2\)"):
        causal_attention(q, k, v, forget_gate=g[..., :2])
    with pytest.raises(TypeError, match="forget_gate must have a floating dtype"):
        causal_attention(q, k, v, forget_gate=jnp.zeros((B, T, H), jnp.int32))
    with pytest.raises(ValueError, match="forget_gate needs keys of the queries' length"):
        causal_attention(q[:, :1], k, v, forget_gate=g[:, :1])
    with pytest.raises(ValueError, match="go together"):
        causal_attention(q, k, v, q_gate_cumsum=g)
    with pytest.raises(ValueError, match="not both"):
        causal_attention(q, k, v, forget_gate=g, q_gate_cumsum=g, k_gate_cumsum=g)
    with pytest.raises(ValueError, match=r"k_gate_cumsum must have shape \[B, S, H\]"):
        causal_attention(q, k, v, q_gate_cumsum=g, k_gate_cumsum=g[:, :3])


@pytest.mark.parametrize("window", [0, 3])
def test_fused_path_maps_the_gate_like_the_xla_form(window):
    """jax.nn.dot_product_attention takes the decay as a dense bias (cuDNN's ``bias``, checked
    here with its XLA implementation): forward and gradients, the gate's included (float32)."""
    q, k, v, g = inputs(dtype=jnp.float32)
    g = g.at[:, 5, 0].set(-jnp.inf)  # a reset becomes a -1e4 bias, never inf - inf
    ours = lambda q, k, v, g: causal_attention(q, k, v, forget_gate=g, window=window, scale=0.3, impl="xla")
    fused = lambda q, k, v, g: fused_attention(q, k, v, forget_gate=g, window=window, scale=0.3, implementation="xla")
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    outs = [jax.jit(jax.value_and_grad(lambda *a, f=f: jnp.sum(f(*a) * ct), argnums=(0, 1, 2, 3)))(q, k, v, g)
            for f in (ours, fused)]
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(fused)(q, k, v, g), jax.jit(ours)(q, k, v, g), rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_auto_stays_on_xla_with_a_forget_gate(monkeypatch):
    q, k, v, g = inputs(dtype=jnp.bfloat16)
    calls = []
    monkeypatch.setattr(attention_module, "fused_attention",
                        lambda q, k, v, **kw: calls.append(kw) or jnp.zeros(q.shape, q.dtype))

    class FakeGpu:
        device_kind = "NVIDIA H100 80GB HBM3"

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [FakeGpu()])
    monkeypatch.setattr(attention_module, "VERIFIED_DEVICES", {"gpu": ("NVIDIA H100",)})
    # traced only (eval_shape): the dispatch is decided while tracing
    jax.eval_shape(lambda: causal_attention(q, k, v, forget_gate=g))  # auto: XLA even on a verified device
    assert calls == []
    jax.eval_shape(lambda: causal_attention(q, k, v, forget_gate=g, impl="cudnn"))  # on request: the dense bias
    assert len(calls) == 1 and calls[0]["forget_gate"] is g
    assert "gate cumsums" in cudnn_unsupported(q, k, v, gate_cumsums=True)
    with pytest.raises(ValueError, match="impl='cudnn' does not support"):
        causal_attention(q, k, v, q_gate_cumsum=g, k_gate_cumsum=g, impl="cudnn")


def test_bf16_within_bound_of_float64_reference():
    q, k, v, g = inputs(dtype=jnp.bfloat16, t=T)
    got = fox(q, k, v, forget_gate=g, window=5, impl="xla")
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, numpy_fox(q, k, v, g, window=5)) < 2e-2  # bf16 inputs, probabilities and output


# ----------------------------------------------------------------------------- the block


def _block(**kw):
    return ForgettingAttention(32, num_heads=4, rngs=nnx.Rngs(0), **kw)


def test_block_registered_and_equals_its_equation():
    assert get_block("fox") is ForgettingAttention and get_block("FoX") is ForgettingAttention
    x = jax.random.normal(jax.random.key(1), (B, T, 32))
    for rope in (False, True):
        blk = _block(num_kv_heads=2, rope=rope, fgate_bias_init=2.0)
        assert np.allclose(blk.bf[...], 2.0)

        @nnx.jit
        def equation(blk, x, rope=rope):
            pos = jnp.broadcast_to(jnp.arange(T), (B, T))
            q, k, v = blk.wq(x).reshape(B, T, 4, 8), blk.wk(x).reshape(B, T, 2, 8), blk.wv(x).reshape(B, T, 2, 8)
            if rope:
                q, k = attention_module.rope(q, pos), attention_module.rope(k, pos)
            g = jax.nn.log_sigmoid(x @ blk.wf.kernel[...] + blk.bf[...])
            return blk.wo(causal_attention(q, k, v, forget_gate=g, impl="xla").reshape(B, T, 32)), blk(x)

        want, got = equation(blk, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not _block().use_rope  # FoX's default: no RoPE


def test_block_prefill_and_steps_equal_forward():
    blk = _block(num_kv_heads=2, window=4)
    x = jax.random.normal(jax.random.key(2), (B, 11, 32))
    full = nnx.jit(lambda m, x: m(x))(blk, x)
    run = nnx.jit(lambda m, x, c: m(x, cache=c))
    cache = blk.init_cache(B, 16)
    assert isinstance(cache, ForgetKVCache) and cache.gate_cumsum.shape == (B, 16, 4)
    y, cache = run(blk, x[:, :6], cache)
    outs = [y]
    for t in range(6, 11):
        y, cache = run(blk, x[:, t:t + 1], cache)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="segment_ids"):
        blk(x[:, :1], cache=cache, segment_ids=jnp.ones((B, 1), jnp.int32))


def test_block_documents_are_independent_and_gate_learns():
    """A packed document's output equals the block run on it alone (the decay is a difference of
    cumulative gates within the document), and the gate's parameters get gradients."""
    blk = _block()
    x = jax.random.normal(jax.random.key(3), (B, T, 32))
    seg = jnp.asarray([[1] * 4 + [2] * 5] * B)
    packed = nnx.jit(lambda m, x, s: m(x, segment_ids=s))(blk, x, seg)
    np.testing.assert_allclose(packed[:, 4:], nnx.jit(lambda m, x: m(x))(blk, x[:, 4:]), rtol=1e-5, atol=1e-5)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(blk)
    assert float(jnp.abs(grads.wf.kernel[...]).max()) > 0 and float(jnp.abs(grads.bf[...]).max()) > 0
