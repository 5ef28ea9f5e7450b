"""SSM blocks (S4D, Mamba2, RGLRUBlock, SlidingWindowSSM): decoding, packing, options, MQAR.

Tolerances (float32): decoding and packed runs match the full-sequence call to 1e-4 relative
(max abs error / max abs output).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.config import ModelConfig
from memjax.nn.hybrid import SlidingWindowSSM
from memjax.nn.layers import logical_axes
from memjax.nn.registry import get_block
from memjax.nn.rglru_block import RGLRUBlock
from memjax.nn.ssm_blocks import S4D, Mamba2
from tests.helpers import rel_err
from tiny import mqar_losses

TOL = 1e-4
CASES = [
    (S4D, {}),
    (S4D, {"mode": "chunked", "chunk_size": 4}),  # prefill of 9 tokens: a padded last chunk
    (Mamba2, {"num_heads": 2, "chunk_size": 8, "d_state": 16, "n_groups": 2}),
    (RGLRUBlock, {"num_heads": 2}),
    (SlidingWindowSSM, {"num_heads": 2, "window": 5, "chunk_size": 8}),
]
IDS = [f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(CASES)]


def make(cls, **kwargs):
    return cls(d_model=32, **kwargs, rngs=nnx.Rngs(0))


# Jitted entry points: eager dispatch would compile each of the many small ops separately (slow).
call = nnx.jit(lambda b, x: b(x))
call_packed = nnx.jit(lambda b, x, seg: b(x, segment_ids=seg))
call_cached = nnx.jit(lambda b, x, cache: b(x, cache=cache))


def same_layout(a, b):
    """Two caches with the same pytree structure, shapes and dtypes (a cache passes through scan)."""
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


@pytest.mark.parametrize("cls,kwargs", CASES, ids=IDS)
def test_prefill_then_steps_match_full_sequence(cls, kwargs):
    """Prefill 2 tokens (fewer than the conv width / window), prefill 9 more, then decode 10 one by
    one (for SlidingWindowSSM the ring buffer wraps around several times and tokens are evicted
    into the SSM). The cache keeps its layout."""
    blk = make(cls, **kwargs)
    x = jax.random.normal(jax.random.key(1), (2, 21, 32))
    y = call(blk, x)
    cache0 = blk.init_cache(2, 32)
    y1, cache = call_cached(blk, x[:, :2], cache0)
    y2, cache = call_cached(blk, x[:, 2:11], cache)
    ys = [y1, y2]
    for t in range(11, 21):
        yt, cache = call_cached(blk, x[:, t:t + 1], cache)
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), y) < TOL
    assert same_layout(cache, cache0)
    with pytest.raises(ValueError, match="segment_ids"):
        blk(x[:, :1], segment_ids=jnp.ones((2, 1), jnp.int32), cache=cache0)


@pytest.mark.parametrize("cls,kwargs", CASES, ids=IDS)
def test_packed_equals_separate_documents(cls, kwargs):
    blk = make(cls, **kwargs)
    lengths = [9, 9, 9]  # longer than swa_ssm's window; equal lengths: one compile for the separate runs
    x = jax.random.normal(jax.random.key(2), (1, sum(lengths), 32))
    seg = jnp.asarray(np.repeat([1, 2, 3], lengths))[None]
    y = call_packed(blk, x, seg)
    parts, start = [], 0
    for n in lengths:
        parts.append(call(blk, x[:, start:start + n]))
        start += n
    assert rel_err(y, jnp.concatenate(parts, 1)) < TOL


def test_swa_ssm_remembers_beyond_the_window_only_through_the_ssm():
    """Changing token 0 changes the output at t = 20 (window 5): the evicted token lives on in the
    SSM state. With instantaneous SSM decay (A -> -inf) the state holds only the token evicted last,
    so token 0 is seen at t = 5 (just evicted, read by the SSM) and no longer at t = 6 or 20."""
    blk = make(SlidingWindowSSM, num_heads=2, window=5, chunk_size=8)
    x = jax.random.normal(jax.random.key(3), (1, 21, 32))
    x2 = x.at[:, 0].add(1.0)
    assert rel_err(call(blk, x2)[:, 20], call(blk, x)[:, 20]) > 1e-3
    blk.a_log[...] = jnp.full_like(blk.a_log[...], 30.0)  # exp(dt A) = 0: forget at once
    y, y2 = call(blk, x), call(blk, x2)
    assert rel_err(y2[:, 5], y[:, 5]) > 1e-3
    assert rel_err(y2[:, 6:], y[:, 6:]) < 1e-6


def test_parameters_carry_logical_axes():
    for cls, kwargs in CASES + [(S4D, {"init": "inv", "reparam": "best"}), (SlidingWindowSSM, {"combine": "sum"})]:
        params = nnx.state(make(cls, **kwargs), nnx.Param)
        for path, var in nnx.to_flat_state(params):
            axes = logical_axes(var)
            assert axes is not None and len(axes) == var[...].ndim, (cls.__name__, path)


def test_s4d_eigenvalues_start_at_the_chosen_init():
    from memjax.memory import hippo
    for init in ("legs", "lin", "inv"):
        for reparam in ("exp", "softplus", "best", "direct"):
            blk = make(S4D, init=init, reparam=reparam, d_state=8)
            A = blk._ssm_params()[0]
            np.testing.assert_allclose(np.asarray(A[3]), hippo.S4D_INITS[init](8), rtol=1e-5)


@pytest.mark.slow
def test_d_model_and_rngs_suffice():
    for cls in (S4D, Mamba2, RGLRUBlock, SlidingWindowSSM):
        blk = cls(64, rngs=nnx.Rngs(0))
        assert blk(jnp.ones((1, 3, 64))).shape == (1, 3, 64)


@pytest.mark.parametrize("cls,kwargs,match", [
    (S4D, {"init": "hippo"}, "init"), (S4D, {"reparam": "tanh"}, "reparam"), (S4D, {"mode": "fft"}, "mode"),
    (S4D, {"chunk_size": 0}, "chunk_size"), (S4D, {"dt_min": 0.5}, "dt_min"),
    (Mamba2, {"num_heads": 2, "n_groups": 3}, "n_groups"), (Mamba2, {"expand": 0}, "expand"),
    (Mamba2, {"reparam": "best"}, "a_init_max"), (Mamba2, {"kernel": "cuda"}, "kernel"),
    (Mamba2, {"mode": "scan"}, "mode"),
    (RGLRUBlock, {"max_rad": 1.0}, "min_rad"), (RGLRUBlock, {"num_heads": 2, "expand": 0.3}, "expand"),
    (RGLRUBlock, {"mode": "chunked"}, "mode"),
    (SlidingWindowSSM, {"window": 0}, "window"), (SlidingWindowSSM, {"combine": "max"}, "combine"),
    (SlidingWindowSSM, {"num_heads": 2, "head_dim": 5}, "head_dim"), (SlidingWindowSSM, {"num_heads": 3}, "num_heads"),
])
def test_bad_options_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=f"{cls.__name__}.*{match}"):
        make(cls, **kwargs)


def test_good_options_build():
    make(S4D, init="lin", mode="chunked")
    make(Mamba2, d_state=16, reparam="best", a_init_max=2.0)
    make(RGLRUBlock, expand=1.5)
    make(SlidingWindowSSM, window=8, combine="sum")


@pytest.mark.parametrize("cls,kwargs", [CASES[i] if i != 4 else pytest.param(*CASES[i], marks=pytest.mark.slow)
                                        for i in (0, 2, 3, 4)], ids=[IDS[i] for i in (0, 2, 3, 4)])
def test_seq_axis_equals_single_device(cls, kwargs):
    """Built with seq_axis="seq" and run under a mesh that splits time over 4 devices, the block
    (packed input) gives the output of the same block without sequence parallelism."""
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    x = jax.random.normal(jax.random.key(5), (2, 32, 32))
    seg = jnp.asarray(np.stack([np.repeat([1, 2, 3], [5, 19, 8]), np.repeat([4, 5], [8, 24])]))
    ref = call_packed(make(cls, **kwargs), x, seg)
    blk = make(cls, **kwargs, seq_axis="seq")
    with pytest.raises(ValueError, match="seq_axis='seq'"):  # no mesh: nothing is inferred
        call_packed(blk, x, seg)
    with jax.set_mesh(mesh):
        y = call_packed(blk, x, seg)
    assert rel_err(y, ref) < TOL


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
