import numpy as np
import pytest

from memjax.config import Config
from memjax.data.mqar import MQAR
from memjax.data.pipeline import make_dataset


def _task(split="train", n=50, seed=0, **kw):
    return MQAR(MQAR.Options(**kw), seq_len=64, vocab_size=256, split=split, num_examples=n, seed=seed)


def test_answers_are_the_values_bound_to_the_queried_keys():
    """Decode each example independently: every scored position holds a key whose value,
    as written in the context, is the target; and every key is queried exactly once."""
    task = _task(num_kv_pairs=6, random_non_queries=False)
    for i in range(20):
        ex = task[i]
        x, y, m = ex["inputs"], ex["targets"], ex["mask"] > 0
        context = x[:12]
        keys, values = context[0::2], context[1::2]
        assert (keys >= 1).all() and (keys < 128).all() and (values >= 128).all()
        table = dict(zip(keys.tolist(), values.tolist()))
        scored = np.where(m)[0]
        assert len(scored) == 6 and (scored >= 12).all()
        assert sorted(x[scored].tolist()) == sorted(keys.tolist())
        for p in scored:
            assert y[p] == table[int(x[p])]
            assert x[p + 1] == y[p] if p + 1 < len(x) else True
        assert ((scored - 12) % 2 == 0).all()  # keys sit at even offsets of the query region
        filler = np.ones(64, bool)
        filler[:12] = False
        filler[scored] = False
        filler[np.minimum(scored + 1, 63)] = False
        assert (x[filler] == 0).all()


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


def test_index_out_of_range():
    with pytest.raises(IndexError):
        _task(n=5)[5]
