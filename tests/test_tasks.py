"""Synthetic tasks: copying, selective copying, pass-key, fact recall, induction.

Each task's examples are decoded here independently (from the token layout in the
task's docstring, not through the task's own helpers) and the scored positions and
answers are checked against the task's definition.
"""
import dataclasses

import numpy as np
import pytest

from memjax.config import Config, ConfigError, validate
from memjax.data.copying import Copying, SelectiveCopying
from memjax.data.facts import FactRecall
from memjax.data.induction import Induction
from memjax.data.passkey import PassKey
from memjax.data.registry import get_task


def make(cls, split="train", n=64, seq_len=64, vocab_size=256, seed=0, **opts):
    return cls(cls.Options(**opts), seq_len=seq_len, vocab_size=vocab_size, split=split,
               num_examples=n, seed=seed)


def scored(ex):
    return np.where(ex["mask"] > 0)[0]


# ----------------------------------------------------------------------------- copying


def test_copying_answers_are_the_leading_tokens_after_the_delimiter():
    n, T = 6, 40
    task = make(Copying, seq_len=T, num_tokens=n, num_symbols=5)
    for i in range(20):
        x, y = task[i]["inputs"], task[i]["targets"]
        (delim,) = np.where(x == 1)[0]
        assert delim == T - n
        copied = x[:n]
        assert ((copied >= 2) & (copied < 7)).all()
        assert (x[n:delim] == 0).all()
        assert scored(task[i]).tolist() == list(range(delim, T))
        assert y[scored(task[i])].tolist() == copied.tolist()
        assert x[delim + 1:].tolist() == copied[:-1].tolist()


def test_selective_copying_answers_are_the_scattered_tokens_in_order():
    n, T = 5, 48
    task = make(SelectiveCopying, seq_len=T, num_tokens=n, num_symbols=8)
    layouts = set()
    for i in range(30):
        ex = task[i]
        x, y = ex["inputs"], ex["targets"]
        (delim,) = np.where(x == 1)[0]
        before = x[:delim]
        where = np.where(before != 0)[0]
        assert len(where) == n and ((before[where] >= 2) & (before[where] < 10)).all()
        layouts.add(tuple(where))
        pos = scored(ex)
        assert pos.tolist() == list(range(delim, T)) and len(pos) == n
        assert y[pos].tolist() == before[where].tolist()
    assert len(layouts) > 20  # positions really are scattered, not fixed


def test_copying_metrics_sequence_accuracy():
    task = make(Copying, seq_len=32, num_tokens=4)
    batch = {k: np.stack([task[i][k] for i in range(4)]) for k in task[0]}
    pred = batch["targets"].copy()
    assert task.metrics(batch, pred)["sequence_accuracy"] == 1.0
    pred[1, -1] += 1  # one wrong answer token spoils example 1
    pred[2, 0] += 1  # an unscored position does not count
    assert task.metrics(batch, pred)["sequence_accuracy"] == 0.75


# ----------------------------------------------------------------------------- pass-key


def decode_passkey(x, key_length, key_symbols):
    (p,) = np.where(x == 1)[0]
    (q,) = np.where(x == 2)[0]
    key = x[p + 1:p + 1 + key_length]
    assert ((key >= 3) & (key < 3 + key_symbols)).all()
    return p, q, key


def test_passkey_answer_is_the_key_at_the_requested_depth():
    T, n = 80, 4
    H = T - 2 * n - 1
    for depth in (0.0, 0.5, 1.0):
        task = make(PassKey, seq_len=T, key_length=n, key_symbols=10, depth=depth, filler_symbols=7)
        for i in range(5):
            ex = task[i]
            x, y = ex["inputs"], ex["targets"]
            p, q, key = decode_passkey(x, n, 10)
            assert p == round(depth * H)  # p filler tokens precede the needle
            assert q == T - n and scored(ex).tolist() == list(range(q, T))
            assert y[scored(ex)].tolist() == key.tolist()
            filler = np.concatenate([x[:p], x[p + 1 + n:q]])
            assert filler.tolist() == [13 + t % 7 for t in range(H)]  # one sentence, repeated
            assert np.allclose(ex["depth"], p / H)


