"""Hierarchical parametric memory bank (Pouransari et al. 2025): the pure functions, the
TensorStore bank, the cluster-path transform, the block, and the loop's host-table integration.

Reference (float64, written from the equation, example by example, level by level; no
concatenation, no gather)::

    y[b, t] = sum_l W2[r_bl]^T sigma(W1[r_bl]^T x[b, t])

Tolerance: relative max error <= 1e-10 in float64 (output and the gradients w.r.t. x and the
fetched rows); unselected rows get exactly zero gradient.
"""
import ast
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tiny import tiny_config

import benchmarks.hierarchical_memory as bench
import benchmarks.hierarchical_memory_study as study
from memjax.config import ConfigError, validate
from memjax.data.cluster_paths import ClusterPaths, ngram_features
from memjax.data.clustered_facts import ClusteredFactRecall
from memjax.data.facts import PAD, SEP
from memjax.data.pipeline import make_dataset
from memjax.memory.hierarchical_bank import memory_ffn, num_blocks, path_block_ids
from memjax.model.decode import generate
from memjax.nn.hierarchical_memory import HierarchicalMemoryFFN
from memjax.nn.host_params import HostIndex, HostParam
from memjax.nn.registry import get_block
from memjax.train.checkpoint import Checkpointer, abstract_like
from memjax.train.loop import (
    build,
    masked_xent,
    open_host_tables,
    run_steps,
    to_global,
    train_and_evaluate,
)
from memjax.train.memory_bank import (
    BankError,
    MemoryBank,
    TableSpec,
    TableStore,
    kvstore_spec,
    plan_fetch,
    row_adam,
)
from tests.helpers import TOL64, rel_err

ACT = {"silu": lambda z: z / (1 + np.exp(-z)), "relu": lambda z: np.maximum(z, 0)}


def reference(x, w1, w2, index, act="silu"):
    """NumPy float64 loop over examples, positions and levels."""
    x, w1, w2 = (np.asarray(a, np.float64) for a in (x, w1, w2))
    b, t, d = x.shape
    y = np.zeros((b, t, d))
    for i in range(b):
        for s in range(t):
            for r in np.asarray(index)[i]:
                y[i, s] += w2[r].T @ ACT[act](w1[r].T @ x[i, s])
    return y


def reference_jnp(x, w1, w2, index, act="silu"):
    """The same sum in jnp (differentiable), one level and one example at a time."""
    f = {"silu": jax.nn.silu, "relu": jax.nn.relu}[act]
    rows = []
    for i in range(x.shape[0]):
        acc = jnp.zeros_like(x[i])
        for r in np.asarray(index)[i]:
            acc = acc + f(x[i] @ w1[int(r)]) @ w2[int(r)]
        rows.append(acc)
    return jnp.stack(rows)


def _inputs(B=2, T=7, D=5, H=3, N=6, L=2, seed=0, dtype=np.float64):
    r = np.random.default_rng(seed)
    x = r.normal(size=(B, T, D)).astype(dtype)
    w1 = (r.normal(size=(N, D, H)) * 0.7).astype(dtype)
    w2 = (r.normal(size=(N, H, D)) * 0.7).astype(dtype)
    index = np.array([[0, 3], [3, 4]], np.int32)[:B, :L]  # row 3 shared; rows 1, 2, 5 unused
    return x, w1, w2, index


# ----------------------------------------------------------------------------- pure functions


