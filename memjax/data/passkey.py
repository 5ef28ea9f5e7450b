"""Pass-key retrieval (needle in a haystack), in token ids.

After Mohtashami & Jaggi (2023, Landmark Attention): a long run of filler text hides
one sentence "the pass key is K"; at the end the model is asked for the key. Here
every word is one token id:

* ``1`` KEY marker ("the pass key is"), ``2`` QUERY marker ("what is the pass key?"),
* ``3 .. 3 + key_symbols - 1`` key symbols (the "digits"),
* ``3 + key_symbols ..`` filler symbols (``filler_symbols`` of them).

A sequence of ``seq_len + 1`` tokens is::

    filler[:p]  KEY k_1 .. k_n  filler[p:]  QUERY k_1 .. k_n

with ``H = seq_len - 2 * key_length - 1`` filler tokens in all. ``depth`` places the
needle after ``p = round(depth * H)`` filler tokens (0: at the very start, 1: right
before the query); ``depth = -1`` draws ``p`` uniformly from ``0 .. H`` per example.
``filler="repeat"`` repeats one fixed "sentence" ``f_0 f_1 .. f_{F-1}`` (the original
"The grass is green. The sky is blue." haystack), ``filler="random"`` draws filler
tokens uniformly. The scored positions are the ``key_length`` answer tokens after
the query marker; each example also carries ``depth`` (float32, the needle's realised
depth ``p / H``, repeated over positions) for :meth:`PassKey.metrics`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memjax.config import ConfigError
from memjax.data.mqar import example_rng
from memjax.data.registry import register_task

KEY, QUERY, FIRST_KEY_SYMBOL = 1, 2, 3
DEPTH_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@register_task("passkey")
class PassKey:
    @dataclasses.dataclass
    class Options:
        key_length: int = 5  # tokens in the pass key
        key_symbols: int = 10  # alphabet of key tokens (10: decimal digits)
        depth: float = -1.0  # needle position as a fraction of the haystack; -1: uniform random
        filler: str = "repeat"  # "repeat" (one fixed sentence, repeated) or "random"
        filler_symbols: int = 16  # filler alphabet; with "repeat", the sentence length

        def validate(self, data_cfg, model_cfg):
            self.check(data_cfg.seq_len, model_cfg.vocab_size)

        def check(self, seq_len: int, vocab_size: int) -> None:
            for key in ("key_length", "key_symbols", "filler_symbols"):
                if getattr(self, key) <= 0:
                    raise ConfigError(f"config key 'data.options.{key}' must be positive, got {getattr(self, key)}")
            if not (0.0 <= self.depth <= 1.0 or self.depth == -1.0):
                raise ConfigError(f"config key 'data.options.depth' must be in [0, 1] or -1 (random), got {self.depth}")
            if self.filler not in ("repeat", "random"):
                raise ConfigError(f"config key 'data.options.filler' must be 'repeat' or 'random', got {self.filler!r}")
            need_vocab = FIRST_KEY_SYMBOL + self.key_symbols + self.filler_symbols
            if vocab_size < need_vocab:
                raise ConfigError(
                    f"config key 'model.vocab_size' ({vocab_size}) too small: pass-key with "
                    f"{self.key_symbols} key and {self.filler_symbols} filler symbols needs >= {need_vocab}"
                )
            # needle (1 + n) + query (1) + answer (n) + at least one filler token = seq_len + 1.
            need = 2 * self.key_length + 2
            if seq_len < need:
                raise ConfigError(
                    f"config key 'data.seq_len' ({seq_len}) too small: a {self.key_length}-token "
                    f"pass key needs seq_len >= {need}"
                )

    def __init__(self, opts: "PassKey.Options", *, seq_len: int, vocab_size: int, split: str,
                 num_examples: int, seed: int):
        opts.check(seq_len, vocab_size)
        self.opts, self.seq_len, self.vocab_size = opts, seq_len, vocab_size
        self.split, self.num_examples, self.seed = split, num_examples, seed
        self.num_filler = seq_len - 2 * opts.key_length - 1
        self.first_filler = FIRST_KEY_SYMBOL + opts.key_symbols

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        o, H, n = self.opts, self.num_filler, self.opts.key_length
        rng = example_rng(self.seed, self.split, int(index))
        key = rng.integers(FIRST_KEY_SYMBOL, FIRST_KEY_SYMBOL + o.key_symbols, n)
        if o.depth < 0:
            p = int(rng.integers(0, H + 1))
        else:
            p = int(round(o.depth * H))
        if o.filler == "repeat":
            filler = self.first_filler + np.arange(H) % o.filler_symbols
        else:
            filler = rng.integers(self.first_filler, self.first_filler + o.filler_symbols, H)
        seq = np.concatenate([filler[:p], [KEY], key, filler[p:], [QUERY], key])
        mask = np.zeros(self.seq_len, np.float32)
        mask[self.seq_len - n:] = 1.0
        return {
            "inputs": seq[:-1].astype(np.int32),
            "targets": seq[1:].astype(np.int32),
            "mask": mask,
            "segment_ids": np.ones(self.seq_len, np.int32),
            "depth": np.full(self.seq_len, p / H, np.float32),
        }

    def metrics(self, batch: dict, predictions: np.ndarray) -> dict:
        """Whole-key accuracy overall and by needle depth (bins of width 0.2, last one closed).

        A key counts as retrieved only if all its tokens are predicted right.
        """
        mask = batch["mask"] > 0
        has_key = mask.any(axis=1)
        if not has_key.any():
            return {}
        right = ~((predictions != batch["targets"]) & mask).any(axis=1)
        depth = batch["depth"][:, 0]
        out = {"key_accuracy": float(right[has_key].mean())}
        for i, (lo, hi) in enumerate(zip(DEPTH_BINS[:-1], DEPTH_BINS[1:])):
            last = i == len(DEPTH_BINS) - 2
            sel = has_key & (depth >= lo) & ((depth <= hi) if last else (depth < hi))
            if sel.any():
                out[f"key_accuracy_depth_{lo:.1f}_{hi:.1f}"] = float(right[sel].mean())
        return out
