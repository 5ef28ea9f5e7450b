"""MoVE (memjax.nn.move): the value mixture against a float64 NumPy reference written from the
equation (dense softmax and top-k routing), the block's output is attention over the mixed values,
decoding == forward, packed documents isolated, one bank shared by every MoVE layer of a model
(one parameter, its gradient the sum of both layers' contributions), construction and bad
arguments.

Reference (per token): ``w = softmax(x W_r)`` (over the top_k logits when top_k > 0),
``g = sigmoid(x W_g + b_g)`` per key/value head, ``v_h = x W_v,h + g_h sum_m w_m E_m,h``.
Tolerances: float64 1e-12 relative; float32 decoding / packing 1e-5 relative.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import bench_move
from memjax.config import ModelConfig
from memjax.memory.attention import causal_attention
from memjax.model.lm import LM
from memjax.nn.attention import Attention
from memjax.nn.cache import KVCache
from memjax.nn.move import MoVEAttention
from memjax.nn.registry import get_block
from tests.helpers import rel_err

D = 32
KW = dict(num_heads=2, num_kv_heads=1, num_slots=16)


def make(dtype=jnp.float32, seed=0, **kw):
    return MoVEAttention(D, **{**KW, **kw}, dtype=dtype, rngs=nnx.Rngs(seed))


def inputs(b=2, t=13, seed=1, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, D)), dtype)


def numpy_values(blk, x):
    """``x W_v + g * sum_m w_m E_m`` per key/value head, float64 NumPy from the block's parameters."""
    p = lambda a: np.asarray(a[...], np.float64)  # noqa: E731
    x = np.asarray(x, np.float64)
    logits = x @ p(blk.router.kernel)
    w = np.zeros_like(logits)
    if blk.top_k:
        idx = np.argsort(-logits, axis=-1)[..., :blk.top_k]
        top = np.take_along_axis(logits, idx, -1)
        e = np.exp(top - top.max(-1, keepdims=True))
        np.put_along_axis(w, idx, e / e.sum(-1, keepdims=True), -1)
    else:
        e = np.exp(logits - logits.max(-1, keepdims=True))
        w = e / e.sum(-1, keepdims=True)
    g = 1 / (1 + np.exp(-(x @ p(blk.gate.kernel) + p(blk.gate.bias))))  # [B, T, Hkv]
    b, t, _ = x.shape
    mix = (w @ p(blk.bank)).reshape(b, t, blk.hkv, blk.dk)
    v = (x @ p(blk.wv.kernel)).reshape(b, t, blk.hkv, blk.dk)
    return v + g[..., None] * mix, w


def randomize(blk, seed=5):
    """Non-trivial gate parameters (they start at zero) so the test sees the gate act per head."""
    rng = np.random.default_rng(seed)
    blk.gate.kernel[...] = jnp.asarray(rng.standard_normal(blk.gate.kernel.shape) * 0.3, blk.gate.kernel.dtype)
    blk.gate.bias[...] = jnp.asarray(rng.standard_normal(blk.gate.bias.shape), blk.gate.bias.dtype)
    blk.router.kernel[...] = blk.router.kernel[...] * 3.0  # peaked routing, so top-k differs from dense


def test_values_and_output_match_float64_reference(x64):
    """Dense routing (all 16 slots), then the same block with top-3 routing."""
    blk = make(jnp.float64)
    randomize(blk)
    x = inputs(dtype=jnp.float64)
    b, t, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))

    @nnx.jit
    def run(m, x, v_ref):
        q0, k0, v0 = Attention._qkv(m, x, pos)
        # The block's output should be attention over the mixed values (the plain block's q, k).
        want = m.wo(causal_attention(q0, k0, v_ref, impl="xla").reshape(b, t, -1))
        return m._qkv(x, pos)[2], m.mixture_weights(x), m(x), want, v0

    for top_k in (0, 3):
        blk.top_k = top_k
        v_ref, w_ref = numpy_values(blk, x)
        v, w, y, want, v0 = run(blk, x, jnp.asarray(v_ref))
        assert v.dtype == jnp.float64 and rel_err(v, v_ref) < 1e-12, top_k
        assert rel_err(w, w_ref) < 1e-12 and np.allclose(np.sum(np.asarray(w), -1), 1.0)
        assert np.all(np.sum(np.asarray(w) > 0, -1) == (top_k or 16))
        assert rel_err(y, want) < 1e-12
        # and the mixture matters: without it the output is different.
        assert rel_err(v0, v_ref) > 1e-2


