"""State-tracking tasks: running parity and the word problem of a finite group.

Both feed a sequence of ``seq_len`` symbols and score *every* position (``mask = 1``): the target
at ``t`` is the state after reading ``x_0 .. x_t``. A fixed-depth model must track the state
exactly, so these tasks separate recurrent memories that can (non-diagonal or negative-eigenvalue
transitions) from those that cannot (Merrill et al. 2024, "The Illusion of State in State-Space
Models"; Grazzi et al. 2025, "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues"). Length generalisation: evaluate at multiples of the training length
(``memjax-eval``'s length multiples).

``parity``: ``inputs`` are bits, token ids ``0`` and ``1`` (``1`` with probability ``p_one``);
``targets[t] = (x_0 + .. + x_t) mod 2``, also as ids ``0`` / ``1``. Needs ``vocab_size >= 2``.

``word_problem``: ``inputs`` are elements of the group ``group`` drawn uniformly, ``targets[t]``
is the running product ``x_0 x_1 .. x_t``. Elements are permutations of ``0 .. k - 1`` as tuples,
composed as functions applied right to left: ``(a b)[i] = a[b[i]]``. Element ids are a fixed
enumeration: the group's permutations in lexicographic order (``itertools.permutations``), the
identity first, id = index (so ``vocab_size >= |G|``). Groups:

  - ``"Z5"``: the cyclic shifts ``i -> i + s mod 5`` (abelian, solvable: within TC0 / a
    diagonal SSM's reach)
  - ``"S3"``: all 6 permutations of 3 (non-abelian, solvable)
  - ``"A4"``, ``"S4"``: 12 / 24 elements (solvable)
  - ``"A5"``: the 60 even permutations of 5 (the smallest non-solvable group: NC1-complete)
  - ``"S5"``: all 120 permutations of 5 (non-solvable)
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

from memjax.config import ConfigError
from memjax.data.mqar import example_rng
from memjax.data.registry import register_task

GROUPS = ("Z5", "S3", "A4", "S4", "A5", "S5")


def _is_even(p: tuple) -> bool:
    """Even permutation: an even number of inversions."""
    return sum(p[i] > p[j] for i in range(len(p)) for j in range(i + 1, len(p))) % 2 == 0


@functools.lru_cache(maxsize=None)
def group_elements(group: str) -> np.ndarray:
    """``[|G|, k]`` int: the group's permutations in lexicographic order (row ``i`` is element id
    ``i``; row 0 is the identity)."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; known: {', '.join(GROUPS)}")
    k = int(group[1])
    perms = list(itertools.permutations(range(k)))  # lexicographic
    if group[0] == "Z":
        perms = [p for p in perms if all(p[i] == (p[0] + i) % k for i in range(k))]
    elif group[0] == "A":
        perms = [p for p in perms if _is_even(p)]
    out = np.asarray(perms, np.int64)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=None)
def multiplication_table(group: str) -> np.ndarray:
    """``[|G|, |G|]`` int: ``table[a, b]`` is the id of ``a b`` (``(a b)[i] = a[b[i]]``)."""
    el = group_elements(group)
    index = {tuple(p): i for i, p in enumerate(el.tolist())}
    prod = el[np.arange(len(el))[:, None, None], el[None]]  # [a, b, i] = a[b[i]]
    table = np.asarray([[index[tuple(prod[a, b])] for b in range(len(el))] for a in range(len(el))], np.int64)
    table.setflags(write=False)
    return table


def _check_seq_len(seq_len: int) -> None:
    if seq_len <= 0:
        raise ConfigError(f"config key 'data.seq_len' must be positive, got {seq_len}")


class _StateTask:
    """Shared plumbing: random access, splits, every position scored."""

    def __init__(self, opts, *, seq_len: int, vocab_size: int, split: str, num_examples: int, seed: int):
        opts.check(seq_len, vocab_size)
        self.opts, self.seq_len, self.vocab_size = opts, seq_len, vocab_size
        self.split, self.num_examples, self.seed = split, num_examples, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        inputs, targets = self._example(example_rng(self.seed, self.split, int(index)))
        return {
            "inputs": inputs.astype(np.int32),
            "targets": targets.astype(np.int32),
            "mask": np.ones(self.seq_len, np.float32),
            "segment_ids": np.ones(self.seq_len, np.int32),
        }

    def metrics(self, batch: dict, predictions: np.ndarray) -> dict:
        """``accuracy_last``: the state after the whole sequence; ``sequence_accuracy``: every
        position right."""
        correct = (np.asarray(predictions) == np.asarray(batch["targets"])) | (np.asarray(batch["mask"]) <= 0)
        return {"accuracy_last": float(correct[..., -1].mean()), "sequence_accuracy": float(correct.all(-1).mean())}


@register_task("parity")
class Parity(_StateTask):
    """Running parity of a bit string (module docstring)."""

    @dataclasses.dataclass
    class Options:
        p_one: float = 0.5  # probability of a 1 bit

        def validate(self, data_cfg, model_cfg):
            self.check(data_cfg.seq_len, model_cfg.vocab_size)

        def check(self, seq_len: int, vocab_size: int) -> None:
            if not 0.0 < self.p_one < 1.0:
                raise ConfigError(f"config key 'data.options.p_one' must be in (0, 1), got {self.p_one!r}")
            _check_seq_len(seq_len)
            if vocab_size < 2:
                raise ConfigError(f"config key 'model.vocab_size' ({vocab_size}) too small: parity needs >= 2")

    def _example(self, rng: np.random.Generator):
        bits = (rng.random(self.seq_len) < self.opts.p_one).astype(np.int64)
        return bits, np.cumsum(bits) % 2


@register_task("word_problem")
class WordProblem(_StateTask):
    """Running product of uniformly drawn group elements (module docstring)."""

    @dataclasses.dataclass
    class Options:
        group: str = "S5"  # one of GROUPS

        def validate(self, data_cfg, model_cfg):
            self.check(data_cfg.seq_len, model_cfg.vocab_size)

        def check(self, seq_len: int, vocab_size: int) -> None:
            if self.group not in GROUPS:
                raise ConfigError(f"config key 'data.options.group' must be one of {GROUPS}, got {self.group!r}")
            _check_seq_len(seq_len)
            size = len(group_elements(self.group))
            if vocab_size < size:
                raise ConfigError(f"config key 'model.vocab_size' ({vocab_size}) too small: the word problem of "
                                  f"{self.group} needs vocab_size >= {size} (one id per element)")

    def _example(self, rng: np.random.Generator):
        table = multiplication_table(self.opts.group)
        x = rng.integers(0, len(table), self.seq_len)
        out = np.empty(self.seq_len, np.int64)
        acc = 0  # the identity
        for t, g in enumerate(x):
            acc = table[acc, g]
            out[t] = acc
        return x, out
