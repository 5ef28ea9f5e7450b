import numpy as np
import pytest

from memjax.config import Config, ConfigError, validate
from memjax.data.mqar import MQAR
from memjax.data.pipeline import make_dataset


def _task(split="train", n=50, seed=0, seq_len=64, **kw):
    return MQAR(MQAR.Options(**kw), seq_len=seq_len, vocab_size=256, split=split, num_examples=n, seed=seed)


def _check_example(x, y, m, pairs):
    """One example decoded on its own: every scored position holds a key whose value, as written
    in the context, is the target; every key is queried exactly once; the rest is filler."""
    t, c = len(x), 2 * pairs
    context = x[:c]
    keys, values = context[0::2], context[1::2]
    assert (keys >= 1).all() and (keys < 128).all() and (values >= 128).all()
    table = dict(zip(keys.tolist(), values.tolist()))
    scored = np.where(m)[0]
    assert len(scored) == pairs and (scored >= c).all()
    assert sorted(x[scored].tolist()) == sorted(keys.tolist())
    for p in scored:
        assert y[p] == table[int(x[p])]
        assert x[p + 1] == y[p] if p + 1 < t else True
    assert ((scored - c) % 2 == 0).all()  # keys sit at even offsets of the query region
    filler = np.ones(t, bool)
    filler[:c] = False
    filler[scored] = False
    filler[np.minimum(scored + 1, t - 1)] = False
    assert (x[filler] == 0).all()


def test_answers_are_the_values_bound_to_the_queried_keys():
    task = _task(num_kv_pairs=6, random_non_queries=False)
    for i in range(20):
        ex = task[i]
        assert (ex["segment_ids"] == 1).all()
        _check_example(ex["inputs"], ex["targets"], ex["mask"] > 0, 6)


def test_train_mixture_packs_independent_examples_of_each_task():
    """Zoology's mixture protocol: a row packs seq_len // L examples of one (L, pairs) task, each
    its own segment and a valid MQAR example by itself; a short tail is unscored filler; tasks
    are drawn in proportion to their weights; the eval split keeps (seq_len, num_kv_pairs)."""
    mix = ((32, 2, 3.0), (64, 8, 1), (48, 4, 1))
    task = _task(seq_len=128, n=400, num_kv_pairs=16, random_non_queries=False, train_mixture=mix)
    seen = {32: 0, 64: 0, 48: 0}
    for i in range(400):
        ex = task[i]
        seg = ex["segment_ids"]
        starts = np.flatnonzero(np.diff(seg, prepend=0))
        length = int(starts[1]) if len(starts) > 1 else 128
        pairs = {32: 2, 64: 8, 48: 4}[length]
        seen[length] += 1
        count = 128 // length
        assert (seg[: count * length] == np.repeat(np.arange(1, count + 1), length)).all()
        for j in range(count):
            sl = slice(j * length, (j + 1) * length)
            _check_example(ex["inputs"][sl], ex["targets"][sl], ex["mask"][sl] > 0, pairs)
        tail = slice(count * length, 128)
        assert (seg[tail] == count + 1).all() and not ex["mask"][tail].any() and (ex["inputs"][tail] == 0).all()
    assert seen[32] > 200 and 40 < seen[64] < 130 and 40 < seen[48] < 130  # 3 : 1 : 1 of 400
    ev = _task("eval", seq_len=128, n=5, num_kv_pairs=16, random_non_queries=False, train_mixture=mix)
    for i in range(5):
        e = ev[i]
        assert (e["segment_ids"] == 1).all()
        _check_example(e["inputs"], e["targets"], e["mask"] > 0, 16)


@pytest.mark.parametrize("mixture, match", [
    (((64, 4),), r"train_mixture\[0\]' must be a triple"),
    (((64, 4, 1), (64, "4", 1)), r"train_mixture\[1\]' must be a triple"),
    (((128, 4, 1),), r"train_mixture\[0\]'.*length 128 must be in \[1, data.seq_len = 64\]"),
    (((64, 4, 0),), r"train_mixture\[0\]'.*weight must be positive"),
    (((16, 8, 1),), r"train_mixture\[0\] length' \(16\) too small: MQAR with 8 pairs"),
    ((("a", 4, 1),), r"must be a triple"),
])
def test_train_mixture_bad_entries_are_named(mixture, match):
    cfg = Config()
    cfg.model.vocab_size = 256
    cfg.data.options = {"num_kv_pairs": 4, "train_mixture": mixture}
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_power_law_favours_short_gaps():
    task = _task(n=400, num_kv_pairs=4)
    gaps = np.concatenate([(np.where(task[i]["mask"] > 0)[0] - 8) // 2 for i in range(400)])
    assert np.mean(gaps < 8) > 0.4 > np.mean(gaps >= 20)


def test_deterministic_and_splits_differ():
    a, b = _task()[3], _task()[3]
    assert all((a[k] == b[k]).all() for k in a)
    assert not (_task()[3]["inputs"] == _task()[4]["inputs"]).all()
    assert not (_task("eval")[3]["inputs"] == a["inputs"]).all()
    train = {_task(n=300)[i]["inputs"].tobytes() for i in range(300)}
    assert not any(_task("eval", n=100)[i]["inputs"].tobytes() in train for i in range(100))


def test_pipeline_same_seed_same_batches_and_resume():
    cfg = Config()
    cfg.model.vocab_size = 256
    cfg.data.num_train_examples = 64
    ds = make_dataset(cfg, "train", batch_size=8)
    it1, it2 = iter(ds), iter(ds)
    for _ in range(3):
        b1, b2 = next(it1), next(it2)
        assert (b1["inputs"] == b2["inputs"]).all()
    state = it1.get_state()
    expected = [next(it1)["inputs"] for _ in range(12)]  # crosses an epoch boundary (64 / 8 = 8)
    it3 = iter(ds)
    it3.set_state(state)
    got = [next(it3)["inputs"] for _ in range(12)]
    assert all((e == g).all() for e, g in zip(expected, got))


def test_processes_read_disjoint_examples():
    cfg = Config()
    cfg.model.vocab_size = 256
    cfg.data.num_train_examples = 32
    seen = []
    for pi in range(2):
        it = iter(make_dataset(cfg, "train", batch_size=8, process_index=pi, process_count=2))
        seen.append({row.tobytes() for _ in range(4) for row in next(it)["inputs"]})
    assert len(seen[0]) == len(seen[1]) == 16 and not seen[0] & seen[1]


def test_train_mixture_batches_through_the_pipeline():
    cfg = Config()
    cfg.model.vocab_size = 256
    cfg.data.seq_len = 128
    cfg.data.num_train_examples = 16
    cfg.data.options = {"num_kv_pairs": 8, "train_mixture": [[32, 4, 1], [128, 8, 1]]}
    validate(cfg)
    b = next(iter(make_dataset(cfg, "train", batch_size=8)))
    assert b["segment_ids"].shape == (8, 128) and b["segment_ids"].max() in (1, 4)
    assert b["mask"].sum() == sum(16 if r.max() == 4 else 8 for r in b["segment_ids"])


def test_index_out_of_range():
    with pytest.raises(IndexError):
        _task(n=5)[5]