def test_path_block_ids_numbering():
    assert num_blocks(3, 2) == 3 + 9 and num_blocks(2, 3) == 2 + 4 + 8
    paths = np.array([[0, 0], [2, 1], [1, 2]], np.int32)
    ids = path_block_ids(paths, 3, 2)
    # level 0: ids 0..2 (the child); level 1: offset 3 + (c0 * 3 + c1)
    np.testing.assert_array_equal(ids, [[0, 3], [2, 10], [1, 8]])
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(path_block_ids(jnp.asarray(paths), 3, 2)), ids)
    every = np.array([[a, b, c] for a in range(2) for b in range(2) for c in range(2)], np.int32)
    leaf = path_block_ids(every, 2, 3)
    assert sorted(leaf[:, 2]) == list(range(6, 14))  # every leaf once
    assert len(np.unique(leaf[:, 1])) == 4 and (leaf[:, 0] < 2).all()
    with pytest.raises(ValueError, match=r"\[0, branching\)"):
        path_block_ids(np.array([[0, 3]]), 3, 2)
    with pytest.raises(ValueError, match="cluster_path must have shape"):
        path_block_ids(np.zeros((2, 3), np.int32), 3, 2)
    with pytest.raises(TypeError, match="integer"):
        path_block_ids(np.zeros((2, 2), np.float32), 3, 2)


def test_memory_ffn_matches_float64_reference_forward_and_gradients(x64):
    x, w1, w2, index = _inputs()
    for act in ("silu", "relu"):
        y = memory_ffn(jnp.asarray(x), jnp.asarray(w1), jnp.asarray(w2), jnp.asarray(index), activation=act)
        assert y.dtype == jnp.float64
        assert rel_err(y, reference(x, w1, w2, index, act)) < TOL64
    ct = np.random.default_rng(1).normal(size=x.shape)
    # (jitted: one compile each instead of one per eager op)
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=(0, 1, 2)))
    g = grad(lambda a, b, c: memory_ffn(a, b, c, jnp.asarray(index)))(x, w1, w2)
    r = grad(lambda a, b, c: reference_jnp(a, b, c, index))(x, w1, w2)
    for got, want in zip(g, r):
        assert rel_err(got, want) < TOL64
    for unused in (1, 2, 5):  # rows no example selects: exactly zero
        assert not np.any(np.asarray(g[1][unused])) and not np.any(np.asarray(g[2][unused]))
    assert np.any(np.asarray(g[1][3]))


def test_memory_ffn_bf16_and_bad_inputs():
    x, w1, w2, index = _inputs(dtype=np.float32)
    ref = reference(x, w1, w2, index)
    y = memory_ffn(*(jnp.asarray(a, jnp.bfloat16) for a in (x, w1, w2)), jnp.asarray(index))
    assert y.dtype == jnp.bfloat16 and rel_err(y, ref) < 3e-2
    ok = (jnp.asarray(x), jnp.asarray(w1), jnp.asarray(w2), jnp.asarray(index))
    for i, bad, err, msg in [(0, x[0], ValueError, r"x must have shape \[B, T, D\]"),
                             (1, w1[:, :4], ValueError, "w1_rows must have shape"),
                             (2, w2[:5], ValueError, r"w2_rows must have shape \[N, H, D\] = \(6, 3, 5\)"),
                             (3, index[:1], ValueError, r"row_index must have shape \[B, L\] = \(2, L\)"),
                             (3, index.astype(np.float32), TypeError, "row_index must have an integer dtype"),
                             (0, x.astype(np.int32), TypeError, "x must have a floating dtype")]:
        args = list(ok)
        args[i] = jnp.asarray(bad)
        with pytest.raises(err, match=msg):
            memory_ffn(*args)
    with pytest.raises(ValueError, match="activation"):
        memory_ffn(*ok, activation="tanh")


def test_row_adam_equals_optax_adam_when_every_row_is_fetched():
    r = np.random.default_rng(0)
    rows0 = jnp.asarray(r.normal(size=(3, 2, 2)), jnp.float32)
    grads = jnp.asarray(r.normal(size=(3, *rows0.shape)), jnp.float32)
    tx = optax.adam(0.1, b1=0.9, b2=0.95)

    @jax.jit
    def both(rows, grads):
        mu, nu, count = jnp.zeros_like(rows), jnp.zeros_like(rows), jnp.zeros((3,), jnp.int32)
        ref, st = rows, tx.init(rows)
        for g in grads:
            rows, mu, nu, count = row_adam(rows, g, mu, nu, count, lr=0.1, b1=0.9, b2=0.95)
            u, st = tx.update(g, st)
            ref = optax.apply_updates(ref, u)
        return rows, ref, count

    rows, ref, count = both(rows0, grads)
    assert rel_err(rows, ref) < 1e-6 and rel_err(rows, rows0) > 1e-2 and (np.asarray(count) == 3).all()


