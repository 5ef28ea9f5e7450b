"""The model initialiser: batched random draws (memjax.nn.layers.batched_init).

Drawn one parameter at a time, the jitted initialiser of ``configs/hybrid_125m.py`` held one
threefry hash per parameter (199 fold_ins + 162 draws); XLA:GPU compiled it for over 150 s.
"""
import contextlib
import re

import jax
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_config

import memjax.model.lm as lm
from memjax.config import load_config
from memjax.nn.layers import batched_init, param
from memjax.nn.registry import known_names
from memjax.train.loop import build

RANDOM_OPS = ("random_bits", "random_fold_in")


def _params(cfg, seed=0):
    return jax.jit(lambda: nnx.state(lm.LM(cfg.model, rngs=nnx.Rngs(seed)), nnx.Param).to_pure_dict())()


def _random_ops(jaxpr) -> int:
    """Random-bit and key-derivation ops in a jaxpr, sub-jaxprs counted at every call site."""
    n = 0
    for eqn in jaxpr.eqns:
        n += str(eqn.primitive) in RANDOM_OPS
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    n += _random_ops(sub)
    return n


def _init_random_ops(cfg) -> int:
    setup = build(cfg, devices=jax.devices()[:1])
    return _random_ops(jax.make_jaxpr(setup.init_fn.__wrapped__)().jaxpr)


@pytest.mark.slow  # (every block, compiled twice; the default run checks the 125M pattern below)
def test_batched_init_draws_the_same_values_for_every_block(monkeypatch):
    """Every registered block, once (some twice, so groups of several parameters form)."""
    names = sorted(n for n in known_names() if "=" not in n)
    cfg = tiny_config(",".join(names + ["attention", "mlp", "gated_deltanet", "memory_plus"]))
    cfg.model.blocks = {"memory_plus": {"shared_pool": True}}
    batched = _params(cfg)
    monkeypatch.setattr(lm, "batched_init", contextlib.nullcontext)
    one_by_one = _params(cfg)
    flat = dict(jax.tree_util.tree_leaves_with_path(one_by_one))
    assert len(flat) == len(jax.tree.leaves(batched)) > 100
    for path, a in jax.tree_util.tree_leaves_with_path(batched):
        np.testing.assert_array_equal(a, flat[path], err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("scan", [False, True])
def test_random_ops_do_not_grow_with_depth(scan):
    """Unrolled: one fold_in and one draw per kind of parameter, however many layers share it.
    Scanned: one of each per parameter of the stacked group (the vmap batches the layers)."""
    counts = []
    for repeat in (2, 4):
        cfg = tiny_config("A,F,D,F,M")
        cfg.model.pattern_repeat, cfg.model.scan_layers = repeat, scan
        counts.append(_init_random_ops(cfg))
    assert 0 < counts[0] == counts[1] <= (80 if scan else 24), counts


def test_hybrid_125m_initialiser_is_small():
    """The 125M initialiser: 22 random ops (361 drawn one parameter at a time), no constant
    larger than 1 KiB, and the same values as drawn one parameter at a time (checked on a
    smaller instance of the same pattern)."""
    cfg = load_config("configs/hybrid_125m.py")
    assert _init_random_ops(cfg) <= 24
    setup = build(cfg, devices=jax.devices()[:1])
    text = setup.init_fn.lower().as_text()
    assert len(text) < 2_000_000
    constants = re.findall(r"stablehlo\.constant dense<(.*?)> : tensor<([^>]*)>", text)
    assert constants
    for value, ty in constants:
        if value.startswith(("[", '"0x')):  # not a splat (one value broadcast)
            *dims, dtype = ty.split("x")
            nbytes = int(np.prod([int(d) for d in dims])) * max(1, int(re.sub(r"\D", "", dtype) or 8) // 8)
            assert nbytes <= 1024, f"a {nbytes}-byte constant tensor<{ty}> in the initialiser"


def test_param_outside_the_context_and_eagerly_draws_at_once():
    rngs = nnx.Rngs(3)
    with batched_init():
        p = param(rngs, nnx.initializers.normal(1.0), (4, 2), ("embed", "mlp"))  # eager: no deferral
    q = nnx.initializers.normal(1.0)(jax.random.fold_in(jax.random.key(3), 0), (4, 2))
    np.testing.assert_array_equal(p[...], q)
    assert int(rngs.params.count[...]) == 1


def test_deferred_draws_advance_the_stream_like_immediate_ones():
    """A draw after the context continues the stream where the deferred draws left it."""

    def build_and_draw(deferred):
        rngs = nnx.Rngs(5)
        ctx = batched_init() if deferred else contextlib.nullcontext()
        with ctx:
            ps = [param(rngs, nnx.initializers.normal(1.0), (3,), ("embed",)) for _ in range(3)]
            ps.append(param(rngs, nnx.initializers.uniform(1.0), (2, 3), ("embed", "mlp")))
        return [p[...] for p in ps] + [jax.random.key_data(rngs.params())]

    deferred, immediate = (jax.jit(lambda d=d: build_and_draw(d))() for d in (True, False))
    for a, b in zip(deferred, immediate, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_unusual_shapes(shape):
    def make():
        rngs = nnx.Rngs(0)
        with batched_init():
            a = param(rngs, nnx.initializers.normal(1.0), shape, ("embed",) * len(shape))
            b = param(rngs, nnx.initializers.normal(1.0), shape, ("embed",) * len(shape))
        return a[...], b[...]

    a, b = jax.jit(make)()
    assert a.shape == b.shape == shape
    np.testing.assert_array_equal(a, nnx.initializers.normal(1.0)(jax.random.fold_in(jax.random.key(0), 0), shape))
    np.testing.assert_array_equal(b, nnx.initializers.normal(1.0)(jax.random.fold_in(jax.random.key(0), 1), shape))
