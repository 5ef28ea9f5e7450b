"""Titans MAG and MAL blocks (and their NeuralMemory / SlidingWindowAttention): decoding, packing,
options, MQAR.

Tolerances (float32): decoded and packed outputs within 1e-4 of the largest full-sequence output.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.nn.layers import logical_axes
from memjax.nn.titans import NeuralMemory, SlidingWindowAttention, TitansMAG, TitansMAL
from tests.helpers import rel_err
from tiny import mqar_losses


def _block(cls, **opts):
    return cls(d_model=32, **{"num_heads": 2, "chunk_size": 4, "window": 6, **opts}, rngs=nnx.Rngs(0))


_call = nnx.jit(lambda b, x: b(x))
_call_cached = nnx.jit(lambda b, x, cache: b(x, cache=cache))


@pytest.mark.slow  # tests/test_decoding.py decodes titans_mag by default
@pytest.mark.parametrize("cls,opts", [(TitansMAG, {}), (TitansMAL, {"depth": 2, "activation": "gelu"})])
def test_block_prefill_then_steps_match_full_sequence(cls, opts):
    """Prefill 5 tokens (a chunk and a partial one), then decode 16 one by one (crossing chunk
    boundaries, wrapping the attention ring buffer): the full-sequence output to 1e-4."""
    blk = _block(cls, **opts)
    x = jax.random.normal(jax.random.key(1), (2, 21, 32))
    y = _call(blk, x)
    cache = blk.init_cache(2, 32)
    y1, cache = _call_cached(blk, x[:, :5], cache)
    ys = [y1]
    for t in range(5, 21):
        yt, cache = _call_cached(blk, x[:, t:t + 1], cache)
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), y) < 1e-4
    assert int(cache.attn.pos) == 21 and int(cache.memory.titans.count) == 21 % 4
    with pytest.raises(ValueError, match="segment_ids"):
        blk(x[:, :1], segment_ids=jnp.ones((2, 1), jnp.int32), cache=cache)


def test_block_packed_equals_separate_documents():
    blk = _block(TitansMAG, depth=2)
    lengths = [7, 10, 5]
    x = jax.random.normal(jax.random.key(2), (1, sum(lengths), 32))
    seg = jnp.asarray(np.repeat([1, 2, 3], lengths))[None]
    y = nnx.jit(lambda b, x, s: b(x, segment_ids=s))(blk, x, seg)
    # Each document alone, zero-padded at the end to one length (causal: padding after a
    # document cannot change its outputs), so one compiled call serves all three.
    docs = jnp.concatenate([jnp.pad(x[:, s:s + n], ((0, 0), (0, 10 - n), (0, 0)))
                            for s, n in zip(np.cumsum([0] + lengths[:-1]), lengths)])
    y_docs = _call(blk, docs)
    parts = [y_docs[i:i + 1, :n] for i, n in enumerate(lengths)]
    assert rel_err(y, jnp.concatenate(parts, 1)) < 1e-4


def test_block_parameters_and_options():
    for cls in (TitansMAG, TitansMAL):
        for path, var in nnx.to_flat_state(nnx.state(_block(cls, depth=2), nnx.Param)):
            axes = logical_axes(var)
            assert axes is not None and len(axes) == var[...].ndim, (cls.__name__, path)
    for bad, key in (({"window": 0}, "window"), ({"depth": 0}, "depth"), ({"activation": "relu"}, "activation"),
                     ({"chunk_size": 0}, "chunk_size"), ({"conv_width": -1}, "conv_width"),
                     ({"theta_max": -0.1}, "theta_max"), ({"num_heads": 3}, "num_heads")):
        with pytest.raises(ValueError, match=f"TitansMAG.*{key}"):
            _block(TitansMAG, **bad)
    _block(TitansMAL, chunk_size=8, depth=2)


@pytest.mark.slow  # tests/test_model_api.py builds every block from d_model and rngs
def test_block_defaults_suffice():
    x = jnp.ones((1, 3, 64))
    for cls in (TitansMAG, TitansMAL):
        assert cls(64, rngs=nnx.Rngs(0))(x).shape == (1, 3, 64)
    assert NeuralMemory(64, rngs=nnx.Rngs(0))(x).shape == (1, 3, 4, 16)
    assert SlidingWindowAttention(64, rngs=nnx.Rngs(0))(x).shape == (1, 3, 4, 16)


@pytest.mark.slow
def test_block_memory_public_pieces_agree():
    """NeuralMemory's pieces: the call is o_norm(update(project(x))); a read of the final weights
    (retrieve) at the last query is the last output (o_t reads M_t after its write); decoding
    from init_cache reproduces update."""
    mem = NeuralMemory(32, num_heads=2, chunk_size=3, depth=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 7, 32))
    inputs, conv = mem.project(x)
    assert conv is None and inputs.q.shape == (2, 7, 2, 16) and inputs.theta.shape == (2, 7, 2)
    o, state = mem.update(inputs)
    assert rel_err(mem.o_norm(o), mem(x)) < 1e-6
    assert rel_err(mem.retrieve(inputs.q[:, -1:], state.weights), o[:, -1:]) < 1e-5
    cache = mem.init_cache(2)
    inputs2, _ = mem.project(x, conv=cache.conv)
    o2, _ = mem.decode(inputs2, cache.titans)
    assert rel_err(o2, o) < 1e-5


@pytest.mark.slow
def test_two_layer_titans_model_learns_mqar():

    from memjax.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern="MAG,MAL",
                      blocks={"titans_mag": {"chunk_size": 8, "window": 8},
                              "titans_mal": {"chunk_size": 8, "window": 8}})
    losses = mqar_losses(cfg, steps=60, lr=3e-3)
    assert np.all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.5, (first, last)
