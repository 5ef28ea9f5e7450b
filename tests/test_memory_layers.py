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

from memjax.config import ModelConfig
from memjax.model.lm import LM
from memjax.nn.cache import NoCache
from memjax.nn.layers import logical_axes
from memjax.nn.memory_layers import MemoryPlusLayer, PKMLayer, record_slots, slot_usage, summarize_slots
from memjax.nn.ngram import STEMFFN, NgramCache, NgramMemory
from memjax.nn.registry import get_block
from tests.helpers import rel_err
from tiny import copy_to_scanned, mqar_losses

TOL = 1e-5
SMALL = {"pkm": {"n_keys": 8, "knn": 4, "heads": 2}, "memory_plus": {"n_keys": 8, "knn": 4, "heads": 2},
         "ngram_mem": {"table_size": 31}, "stem_ffn": {"hidden": 48}}
ALIASES = ["P", "M", "N", "T"]


def make(alias, **extra):
    cls = get_block(alias)
    model = {"vocab_size": 64} if cls is STEMFFN else {}
    return cls(d_model=32, **model, **{**SMALL[cls.name], **extra}, rngs=nnx.Rngs(0))


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
    cache = blk.init_cache(2, 16)
    assert isinstance(cache, NgramCache if alias == "N" else NoCache)
    decode = nnx.jit(lambda b, x, c, t: b(x, tokens=t, cache=c))
    y1, cache = decode(blk, x[:, :1], cache, tok[:, :1])  # shorter than an n-gram
    y2, cache = decode(blk, x[:, 1:6], cache, tok[:, 1:6])
    ys = [y1, y2]
    for t in range(6, 13):
        yt, cache = decode(blk, x[:, t:t + 1], cache, tok[:, t:t + 1])
        ys.append(yt)
    assert rel_err(jnp.concatenate(ys, 1), y) < TOL


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
    assert rel_err(y, jnp.concatenate(parts, 1)) < TOL
    if alias == "N":  # n-grams do cross boundaries without segment_ids
        assert rel_err(call(blk, x, tok, jnp.ones_like(seg)), y) > 1e-3


def test_token_blocks_need_tokens():
    x, tok = inputs()
    for alias in ("N", "T"):
        blk = make(alias)
        with pytest.raises(ValueError, match="token ids"):
            blk(x)
        with pytest.raises(ValueError, match="token ids"):
            blk(x[:, :1], cache=blk.init_cache(2, 4))
        with pytest.raises(ValueError, match="tokens must be"):
            blk(x, tokens=tok[:, :3])


def test_registered_names_and_defaults():
    for alias, cls in (("P", PKMLayer), ("M", MemoryPlusLayer), ("N", NgramMemory), ("T", STEMFFN)):
        assert get_block(alias) is cls
        blk = cls(64, rngs=nnx.Rngs(0))  # d_model and rngs suffice
        assert blk.scannable == (cls is not NgramMemory)  # its hash depends on `layer`
    assert STEMFFN(8, rngs=nnx.Rngs(0)).embed.shape == (256, 32)  # vocab_size 256, 4 * d_model
    assert STEMFFN(8, mlp_hidden=24, rngs=nnx.Rngs(0)).embed.shape == (256, 24)


def test_parameters_carry_logical_axes_and_value_groups():
    for alias in ALIASES:
        params = nnx.state(make(alias), nnx.Param)
        for path, var in nnx.to_flat_state(params):
            axes = logical_axes(var)
            assert axes is not None and len(axes) == var[...].ndim, (alias, path)
            if path[-1] == "values":
                assert axes == ("memory_slots", "memory_dim")
            if path[-1] in ("values", "table"):  # the sparse-read tables: product-key values, n-gram tables
                assert var.get_metadata()["optim_group"] == "memory_values", (alias, path)


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