# ----------------------------------------------------------------------------- the store


SPEC = TableSpec("blocks.1.w1", num_rows=10, row_shape=(3, 2), init_std=0.5, seed=7)


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def test_store_fetch_write_round_trip_changes_only_written_rows(tmp_path):
    bank = MemoryBank(str(tmp_path), [SPEC])
    before_all = bank.tables[SPEC.name].read_all()
    assert before_all["value"].shape == (10, 3, 2) and 0.3 < before_all["value"].std() < 0.7
    assert not before_all["mu"].any() and not before_all["count"].any()
    again = MemoryBank(str(tmp_path), [SPEC]).tables[SPEC.name].read_all()  # reopening keeps the rows
    np.testing.assert_array_equal(again["value"], before_all["value"])
    ids = np.array([7, 2, 4])
    got = bank.read(SPEC.name, ids)
    np.testing.assert_array_equal(got["value"], before_all["value"][ids])
    files = _files(tmp_path / "live")
    new = np.arange(18, dtype=np.float32).reshape(3, 3, 2)
    bank.write(SPEC.name, ids, value=new, mu=new + 1, nu=new + 2, count=np.array([1, 2, 3]))
    after = bank.tables[SPEC.name].read_all()
    np.testing.assert_array_equal(after["value"][ids], new)
    np.testing.assert_array_equal(after["count"][ids], [1, 2, 3])
    rest = np.setdiff1d(np.arange(10), ids)
    np.testing.assert_array_equal(after["value"][rest], before_all["value"][rest])
    changed = {k for k, v in _files(tmp_path / "live").items() if files.get(k) != v}
    # byte-level: the chunk files of the written rows (and the counts' one chunk) and nothing else
    want = {f"{SPEC.name}/{a}/{i}.0.0" for a in ("value", "mu", "nu") for i in ids} | {f"{SPEC.name}/count/0"}
    assert changed == want, sorted(changed ^ want)
    with pytest.raises(BankError, match=r"value rows must have shape \(3, 3, 2\)"):
        bank.write(SPEC.name, ids, value=new[:, :2])
    with pytest.raises(BankError, match="unique"):
        bank.write(SPEC.name, np.array([1, 1]), value=new[:2])
    with pytest.raises(BankError, match=r"ids must be in \[0, 10\)"):
        bank.read(SPEC.name, np.array([10]))


def test_store_errors_name_the_problem(tmp_path):
    MemoryBank(str(tmp_path), [SPEC])
    wrong = TableSpec(SPEC.name, num_rows=12, row_shape=(3, 2))
    with pytest.raises(BankError, match=r"does not match the model.*expected shape \[12, 3, 2\]"):
        MemoryBank(str(tmp_path), [wrong])
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BankError, match="afile"):
        MemoryBank(str(tmp_path / "afile" / "bank"), [SPEC])
    with pytest.raises(BankError, match="kvstore URL"):
        kvstore_spec("nosuchscheme://x/y")
    assert kvstore_spec("gs://bucket/some/path") == {"driver": "gcs", "bucket": "bucket", "path": "some/path/"}
    with pytest.raises(BankError, match="num_rows"):
        TableSpec("t", num_rows=0, row_shape=(2,))
    plan = plan_fetch(np.array([[5, 9], [9, 1]]), 4)
    np.testing.assert_array_equal(plan.unique, [1, 5, 9])
    np.testing.assert_array_equal(plan.padded[plan.row_index], [[5, 9], [9, 1]])
    assert plan.padded.shape == (4,)
    with pytest.raises(BankError, match="3 distinct rows but only 2 fetch slots"):
        plan_fetch(np.array([[5, 9], [9, 1]]), 2)


