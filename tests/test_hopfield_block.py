"""Hopfield layer block (``hopfield``): position-wise (decoding = full sequence, packing changes
nothing), the output equals the naive retrieval from its learned patterns, option checks, and a
two-layer model on MQAR.

Tolerance (float32 parameters): 1e-5 relative, 1e-6 absolute.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.nn.cache import NoCache
from memjax.nn.hopfield import HopfieldLayer
from memjax.nn.layers import l2_normalize, logical_axes
from memjax.nn.registry import get_block
from tiny import mqar_first_last


def naive_update(xi, X, beta, mask=None):
    """One step in the paper's column form for a single state pattern: ``X softmax(beta X^T xi)``
    with ``X: [D, N]`` (numpy, float64)."""
    z = beta * X.T @ xi
    if mask is not None:
        z = np.where(mask, z, -np.inf)
    p = np.exp(z - z.max())
    return X @ (p / p.sum())


def _block(**opts):
    return HopfieldLayer(d_model=32, **{"num_heads": 2, **opts}, rngs=nnx.Rngs(0))


def test_block_registered_and_defaults():
    assert get_block("H") is get_block("hopfield") is HopfieldLayer
    blk = HopfieldLayer(64, rngs=nnx.Rngs(0))  # d_model and rngs suffice
    assert blk.patterns.shape == (4, 64, 16) and blk.steps == 1
    np.testing.assert_allclose(np.exp(np.asarray(blk.log_beta[...])), 4.0, rtol=1e-6)  # sqrt(head_dim)


def test_block_is_position_wise_and_matches_naive_retrieval():
    """Decoding token by token = full sequence (it has no state); packed = separate; and the
    output is the naive two-step retrieval from the learned patterns (float32 parameters:
    tolerance 1e-5 relative)."""
    blk = _block(num_patterns=8, steps=2)
    x = jax.random.normal(jax.random.key(0), (2, 7, 32))
    y = blk(x)
    cache = blk.init_cache(2, 7)
    assert not blk.stateful and cache == NoCache()
    ys = []
    for t in range(7):
        yt, cache = blk(x[:, t:t + 1], cache=cache)
        ys.append(yt)
    assert cache == NoCache()
    np.testing.assert_allclose(jnp.concatenate(ys, 1), y, rtol=1e-5, atol=1e-6)
    seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 3]] * 2)
    np.testing.assert_allclose(blk(x, segment_ids=seg), y, rtol=1e-5, atol=1e-6)

    xi = np.asarray(l2_normalize(blk.wq(x).reshape(2, 7, 2, 16)))
    pats = np.asarray(l2_normalize(blk.patterns[...]))
    vals = np.asarray(blk.values[...])
    beta = np.exp(np.asarray(blk.log_beta[...]))
    o = np.zeros((2, 7, 2, 16))
    for b in range(2):
        for t in range(7):
            for h in range(2):
                s = naive_update(xi[b, t, h], pats[h].T, beta[h])
                z = beta[h] * pats[h] @ s
                p = np.exp(z - z.max())
                o[b, t, h] = vals[h].T @ (p / p.sum())
    o = blk.o_norm(jnp.asarray(o)) * jax.nn.silu(blk.wg(x)).reshape(2, 7, 2, 16)
    np.testing.assert_allclose(blk.wo(o.reshape(2, 7, 32)), y, rtol=1e-5, atol=1e-6)
    for path, var in nnx.to_flat_state(nnx.state(blk, nnx.Param)):
        axes = logical_axes(var)
        assert axes is not None and len(axes) == var[...].ndim, path


def test_block_options_are_validated():
    for bad, key in (({"num_patterns": 0}, "num_patterns"), ({"steps": 0}, "steps"), ({"beta_init": -1.0}, "beta_init"),
                     ({"num_heads": 3}, "num_heads")):
        with pytest.raises(ValueError, match=f"HopfieldLayer: {key}"):
            _block(**bad)


@pytest.mark.slow
def test_two_layer_hopfield_model_trains_on_mqar():
    """Position-wise, so it cannot do the recall itself: 'A,H' (attention then the Hopfield
    layer) shows the layer trains inside a model; the loss must fall."""
    first, last = mqar_first_last("A,H", {"hopfield": {"num_patterns": 32}}, steps=40, lr=1e-2)
    assert last < first - 0.5, (first, last)