def test_shared_values_from_shared_params():
    kw = dict(d_model=32, **SMALL["memory_plus"], shared_pool=True)
    assert MemoryPlusLayer.shared_params(rngs=nnx.Rngs(0), **{**kw, "shared_pool": False}) == {}
    shared = MemoryPlusLayer.shared_params(rngs=nnx.Rngs(0), **kw)
    assert set(shared) == {"shared_values"} and shared["shared_values"].shape == (64, 32)
    a = MemoryPlusLayer(**kw, **shared, layer=0, rngs=nnx.Rngs(1))
    b = MemoryPlusLayer(**kw, **shared, layer=2, rngs=nnx.Rngs(2))
    assert a.values is b.values is shared["shared_values"] and a.pool == b.pool == "memory_plus/shared"
    x, _ = inputs()
    with record_slots() as rec:
        b(a(x))
    assert set(rec["memory_plus/shared"]["layers"]) == {0, 2}
    assert set(summarize_slots(rec)) == {"memory_plus/shared", "memory_plus/shared/layer0",
                                        "memory_plus/shared/layer2"}
    alone = MemoryPlusLayer(**kw, rngs=nnx.Rngs(0))  # shared_pool without a table: its own
    assert alone.values.shape == (64, 32) and alone.pool == "memory_plus/shared"
    with pytest.raises(ValueError, match="MemoryPlusLayer: shared_values has shape"):
        MemoryPlusLayer(**{**kw, "n_keys": 4, "knn": 2}, **shared, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="shared_pool is False"):
        MemoryPlusLayer(**{**kw, "shared_pool": False}, **shared, rngs=nnx.Rngs(0))
    assert MemoryPlusLayer(32, layer=3, rngs=nnx.Rngs(0)).pool == "memory_plus/layer3"


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

    blk = make("M", shard=shard)
    x, _ = inputs()
    y_ref = nnx.jit(lambda b, x: b(x))(blk, x)  # no mesh: the local lookup
    g_ref = nnx.jit(nnx.grad(lambda b, x: jnp.sum(b(x) ** 2)))(blk, x)
    mesh = jax.make_mesh((8,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
    spec = P("tensor", None) if shard == "rows" else P(None, "tensor")
    with jax.set_mesh(mesh):
        blk.values.set_value(jax.device_put(blk.values[...], NamedSharding(mesh, spec)))
        y = nnx.jit(lambda b, x: b(x))(blk, x)
        g = nnx.jit(nnx.grad(lambda b, x: jnp.sum(b(x) ** 2)))(blk, x)
    assert rel_err(y, y_ref) < TOL
    assert rel_err(g["values"][...], g_ref["values"][...]) < TOL
    assert rel_err(g["query"]["kernel"][...], g_ref["query"]["kernel"][...]) < TOL
    assert g["values"][...].sharding.is_equivalent_to(NamedSharding(mesh, spec), 2)


def test_options_are_validated():
    for opts, key in [({"knn": 40, "n_keys": 32}, "knn"), ({"k_dim": 7}, "k_dim"), ({"shard": "diag"}, "shard"),
                      ({"impl": "cuda"}, "impl"), ({"heads": 0}, "heads"), ({"shard_axis": ""}, "shard_axis"),
                      ({"value_dim": -1}, "value_dim")]:
        with pytest.raises(ValueError, match=f"MemoryPlusLayer: {key}"):
            MemoryPlusLayer(32, **opts, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="PKMLayer: knn"):
        PKMLayer(32, knn=9, n_keys=8, rngs=nnx.Rngs(0))
    for opts, key in [({"max_ngram": 1}, "max_ngram"), ({"heads": 0}, "heads"), ({"table_size": 0}, "table_size"),
                      ({"embed_dim": -1}, "embed_dim"), ({"pad_id": -1}, "pad_id")]:
        with pytest.raises(ValueError, match=f"NgramMemory: {key}"):
            NgramMemory(32, **opts, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="STEMFFN: hidden"):
        STEMFFN(32, hidden=-1, rngs=nnx.Rngs(0))
    PKMLayer(32, n_keys=16, knn=16, rngs=nnx.Rngs(0))
    MemoryPlusLayer(32, shared_pool=True, shard="cols", shard_axis="model", rngs=nnx.Rngs(0))
    NgramMemory(32, one_bucket=True, rngs=nnx.Rngs(0))
    STEMFFN(32, hidden=64, rngs=nnx.Rngs(0))


def test_one_bucket_control_ignores_the_ngram():
    blk = make("N", one_bucket=True)
    x, tok = inputs()
    fwd = nnx.jit(lambda m, x, tok: m(x, tokens=tok))  # one compile per block instead of op-by-op dispatch
    y1 = fwd(blk, x, tok)
    y2 = fwd(blk, x, (tok + 17) % 64)
    assert rel_err(y2, y1) < 1e-6
    hashed = make("N")
    assert rel_err(fwd(hashed, x, (tok + 17) % 64), fwd(hashed, x, tok)) > 1e-2


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


@pytest.mark.slow
def test_scanned_model_stacks_memory_layers_and_records_every_layer():
    """Product-key layers without a shared pool stack under the scanned model; slot recording runs
    the stacked groups eagerly and names each table by its model-wide layer."""
    blocks = {"pkm": SMALL["pkm"], "memory_plus": SMALL["memory_plus"]}
    cfg = ModelConfig(vocab_size=64, d_model=32, num_heads=2, pattern="P,M", pattern_repeat=3, blocks=blocks)
    model = LM(cfg, rngs=nnx.Rngs(0))
    assert model.scanned
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    usage = slot_usage(model, tok)
    assert set(usage) == {f"pkm/layer{i}" for i in (0, 2, 4)} | {f"memory_plus/layer{i}" for i in (1, 3, 5)}
    cfg.scan_layers = False
    unrolled = LM(cfg, rngs=nnx.Rngs(1))
    assert not unrolled.scanned
    nnx.update(model, nnx.State(copy_to_scanned(nnx.state(unrolled, nnx.Param).to_pure_dict(), 2, 3)))
    assert slot_usage(model, tok) == pytest.approx(slot_usage(unrolled, tok))
    np.testing.assert_allclose(model(tok), unrolled(tok), rtol=1e-5, atol=1e-5)
