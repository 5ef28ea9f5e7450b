"""Multi-query associative recall (MQAR) exactly as the Zoology benchmark defines it.

A sequence of ``seq_len + 1`` tokens: the context ``k1 v1 k2 v2 ...`` (repeated
``num_passes`` times), then a query region where each key appears once, at an even
offset ``2 * gap``, followed by its value. Gaps are drawn without replacement with
probability proportional to ``power_a * i ** (power_a - 1)``, ``i = 1..space`` (short
gaps favoured). Keys come from ``[1, vocab/2)``, values from ``[vocab/2, vocab)``, 0 is
filler (replaced by uniform random tokens when ``random_non_queries``). The model sees
``inputs = seq[:-1]`` and is scored only where the next token is a queried value.

``train_mixture`` (training split only; evaluation keeps ``seq_len`` and ``num_kv_pairs``) is the
protocol of Zoology's Based-paper MQAR sweep (``zoology/experiments/paper_configs/
arxiv24_based_figure2``): training examples drawn from several ``(length, pairs)`` tasks at once,
short ones included, which is what lets a model leave the loss plateau of a long task. Each row
picks one task ``(L, n, weight)`` with probability proportional to ``weight`` and packs
``seq_len // L`` independent examples of it, one segment each (``segment_ids`` 1, 2, ...; every
memory and attention block resets at a segment start, so a packed row equals its examples run
separately); a tail shorter than ``L`` is unscored filler in a segment of its own.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memjax.config import ConfigError
from memjax.data.registry import register_task

_SPLIT_IDS = {"train": 0, "eval": 1}


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent stream per (seed, split, index): random access and disjoint splits."""
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