def test_passkey_random_depth_and_random_filler():
    T, n = 64, 3
    task = make(PassKey, n=200, seq_len=T, key_length=n, key_symbols=4, filler="random", filler_symbols=9)
    depths = []
    for i in range(200):
        ex = task[i]
        p, q, key = decode_passkey(ex["inputs"], n, 4)
        assert ex["targets"][scored(ex)].tolist() == key.tolist()
        rest = np.delete(ex["inputs"], [*range(p, p + 1 + n), *range(q, T)])
        assert ((rest >= 7) & (rest < 16)).all()
        depths.append(ex["depth"][0])
    depths = np.array(depths)
    assert depths.min() < 0.1 and depths.max() > 0.9 and 0.4 < depths.mean() < 0.6


def test_passkey_metrics_by_depth():
    task = make(PassKey, n=40, seq_len=48, key_length=3)
    batch = {k: np.stack([task[i][k] for i in range(40)]) for k in task[0]}
    pred = batch["targets"].copy()
    shallow = batch["depth"][:, 0] < 0.2
    assert 0 < shallow.sum() < 40
    pred[shallow, -1] = 0  # miss the last key token wherever the needle is shallow
    m = task.metrics(batch, pred)
    assert m["key_accuracy"] == pytest.approx(1 - shallow.mean())
    assert m["key_accuracy_depth_0.0_0.2"] == 0.0
    assert all(v == 1.0 for k, v in m.items() if k.startswith("key_accuracy_depth") and "0.0_0.2" not in k)


# ----------------------------------------------------------------------------- induction


@pytest.mark.parametrize("trigger", ["random", "special"])
def test_induction_answer_follows_the_earlier_trigger(trigger):
    T, gap = 50, 3
    task = make(Induction, n=100, seq_len=T, vocab_size=20, trigger=trigger, min_gap=gap)
    firsts = set()
    for i in range(100):
        ex = task[i]
        x, y = ex["inputs"], ex["targets"]
        a = x[-1]
        if trigger == "special":
            assert a == 1
        occurrences = np.where(x == a)[0]
        assert len(occurrences) == 2 and occurrences[1] == T - 1
        p = occurrences[0]
        assert T - 1 - (p + 2) >= gap  # at least min_gap tokens between B and the query
        assert scored(ex).tolist() == [T - 1]
        assert y[T - 1] == x[p + 1] != a
        assert ex["distance"][T - 1] == T - 1 - p
        assert ((x >= 2) | (x == a)).all() and (x < 20).all()
        firsts.add(p)
    assert len(firsts) > 20


def test_induction_metrics_by_distance():
    task = make(Induction, n=32, seq_len=64)
    batch = {k: np.stack([task[i][k] for i in range(32)]) for k in task[0]}
    pred = batch["targets"].copy()
    far = batch["distance"][:, -1] >= 32
    pred[far, -1] = 0
    m = task.metrics(batch, pred)
    assert far.any() and (~far).any()
    for k, v in m.items():
        lo = int(k.split("_")[2])
        assert v == (0.0 if lo >= 32 else 1.0)


# ----------------------------------------------------------------------------- fact recall


def decode_facts(task, ex):
    """Sentences (skeleton, subject token, relation token, object tokens) of one example,
    decoded from the id ranges alone; checks the scored positions on the way."""
    o = task.opts
    S, R, O = o.num_subjects, o.num_relations, o.num_objects
    seq = np.concatenate([ex["inputs"], ex["targets"][-1:]])
    out, start, expect_mask = [], 0, np.zeros(len(seq), bool)
    for end in np.where(seq == 1)[0]:
        sent = seq[start:end]
        subj = [t for t in sent if 2 <= t < 2 + S]
        rel = [t for t in sent if 2 + S <= t < 2 + S + R]
        assert len(subj) == 1 and len(rel) == 1
        obj = sent[-o.object_length:]
        assert ((obj >= 2 + S + R) & (obj < 2 + S + R + O)).all()
        skeleton = tuple("S" if 2 <= t < 2 + S else "R" if t < 2 + S + R else int(t) for t in sent[:-o.object_length])
        assert all(isinstance(t, str) or t >= 2 + S + R + O for t in skeleton)
        out.append((skeleton, subj[0], rel[0], tuple(obj.tolist())))
        expect_mask[end - o.object_length:end] = True
        start = end + 1
    assert (seq[start:] == 0).all()  # PAD after the last sentence
    # input t is scored iff seq[t + 1] is an object token
    assert (ex["mask"] > 0).tolist() == expect_mask[1:].tolist()
    assert ex["targets"][ex["mask"] > 0].tolist() == seq[1:][expect_mask[1:]].tolist()
    return out


