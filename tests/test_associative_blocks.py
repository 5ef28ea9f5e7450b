"""Associative-memory blocks (linear_attn, gla, deltanet, gated_deltanet): decoding, packing, MQAR.

Tolerances (float32): decoding and packed runs match the full-sequence call to 1e-4 relative
(max abs error / max abs output).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.config import Config, ConfigError, ModelConfig, options_from_dict, validate
from memjax.nn.registry import get_block
from tiny import mqar_losses

TOL = 1e-4
CASES = [("L", {}), ("G", {}), ("DN", {"conv_width": 0}), ("D", {"expand_v": 2.0})]
TAYLOR = ("L", {"feature_map": "taylor", "qk_dim": 4, "qk_norm": True, "conv_width": 2})


def make(alias, opts, **extra):
    cfg = ModelConfig(d_model=32, num_heads=2)
    cls = get_block(alias)
    o = options_from_dict(cls.Options, {"chunk_size": 8, **opts, **extra}, f"model.blocks.{cls.name}")
    return cls(cfg, o, layer=0, shared={}, rngs=nnx.Rngs(0))


# Jitted: eager dispatch of the chunked forms compiles every small op separately (slower).
call = nnx.jit(lambda blk, x, seg=None: blk(x, segment_ids=seg))
prefill = nnx.jit(lambda blk, x, st: blk.prefill(x, st))
step = nnx.jit(lambda blk, x, st: blk.step(x, st))


def rel(x, ref):
    return float(jnp.max(jnp.abs(x - ref)) / jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("alias,opts", CASES)
def test_prefill_then_steps_match_full_sequence(alias, opts):
    """Prefill 2 tokens (fewer than the conv window), then decode one by one. For gated_deltanet a
    second prefill of 9 tokens continues from the first one's (conv and memory) state."""
    blk = make(alias, opts)
    x = jax.random.normal(jax.random.key(1), (2, 21, 32))
    y = call(blk, x)
    state = blk.init_state(2, 32)
    assert state["memory"].dtype == jnp.float32
    ys = []
    start = 0
    for n in [2, 9] if alias == "D" else [2]:
        yp, state = prefill(blk, x[:, start:start + n], state)
        ys.append(yp)
        start += n
    for t in range(start, 21):
        yt, state = step(blk, x[:, t], state)
        ys.append(yt[:, None])
    assert rel(jnp.concatenate(ys, 1), y) < TOL


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
    assert rel(y, jnp.concatenate(parts, 1)) < TOL


def test_parameters_carry_logical_axes():
    for alias, opts in CASES + [TAYLOR]:
        params = nnx.state(make(alias, opts), nnx.Param)
        for path, var in nnx.to_flat_state(params):
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == var[...].ndim, (alias, path)


def test_options_are_validated():
    cfg = Config()
    cfg.model.pattern = "D,G"
    cfg.model.blocks = {"gated_deltanet": {"chunk_size": 0}}
    with pytest.raises(ConfigError, match="gated_deltanet.chunk_size"):
        validate(cfg)
    cfg.model.blocks = {"gla": {"feature_map": "softmax"}}
    with pytest.raises(ConfigError, match="gla.feature_map"):
        validate(cfg)
    cfg.model.blocks = {"deltanet": {"feature_map": "elu"}}  # delta blocks always L2-normalise
    with pytest.raises(ConfigError, match="feature_map"):
        validate(cfg)
    cfg.model.blocks = {"gated_deltanet": {"chunk_size": 16, "conv_width": 0}, "linear_attn": {"mode": "recurrent"}}
    validate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["L", "G", "DN", "D"])
def test_two_layer_model_learns_mqar(alias):

    cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern=f"{alias},{alias}",
                      blocks={get_block(alias).name: {"chunk_size": 16}})
    losses = mqar_losses(cfg, steps=100, lr=1e-2)
    assert np.all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < first - 0.5, (first, last)  # measured drops: 0.7 to 1.0