@register_task("mqar")
class MQAR:
    @dataclasses.dataclass
    class Options:
        num_kv_pairs: int = 4
        power_a: float = 0.01
        num_passes: int = 1
        random_non_queries: bool = True
        # ((length, num_kv_pairs, weight), ...): the training rows' task mixture (module docstring).
        train_mixture: tuple | list = ()

        def validate(self, data_cfg, model_cfg):
            self._validate_task(data_cfg.seq_len, self.num_kv_pairs, model_cfg.vocab_size, "data.seq_len",
                                "data.options.num_kv_pairs")
            for i, part in enumerate(self.mixture()):
                key = f"data.options.train_mixture[{i}]"
                length, pairs, weight = part
                if not 1 <= length <= data_cfg.seq_len:
                    raise ConfigError(f"config key {key!r}: length {length} must be in [1, data.seq_len = "
                                      f"{data_cfg.seq_len}] (a row packs data.seq_len // length examples)")
                if weight <= 0:
                    raise ConfigError(f"config key {key!r}: weight must be positive, got {weight}")
                self._validate_task(length, pairs, model_cfg.vocab_size, key + " length", key + " num_kv_pairs")

        def mixture(self) -> list[tuple[int, int, float]]:
            """``train_mixture`` as ``[(length, num_kv_pairs, weight)]`` (ConfigError if malformed)."""
            parts = []
            for i, part in enumerate(self.train_mixture):
                ok = isinstance(part, (tuple, list)) and len(part) == 3
                ok = ok and all(isinstance(x, int) and not isinstance(x, bool) for x in part[:2])
                ok = ok and isinstance(part[2], (int, float)) and not isinstance(part[2], bool)
                if not ok:
                    raise ConfigError(f"config key 'data.options.train_mixture[{i}]' must be a triple "
                                      f"(length: int, num_kv_pairs: int, weight: number), got {part!r}")
                parts.append((part[0], part[1], float(part[2])))
            return parts

        def _validate_task(self, seq_len, num_kv_pairs, vocab_size, len_key, pairs_key):
            L, V = seq_len + 1, vocab_size
            if num_kv_pairs <= 0:
                raise ConfigError(f"config key {pairs_key!r} must be positive, got {num_kv_pairs}")
            if self.num_passes <= 0:
                raise ConfigError(f"config key 'data.options.num_passes' must be positive, got {self.num_passes}")
            if not 0 < self.power_a <= 1:
                raise ConfigError(f"config key 'data.options.power_a' must be in (0, 1], got {self.power_a}")
            if V <= L:
                raise ConfigError(
                    f"config key 'model.vocab_size' ({V}) must exceed the MQAR sequence length {L} ({len_key} + 1)"
                )
            if V // 2 - 1 < num_kv_pairs:
                raise ConfigError(f"config key 'model.vocab_size' ({V}) is too small for {num_kv_pairs} distinct keys "
                                  f"({pairs_key})")
            need = 2 * num_kv_pairs * self.num_passes + 2 * num_kv_pairs
            if need > L:
                raise ConfigError(
                    f"config key {len_key!r} ({seq_len}) too small: MQAR with "
                    f"{num_kv_pairs} pairs x {self.num_passes} passes needs length >= {need - 1}"
                )

    def __init__(self, opts: "MQAR.Options", *, seq_len: int, vocab_size: int, split: str,
                 num_examples: int, seed: int):
        self.opts, self.seq_len, self.vocab_size = opts, seq_len, vocab_size
        self.split, self.num_examples, self.seed = split, num_examples, seed
        self.parts = opts.mixture() if split == "train" else []
        if self.parts:
            w = np.array([p[2] for p in self.parts])
            self.part_probs = w / w.sum()
        self._gaps: dict[tuple[int, int], np.ndarray] = {}

    def gap_probs(self, seq_len: int, num_kv_pairs: int) -> np.ndarray:
        """P(gap = i), ``i = 0 .. space - 1``, proportional to ``power_a (i + 1) ** (power_a - 1)``."""
        key = (seq_len, num_kv_pairs)
        if key not in self._gaps:
            space = (seq_len + 1 - 2 * num_kv_pairs * self.opts.num_passes) // 2
            i = np.arange(1, space + 1, dtype=np.float64)
            p = self.opts.power_a * i ** (self.opts.power_a - 1)
            self._gaps[key] = p / p.sum()
        return self._gaps[key]

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        rng = example_rng(self.seed, self.split, int(index))
        if not self.parts:
            return self.example(rng, self.seq_len, self.opts.num_kv_pairs)
        length, pairs, _ = self.parts[rng.choice(len(self.parts), p=self.part_probs)]
        count = self.seq_len // length
        rows = [self.example(rng, length, pairs) for _ in range(count)]
        for i, row in enumerate(rows):
            row["segment_ids"] = np.full(length, i + 1, np.int32)
        tail = self.seq_len - count * length
        if tail:  # unscored filler, its own segment
            rows.append({"inputs": np.zeros(tail, np.int32), "targets": np.zeros(tail, np.int32),
                         "mask": np.zeros(tail, np.float32), "segment_ids": np.full(tail, count + 1, np.int32),
                         "distance": np.zeros(tail, np.int32)})
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    def example(self, rng: np.random.Generator, seq_len: int, num_kv_pairs: int) -> dict:
        """One MQAR example of ``seq_len`` positions with ``num_kv_pairs`` pairs, drawn from ``rng``."""
        o, V, n = self.opts, self.vocab_size, num_kv_pairs
        keys = rng.choice(np.arange(1, V // 2), n, replace=False)
        values = rng.choice(np.arange(V // 2, V), n, replace=False)
        kv = np.stack([keys, values], axis=1).reshape(-1)
        context = np.tile(kv, o.num_passes)
        context_size = len(context)
        total = seq_len + 1
        queries = np.zeros(total - context_size, np.int64)
        answers = np.full(total - context_size, -1, np.int64)
        probs = self.gap_probs(seq_len, n)
        gaps = rng.choice(len(probs), n, replace=False, p=probs)
        queries[2 * gaps] = keys
        queries[2 * gaps + 1] = values
        answers[2 * gaps + 1] = values
        seq = np.concatenate([context, queries])
        labels = np.concatenate([np.full(context_size, -1), answers])
        inputs = seq[:-1].copy()
        if o.random_non_queries:
            filler = inputs == 0
            inputs[filler] = rng.integers(0, V, filler.sum())
        targets, mask = labels[1:], labels[1:] >= 0
        # Filler targets are arbitrary (they are never scored); use the next input token.
        targets = np.where(mask, targets, np.concatenate([inputs[1:], [0]]))
        # Query distance: how far back the queried pair sits (for accuracy-by-distance).
        query_pos = context_size + 2 * gaps  # where key j is queried (input index)
        last_write = context_size - 2 * n + 2 * np.arange(n)  # key j in the last pass
        distance = np.zeros(seq_len, np.int32)
        distance[query_pos] = query_pos - last_write
        return {
            "inputs": inputs.astype(np.int32),
            "targets": targets.astype(np.int32),
            "mask": mask.astype(np.float32),
            "segment_ids": np.ones(seq_len, np.int32),
            "distance": distance,
        }

    def metrics(self, batch: dict, predictions: np.ndarray) -> dict:
        """Accuracy by query distance bucket (powers of two)."""
        mask = batch["mask"] > 0
        correct = (predictions == batch["targets"]) & mask
        dist = batch["distance"]
        out = {}
        edges = [0, 8, 16, 32, 64, 128, 256, 512, 1 << 30]
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = mask & (dist >= lo) & (dist < hi)
            if sel.any():
                out[f"accuracy_dist_{lo}_{hi}"] = float(correct[sel].sum() / sel.sum())
        return out
