"""Memory-layer blocks (pkm, memory_plus, ngram_mem, stem_ffn): decoding, packing, sparse value
gradients, the shared pool, sharded lookups inside the model, slot usage, training.

Tolerances (float32): decoding / packed / sharded runs match the full-sequence call to 1e-5
relative (max abs error / max abs output).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.config import Config, ConfigError, ModelConfig, options_from_dict, validate
from memjax.model.lm import LM
from memjax.nn.memory_layers import record_slots, slot_usage, summarize_slots
from memjax.nn.registry import get_block
from tiny import mqar_losses

TOL = 1e-5
SMALL = {"pkm": {"n_keys": 8, "knn": 4, "heads": 2}, "memory_plus": {"n_keys": 8, "knn": 4, "heads": 2},
         "ngram_mem": {"table_size": 31}, "stem_ffn": {"hidden": 48}}
ALIASES = ["P", "M", "N", "T"]


def make(alias, **extra):
    cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2)
    cls = get_block(alias)
    o = options_from_dict(cls.Options, {**SMALL[cls.name], **extra}, f"model.blocks.{cls.name}")
    return cls(cfg, o, layer=0, shared={}, rngs=nnx.Rngs(0))


def rel(x, ref):
    return float(jnp.max(jnp.abs(x - ref)) / jnp.max(jnp.abs(ref)))


def inputs(b=2, t=13, seed=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, t, 32)), jnp.float32)
    tok = jnp.asarray(rng.integers(0, 64, (b, t)), jnp.int32)
    return x, tok


@pytest.mark.parametrize("alias", ALIASES)
def test_prefill_then_steps_match_full_sequence(alias):
    blk = make(alias)
    x, tok = inputs()
    y = nnx.jit(lambda b, x, t: b(x, tokens=t))(blk, x, tok)
    state = blk.init_state(2, 16)
    prefill = nnx.jit(lambda b, x, st, t: b.prefill(x, st, tokens=t))
    y1, state = prefill(blk, x[:, :1], state, tok[:, :1])  # shorter than an n-gram
    y2, state = prefill(blk, x[:, 1:6], state, tok[:, 1:6])
    ys = [y1, y2]
    step = nnx.jit(lambda b, xt, st, t: b.step(xt, st, token=t))
    for t in range(6, 13):
        yt, state = step(blk, x[:, t], state, tok[:, t])
        ys.append(yt[:, None])
    assert rel(jnp.concatenate(ys, 1), y) < TOL


@pytest.mark.parametrize("alias", ALIASES)
def test_packed_equals_separate_documents(alias):
    blk = make(alias)
    lengths = [1, 7, 5]
    x, tok = inputs(b=1, t=sum(lengths))
    seg = jnp.asarray(np.repeat([1, 2, 3], lengths))[None]
    call = nnx.jit(lambda b, x, t, s: b(x, tokens=t, segment_ids=s))
    y = call(blk, x, tok, seg)
    parts, start = [], 0
    for n in lengths:
        parts.append(call(blk, x[:, start:start + n], tok[:, start:start + n], None))
        start += n
    assert rel(y, jnp.concatenate(parts, 1)) < TOL
    if alias == "N":  # n-grams do cross boundaries without segment_ids
        assert rel(call(blk, x, tok, jnp.ones_like(seg)), y) > 1e-3


def test_token_blocks_need_tokens():
    x, _ = inputs()
    for alias in ("N", "T"):
        with pytest.raises(ValueError, match="token ids"):
            make(alias)(x)


def test_parameters_carry_logical_axes_and_value_groups():
    for alias in ALIASES:
        params = nnx.state(make(alias), nnx.Param)
        for path, var in nnx.to_flat_state(params):
            meta = var.get_metadata()
            assert meta.get("logical_axes") is not None and len(meta["logical_axes"]) == var[...].ndim, (alias, path)
            if path[-1] == "values":
                assert meta["logical_axes"] == ("memory_slots", "memory_dim")
                assert meta["optim_group"] == "memory_values"


@pytest.mark.parametrize("alias", ["P", "M"])
def test_values_get_gradient_only_on_rows_read(alias):
    blk = make(alias)
    x, _ = inputs()
    with record_slots() as rec:
        blk(x)
    read = np.unique(np.concatenate([np.asarray(i).ravel() for e in rec.values() for l in e["layers"].values()
                                     for i in l]))
    cot = jnp.asarray(np.random.default_rng(5).standard_normal((2, 13, 32)), jnp.float32)
    grads = nnx.jit(nnx.grad(lambda b: jnp.sum(b(x) * cot)))(blk)
    g = np.asarray(grads["values"][...])
    nonzero = np.flatnonzero(np.any(g != 0, axis=1))
    np.testing.assert_array_equal(nonzero, read)
    assert 0 < len(read) < blk.num_slots


def test_shared_pool_is_one_table_for_all_memory_plus_blocks():
    cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern="M,A,M",
                      blocks={"memory_plus": {**SMALL["memory_plus"], "shared_pool": True}})
    model = LM(cfg, rngs=nnx.Rngs(0))
    assert model.blocks[0].values is model.blocks[2].values
    tables = [p for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
              if v.get_metadata().get("optim_group") == "memory_values"]
    assert tables == [("blocks", 0, "values")]
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    with record_slots() as rec:
        model(tok)
    usage = summarize_slots(rec)
    assert set(usage) == {"memory_plus/shared", "memory_plus/shared/layer0", "memory_plus/shared/layer2"}
    read = np.unique(np.concatenate([np.asarray(i).ravel() for l in rec["memory_plus/shared"]["layers"].values()
                                     for i in l]))
    assert usage["memory_plus/shared"] == pytest.approx(len(read) / 64)
    assert usage["memory_plus/shared"] > max(usage["memory_plus/shared/layer0"], usage["memory_plus/shared/layer2"])
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(tok) ** 2)))(model)
    g = np.asarray(grads["blocks"][0]["values"][...])
    np.testing.assert_array_equal(np.flatnonzero(np.any(g != 0, axis=1)), read)  # both layers write into it
    # Separate pools: one table per block.
    cfg.blocks["memory_plus"]["shared_pool"] = False
    sep = LM(cfg, rngs=nnx.Rngs(0))
    assert sep.blocks[0].values is not sep.blocks[2].values
    assert (sep.blocks[0].pool, sep.blocks[2].pool) == ("memory_plus/layer0", "memory_plus/layer2")


def test_slot_usage_helper():
    cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern="P", blocks={"pkm": SMALL["pkm"]})
    model = LM(cfg, rngs=nnx.Rngs(0))
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 3)), jnp.int32)
    usage = slot_usage(model, tok)
    # 3 tokens x 2 heads x 4 slots read at most 24 of the 64 slots.
    assert set(usage) == {"pkm/layer0"} and 0 < usage["pkm/layer0"] <= 24 / 64
    with pytest.raises(RuntimeError, match="eager"):
        with record_slots():
            nnx.jit(lambda m, t: m(t))(model, tok)


@pytest.mark.parametrize("shard", ["rows", "cols"])
def test_sharded_values_inside_the_block(shard):
    from jax.sharding import NamedSharding, PartitionSpec as P

    from memjax.config import MeshConfig
    from memjax.model.sharding import make_mesh

    blk = make("M", shard=shard)
    x, _ = inputs()
    y_ref = nnx.jit(lambda b, x: b(x))(blk, x)  # no mesh: the local lookup
    g_ref = nnx.jit(nnx.grad(lambda b, x: jnp.sum(b(x) ** 2)))(blk, x)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
    spec = P("tensor", None) if shard == "rows" else P(None, "tensor")
    with jax.set_mesh(mesh):
        blk.values.set_value(jax.device_put(blk.values[...], NamedSharding(mesh, spec)))
        y = nnx.jit(lambda b, x: b(x))(blk, x)
        g = nnx.jit(nnx.grad(lambda b, x: jnp.sum(b(x) ** 2)))(blk, x)
    assert rel(y, y_ref) < TOL
    assert rel(g["values"][...], g_ref["values"][...]) < TOL and rel(g["query"]["kernel"][...],
                                                                    g_ref["query"]["kernel"][...]) < TOL
    assert g["values"][...].sharding.is_equivalent_to(NamedSharding(mesh, spec), 2)


def test_options_are_validated():
    cfg = Config()
    cfg.model.pattern = "A,M"
    for opts, key in [({"knn": 40, "n_keys": 32}, "knn"), ({"k_dim": 7}, "k_dim"), ({"shard": "diag"}, "shard"),
                      ({"impl": "cuda"}, "impl"), ({"heads": 0}, "heads"), ({"shard_axis": "model"}, "shard_axis")]:
        cfg.model.blocks = {"memory_plus": opts}
        with pytest.raises(ConfigError, match=f"memory_plus.{key}"):
            validate(cfg)
    cfg.model.blocks = {"ngram_mem": {"max_ngram": 1}}
    with pytest.raises(ConfigError, match="ngram_mem.max_ngram"):
        validate(cfg)
    cfg.model.blocks = {"stem_ffn": {"hidden": -1}}
    with pytest.raises(ConfigError, match="stem_ffn.hidden"):
        validate(cfg)
    cfg.model.pattern = "A,P,M,N,T"
    cfg.model.blocks = {"pkm": {"n_keys": 16, "knn": 16}, "memory_plus": {"shared_pool": True, "shard": "cols"},
                        "ngram_mem": {"one_bucket": True}, "stem_ffn": {"hidden": 64}}
    validate(cfg)


def test_one_bucket_control_ignores_the_ngram():
    blk = make("N", one_bucket=True)
    x, tok = inputs()
    y1 = blk(x, tokens=tok)
    y2 = blk(x, tokens=(tok + 17) % 64)
    assert rel(y2, y1) < 1e-6
    assert rel(make("N")(x, tokens=(tok + 17) % 64), make("N")(x, tokens=tok)) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("alias", ALIASES)
def test_model_with_memory_layer_trains(alias):

    name = get_block(alias).name
    cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern=f"A,{alias}", blocks={name: SMALL[name]})
    losses = mqar_losses(cfg, steps=60, lr=3e-3)
    assert np.all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 0.5, (first, last)


@pytest.mark.slow
def test_memory_values_get_their_own_learning_rate_in_the_loop():
    """optim.memory_values_lr: the value table moves by ~that lr (Adam), the rest by the main lr."""
    from tiny import tiny_config

    from memjax.data.pipeline import make_dataset
    from memjax.train.loop import build, run_steps

    cfg = tiny_config("A,M")
    cfg.model.blocks = {"memory_plus": SMALL["memory_plus"]}
    cfg.optim.warmup_steps, cfg.optim.grad_clip_norm = 0, 0.0
    cfg.optim.learning_rate, cfg.optim.memory_values_lr = 1e-4, 1e-2
    setup = build(cfg, devices=jax.devices()[:1])
    with jax.set_mesh(setup.mesh):
        state = setup.init_fn()
    before = jax.tree.map(np.asarray, state["params"])
    state, _ = run_steps(setup, state, next(iter(make_dataset(cfg, "train"))))
    after = jax.tree.map(np.asarray, state["params"])
    dv = np.abs(after["blocks"][1]["values"] - before["blocks"][1]["values"]).max()
    dq = np.abs(after["blocks"][1]["query"]["kernel"] - before["blocks"][1]["query"]["kernel"]).max()
    assert dv == pytest.approx(1e-2, rel=0.05) and dq == pytest.approx(1e-4, rel=0.05), (dv, dq)
