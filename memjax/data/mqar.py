"""Multi-query associative recall (MQAR) exactly as the Zoology benchmark defines it.

A sequence of ``seq_len + 1`` tokens: the context ``k1 v1 k2 v2 ...`` (repeated
``num_passes`` times), then a query region where each key appears once, at an even
offset ``2 * gap``, followed by its value. Gaps are drawn without replacement with
probability proportional to ``power_a * i ** (power_a - 1)``, ``i = 1..space`` (short
gaps favoured). Keys come from ``[1, vocab/2)``, values from ``[vocab/2, vocab)``, 0 is
filler (replaced by uniform random tokens when ``random_non_queries``). The model sees
``inputs = seq[:-1]`` and is scored only where the next token is a queried value.
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

        def validate(self, data_cfg, model_cfg):
            L, V = data_cfg.seq_len + 1, model_cfg.vocab_size
            if self.num_kv_pairs <= 0:
                raise ConfigError(f"config key 'data.options.num_kv_pairs' must be positive, got {self.num_kv_pairs}")
            if self.num_passes <= 0:
                raise ConfigError(f"config key 'data.options.num_passes' must be positive, got {self.num_passes}")
            if not 0 < self.power_a <= 1:
                raise ConfigError(f"config key 'data.options.power_a' must be in (0, 1], got {self.power_a}")
            if V <= L:
                raise ConfigError(
                    f"config key 'model.vocab_size' ({V}) must exceed the MQAR sequence length {L} (data.seq_len + 1)"
                )
            if V // 2 - 1 < self.num_kv_pairs:
                raise ConfigError(f"config key 'model.vocab_size' ({V}) is too small for {self.num_kv_pairs} distinct keys")
            need = 2 * self.num_kv_pairs * self.num_passes + 2 * self.num_kv_pairs
            if need > L:
                raise ConfigError(
                    f"config key 'data.seq_len' ({data_cfg.seq_len}) too small: MQAR with "
                    f"{self.num_kv_pairs} pairs x {self.num_passes} passes needs seq_len >= {need - 1}"
                )

    def __init__(self, opts: "MQAR.Options", *, seq_len: int, vocab_size: int, split: str,
                 num_examples: int, seed: int):
        self.opts, self.seq_len, self.vocab_size = opts, seq_len, vocab_size
        self.split, self.num_examples, self.seed = split, num_examples, seed
        total = seq_len + 1
        self.context_size = 2 * opts.num_kv_pairs * opts.num_passes
        self.space = (total - self.context_size) // 2
        i = np.arange(1, self.space + 1, dtype=np.float64)
        p = opts.power_a * i ** (opts.power_a - 1)
        self.gap_probs = p / p.sum()

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        o, V, n = self.opts, self.vocab_size, self.opts.num_kv_pairs
        rng = example_rng(self.seed, self.split, int(index))
        keys = rng.choice(np.arange(1, V // 2), n, replace=False)
        values = rng.choice(np.arange(V // 2, V), n, replace=False)
        kv = np.stack([keys, values], axis=1).reshape(-1)
        context = np.tile(kv, o.num_passes)
        total = self.seq_len + 1
        queries = np.zeros(total - self.context_size, np.int64)
        answers = np.full(total - self.context_size, -1, np.int64)
        gaps = rng.choice(self.space, n, replace=False, p=self.gap_probs)
        queries[2 * gaps] = keys
        queries[2 * gaps + 1] = values
        answers[2 * gaps + 1] = values
        seq = np.concatenate([context, queries])
        labels = np.concatenate([np.full(self.context_size, -1), answers])
        inputs = seq[:-1].copy()
        if o.random_non_queries:
            filler = inputs == 0
            inputs[filler] = rng.integers(0, V, filler.sum())
        targets, mask = labels[1:], labels[1:] >= 0
        # Filler targets are arbitrary (they are never scored); use the next input token.
        targets = np.where(mask, targets, np.concatenate([inputs[1:], [0]]))
        # Query distance: how far back the queried pair sits (for accuracy-by-distance).
        query_pos = self.context_size + 2 * gaps  # where key j is queried (input index)
        last_write = self.context_size - 2 * n + 2 * np.arange(n)  # key j in the last pass
        distance = np.zeros(self.seq_len, np.int32)
        distance[query_pos] = query_pos - last_write
        return {
            "inputs": inputs.astype(np.int32),
            "targets": targets.astype(np.int32),
            "mask": mask.astype(np.float32),
            "segment_ids": np.ones(self.seq_len, np.int32),
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
