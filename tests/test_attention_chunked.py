"""The O(T)-memory chunked attention (memjax.memory.flash_attention through causal_attention's
impl="chunked") against an independent NumPy loop and the XLA form, in float64: outputs and
gradients, every mask kind, odd lengths, GQA, packed documents, window, forget gate, explicit
positions and KV-cache masks; its memory plan grows linearly in T; the auto dispatch; the
decoding block with the chunked prefill; the benchmark script."""
import importlib
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.memory.attention import CHUNKED_MIN_LENGTH, IMPLS, causal_attention
from memjax.nn.attention import Attention
from memjax.nn.cache import KVCache, WindowKVCache
from tests.helpers import TOL64, rand, rel_err

# the module itself: memjax.memory exports the function of the same name
flash = importlib.import_module("memjax.memory.flash_attention")

attention_module = sys.modules["memjax.memory.attention"]


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 queries and 3 keys, so that T = 13 has several of each, ragged at the end."""
    monkeypatch.setattr(flash, "BLOCK_Q", 4)
    monkeypatch.setattr(flash, "BLOCK_K", 3)


def reference(q, k, v, *, scale, q_pos, k_pos, window=0, seg=None, valid=None, decay=None):
    """Token by token from the definition: o_t = sum_s softmax_s(scale q_t.k_s + D_ts) v_s over the
    visible s (k_pos <= q_pos, within window, same document, valid, D_ts > -inf); ``decay(i, t, s,
    j)`` gives D_ts of row i, head j (FoX: sum_{s < l <= t} g_l; a cache: G_t - G_s)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, _ = q.shape
    s_len, r = k.shape[1], h // k.shape[2]
    o = np.zeros((b, t, h, v.shape[3]))
    for i in range(b):
        for j in range(h):
            for a in range(t):
                keys = [u for u in range(s_len) if k_pos[i, u] <= q_pos[i, a]
                        and (window == 0 or k_pos[i, u] > q_pos[i, a] - window)
                        and (seg is None or seg[i, u] == seg[i, a]) and (valid is None or valid[i, u])
                        and (decay is None or decay(i, a, u, j) > -np.inf)]
                if not keys:
                    continue  # no visible key: 0
                logits = np.array([scale * q[i, a, j] @ k[i, u, j // r]
                                   + (0.0 if decay is None else decay(i, a, u, j)) for u in keys])
                p = np.exp(logits - logits.max())
                o[i, a, j] = (p / p.sum()) @ v[i, keys, j // r]
    return o


def outputs_and_grads(impl, w, kw, *args, diff=None):
    """One jitted program: ``causal_attention(*args[:3], impl=impl, **kw, **{name: arg})`` and the
    gradients of ``sum(o * w)`` w.r.t. every argument (``diff``: the keyword names of args[3:])."""
    names = diff or ()

    def f(*a):
        return causal_attention(*a[:3], impl=impl, **kw, **dict(zip(names, a[3:])))

    def run(*a):
        o, vjp = jax.vjp(f, *a)
        return o, vjp(w.astype(o.dtype))

    return jax.jit(run)(*args)


def close(a, b, tol=TOL64):
    """max|a - b| <= tol max(|b|, 1): relative, except for gradients that are ~0 in exact
    arithmetic (a query gate's: softmax ignores a per-row constant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.all(np.isfinite(a)) and float(np.max(np.abs(a - b))) <= tol * max(float(np.max(np.abs(b))), 1.0)


B, T, H, HKV, D = 2, 13, 4, 2, 8
SEG = np.array([[0] * 5 + [1] * 4 + [0] * 4, [2] * 13])  # the reused id 0 is a third document


def inputs(dtype=jnp.float64, seed=0):
    return rand(seed, (B, T, H, D), dtype), rand(seed + 1, (B, T, HKV, D), dtype), rand(seed + 2, (B, T, HKV, D), dtype)


def forget_gate(seed=3):
    g = -np.abs(np.random.default_rng(seed).standard_normal((B, T, H))) * 0.5
    g[0, 7, 1] = -np.inf  # a full reset inside a document
    return jnp.asarray(g)


CASES = {
    "plain": {},
    "window_segments": dict(window=4, segment_ids=SEG),
    "forget_window_segments": dict(window=6, segment_ids=SEG, forget_gate=True),
}


# (the forget-gate case also has the window and the documents; the others are slow to keep the
# default suite short)
@pytest.mark.parametrize("case", [pytest.param("plain", marks=pytest.mark.slow),
                                  pytest.param("window_segments", marks=pytest.mark.slow), "forget_window_segments"])
def test_chunked_matches_reference_and_xla_with_gradients(x64, small_blocks, case):
    kw = dict(CASES[case])
    q, k, v = inputs()
    seg = kw.get("segment_ids")
    if seg is not None:
        kw["segment_ids"] = jnp.asarray(seg)
    g = forget_gate() if kw.pop("forget_gate", False) else None
    pos = np.broadcast_to(np.arange(T), (B, T))
    doc = None
    if seg is not None:
        doc = np.cumsum(np.concatenate([np.ones((B, 1)), seg[:, 1:] != seg[:, :-1]], axis=1), axis=1)
    decay = None
    if g is not None:  # D_ts = sum_{s < l <= t} g_l (pairs across documents are masked anyway)
        gn = np.asarray(g)
        decay = lambda i, a, u, j: float(np.sum(gn[i, u + 1:a + 1, j]))
    ref = reference(q, k, v, scale=D ** -0.5, q_pos=pos, k_pos=pos, window=kw.get("window", 0), seg=doc,
                    decay=decay)
    w = rand(9, (B, T, H, D), jnp.float64)
    gate = {} if g is None else {"forget_gate": g}
    out, grads = outputs_and_grads("chunked", w, kw, q, k, v, *gate.values(), diff=list(gate))
    assert rel_err(out, ref) < TOL64
    ref_out, ref_grads = outputs_and_grads("xla", w, kw, q, k, v, *gate.values(), diff=list(gate))
    assert rel_err(out, ref_out) < TOL64
    assert len(grads) == 3 + len(gate)
    for a, b_ in zip(grads, ref_grads):
        assert close(a, b_)


def test_cache_masks_positions_and_gate_cumsums(x64, small_blocks):
    """A prefill-like call: 5 queries at positions 6..10 against a 16-slot cache (positions 0..15,
    slots >= 11 invalid), cache gate cumsums, and a batch row whose every key is invalid (its
    output must be 0, as in the XLA form, with finite gradients)."""
    t, s = 5, 16
    q = rand(0, (B, t, H, D), jnp.float64)
    k, v = rand(1, (B, s, HKV, D), jnp.float64), rand(2, (B, s, HKV, D), jnp.float64)
    q_pos = jnp.broadcast_to(jnp.arange(6, 11), (B, t))
    k_pos = jnp.broadcast_to(jnp.arange(s), (B, s))
    valid = jnp.asarray(np.stack([np.arange(s) < 11, np.zeros(s, bool)]))
    gk = jnp.asarray(np.cumsum(-np.abs(np.random.default_rng(5).standard_normal((B, s, H))), axis=1))
    gq = gk[:, 6:11]
    kw = dict(q_positions=q_pos, k_positions=k_pos, k_valid=valid, window=4)
    ref = reference(q, k, v, scale=D ** -0.5, q_pos=np.asarray(q_pos), k_pos=np.asarray(k_pos), window=4,
                    valid=np.asarray(valid), decay=lambda i, a, u, j: float(gq[i, a, j] - gk[i, u, j]))
    w = rand(9, (B, t, H, D), jnp.float64)
    diff = ["q_gate_cumsum", "k_gate_cumsum"]
    got, grads = outputs_and_grads("chunked", w, kw, q, k, v, gq, gk, diff=diff)
    assert rel_err(got, ref) < TOL64
    assert np.all(np.asarray(got[1]) == 0)
    _, ref_grads = outputs_and_grads("xla", w, kw, q, k, v, gq, gk, diff=diff)
    for a, b_ in zip(grads, ref_grads):
        assert close(a, b_)


def test_nonfinite_inputs_poison_the_rows_the_xla_form_poisons(small_blocks):
    q, k, v = inputs(jnp.float32)
    k = k.at[0, 6, 1].set(jnp.nan)  # seen by rows 6.. of document 1 (rows 5..8) of heads 2, 3
    q = q.at[1, 2, 0].set(jnp.inf)
    seg = jnp.asarray(SEG)
    got, ref = (jax.jit(lambda q, k, v, impl=impl: causal_attention(q, k, v, segment_ids=seg, impl=impl))(q, k, v)
                for impl in ("chunked", "xla"))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    assert np.isnan(got).any() and not np.isnan(got[0, :6]).any()
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(ref), rtol=1e-5, atol=1e-5)


def test_bf16_error_is_bounded():
    q, k, v = inputs(jnp.bfloat16)
    ref = jax.jit(lambda *a: causal_attention(*(x.astype(jnp.float32) for x in a), impl="xla"))(q, k, v)
    got = jax.jit(lambda *a: causal_attention(*a, impl="chunked"))(q, k, v)
    assert got.dtype == jnp.bfloat16
    assert rel_err(got, ref) < 2e-2  # bf16 rounding of the output and of p before p @ v


def test_peak_temporaries_grow_linearly_in_t():
    """XLA's memory plan: the chunked forward + backward grows ~ T (ratio ~4 for 4x the length),
    the XLA form's forward ~ T^2 (its [B, H, T, T] logits; ratio ~16)."""
    def temp(impl, t, backward):
        q = jnp.zeros((1, t, 1, 16), jnp.float32)
        f = lambda q, k, v: jnp.sum(causal_attention(q, k, v, impl=impl))
        f = jax.grad(f, argnums=(0, 1, 2)) if backward else f
        return jax.jit(f).lower(q, q, q).compile().memory_analysis().temp_size_in_bytes

    chunked = temp("chunked", 2048, True) / temp("chunked", 512, True)
    xla = temp("xla", 2048, False) / temp("xla", 512, False)
    assert chunked < 6, chunked
    assert xla > 10, xla


def test_auto_takes_the_chunked_form_for_long_inputs(monkeypatch):
    calls = []
    real = attention_module.flash_attention
    monkeypatch.setattr(attention_module, "flash_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, k, v = inputs(jnp.float32)
    trace = lambda **kw: jax.eval_shape(lambda q, k, v: causal_attention(q, k, v, **kw), q, k, v)  # no compile
    trace()
    assert calls == [] and T < CHUNKED_MIN_LENGTH
    monkeypatch.setattr(attention_module, "CHUNKED_MIN_LENGTH", T)
    trace()
    assert len(calls) == 1 and calls[0]["causal_blocks"]
    # explicit positions (a cache): the kernel may not skip blocks by index
    trace(q_positions=jnp.zeros((B, T), jnp.int32), k_positions=jnp.zeros((B, T), jnp.int32))
    assert len(calls) == 2 and not calls[1]["causal_blocks"]
    trace(impl="xla")
    assert len(calls) == 2
    assert "chunked" in IMPLS


def test_bad_inputs_raise():
    q, k, v = inputs(jnp.float32)
    with pytest.raises(ValueError, match="impl must be one of"):
        causal_attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="window must be an int"):
        causal_attention(q, k, v, window=-1, impl="chunked")
    with pytest.raises(ValueError, match="do not match"):
        causal_attention(q, k[..., :4], v, impl="chunked")
    with pytest.raises(TypeError, match="k must have a floating dtype"):
        causal_attention(q, k.astype(jnp.int32), v, impl="chunked")
    with pytest.raises(ValueError, match=r"k_pos must have shape \(2, 13\)"):
        flash.flash_attention(q, k, v, scale=1.0, q_pos=jnp.zeros((B, T), jnp.int32), k_pos=jnp.zeros((B, 4)))
    with pytest.raises(ValueError, match="q_seg and k_seg go together"):
        flash.flash_attention(q, k, v, scale=1.0, q_pos=jnp.zeros((B, T), jnp.int32),
                              k_pos=jnp.zeros((B, T), jnp.int32), q_seg=jnp.zeros((B, T), jnp.int32))
    with pytest.raises(ValueError, match="block sizes must be positive"):
        flash.flash_attention(q, k, v, scale=1.0, q_pos=jnp.zeros((B, T), jnp.int32),
                              k_pos=jnp.zeros((B, T), jnp.int32), block_q=0)


@pytest.mark.parametrize("window", [pytest.param(0, marks=pytest.mark.slow), 5])
def test_block_chunked_prefill_then_decode_equals_forward(monkeypatch, window):
    """The Attention block: training forward (impl="chunked") == a chunked prefill (auto past a
    lowered threshold) of 9 tokens then 4 decoded one by one; with a window the cache is a ring of
    `window` slots (O(window))."""
    monkeypatch.setattr(attention_module, "CHUNKED_MIN_LENGTH", 8)
    blk = Attention(32, num_heads=4, num_kv_heads=2, window=window, impl="chunked", rngs=nnx.Rngs(0))
    x = rand(1, (2, 13, 32), jnp.float32)
    full = nnx.jit(lambda blk, x: blk(x))(blk, x)
    cache = blk.init_cache(2, 13)
    assert isinstance(cache, WindowKVCache if window else KVCache)
    assert cache.k.shape[1] == (window or 13)
    step = nnx.jit(lambda blk, x, cache: blk(x, cache=cache))
    y, cache = step(blk, x[:, :9], cache)
    ys = [y]
    for t in range(9, 13):
        y, cache = step(blk, x[:, t:t + 1], cache)
        ys.append(y)
    assert rel_err(jnp.concatenate(ys, axis=1), full) < 1e-5


@pytest.mark.slow
def test_benchmark_script_runs_and_writes_json(tmp_path):
    from benchmarks import bench_attention as bench

    out = tmp_path / "att.json"
    bench.main(["--T", "16", "--small", "--repeats", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["xla", "chunked"]
    for r in rows:
        assert r["T"] == 16 and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["fwd_bwd_temp_MiB"] >= 0
