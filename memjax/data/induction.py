"""Induction heads: ``... A B ... A`` -> ``B`` (Olsson et al. 2022; the H3 paper's synthetic).

A sequence of ``seq_len + 1`` random symbols in which a trigger ``A`` occurs exactly
twice: once at a random position ``p`` followed by ``B``, and once at the last input
position (``seq_len - 1``); the final token, the only scored target, is ``B``::

    r r r A B r r r r .. r A B
          p                 ^ query, target B

Token ids: ``0`` is never used (free for padding), ``1`` the special trigger when
``trigger="special"`` (as in H3), symbols ``2 .. 2 + num_symbols - 1``. With
``trigger="random"`` ``A`` is a random symbol and the other positions avoid it; ``B``
differs from ``A`` and may also occur elsewhere. ``min_gap`` is the least number of
tokens between ``B`` and the query. Each example carries ``distance`` (int32, at the
query position: ``seq_len - 1 - p``, how far back the bigram is) for
:meth:`Induction.metrics`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memjax.config import ConfigError
from memjax.data.mqar import example_rng
from memjax.data.registry import register_task

SPECIAL_TRIGGER, FIRST_SYMBOL = 1, 2


@register_task("induction")
class Induction:
    @dataclasses.dataclass
    class Options:
        num_symbols: int = 0  # 0: every id from 2 to vocab_size - 1
        trigger: str = "random"  # "random" (a symbol, unique in the sequence) or "special" (id 1)
        min_gap: int = 0  # tokens at least between B and the query A

        def validate(self, data_cfg, model_cfg):
            self.check(data_cfg.seq_len, model_cfg.vocab_size)

        def resolved_symbols(self, vocab_size: int) -> int:
            return self.num_symbols or vocab_size - FIRST_SYMBOL

        def check(self, seq_len: int, vocab_size: int) -> None:
            if self.num_symbols < 0:
                raise ConfigError(f"config key 'data.options.num_symbols' must be >= 0, got {self.num_symbols}")
            if self.min_gap < 0:
                raise ConfigError(f"config key 'data.options.min_gap' must be >= 0, got {self.min_gap}")
            if self.trigger not in ("random", "special"):
                raise ConfigError(f"config key 'data.options.trigger' must be 'random' or 'special', got {self.trigger!r}")
            # random: A, B != A, and filler without A need 3 symbols; special: B and filler need 2.
            least = 3 if self.trigger == "random" else 2
            if self.num_symbols == 0 and vocab_size - FIRST_SYMBOL < least:
                raise ConfigError(
                    f"config key 'model.vocab_size' ({vocab_size}) too small: induction with "
                    f"trigger={self.trigger!r} needs vocab_size >= {FIRST_SYMBOL + least}"
                )
            if self.resolved_symbols(vocab_size) < least:
                raise ConfigError(
                    f"config key 'data.options.num_symbols' ({self.resolved_symbols(vocab_size)}) must be "
                    f">= {least} for trigger={self.trigger!r}"
                )
            if vocab_size < FIRST_SYMBOL + self.resolved_symbols(vocab_size):
                raise ConfigError(
                    f"config key 'model.vocab_size' ({vocab_size}) too small: induction with "
                    f"{self.num_symbols} symbols needs vocab_size >= {FIRST_SYMBOL + self.num_symbols}"
                )
            # A B, min_gap tokens, A B: 4 + min_gap tokens = seq_len + 1 at the least.
            need = 3 + self.min_gap
            if seq_len < need:
                raise ConfigError(
                    f"config key 'data.seq_len' ({seq_len}) too small: induction with min_gap="
                    f"{self.min_gap} needs seq_len >= {need}"
                )

    def __init__(self, opts: "Induction.Options", *, seq_len: int, vocab_size: int, split: str,
                 num_examples: int, seed: int):
        opts.check(seq_len, vocab_size)
        self.opts, self.seq_len, self.vocab_size = opts, seq_len, vocab_size
        self.split, self.num_examples, self.seed = split, num_examples, seed
        self.num_symbols = opts.resolved_symbols(vocab_size)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        T, S = self.seq_len, self.num_symbols
        rng = example_rng(self.seed, self.split, int(index))
        if self.opts.trigger == "special":
            a = SPECIAL_TRIGGER
            seq = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + S, T + 1)
            b = int(rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + S))
        else:
            a = int(rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + S))
            # Uniform over the other S - 1 symbols: draw from S - 1 and skip over A.
            seq = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + S - 1, T + 1)
            seq = seq + (seq >= a)
            b = int(rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + S - 1))
            b = b + (b >= a)
        # The query A sits at T - 1, its B at T; the first pair at p, p + 1 with p + 1 + min_gap < T - 1.
        p = int(rng.integers(0, T - 2 - self.opts.min_gap))
        seq[p], seq[p + 1], seq[T - 1], seq[T] = a, b, a, b
        mask = np.zeros(T, np.float32)
        mask[T - 1] = 1.0
        distance = np.zeros(T, np.int32)
        distance[T - 1] = T - 1 - p
        return {
            "inputs": seq[:-1].astype(np.int32),
            "targets": seq[1:].astype(np.int32),
            "mask": mask,
            "segment_ids": np.ones(T, np.int32),
            "distance": distance,
        }

    def metrics(self, batch: dict, predictions: np.ndarray) -> dict:
        """Accuracy by distance between the first ``A`` and the query (powers-of-two buckets)."""
        mask = batch["mask"] > 0
        correct = (predictions == batch["targets"]) & mask
        dist = batch["distance"]
        out = {}
        edges = [0, 8, 16, 32, 64, 128, 256, 512, 1024, 1 << 30]
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = mask & (dist >= lo) & (dist < hi)
            if sel.any():
                out[f"accuracy_dist_{lo}_{hi}"] = float(correct[sel].sum() / sel.sum())
        return out
