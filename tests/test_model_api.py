"""The model's contract: blocks built from the registry by keyword arguments, scanned layers equal
to unrolled ones, Flax partition specs, config errors naming the key, the README's user-code example."""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import copy_to_scanned

import memjax
from memjax.config import Config, ConfigError, ModelConfig, validate
from memjax.model.lm import LM, block_names
from memjax.model.sharding import flax_rules, param_specs
from memjax.nn.layers import logical_axes
from memjax.nn.registry import block_kwargs, get_block, known_names

BLOCKS = sorted(n for n in known_names() if "=" not in n)
# Built from keyword arguments in the default run: one block per constructor family (projections +
# matrix memory, vector gates, KDA / GDN-2, SSMs, DPLR, Titans, memory layers, n-gram memory,
# mixture, Hopfield, log-linear). Every registered block is built here under `-m slow`; the blocks'
# own test files construct them by default as well.
DEFAULT = {"attention", "gated_deltanet", "gla_vec", "kda", "mamba2", "mamba3", "rwkv7", "titans_mac",
           "memory_plus", "ngram_mem", "mom", "hopfield", "log_linear_gdn", "s4d"}


@pytest.mark.parametrize("name", [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow) for n in BLOCKS])
def test_every_block_builds_from_d_model_and_rngs_alone(name):
    cls = get_block(name)
    model_args, _ = block_kwargs(cls)
    assert "d_model" in model_args
    blk = cls(d_model=32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
    # jitted: eager dispatch of a chunked memory's many small ops took up to 5x longer than compiling
    y = nnx.jit(lambda m, x, t: m(x, tokens=t))(blk, x, tokens)
    assert y.shape == x.shape and y.dtype == x.dtype
    cache = blk.init_cache(2, 16)
    y2, cache2 = nnx.jit(lambda m, x, t, c: m(x, tokens=t, cache=c))(blk, x, tokens, cache)
    np.testing.assert_allclose(y2, y, rtol=2e-4, atol=2e-4)
    assert jax.tree.structure(cache2) == jax.tree.structure(cache)
    for _, var in nnx.to_flat_state(nnx.state(blk, nnx.Param)):
        axes = logical_axes(var)
        assert axes is not None and len(axes) == var.ndim, (name, var)


def test_public_block_names_are_exported():
    for cls_name in ("Attention", "GatedDeltaNet", "Mamba2", "MemoryPlus", "GatedMLP", "RGLRU", "TitansMAC",
                     "KVCache", "NoCache", "Block"):
        assert hasattr(memjax.nn, cls_name), cls_name
    assert {get_block(n) for n in BLOCKS} <= {getattr(memjax.nn, n) for n in memjax.nn.__all__}


@pytest.mark.slow  # (test_scan_compiles_one_group_body runs by default; CI's time)
def test_scanned_layers_equal_unrolled_layers():
    # a gated memory beside attention; G (GLA) rather than D: the delta rule's chunk form compiled
    # 1.6x longer and scanning is block-agnostic (test_scan_compiles_one_group_body scans D too)
    pattern = "A,G"
    cfg = ModelConfig(vocab_size=40, d_model=32, num_heads=2, pattern=pattern, pattern_repeat=2, scan_layers=False)
    flat = LM(cfg, rngs=nnx.Rngs(0))
    scanned = LM(ModelConfig(**{**cfg.__dict__, "scan_layers": True}), rngs=nnx.Rngs(1))
    assert scanned.scanned and not flat.scanned
    params = copy_to_scanned(nnx.state(flat, nnx.Param).to_pure_dict(), len(pattern.split(",")), 2)
    nnx.update(scanned, nnx.State(params))
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 40)
    seg = jnp.repeat(jnp.array([[1, 2]]), 8, axis=1).repeat(2, 0)
    fwd = nnx.jit(lambda m, t, s: m(t, segment_ids=s))
    np.testing.assert_allclose(fwd(scanned, tokens, seg), fwd(flat, tokens, seg), rtol=1e-5, atol=1e-5)
    # the remat policies change what is saved, not the gradient
    grads = []
    for remat in ("none", "full"):
        scanned.remat = remat
        g = nnx.jit(nnx.grad(lambda m, t: m(t).astype(jnp.float32).std()))(scanned, tokens)
        grads.append(jax.tree.leaves(nnx.state(g, nnx.Param)))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_scan_compiles_one_group_body():
    """The scanned model's jaxpr holds each block once, whatever the depth."""
    sizes = []
    for repeat in (2, 6):
        cfg = ModelConfig(vocab_size=40, d_model=32, num_heads=2, pattern="A,F,D,F", pattern_repeat=repeat)
        model = LM(cfg, rngs=nnx.Rngs(0))
        g, st = nnx.split(model)
        sizes.append(len(str(jax.make_jaxpr(lambda s, t: nnx.merge(g, s)(t))(st, jnp.zeros((1, 8), jnp.int32)))))
    assert sizes[1] < 1.05 * sizes[0], sizes