def test_snapshot_restore_and_retain(tmp_path):
    bank = MemoryBank({"driver": "file", "path": str(tmp_path)}, [SPEC])
    v0 = bank.tables[SPEC.name].read_all()
    bank.snapshot(3)
    bank.write(SPEC.name, np.array([1]), value=np.full((1, 3, 2), 9.0), count=np.array([4]))
    bank.snapshot(5)
    bank.write(SPEC.name, np.array([2]), value=np.full((1, 3, 2), -1.0))
    assert bank.snapshot_steps() == [3, 5]
    bank.restore(3)
    for a, v in bank.tables[SPEC.name].read_all().items():
        np.testing.assert_array_equal(v, v0[a])
    bank.restore(5)
    v5 = bank.tables[SPEC.name].read_all()
    assert (v5["value"][1] == 9).all() and v5["count"][1] == 4 and (v5["value"][2] == v0["value"][2]).all()
    # A read-only view of a snapshot (evaluation): step 3's rows, whatever the live tables hold.
    view = MemoryBank.open_snapshot({"driver": "file", "path": str(tmp_path)}, [SPEC], 3)
    for a, v in view.tables[SPEC.name].read_all().items():
        np.testing.assert_array_equal(v, v0[a])
    with pytest.raises(BankError, match="no complete snapshot of step 4"):
        MemoryBank.open_snapshot({"driver": "file", "path": str(tmp_path)}, [SPEC], 4)
    bank.retain([5])
    assert bank.snapshot_steps() == [5]
    with pytest.raises(BankError, match="no complete snapshot of step 3"):
        bank.restore(3)
    fresh = MemoryBank(str(tmp_path), [SPEC], fresh=True).tables[SPEC.name].read_all()
    np.testing.assert_array_equal(fresh["value"], v0["value"])  # re-initialised: same seed, same rows
    assert not fresh["count"].any()


# ----------------------------------------------------------------------------- transform and block


def test_cluster_paths_deterministic_content_based(tmp_path):
    t = ClusterPaths(depth=3, branching=4, ngram=2, num_features=64, seed=1)
    r = np.random.default_rng(0)
    docs = [r.integers(0, 64, size=20) for _ in range(40)]
    paths = np.stack([t.map({"inputs": d})["cluster_path"] for d in docs])
    assert paths.dtype == np.int32 and paths.shape == (40, 3) and paths.min() >= 0 and paths.max() < 4
    assert len({tuple(p) for p in paths}) > 5  # the content spreads over the tree
    again = ClusterPaths(depth=3, branching=4, ngram=2, num_features=64, seed=1)
    assert (again.map({"inputs": docs[3]})["cluster_path"] == paths[3]).all()
    # padding (segment_ids == 0) does not move a document
    padded = np.concatenate([docs[3], r.integers(0, 64, size=12)])
    seg = np.concatenate([np.ones(20, np.int32), np.zeros(12, np.int32)])
    assert (t.map({"inputs": padded, "segment_ids": seg})["cluster_path"] == paths[3]).all()
    f = ngram_features(np.array([1, 2, 3]), 2, 16)
    assert abs(np.linalg.norm(f) - 1) < 1e-12
    # the pipeline attaches it (config key data.cluster_paths), and validation checks it
    cfg = _config()
    batch = next(iter(make_dataset(cfg, "train")))
    assert batch["cluster_path"].shape == (cfg.train.batch_size, 2)
    cfg.data.cluster_paths = {"depth": 2, "branching": 3, "bogus": 1}
    with pytest.raises(ConfigError, match="bogus"):
        validate(cfg)
    cfg.data.cluster_paths = {"depth": 3, "branching": 3}
    with pytest.raises(ConfigError, match="cluster_paths.depth"):
        validate(cfg)