def test_fact_recall_answers_match_the_table_and_eval_uses_heldout_phrasings():
    opts = dict(num_subjects=20, num_relations=3, num_objects=10, object_length=2, num_words=6,
                num_templates=6, num_eval_templates=2)
    train, evals = make(FactRecall, n=200, **opts), make(FactRecall, "eval", n=100, **opts)
    facts, train_skel, eval_skel = {}, set(), set()
    for i in range(200):
        sentences = decode_facts(train, train[i])
        assert len({(s, r) for _, s, r, _ in sentences}) == len(sentences)  # no repeated fact
        for skel, s, r, obj in sentences:
            train_skel.add(skel)
            assert facts.setdefault((s, r), obj) == obj  # one object per fact across examples
            assert obj == tuple(train.table[s - 2, r - 22].tolist())
    for i in range(100):
        for skel, s, r, obj in decode_facts(evals, evals[i]):
            eval_skel.add(skel)
            assert obj == tuple(train.table[s - 2, r - 22].tolist())
            if (s, r) in facts:
                assert facts[(s, r)] == obj  # same world in both splits
    assert len(train_skel) == 4 and len(eval_skel) == 2
    assert not train_skel & eval_skel
    # ... and the phrasings are held out, not just reordered words of the same list
    assert {s for s in eval_skel} == {tuple("S" if x == -1 else "R" if x == -2 else x for x in t)
                                      for t in evals.eval_templates}


def test_fact_table_depends_on_table_seed_only():
    a = make(FactRecall, seed=0)
    assert (make(FactRecall, "eval", seed=7).table == a.table).all()
    assert make(FactRecall, seed=7).train_templates == a.train_templates
    assert not (make(FactRecall, table_seed=1).table == a.table).all()
    b = make(FactRecall, "eval", eval_phrasings="train")
    skel = {s for i in range(30) for s, *_ in decode_facts(b, b[i])}
    assert len(skel) == 6  # train phrasings


def test_fact_recall_multi_token_names_state_the_table():
    # 60 subjects named by 2 of 8 name tokens: the vocabulary holds the alphabet, not the subjects.
    opts = dict(num_subjects=60, subject_length=2, subject_alphabet=8, num_relations=3, num_objects=10,
                num_words=6, num_templates=6, num_eval_templates=2)
    task = make(FactRecall, n=100, **opts)
    assert task.opts.vocab_needed() == 2 + 8 + 3 + 10 + 6 and task.first_relation == 10
    names = task.names
    assert names.shape == (60, 2) and len({tuple(r) for r in names}) == 60  # distinct names
    assert ((names >= 2) & (names < 10)).all()
    assert (make(FactRecall, "eval", seed=5, **opts).names == names).all()  # the world, not the example
    by_name = {tuple(r): s for s, r in enumerate(names.tolist())}
    seen = 0
    for i in range(100):
        ex = task[i]
        seq = np.concatenate([ex["inputs"][:1], ex["targets"]])
        for pos in np.where(ex["mask"] > 0)[0]:
            # the sentence of this object: back to the previous SEP (or the start)
            start = max([j + 1 for j in range(pos + 1) if seq[j] == 1], default=0)
            sent = seq[start:pos + 1]
            name = tuple(t for t in sent if 2 <= t < 10)
            rel = [t - 10 for t in sent if 10 <= t < 13]
            assert len(name) == 2 and len(rel) == 1 and name in by_name
            assert int(seq[pos + 1]) == task.table[by_name[name], rel[0], 0]
            seen += 1
    assert seen > 300
    # one-token worlds are unchanged by the option's existence
    assert (make(FactRecall).names[:, 0] == 2 + np.arange(64)).all()


def test_fact_recall_metrics():
    task = make(FactRecall, n=4, object_length=2)
    batch = {k: np.stack([task[i][k] for i in range(4)]) for k in task[0]}
    n_facts = int(batch["fact_index"].max(axis=1).sum())
    pred = batch["targets"].copy()
    assert task.metrics(batch, pred)["fact_accuracy"] == 1.0
    first = np.where(batch["fact_index"][0] == 1)[0]
    pred[0, first[1]] += 1  # second token of fact 1 wrong -> that fact is wrong
    assert task.metrics(batch, pred)["fact_accuracy"] == pytest.approx((n_facts - 1) / n_facts)


