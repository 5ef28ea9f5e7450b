"""Zoology's gated short convolution block (memjax.nn.base_conv, pattern "C"): the training form
against a token-by-token float64 loop, decoding == the training form, packed documents == the
documents run alone, errors, and Zoology's attention model ("C,A") as a pattern."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.config import ModelConfig
from memjax.model.lm import LM
from memjax.nn import BaseConv


def _naive(blk, x, segment_ids=None):
    """``y_t = (sum_i w_i x_{t-i}) * (x_t W + b)``, the sum over ``t - i`` in ``t``'s document."""
    w = np.asarray(blk.conv.weight[...])
    kernel, bias = np.asarray(blk.proj.kernel[...]), np.asarray(blk.proj.bias[...])
    x = np.asarray(x)
    seg = np.zeros(x.shape[:2], int) if segment_ids is None else np.asarray(segment_ids)
    y = np.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            u = sum(w[i] * x[b, t - i] for i in range(w.shape[0]) if t - i >= 0 and seg[b, t - i] == seg[b, t])
            y[b, t] = u * (x[b, t] @ kernel + bias)
    return y


def test_training_form_matches_the_token_loop_in_float64(x64):
    blk = BaseConv(d_model=6, conv_width=3, dtype=jnp.float64, rngs=nnx.Rngs(0))
    blk.proj.bias[...] = jax.random.normal(jax.random.key(2), (6,), jnp.float32)  # (zeros at init: test the bias)
    x = jax.random.normal(jax.random.key(1), (2, 9, 6), jnp.float64)
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 2, 2, 2, 2, 3, 3, 3]])
    np.testing.assert_allclose(blk(x), _naive(blk, x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(blk(x, segment_ids=seg), _naive(blk, x, seg), rtol=1e-12, atol=1e-12)


def test_packed_documents_equal_documents_run_alone():
    blk = BaseConv(d_model=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (1, 10, 8))
    seg = jnp.asarray([[1] * 4 + [2] * 6])
    y = blk(x, segment_ids=seg)
    np.testing.assert_allclose(y[:, :4], blk(x[:, :4]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y[:, 4:], blk(x[:, 4:]), rtol=1e-6, atol=1e-6)


def test_decoding_equals_the_training_form():
    """A 5-token prefill, then one token at a time: the same outputs as the whole sequence."""
    blk = BaseConv(d_model=8, conv_width=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 11, 8))
    full = blk(x)
    cache = blk.init_cache(2, 11)
    y0, cache = blk(x[:, :5], cache=cache)
    ys = [y0]
    for t in range(5, 11):
        y, cache = blk(x[:, t:t + 1], cache=cache)
        ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), full, rtol=1e-6, atol=1e-6)
    assert cache.conv.shape == (2, 3, 8)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="conv_width must be >= 1"):
        BaseConv(d_model=8, conv_width=0, rngs=nnx.Rngs(0))
    blk = BaseConv(d_model=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="segment_ids are not supported with a decoding cache"):
        blk(jnp.zeros((1, 2, 8)), segment_ids=jnp.ones((1, 2), int), cache=blk.init_cache(1, 2))


def test_zoology_attention_model_is_a_pattern():
    """``pattern="C,A"``: layer 0 the gated conv, layer 1 attention (Zoology's MQAR attention)."""
    cfg = ModelConfig(vocab_size=32, d_model=16, num_heads=1, pattern="C,A")
    model = LM(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, 32)
    logits = model(tokens)
    assert logits.shape == (2, 12, 32) and np.isfinite(np.asarray(logits)).all()
    assert [type(b).__name__ for b in model.blocks] == ["BaseConv", "Attention"]
