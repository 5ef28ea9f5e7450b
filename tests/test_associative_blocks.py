"""Associative-memory blocks (linear_attn, gla, deltanet, gated_deltanet): decoding, packing, MQAR.

Tolerances (float32): decoding and packed runs match the full-sequence call to 1e-4 relative
(max abs error / max abs output).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.config import ModelConfig
from memjax.nn.associative import AssociativeCache, DeltaNet, GatedDeltaNet, GatedLinearAttention, LinearAttention
from memjax.nn.layers import logical_axes
from memjax.nn.registry import get_block
from tests.helpers import rel_err
from tiny import mqar_losses

TOL = 1e-4
CASES = [("L", {}), ("G", {}), ("DN", {"conv_width": 0}), ("D", {"expand_v": 2.0})]
TAYLOR = ("L", {"feature_map": "taylor", "qk_dim": 4, "qk_norm": True, "conv_width": 2})


def make(alias, opts, **extra):
    return get_block(alias)(d_model=32, num_heads=2, **{"chunk_size": 8, **opts, **extra}, rngs=nnx.Rngs(0))


# Jitted: eager dispatch of the chunked forms compiles every small op separately (slower).
call = nnx.jit(lambda blk, x, seg=None: blk(x, segment_ids=seg))
decode = nnx.jit(lambda blk, x, cache: blk(x, cache=cache))


def test_registered_names_and_defaults():
    for alias, cls in (("L", LinearAttention), ("G", GatedLinearAttention), ("DN", DeltaNet), ("D", GatedDeltaNet)):
        assert get_block(alias) is cls
    blk = GatedDeltaNet(64, rngs=nnx.Rngs(0))  # d_model and rngs suffice
    # chunk_size None: delta_rule's platform default (memjax.memory.chunking.delta_chunk_size)
    assert (blk.h, blk.dk, blk.dv, blk.chunk_size) == (4, 16, 16, None)
    assert LinearAttention(64, rngs=nnx.Rngs(0)).feature_map == "elu"
    assert GatedLinearAttention(64, rngs=nnx.Rngs(0)).feature_map == "identity"


@pytest.mark.parametrize("alias,opts", CASES)
def test_prefill_then_steps_match_full_sequence(alias, opts):
    """Prefill 2 tokens (fewer than the conv window), then decode one by one. For gated_deltanet a
    second prefill of 9 tokens continues from the first one's (conv and memory) cache."""
    blk = make(alias, opts)
    x = jax.random.normal(jax.random.key(1), (2, 21, 32))
    y = call(blk, x)
    cache = blk.init_cache(2, 32)
    assert isinstance(cache, AssociativeCache) and cache.memory.dtype == jnp.float32
    assert (cache.conv is None) == (opts.get("conv_width") == 0)
    ys = []
    start = 0
    for n in [2, 9] if alias == "D" else [2]:
        yp, cache = decode(blk, x[:, start:start + n], cache)
        ys.append(yp)
        start += n
    for t in range(start, 21):
        yt, cache = decode(blk, x[:, t:t + 1], cache)
        ys.append(yt)
    assert isinstance(cache, AssociativeCache)
    assert rel_err(jnp.concatenate(ys, 1), y) < TOL


@pytest.mark.parametrize("alias,opts", [TAYLOR, CASES[3]])
def test_packed_equals_separate_documents(alias, opts):
    """Also with the recurrent training form (option mode="recurrent")."""
    blk = make(alias, opts, mode="recurrent" if alias == "D" else "chunked")
    lengths = [7, 11, 5]
    x = jax.random.normal(jax.random.key(2), (1, sum(lengths), 32))
    seg = jnp.asarray(np.repeat([1, 2, 3], lengths))[None]
    y = call(blk, x, seg)
    parts, start = [], 0
    for n in lengths:
        parts.append(call(blk, x[:, start:start + n]))
        start += n
    assert rel_err(y, jnp.concatenate(parts, 1)) < TOL


def test_segment_ids_with_a_cache_are_refused():
    blk = make("D", {})
    x = jnp.zeros((1, 3, 32))
    with pytest.raises(ValueError, match="GatedDeltaNet: segment_ids"):
        blk(x, segment_ids=jnp.ones((1, 3), jnp.int32), cache=blk.init_cache(1, 3))


def test_parameters_carry_logical_axes():
    for alias, opts in CASES + [TAYLOR]:
        params = nnx.state(make(alias, opts), nnx.Param)
        for path, var in nnx.to_flat_state(params):
            axes = logical_axes(var)
            assert axes is not None and len(axes) == var[...].ndim, (alias, path)


def test_options_are_validated():
    for cls, bad, key in [(GatedDeltaNet, {"chunk_size": 0}, "chunk_size"),
                          (GatedDeltaNet, {"conv_width": -1}, "conv_width"),
                          (DeltaNet, {"expand_v": 0.01}, "expand_v"),
                          (LinearAttention, {"mode": "parallel"}, "mode"),
                          (DeltaNet, {"kernel": "triton"}, "kernel"),
                          (GatedLinearAttention, {"feature_map": "softmax"}, "feature_map"),
                          (LinearAttention, {"qk_dim": -1}, "qk_dim"),
                          (GatedDeltaNet, {"num_heads": 3}, "num_heads")]:
        with pytest.raises(ValueError, match=f"{cls.__name__}: {key}"):
            cls(32, **bad, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="feature_map"):  # delta blocks always L2-normalise
        DeltaNet(32, feature_map="elu", rngs=nnx.Rngs(0))
    GatedDeltaNet(32, chunk_size=16, conv_width=0, rngs=nnx.Rngs(0))
    LinearAttention(32, mode="recurrent", rngs=nnx.Rngs(0))


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["L", "G", "DN", "D"])
def test_two_layer_model_learns_mqar(alias):

    cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern=f"{alias},{alias}",
                      blocks={get_block(alias).name: {"chunk_size": 16}})
    losses = mqar_losses(cfg, steps=100, lr=1e-2)
    assert np.all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first - 0.5, (first, last)  # measured drops: 0.7 to 1.0
