"""Causal attention: the XLA form against a NumPy loop, the fused path's argument mapping
(jax.nn.dot_product_attention, checked with its XLA implementation on CPU) and the dispatch rules."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.memory.attention import causal_attention, cudnn_unsupported, fused_attention

attention_module = sys.modules["memjax.memory.attention"]


def qkv(b=2, t=11, h=4, hkv=2, d=8, dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
    return f(b, t, h, d), f(b, t, hkv, d), f(b, t, hkv, d)


def numpy_attention(q, k, v, scale, window=0, seg=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, _ = q.shape
    r = h // k.shape[2]
    o = np.zeros(q.shape[:3] + (v.shape[3],))
    for i in range(b):
        for j in range(h):
            for s in range(t):
                keys = [u for u in range(s + 1) if (window == 0 or u > s - window)
                        and (seg is None or seg[i, u] == seg[i, s])]
                logits = np.array([scale * q[i, s, j] @ k[i, u, j // r] for u in keys])
                p = np.exp(logits - logits.max())
                o[i, s, j] = (p / p.sum()) @ v[i, keys, j // r]
    return o


@pytest.mark.parametrize("window", [0, 3])
def test_xla_form_matches_numpy_loop(x64, window):
    q, k, v = qkv()
    seg = np.repeat(np.array([[0] * 6 + [1] * 5]), 2, axis=0)
    for segs in (None, seg):
        got = causal_attention(q, k, v, window=window, segment_ids=None if segs is None else jnp.asarray(segs),
                               impl="xla")
        np.testing.assert_allclose(got, numpy_attention(q, k, v, 8 ** -0.5, window, segs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [0, 1, 3])
def test_fused_path_maps_arguments_like_the_xla_form(window):
    """jax.nn.dot_product_attention (its XLA implementation here; cuDNN on a GPU) with the
    arguments fused_attention passes == our XLA form: causal, window, GQA, scale; and gradients.
    float32: jax.nn forms its logits in float32 whatever the inputs; a wrong mask, window or scale
    moves outputs by O(1), round-off by ~1e-6."""
    q, k, v = qkv(dtype=jnp.float32)
    ours = lambda q, k, v: causal_attention(q, k, v, window=window, scale=0.3, impl="xla")
    fused = lambda q, k, v: fused_attention(q, k, v, scale=0.3, window=window, implementation="xla")
    np.testing.assert_allclose(fused(q, k, v), ours(q, k, v), rtol=1e-5, atol=1e-5)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * g), argnums=(0, 1, 2))(q, k, v) for f in (ours, fused)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cudnn_preconditions_and_errors():
    q, k, v = qkv(dtype=jnp.bfloat16)
    assert cudnn_unsupported(q, k, v) is None
    assert "segment_ids" in cudnn_unsupported(q, k, v, segment_ids=jnp.zeros((2, 11), jnp.int32))
    assert "positions" in cudnn_unsupported(q, k, v, q_positions=jnp.zeros((2, 11), jnp.int32))
    assert "dtype" in cudnn_unsupported(*qkv(dtype=jnp.float32))
    assert "head dims" in cudnn_unsupported(*qkv(d=12, dtype=jnp.bfloat16))
    with pytest.raises(ValueError, match="impl='cudnn' does not support segment_ids"):
        causal_attention(q, k, v, segment_ids=jnp.zeros((2, 11), jnp.int32), impl="cudnn")
    with pytest.raises(ValueError, match="impl must be one of"):
        causal_attention(q, k, v, impl="flash")


def test_auto_uses_cudnn_only_on_a_verified_gpu(monkeypatch):
    q, k, v = qkv(dtype=jnp.bfloat16)
    calls = []
    monkeypatch.setattr(attention_module, "fused_attention",
                        lambda q, k, v, **kw: calls.append(kw) or jnp.zeros(q.shape, q.dtype))
    causal_attention(q, k, v)  # CPU: XLA
    assert calls == []

    class FakeGpu:
        device_kind = "NVIDIA H100 80GB HBM3"

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [FakeGpu()])
    causal_attention(q, k, v)  # a GPU, but none verified: XLA
    assert calls == []
    monkeypatch.setattr(attention_module, "VERIFIED_DEVICES", {"gpu": ("NVIDIA H100",)})
    causal_attention(q, k, v, window=4)
    assert calls == [{"scale": 8 ** -0.5, "window": 4}]
    causal_attention(q, k, v, segment_ids=jnp.zeros((2, 11), jnp.int32))  # packed: XLA
    causal_attention(q.astype(jnp.float32), k, v)  # float32: XLA
    assert len(calls) == 1


def test_attention_block_impl_option(monkeypatch):
    from flax import nnx
    from tiny import tiny_config

    from memjax.config import ConfigError, validate
    from memjax.model import LM
    import memjax.nn.attention as block_module

    seen = []
    real = block_module.causal_attention
    monkeypatch.setattr(block_module, "causal_attention",
                        lambda *a, impl="auto", **kw: seen.append(impl) or real(*a, impl="xla", **kw))
    cfg = tiny_config(pattern="A")
    cfg.model.blocks = {"attention": {"impl": "cudnn"}}
    validate(cfg)
    LM(cfg.model, rngs=nnx.Rngs(0))(jnp.zeros((1, 8), jnp.int32))
    assert seen == ["cudnn"]
    cfg.model.blocks = {"attention": {"impl": "flash"}}
    with pytest.raises(ConfigError, match=r"model\.blocks\.attention.*impl must be one of"):
        validate(cfg)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("window", [0, 128])
def test_hardware_cudnn_matches_xla(window):
    """cuDNN flash attention vs the XLA form on the device (bf16, GQA, T = 1024), forward and
    gradients; add the device to VERIFIED_DEVICES in memjax/memory/attention.py once green."""
    q, k, v = qkv(b=2, t=1024, h=8, hkv=4, d=64, dtype=jnp.bfloat16)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.bfloat16)

    def value_and_grads(impl):
        f = lambda q, k, v: jnp.sum(causal_attention(q, k, v, window=window, impl=impl).astype(jnp.float32) * g)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    (ref, ref_grads), (got, got_grads) = value_and_grads("xla"), value_and_grads("cudnn")
    rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
    assert abs(float(got) - float(ref)) <= 1e-2 * abs(float(ref)) + 1e-2
    for a, b in zip(got_grads, ref_grads):
        assert rel(a, b) < 2e-2  # bf16 outputs and probabilities
