"""Copying tasks: plain copying and the Mamba paper's selective copying.

Token ids: ``0`` noise / blank, ``1`` the delimiter, ``2 .. 2 + num_symbols - 1`` the
symbols to copy. A sequence holds ``seq_len + 1`` tokens; the model sees
``inputs = seq[:-1]``, ``targets = seq[1:]`` and is scored (``mask``) only where the
target is one of the copied tokens after the delimiter.

``copying`` (constant spacing, the classic memory task)::

    x_1 .. x_n  0 0 .. 0  DELIM  x_1 .. x_n

``selective_copying`` (Gu & Dao 2023, Mamba, Sec. 3.1 / Fig. 2): the ``n`` tokens sit
at random sorted positions of a region otherwise filled with noise tokens; after the
delimiter the model must output them in order, so it has to select content rather
than count positions::

    0 x_1 0 0 x_2 x_3 0 .. 0 x_n 0  DELIM  x_1 .. x_n

Either way the answer region is the last ``n`` tokens, i.e. the scored input positions
are ``seq_len - n .. seq_len - 1`` (the delimiter predicts ``x_1``).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memjax.config import ConfigError
from memjax.data.mqar import example_rng
from memjax.data.registry import register_task

NOISE, DELIM, FIRST_SYMBOL = 0, 1, 2


@register_task("copying")
class Copying:
    """Copy ``num_tokens`` random symbols after a run of blanks and a delimiter."""

    selective = False

    @dataclasses.dataclass
    class Options:
        num_tokens: int = 16  # how many tokens to copy
        num_symbols: int = 16  # alphabet of copied tokens: ids 2 .. 2 + num_symbols - 1

        def validate(self, data_cfg, model_cfg):
            self.check(data_cfg.seq_len, model_cfg.vocab_size)

        def check(self, seq_len: int, vocab_size: int) -> None:
            if self.num_tokens <= 0:
                raise ConfigError(f"config key 'data.options.num_tokens' must be positive, got {self.num_tokens}")
            if self.num_symbols <= 0:
                raise ConfigError(f"config key 'data.options.num_symbols' must be positive, got {self.num_symbols}")
            if vocab_size < FIRST_SYMBOL + self.num_symbols:
                raise ConfigError(
                    f"config key 'model.vocab_size' ({vocab_size}) too small: copying with "
                    f"{self.num_symbols} symbols needs vocab_size >= {FIRST_SYMBOL + self.num_symbols}"
                )
            # n tokens to memorise + the delimiter + n answers = seq_len + 1 at the least.
            need = 2 * self.num_tokens
            if seq_len < need:
                raise ConfigError(
                    f"config key 'data.seq_len' ({seq_len}) too small: copying {self.num_tokens} "
                    f"tokens needs seq_len >= {need}"
                )

    def __init__(self, opts: "Copying.Options", *, seq_len: int, vocab_size: int, split: str,
                 num_examples: int, seed: int):
        opts.check(seq_len, vocab_size)
        self.opts, self.seq_len, self.vocab_size = opts, seq_len, vocab_size
        self.split, self.num_examples, self.seed = split, num_examples, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        n, total = self.opts.num_tokens, self.seq_len + 1
        rng = example_rng(self.seed, self.split, int(index))
        symbols = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + self.opts.num_symbols, n)
        region = np.full(total - n - 1, NOISE, np.int64)  # everything before the delimiter
        if self.selective:
            where = np.sort(rng.choice(region.size, n, replace=False))
        else:
            where = np.arange(n)
        region[where] = symbols
        seq = np.concatenate([region, [DELIM], symbols])
        mask = np.zeros(self.seq_len, np.float32)
        mask[self.seq_len - n:] = 1.0
        return {
            "inputs": seq[:-1].astype(np.int32),
            "targets": seq[1:].astype(np.int32),
            "mask": mask,
            "segment_ids": np.ones(self.seq_len, np.int32),
        }

    def metrics(self, batch: dict, predictions: np.ndarray) -> dict:
        """``sequence_accuracy``: fraction of examples whose every copied token is right."""
        mask = batch["mask"] > 0
        wrong = (predictions != batch["targets"]) & mask
        has_answer = mask.any(axis=1)
        if not has_answer.any():
            return {}
        return {"sequence_accuracy": float((~wrong.any(axis=1))[has_answer].mean())}


@register_task("selective_copying")
class SelectiveCopying(Copying):
    """Mamba's selective copying: the tokens to copy are scattered among noise tokens."""

    selective = True
