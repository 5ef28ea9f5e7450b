"""State-tracking tasks (memjax.data.state_tracking): parity and group word problems.

Targets are recomputed here independently: parity with a Python loop, group products by
composing permutation tuples by hand (and checking the group axioms / sizes of the enumeration).
"""
import itertools
import math

import numpy as np
import pytest

from memjax.config import Config, ConfigError, validate
from memjax.data.registry import get_task
from memjax.data.state_tracking import GROUPS, Parity, WordProblem, group_elements

SIZES = {"Z5": 5, "S3": 6, "A4": 12, "S4": 24, "A5": 60, "S5": 120}


def make(cls, split="train", n=16, seq_len=50, vocab_size=128, seed=0, **opts):
    return cls(cls.Options(**opts), seq_len=seq_len, vocab_size=vocab_size, split=split, num_examples=n, seed=seed)


def compose(a: tuple, b: tuple) -> tuple:
    """``(a b)[i] = a[b[i]]``: b first, then a."""
    return tuple(a[b[i]] for i in range(len(b)))


def test_registered():
    assert get_task("parity") is Parity and get_task("word_problem") is WordProblem


def test_parity_targets_are_the_running_parity():
    task = make(Parity, seq_len=64, vocab_size=2)
    ones = 0
    for i in range(len(task)):
        ex = task[i]
        assert set(ex) >= {"inputs", "targets", "mask", "segment_ids"}
        assert all(ex[k].shape == (64,) for k in ("inputs", "targets", "mask", "segment_ids"))
        assert ex["inputs"].dtype == np.int32 and ex["targets"].dtype == np.int32 and ex["mask"].dtype == np.float32
        assert (ex["mask"] == 1).all() and (ex["segment_ids"] == 1).all()
        p = 0
        for x, y in zip(ex["inputs"].tolist(), ex["targets"].tolist()):
            assert x in (0, 1)
            p ^= x
            assert y == p
        ones += int(ex["inputs"].sum())
    assert 0.4 < ones / (64 * len(task)) < 0.6  # p_one = 0.5
    skewed = make(Parity, n=8, seq_len=200, p_one=0.1)
    frac = np.mean([skewed[i]["inputs"].mean() for i in range(8)])
    assert 0.05 < frac < 0.15


@pytest.mark.parametrize("group", GROUPS)
def test_group_enumeration(group):
    el = [tuple(p) for p in group_elements(group).tolist()]
    k = int(group[1])
    assert len(el) == SIZES[group] == len(set(el))
    assert el[0] == tuple(range(k)) and el == sorted(el)  # identity first, lexicographic
    closed = set(el)
    assert all(compose(a, b) in closed for a in el for b in el)  # a group (finite: closure suffices)
    if group[0] == "S":
        assert len(el) == math.factorial(k)
    abelian = all(compose(a, b) == compose(b, a) for a in el for b in el)
    assert abelian == (group == "Z5")


@pytest.mark.parametrize("group", ["S3", "Z5", "A5", "S5"])
def test_word_problem_targets_are_running_products(group):
    task = make(WordProblem, group=group)
    el = [tuple(p) for p in itertools.permutations(range(int(group[1])))]
    el = [p for p in el if p in {tuple(q) for q in group_elements(group).tolist()}]  # the group, lexicographic
    seen = set()
    for i in range(len(task)):
        ex = task[i]
        assert (ex["mask"] == 1).all() and (ex["segment_ids"] == 1).all()
        acc = tuple(range(len(el[0])))
        for x, y in zip(ex["inputs"].tolist(), ex["targets"].tolist()):
            assert 0 <= x < len(el)
            acc = compose(acc, el[x])  # x_0 x_1 .. x_t
            assert el[y] == acc
        seen.update(ex["inputs"].tolist())
    assert len(seen) > 0.9 * len(el)  # drawn from the whole group


def test_deterministic_and_splits_differ():
    for cls, opts in ((Parity, {}), (WordProblem, {"group": "S3"})):
        a, b = make(cls, **opts), make(cls, **opts)
        for i in range(4):
            for k in ("inputs", "targets"):
                np.testing.assert_array_equal(a[i][k], b[i][k])
        ev, other_seed = make(cls, split="eval", **opts), make(cls, seed=1, **opts)
        assert any((a[i]["inputs"] != ev[i]["inputs"]).any() for i in range(4))
        assert any((a[i]["inputs"] != other_seed[i]["inputs"]).any() for i in range(4))
        assert not (a[0]["inputs"] == a[1]["inputs"]).all()
        with pytest.raises(IndexError):
            a[len(a)]


def test_metrics():
    task = make(WordProblem, n=2, seq_len=5, group="S3")
    batch = {k: np.stack([task[i][k] for i in range(2)]) for k in ("inputs", "targets", "mask")}
    preds = batch["targets"].copy()
    preds[0, 2] = (preds[0, 2] + 1) % 6
    m = task.metrics(batch, preds)
    assert m == {"accuracy_last": 1.0, "sequence_accuracy": 0.5}


def _cfg(task, options, vocab_size=128, seq_len=32):
    cfg = Config(name="t")
    cfg.data.task, cfg.data.options, cfg.data.seq_len = task, options, seq_len
    cfg.model.vocab_size = vocab_size
    return cfg


@pytest.mark.parametrize("task,options,vocab,match", [
    ("word_problem", {"group": "S6"}, 128, "data.options.group"),
    ("word_problem", {"group": "S5"}, 100, "model.vocab_size"),
    ("word_problem", {"groop": "S5"}, 128, "data.options.groop"),
    ("parity", {"p_one": 1.0}, 128, "data.options.p_one"),
    ("parity", {}, 1, "model.vocab_size"),
])
def test_bad_options_raise_config_error_naming_the_key(task, options, vocab, match):
    with pytest.raises(ConfigError, match=match):
        validate(_cfg(task, options, vocab))
    if "groop" not in options:  # direct construction checks too
        cls = get_task(task)
        with pytest.raises(ConfigError, match=match):
            cls(cls.Options(**options), seq_len=32, vocab_size=vocab, split="train", num_examples=1, seed=0)


def test_good_options_validate():
    validate(_cfg("word_problem", {"group": "A5"}, vocab_size=64))
    validate(_cfg("parity", {}, vocab_size=2))