def test_block_adds_fetched_memory_to_its_ffn():
    assert get_block("HM") is HierarchicalMemoryFFN and get_block("hierarchical_memory") is HierarchicalMemoryFFN
    blk = HierarchicalMemoryFFN(d_model=8, branching=2, depth=2, block_hidden=3, fetch_rows=5, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 8)), jnp.float32)
    plain = blk.ffn(x)
    np.testing.assert_array_equal(blk(x), plain)  # nothing fetched: the plain FFN
    r = np.random.default_rng(1)
    w1, w2 = r.normal(size=(5, 8, 3)).astype(np.float32), r.normal(size=(5, 3, 8)).astype(np.float32)
    index = np.array([[0, 2], [1, 4]], np.int32)
    blk.load_rows(w1, w2, index)
    y = blk(x)
    assert rel_err(np.asarray(y) - np.asarray(plain), reference(x, w1, w2, index)) < 1e-5
    ids = blk.host_row_ids({"cluster_path": np.array([[1, 0], [0, 1]], np.int32)})
    np.testing.assert_array_equal(ids, [[1, 4], [0, 3]])
    with pytest.raises(ValueError, match="cluster_path"):
        blk.host_row_ids({"inputs": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="block_hidden must be positive"):
        HierarchicalMemoryFFN(d_model=8, block_hidden=0, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- the loop


def _config(**train):
    cfg = tiny_config("HM", **train)  # (one block: the loop tests are mostly compile time)
    cfg.model.d_model, cfg.data.seq_len, cfg.train.batch_size = 16, 16, 8
    cfg.data.num_train_examples, cfg.data.num_eval_examples = 64, 16
    cfg.model.blocks = {"hierarchical_memory": {"depth": 2, "branching": 3, "block_hidden": 4, "fetch_rows": 16}}
    cfg.data.cluster_paths = {"depth": 2, "branching": 3}
    cfg.optim.warmup_steps = 0  # (the warmup's first learning rate is 0: no row would move)
    return cfg


@pytest.fixture(scope="module")
def hm_setup(tmp_path_factory):
    """One compiled setup of ``_config()`` with its bank, shared by the loop tests (compiling is
    most of their time)."""
    cfg = _config()
    setup = build(cfg, devices=jax.devices()[:1])
    assert [m.path for m in setup.host_modules] == [("blocks", 0)]
    with pytest.raises(RuntimeError, match="open_host_tables"):
        run_steps(setup, None, {})
    open_host_tables(setup, str(tmp_path_factory.mktemp("bank")))
    return cfg, setup


def test_train_step_updates_exactly_the_fetched_rows(hm_setup):
    cfg, setup = hm_setup
    tables = setup.host
    with jax.set_mesh(setup.mesh):
        state = setup.init_fn()
    assert "w1" not in json.dumps(jax.tree.map(lambda a: 0, state))  # the rows are not train state
    batch = next(iter(make_dataset(cfg, "train")))
    need = np.unique(path_block_ids(batch["cluster_path"], 3, 2))
    before = {n: t.read_all() for n, t in tables.bank.tables.items()}
    state, metrics = run_steps(setup, state, batch)
    assert float(metrics["host_grad_norm"]) > 0 and int(state["step"]) == 1
    for name, table in tables.bank.tables.items():
        after = table.read_all()
        moved = np.flatnonzero(np.any(after["value"] != before[name]["value"], axis=(1, 2)))
        np.testing.assert_array_equal(moved, need, err_msg=name)
        np.testing.assert_array_equal(np.flatnonzero(after["count"]), need)
        assert (after["count"][need] == 1).all()


def _bank_and_params(workdir, cfg):
    setup = build(cfg, devices=jax.devices()[:1])
    with jax.set_mesh(setup.mesh):
        target = setup.init_fn()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    state, _, step = ckpt.restore(abstract_like(target))
    ckpt.close()
    bank = MemoryBank(os.path.join(workdir, "host_tables"), [s for m in setup.host_modules
                                                             for s in m.tables.values()])
    return step, jax.tree.map(np.asarray, state["params"]), {n: t.read_all() for n, t in bank.tables.items()}


@pytest.mark.slow  # (three runs of the loop: ~40 s on 2 cores)
def test_resume_equals_uninterrupted_run_params_and_bank(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    cfg = _config(steps=6, checkpoint_every=3, log_every=3)
    train_and_evaluate(cfg, full)
    stop = _config(steps=6, checkpoint_every=3, log_every=3, stop_at_step=3)
    train_and_evaluate(stop, part)
    # A crash after the checkpoint: rows written after step 3 that the checkpoint must undo.
    for name in os.listdir(os.path.join(part, "host_tables", "live")):
        store = TableStore(kvstore_spec(os.path.join(part, "host_tables", "live", name)),
                           _spec_of(part, name))
        store.write(np.array([0, 5]), value=np.full((2, *store.spec.row_shape), 7.0, np.float32))
    train_and_evaluate(cfg, part)
    s1, p1, b1 = _bank_and_params(full, cfg)
    s2, p2, b2 = _bank_and_params(part, cfg)
    assert s1 == s2 == 6
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    assert b1.keys() == b2.keys() and len(b1) == 2
    for name in b1:
        for a in b1[name]:
            np.testing.assert_array_equal(b1[name][a], b2[name][a], err_msg=f"{name}/{a}")
        assert b1[name]["count"].sum() > 0


def _spec_of(workdir, name):
    with open(os.path.join(workdir, "host_tables", "live", name, "INITIALIZED")) as f:
        d = json.load(f)
    return TableSpec(**{**d, "row_shape": tuple(d["row_shape"])})


def test_checkpointer_snapshots_and_restores_the_bank(tmp_path):
    """The fast version of the resume test: a Checkpointer with a bank saves a snapshot with each
    step, drops the ones Orbax drops, and restoring a step restores its rows."""
    bank = MemoryBank(str(tmp_path / "bank"), [SPEC])
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=False, bank=bank)
    state = {"params": {"w": np.zeros(2, np.float32)}}
    rows = {}
    for step in (1, 2, 3):
        bank.write(SPEC.name, np.array([step]), value=np.full((1, 3, 2), float(step), np.float32))
        rows[step] = bank.tables[SPEC.name].read_all()["value"]
        ckpt.save(step, {"params": {"w": np.full(2, step, np.float32)}}, {"pos": step})
        ckpt.wait()
    assert bank.snapshot_steps() == [2, 3]  # keep=2: step 1's snapshot went with its checkpoint
    bank.write(SPEC.name, np.array([0, 9]), value=np.full((2, 3, 2), -5.0, np.float32))
    restored, data, step = ckpt.restore(abstract_like(jax.tree.map(jnp.asarray, state)), step=2)
    assert step == 2 and data == {"pos": 2} and (np.asarray(restored["params"]["w"]) == 2).all()
    np.testing.assert_array_equal(bank.tables[SPEC.name].read_all()["value"], rows[2])
    ckpt.close()


def test_benchmark_smoke(hm_setup, tmp_path):
    """The benchmark's measurement and report on the shared setup (``main`` builds its own model:
    another compile the default run cannot afford)."""
    cfg, setup = hm_setup
    with jax.set_mesh(setup.mesh):
        state = setup.init_fn()
    it = iter(make_dataset(cfg, "train"))
    times, state = bench.measure(setup, state, [next(it) for _ in range(3)])
    assert int(state["step"]) == 3 and times["step"] > 0 and times["fetch"] > 0
    row = bench.summarize(setup, cfg, times)
    assert row["blocks"] == 3 + 9 and 1 <= row["rows/step"] <= 12 and row["fetch_MB/s"] > 0
    # bytes per fetched id: value + 2 moments of w1 [16, 4] and w2 [4, 16], float32
    assert bench.row_bytes(setup) == 2 * 3 * 4 * 64
    bench.report([row], quick=True, out_dir=str(tmp_path), root="test", steps=2)
    with open(tmp_path / "hierarchical_memory_quick.json") as f:
        assert json.load(f)["rows"][0]["batch"] == cfg.train.batch_size


# ----------------------------------------------------------------------------- generic host variables


def _imported_modules(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_loop_and_store_depend_on_the_generic_host_variables_only():
    """The loop and the store import HostParam / HostIndex from memjax.nn.host_params, never the
    hierarchical memory's module; the block's windows are those generic types."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for rel in ("memjax/train/loop.py", "memjax/train/memory_bank.py"):
        mods = _imported_modules(os.path.join(root, rel))
        assert "memjax.nn.host_params" in mods, rel
        assert not any(m.startswith("memjax.nn.hierarchical_memory") for m in mods), rel
    blk = HierarchicalMemoryFFN(d_model=8, block_hidden=2, fetch_rows=4, rngs=nnx.Rngs(0))
    assert type(blk.w1) is HostParam and type(blk.w2) is HostParam and type(blk.row_index) is HostIndex


# ----------------------------------------------------------------------------- the study's task


def test_label_cluster_paths_are_the_leaf_ids_digits():
    cp = ClusterPaths(depth=3, branching=3, method="label", key="cluster")
    for c in (0, 5, 26):
        want = [c // 9, (c // 3) % 3, c % 3]
        np.testing.assert_array_equal(cp.map({"cluster": np.int32(c)})["cluster_path"], want)
    with pytest.raises(ValueError, match=r"\[0, 27\)"):
        cp.map({"cluster": np.int32(27)})
    with pytest.raises(ValueError, match="one integer"):
        cp.map({"cluster": np.zeros(2, np.int32)})
    cfg = tiny_config("A,F")
    cfg.data.cluster_paths = {"method": "kmeans"}
    with pytest.raises(ConfigError, match="method"):
        validate(cfg)


def _parse(task, ex):
    """Reference parse of a clustered-facts sequence: ``(cluster, [(s, r, object tokens)])``."""
    seq = np.concatenate([ex["inputs"], ex["targets"][-1:]])
    o = task.opts
    cluster = int(seq[0]) - task.first_marker
    facts, sentence = [], []
    for tok in seq[1:]:
        if tok == SEP:
            subj = [t - 2 for t in sentence if 2 <= t < task.first_relation]
            rel = [t - task.first_relation for t in sentence if task.first_relation <= t < task.first_object]
            facts.append((subj[0], rel[0], sentence[-o.object_length:]))
            sentence = []
        elif tok != PAD:
            sentence.append(int(tok))
    return cluster, facts


def test_clustered_facts_state_each_clusters_own_table():
    opts = ClusteredFactRecall.Options(num_subjects=6, num_relations=2, num_objects=8, num_words=4,
                                       num_clusters=4, object_length=2)
    task = ClusteredFactRecall(opts, seq_len=40, vocab_size=64, split="train", num_examples=50, seed=3)
    assert task.tables.shape == (4, 6, 2, 2) and (task.tables[0] != task.tables[1]).any()
    seen = set()
    for i in range(50):
        ex = task[i]
        cluster, facts = _parse(task, ex)
        assert int(ex["cluster"]) == cluster and 0 <= cluster < 4 and facts
        seen.add(cluster)
        for s, r, obj in facts:
            np.testing.assert_array_equal(obj, task.tables[cluster, s, r])
        # scored positions: exactly the object tokens, numbered by sentence
        assert int(ex["mask"].sum()) == 2 * len(facts) and ex["fact_index"].max() == len(facts)
        np.testing.assert_array_equal(ex["inputs"], task[i]["inputs"])  # deterministic
    assert seen == {0, 1, 2, 3}
    with pytest.raises(ConfigError, match="vocab_size"):
        ClusteredFactRecall(opts, seq_len=40, vocab_size=opts.vocab_needed() - 1, split="train", num_examples=1,
                            seed=0)
    with pytest.raises(ConfigError, match="num_clusters"):
        ClusteredFactRecall.Options(num_clusters=0).check(40, 64)


def test_study_models_and_parameter_accounting():
    """The preset validates; the three models differ as documented; the wide dense model matches
    the bank model's total parameters (device + whole bank) to within one FFN unit."""
    base = study.preset()
    (n1, dense), (n2, bank), (n3, wide), (n4, hashed) = study.variants(base, steps=7)
    assert (n1, n2, n3, n4) == ("A,F", "A,HM", "A,F wide", "A,HM hashed paths")
    assert dense.model.pattern == wide.model.pattern == "A,F" and bank.model.pattern == hashed.model.pattern == "A,HM"
    assert dense.model.mlp_hidden == bank.model.mlp_hidden and not dense.data.cluster_paths
    assert bank.data.cluster_paths["method"] == "label" and hashed.data.cluster_paths.get("method", "ngram") == "ngram"
    assert all(c.train.steps == 7 and c.optim.learning_rate == base.optim.learning_rate
               for c in (dense, bank, wide, hashed))
    setup = build(bank, devices=jax.devices()[:1])  # (abstract: nothing compiles until a step runs)
    tables = [s for m in setup.host_modules for s in m.tables.values()]
    assert study.bank_params(bank) == sum(s.num_rows * int(np.prod(s.row_shape)) for s in tables) == 81920
    extra = 3 * base.model.d_model * (wide.model.mlp_hidden - dense.model.mlp_hidden)
    assert abs(extra - study.bank_params(bank)) <= 3 * base.model.d_model


@pytest.mark.slow  # (three models compiled and trained for 3 steps: ~20 s on 2 loaded cores)
def test_study_quick_run(tmp_path):
    rows = study.main(["--quick", "--out-dir", str(tmp_path), "--models", "A,F;A,HM;A,F wide"])
    assert [r["model"] for r in rows] == ["A,F", "A,HM", "A,F wide"]
    assert rows[1]["bank_params"] > 0 == rows[0]["bank_params"]
    assert all(np.isfinite(r["eval_loss"]) and 0 <= r["fact_acc"] <= 1 for r in rows)
    with open(tmp_path / "hierarchical_memory_study_quick.json") as f:
        assert len(json.load(f)["rows"]) == 3
    with pytest.raises(SystemExit):
        study.main(["--quick", "--models", "A,X"])


def test_load_into_gives_a_model_the_banks_rows_for_eval_and_decoding(hm_setup):
    """``HostTables.load_into`` fills a concrete model's windows: its forward pass equals the loop's
    eval step (which fetches inside the step) and greedy decoding starts with the forward's argmax;
    without the rows (zero windows) the logits differ."""
    cfg, setup = hm_setup
    with jax.set_mesh(setup.mesh):
        state = setup.init_fn()
    batch = next(iter(make_dataset(cfg, "eval")))
    host, _ = setup.host.fetch(batch, with_moments=False)
    with jax.set_mesh(setup.mesh):
        sums, _ = setup.eval_step(state, to_global(setup, batch), {"rows": host["rows"], "index": host["index"]})
    # The loop's state as a model, with zero windows of the same shapes (one compile of `forward`).
    zero = [nnx.State(jax.tree.map(np.zeros_like, host[k])) for k in ("rows", "index")]
    model = nnx.merge(setup.graphdef, nnx.State(state["params"]), nnx.State(state["rest"]), *zero)
    forward = nnx.jit(lambda m, x, s: m(x, segment_ids=s))
    inputs, seg = jnp.asarray(batch["inputs"]), jnp.asarray(batch["segment_ids"])
    plain = forward(model, inputs, seg)
    setup.host.load_into(model, batch)
    logits = forward(model, inputs, seg)
    nll, _, _ = masked_xent(logits, jnp.asarray(batch["targets"]), jnp.asarray(batch["mask"]))
    assert abs(float(nll) - float(sums["nll"])) <= 1e-5 * abs(float(sums["nll"]))
    assert float(jnp.max(jnp.abs(logits - plain))) > 1e-4
    # Decoding keeps the loaded window (the prompt's prefill is the forward pass, up to float32
    # reassociation: compare with the full forward's argmax where its top-2 margin is clear).
    out = np.asarray(generate(model, inputs, 1)[:, 0])
    top2 = np.sort(np.asarray(logits[:, -1]), -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert clear.sum() >= 4
    np.testing.assert_array_equal(out[clear], np.asarray(jnp.argmax(logits[:, -1], -1))[clear])