def test_decode_equals_forward():
    """Prefill 5 tokens, then one token at a time; top-k routing and grouped KV heads."""
    blk = make(top_k=4)
    randomize(blk)
    x = inputs()
    y = nnx.jit(lambda m, x: m(x))(blk, x)
    cache = blk.init_cache(2, 16)
    assert isinstance(cache, KVCache)
    step = nnx.jit(lambda m, x, c: m(x, cache=c))
    ys = []
    y0, cache = step(blk, x[:, :5], cache)
    ys.append(y0)
    for i in range(5, x.shape[1]):
        yi, cache = step(blk, x[:, i:i + 1], cache)
        ys.append(yi)
    assert rel_err(jnp.concatenate(ys, axis=1), y) < 1e-5


def test_packed_documents_are_isolated():
    """A row packing two documents equals each document run alone (RoPE restarts per document)."""
    blk = make()
    randomize(blk)
    x = inputs(b=1, t=12)
    seg = jnp.asarray([[3] * 6 + [4] * 6], jnp.int32)
    f = nnx.jit(lambda m, x, s: m(x, segment_ids=s))
    y = f(blk, x, seg)
    for lo, hi in ((0, 6), (6, 12)):
        alone = f(blk, x[:, lo:hi], None)
        assert rel_err(y[:, lo:hi], alone) < 1e-5


def test_one_bank_for_all_move_layers_and_gradient_from_both():
    cfg = ModelConfig(vocab_size=64, d_model=D, num_heads=2, pattern="MV,MV",
                      blocks={"move_attention": {"num_slots": 16, "num_kv_heads": 1}})
    model = LM(cfg, rngs=nnx.Rngs(0))
    assert model.stack is None  # not stacked: the layers share a parameter
    assert model.blocks[0].bank is model.blocks[1].bank
    banks = [p for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
             if v.get_metadata().get("optim_group") == "memory_values"]
    assert banks == [("blocks", 0, "bank")]  # one parameter in the model's state
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 7)), jnp.int32)
    loss = lambda m: jnp.sum(m(tok) ** 2)  # noqa: E731
    g_shared = np.asarray(nnx.jit(nnx.grad(loss))(model)["blocks"][0]["bank"][...])
    # Unshare: layer 1 gets a copy of the same values; the shared gradient is the sum of the two.
    bank = model.blocks[0].bank
    model.blocks[1].bank = nnx.Param(jnp.array(bank[...]), **bank.get_metadata())
    grads = nnx.jit(nnx.grad(loss))(model)
    g0, g2 = (np.asarray(grads["blocks"][i]["bank"][...]) for i in (0, 1))
    assert np.abs(g0).max() > 0 and np.abs(g2).max() > 0
    assert rel_err(g_shared, g0 + g2) < 1e-5 and rel_err(g_shared, g0) > 1e-3


def test_build_from_registry_and_kwargs():
    assert get_block("MV") is MoVEAttention and get_block("move_attention") is MoVEAttention
    assert MoVEAttention.scannable is False
    shared = MoVEAttention.shared_params(rngs=nnx.Rngs(0), d_model=D, **{**KW, "num_slots": 64})
    assert shared["bank"].shape == (64, 16)  # capacity: num_slots rows of Hkv * K
    a, b = make(**shared, num_slots=64, seed=1), make(**shared, num_slots=64, seed=2)
    assert a.bank is b.bank is shared["bank"]
    assert shared["bank"].get_metadata()["optim_group"] == "memory_values"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_slots"):
        make(num_slots=0)
    with pytest.raises(ValueError, match="top_k"):
        make(top_k=-1)
    with pytest.raises(ValueError, match=r"top_k \(17\) must be at most num_slots \(16\)"):
        make(top_k=17)
    with pytest.raises(ValueError, match="bank_init_scale"):
        make(bank_init_scale=0.0)
    shared = MoVEAttention.shared_params(rngs=nnx.Rngs(0), d_model=D, **{**KW, "num_slots": 8})
    with pytest.raises(ValueError, match=r"MoVEAttention: bank has shape \(8, 16\), this block needs \(16, 16\)"):
        make(**shared)
    with pytest.raises(ValueError, match="num_kv_heads"):
        make(num_kv_heads=3, num_heads=2)


@pytest.mark.slow
def test_bench_move_smoke(tmp_path):
    """``python -m benchmarks.bench_move`` at toy size: the three models train and the JSON is written."""
    md = bench_move.main(["--d-model", "16", "--seq-len", "16", "--slots", "64", "--steps", "2", "--batch", "2",
                          "--eval-windows", "4", "--out-dir", str(tmp_path)])
    rows = json.loads((tmp_path / "move_text.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["A", "MV", "M+shared"] and "| MV |" in md
    assert all(np.isfinite(r["eval_loss"]) for r in rows)
    assert rows[1]["params"] > rows[0]["params"]  # the bank and routers
