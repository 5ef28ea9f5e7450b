"""Mixture-of-memories block (``mom``): decoding with a cache = the full sequence, packed = separate
documents, parameter metadata, option checks, and a two-layer model on MQAR.

Tolerances (float32): 1e-4 relative (max abs error / max abs output).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.nn.associative import AssociativeCache
from memjax.nn.layers import logical_axes
from memjax.nn.mixture import MixtureOfMemories
from memjax.nn.registry import get_block
from tests.helpers import rel_err
from tiny import mqar_first_last


def _block(**opts):
    return MixtureOfMemories(d_model=32, num_heads=2, **opts, rngs=nnx.Rngs(0))


def test_block_registered_and_defaults():
    assert get_block("MoM") is get_block("mom") is MixtureOfMemories
    blk = MixtureOfMemories(64, rngs=nnx.Rngs(0))  # d_model and rngs suffice
    assert (blk.h, blk.dk, blk.m, blk.mp, blk.top_k) == (4, 16, 4, 5, 2)


@pytest.mark.parametrize("opts", [{}, {"memory": "linear", "shared_memory": False, "conv_width": 0}])
def test_block_prefill_then_steps_match_full_sequence(opts):
    """Prefill 2 tokens (fewer than the conv window), then decode 19 one by one (the recurrent
    form, crossing chunk boundaries of the training form): the full-sequence output to 1e-4."""
    blk = _block(chunk_size=8, **opts)
    x = jax.random.normal(jax.random.key(1), (2, 21, 32))
    y = nnx.jit(lambda b, x: b(x))(blk, x)
    cache = blk.init_cache(2, 32)
    assert isinstance(cache, AssociativeCache) and cache.memory.dtype == jnp.float32
    assert cache.memory.shape == (2, blk.mp, 2, 16, 16)
    decode = nnx.jit(lambda b, x, c: b(x, cache=c))
    y1, cache = decode(blk, x[:, :2], cache)
    ys = [y1]
    for t in range(2, 21):
        yt, cache = decode(blk, x[:, t:t + 1], cache)
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), y) < 1e-4


@pytest.mark.slow
def test_block_packed_equals_separate_documents():
    blk = _block(chunk_size=4)
    lengths = [7, 10, 5]
    x = jax.random.normal(jax.random.key(2), (1, sum(lengths), 32))
    seg = jnp.asarray(np.repeat([1, 2, 3], lengths))[None]
    y = nnx.jit(lambda b, x, s: b(x, segment_ids=s))(blk, x, seg)
    docs = jnp.concatenate([jnp.pad(x[:, s:s + n], ((0, 0), (0, 10 - n), (0, 0)))
                            for s, n in zip(np.cumsum([0] + lengths[:-1]), lengths)])
    y_docs = nnx.jit(lambda b, x: b(x))(blk, docs)
    parts = [y_docs[i:i + 1, :n] for i, n in enumerate(lengths)]
    assert rel_err(y, jnp.concatenate(parts, 1)) < 1e-4
    with pytest.raises(ValueError, match="MixtureOfMemories: segment_ids"):
        blk(x, segment_ids=seg, cache=blk.init_cache(1, 22))


def test_block_parameters_and_options():
    for path, var in nnx.to_flat_state(nnx.state(_block(), nnx.Param)):
        axes = logical_axes(var)
        assert axes is not None and len(axes) == var[...].ndim, path
    for bad, key in (({"top_k": 5}, "top_k"), ({"memory": "softmax"}, "memory"), ({"num_memories": 0}, "num_memories"),
                     ({"chunk_size": 0}, "chunk_size"), ({"conv_width": -1}, "conv_width"),
                     ({"mode": "parallel"}, "mode")):
        with pytest.raises(ValueError, match=f"MixtureOfMemories: {key}"):
            _block(**bad)
    _block(num_memories=2, top_k=1, memory="linear")


@pytest.mark.slow
def test_two_layer_mom_model_learns_mqar():
    first, last = mqar_first_last("MoM,MoM", {"mom": {"chunk_size": 16}}, steps=40, lr=1e-2)
    assert last < first - 0.5, (first, last)