def test_flax_partition_specs_follow_the_rules():
    cfg = Config()
    cfg.model.pattern, cfg.model.pattern_repeat = "A,F,D,F", 2
    abs_model = nnx.eval_shape(lambda: LM(cfg.model, rngs=nnx.Rngs(0)))
    state = nnx.state(abs_model, nnx.Param)
    ours = param_specs(state, cfg.mesh.rules).to_pure_dict()
    with nnx.logical_axis_rules(flax_rules({"layers": None, **cfg.mesh.rules})):
        theirs = nnx.get_partition_spec(state).to_pure_dict()
    flat_ours = dict(jax.tree_util.tree_leaves_with_path(ours, is_leaf=lambda x: isinstance(x, jax.P)))
    flat_theirs = dict(jax.tree_util.tree_leaves_with_path(theirs, is_leaf=lambda x: isinstance(x, jax.P)))
    assert flat_ours.keys() == flat_theirs.keys() and len(flat_ours) > 20
    for path, spec in flat_ours.items():
        assert spec == flat_theirs[path], (jax.tree_util.keystr(path), spec, flat_theirs[path])
    # a scanned parameter has the stacked axis first
    kernel = abs_model.stack.blocks[0].wq.kernel
    assert logical_axes(kernel) == ("layers", "embed", "heads") and kernel.shape[0] == 2


@pytest.mark.parametrize("blocks, match", [
    ({"gated_deltanet": {"chunk_sise": 32}}, r"model\.blocks\.gated_deltanet\.chunk_sise.*did you mean 'chunk_size'"),
    ({"gated_deltanet": {"chunk_size": "big"}}, r"model\.blocks\.gated_deltanet\.chunk_size' expects int"),
    ({"gated_deltanet": {"chunk_size": 0}}, r"model\.blocks\.gated_deltanet.*chunk_size"),
    ({"gated_deltanet": {"d_model": 8}}, r"model-wide setting"),
    ({"attention": {"window": -1}}, r"model\.blocks\.attention.*window"),
    ({"gated_deltanett": {}}, r"did you mean 'gated_deltanet'"),
])
def test_block_option_errors_name_the_key(blocks, match):
    cfg = Config()
    cfg.model.pattern = "A,D"
    cfg.model.blocks = blocks
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_pattern_errors():
    cfg = Config()
    cfg.model.pattern = "A,Dx"
    with pytest.raises(ConfigError, match="unknown block 'Dx'"):
        validate(cfg)
    cfg.model.pattern, cfg.model.remat = "A", "sometimes"
    with pytest.raises(ConfigError, match="model.remat"):
        validate(cfg)
    assert block_names(ModelConfig(pattern="A,D", pattern_repeat=2)) == ["attention", "gated_deltanet"] * 2


@pytest.mark.slow
def test_readme_user_code_example_runs():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- user-code example -->\s*```python\n(.*?)```", readme, re.S)
    assert m, "README has no user-code example block"
    namespace = {}
    exec(compile(m.group(1), "README.md", "exec"), namespace)
    assert namespace["logits"].shape[-1] == namespace["VOCAB"]
