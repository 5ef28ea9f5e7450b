"""SSM blocks (s4d, mamba2, rglru, swa_ssm): decoding, packing, options, MQAR.

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
CASES = [
    ("S", {}),
    ("S", {"mode": "chunked", "chunk_size": 4}),  # prefill of 9 tokens: a padded last chunk
    ("M2", {"chunk_size": 8, "d_state": 16, "n_groups": 2}),
    ("R", {}),
    ("E", {"window": 5, "chunk_size": 8}),
]


def make(alias, opts, **extra):
    cfg = ModelConfig(d_model=32, num_heads=2)
    cls = get_block(alias)
    o = options_from_dict(cls.Options, {**opts, **extra}, f"model.blocks.{cls.name}")
    o.validate(cfg, f"model.blocks.{cls.name}")
    return cls(cfg, o, layer=0, shared={}, rngs=nnx.Rngs(0))


# Jitted entry points: eager dispatch would compile each of the many small ops separately (slow).
call = nnx.jit(lambda b, x: b(x))
call_packed = nnx.jit(lambda b, x, seg: b(x, segment_ids=seg))
prefill = nnx.jit(lambda b, x, st: b.prefill(x, st))
step = nnx.jit(lambda b, x, st: b.step(x, st))


def rel(x, ref):
    x, ref = np.asarray(x), np.asarray(ref)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("alias,opts", CASES)
def test_prefill_then_steps_match_full_sequence(alias, opts):
    """Prefill 2 tokens (fewer than the conv width / window), prefill 9 more, then decode 10 one by
    one (for swa_ssm the ring buffer wraps around several times and tokens are evicted into the SSM)."""
    blk = make(alias, opts)
    x = jax.random.normal(jax.random.key(1), (2, 21, 32))
    y = call(blk, x)
    state = blk.init_state(2, 32)
    y1, state = prefill(blk, x[:, :2], state)
    y2, state = prefill(blk, x[:, 2:11], state)
    ys = [y1, y2]
    for t in range(11, 21):
        yt, state = step(blk, x[:, t], state)
        ys.append(yt[:, None])
    assert rel(jnp.concatenate(ys, 1), y) < TOL


@pytest.mark.parametrize("alias,opts", CASES)
def test_packed_equals_separate_documents(alias, opts):
    blk = make(alias, opts)
    lengths = [9, 9, 9]  # longer than swa_ssm's window; equal lengths: one compile for the separate runs
    x = jax.random.normal(jax.random.key(2), (1, sum(lengths), 32))
    seg = jnp.asarray(np.repeat([1, 2, 3], lengths))[None]
    y = call_packed(blk, x, seg)
    parts, start = [], 0
    for n in lengths:
        parts.append(call(blk, x[:, start:start + n]))
        start += n
    assert rel(y, jnp.concatenate(parts, 1)) < TOL


def test_swa_ssm_remembers_beyond_the_window_only_through_the_ssm():
    """Changing token 0 changes the output at t = 20 (window 5): the evicted token lives on in the
    SSM state. With instantaneous SSM decay (A -> -inf) the state holds only the token evicted last,
    so token 0 is seen at t = 5 (just evicted, read by the SSM) and no longer at t = 6 or 20."""
    blk = make("E", {"window": 5, "chunk_size": 8})
    x = jax.random.normal(jax.random.key(3), (1, 21, 32))
    x2 = x.at[:, 0].add(1.0)
    assert rel(call(blk, x2)[:, 20], call(blk, x)[:, 20]) > 1e-3
    blk.a_log[...] = jnp.full_like(blk.a_log[...], 30.0)  # exp(dt A) = 0: forget at once
    y, y2 = call(blk, x), call(blk, x2)
    assert rel(y2[:, 5], y[:, 5]) > 1e-3
    assert rel(y2[:, 6:], y[:, 6:]) < 1e-6


def test_parameters_carry_logical_axes():
    for alias, opts in CASES + [("S", {"init": "inv", "reparam": "best"}), ("E", {"combine": "sum"})]:
        params = nnx.state(make(alias, opts), nnx.Param)
        for path, var in nnx.to_flat_state(params):
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == var[...].ndim, (alias, path)


def test_s4d_eigenvalues_start_at_the_chosen_init():
    from memjax.memory import hippo
    for init in ("legs", "lin", "inv"):
        for reparam in ("exp", "softplus", "best", "direct"):
            blk = make("S", {"init": init, "reparam": reparam, "d_state": 8})
            A = blk._ssm_params()[0]
            np.testing.assert_allclose(np.asarray(A[3]), hippo.S4D_INITS[init](8), rtol=1e-5)


def test_options_are_validated():
    cfg = Config()
    cfg.model.pattern = "S,M2,R,E"
    bad = [({"s4d": {"init": "hippo"}}, "s4d.init"), ({"s4d": {"reparam": "tanh"}}, "s4d.reparam"),
           ({"s4d": {"mode": "fft"}}, "s4d.mode"), ({"s4d": {"chunk_size": 0}}, "s4d.chunk_size"),
           ({"mamba2": {"n_groups": 3}}, "mamba2.n_groups"), ({"mamba2": {"expand": 0}}, "mamba2.expand"),
           ({"mamba2": {"reparam": "best"}}, "mamba2.a_init_max"), ({"rglru": {"max_rad": 1.0}}, "rglru.min_rad"),
           ({"rglru": {"expand": 0.3}}, "rglru.expand"), ({"swa_ssm": {"window": 0}}, "swa_ssm.window"),
           ({"swa_ssm": {"combine": "max"}}, "swa_ssm.combine"), ({"mamba2": {"chunk": 3}}, "mamba2.chunk")]
    for blocks, match in bad:
        cfg.model.blocks = blocks
        with pytest.raises(ConfigError, match=match):
            validate(cfg)
    cfg.model.blocks = {"s4d": {"init": "lin", "mode": "chunked"}, "mamba2": {"d_state": 16, "reparam": "best",
                                                                            "a_init_max": 2.0},
                        "rglru": {"expand": 1.5}, "swa_ssm": {"window": 8, "combine": "sum"}}
    validate(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("alias,opts", [("S", {}), ("M2", {"chunk_size": 16, "d_state": 16}), ("R", {}),
                                        ("E", {"window": 8, "chunk_size": 16})])
def test_two_layer_model_learns_mqar(alias, opts):

    cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern=f"{alias},{alias}",
                      blocks={get_block(alias).name: opts})
    losses = mqar_losses(cfg, steps=60, lr=3e-3)
    assert np.all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.5, (first, last)