# ----------------------------------------------------------------------------- all tasks

TASKS = {
    "copying": (Copying, {}),
    "selective_copying": (SelectiveCopying, {}),
    "passkey": (PassKey, {}),
    "fact_recall": (FactRecall, {}),
    "induction": (Induction, {}),
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_contract_determinism_and_split_disjointness(name):
    cls, opts = TASKS[name]
    assert get_task(name) is cls
    t1, t2 = make(cls, n=200, **opts), make(cls, n=200, **opts)
    ev = make(cls, "eval", n=50, **opts)
    for i in (0, 7, 199):
        a, b = t1[i], t2[i]
        assert all((a[k] == b[k]).all() for k in a)
        assert a["inputs"].dtype == np.int32 and a["targets"].dtype == np.int32
        assert a["mask"].dtype == np.float32 and a["segment_ids"].dtype == np.int32
        assert all(a[k].shape == (64,) for k in ("inputs", "targets", "mask", "segment_ids"))
        assert (a["segment_ids"] == 1).all() and set(np.unique(a["mask"])) <= {0.0, 1.0}
        assert a["mask"].sum() > 0
        assert (a["targets"][:-1] == a["inputs"][1:]).all()  # next-token targets
        assert (a["inputs"] < 256).all() and (a["inputs"] >= 0).all()
    assert not (t1[3]["inputs"] == t1[4]["inputs"]).all()
    assert not (make(cls, seed=1, **opts)[3]["inputs"] == t1[3]["inputs"]).all()
    train_set = {t1[i]["inputs"].tobytes() for i in range(200)}
    assert len(train_set) == 200
    assert not any(ev[i]["inputs"].tobytes() in train_set for i in range(50))
    with pytest.raises(IndexError):
        t1[200]


BAD = [
    ("copying", {"num_tokens": 33}, "data.seq_len"),
    ("copying", {"num_symbols": 255}, "model.vocab_size"),
    ("selective_copying", {"num_tokens": 0}, "data.options.num_tokens"),
    ("passkey", {"key_length": 32}, "data.seq_len"),
    ("passkey", {"filler_symbols": 250}, "model.vocab_size"),
    ("passkey", {"depth": 1.5}, "data.options.depth"),
    ("passkey", {"filler": "lorem"}, "data.options.filler"),
    ("fact_recall", {"max_words": 21}, "data.seq_len"),
    ("fact_recall", {"num_subjects": 250}, "model.vocab_size"),
    ("fact_recall", {"num_eval_templates": 8}, "data.options.num_eval_templates"),
    ("fact_recall", {"num_words": 1, "max_words": 0}, "data.options.num_templates"),
    ("fact_recall", {"subject_length": 2, "subject_alphabet": 7}, "data.options.subject_alphabet"),
    ("fact_recall", {"subject_alphabet": 12}, "data.options.subject_alphabet"),
    ("fact_recall", {"subject_length": 0}, "data.options.subject_length"),
    ("fact_recall", {"subject_length": 3, "subject_alphabet": 4, "max_words": 20}, "data.seq_len"),
    ("induction", {"min_gap": 62}, "data.seq_len"),
    ("induction", {"num_symbols": 300}, "model.vocab_size"),
    ("induction", {"trigger": "first"}, "data.options.trigger"),
]


@pytest.mark.parametrize("name,opts,key", BAD)
def test_bad_options_name_the_key(name, opts, key):
    cls = TASKS[name][0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make(cls, **opts)
    cfg = Config()
    cfg.model.vocab_size, cfg.data.seq_len, cfg.data.task, cfg.data.options = 256, 64, name, opts
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_small_vocab_for_default_induction():
    with pytest.raises(ConfigError, match="model.vocab_size"):
        make(Induction, vocab_size=4)


def test_all_tasks_batch_through_the_pipeline():
    from memjax.data.pipeline import make_dataset

    for name in TASKS:
        cfg = Config()
        cfg.data.task, cfg.data.seq_len, cfg.data.num_train_examples = name, 64, 32
        validate(cfg)
        batch = next(iter(make_dataset(cfg, "train", batch_size=8)))
        assert batch["inputs"].shape == batch["mask"].shape == (8, 64)
        assert dataclasses.is_dataclass(get_task(name).Options)
