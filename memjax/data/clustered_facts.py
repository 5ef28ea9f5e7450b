"""Cluster-specific fact recall: every cluster of documents has its own fact table.

A variant of :mod:`memjax.data.facts` (fact recall) for hierarchical memories (Pouransari et al.,
"Pretraining with hierarchical memories", 2025: long-tail knowledge tied to clusters of the
corpus). The world holds ``num_clusters`` fact tables ``table[c, s, r]``, independent draws from
``(table_seed, c)``; the phrasings are shared. An example belongs to one cluster ``c`` (drawn from
``(seed, split, index)``), opens with the cluster's marker token, and states facts of table ``c``
only, so the same ``(subject, relation)`` has a different object in each cluster: the model must
read the cluster (the marker, or the bank's blocks selected by the cluster path) to recall it.

Token ids: those of :class:`memjax.data.facts.FactRecall`, then the ``num_clusters`` markers::

    0 PAD | 1 SEP | subjects | relations | objects | words | markers 2+S+R+O+W ..

A sequence of ``seq_len + 1`` tokens is ``MARKER_c`` then as many sentences as fit (distinct
``(s, r)`` pairs), then PAD; ``inputs = seq[:-1]``, ``targets = seq[1:]``, scored positions are the
object tokens, ``fact_index`` as in fact recall. The example's ``cluster`` field (int32 scalar)
is its cluster id, which ``data.cluster_paths = {"method": "label", "key": "cluster", ...}``
(:mod:`memjax.data.cluster_paths`) turns into its path: with ``num_clusters = branching**depth``
every cluster has its own leaf block, and clusters ``c // branching`` share the blocks above.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memjax.config import ConfigError
from memjax.data.facts import SEP, FactRecall
from memjax.data.mqar import example_rng
from memjax.data.registry import register_task


@register_task("clustered_facts")
class ClusteredFactRecall(FactRecall):
    @dataclasses.dataclass
    class Options(FactRecall.Options):
        num_clusters: int = 16  # fact tables (document clusters)

        def vocab_needed(self) -> int:
            return super().vocab_needed() + self.num_clusters

        def longest_sentence(self) -> int:
            return super().longest_sentence() + 1  # (+ the marker opening the sequence)

        def check(self, seq_len: int, vocab_size: int) -> None:
            if self.num_clusters <= 0:
                raise ConfigError(f"config key 'data.options.num_clusters' must be positive, got {self.num_clusters}")
            super().check(seq_len, vocab_size)

    def __init__(self, opts: ClusteredFactRecall.Options, *, seq_len: int, vocab_size: int, split: str,
                 num_examples: int, seed: int):
        super().__init__(opts, seq_len=seq_len, vocab_size=vocab_size, split=split, num_examples=num_examples,
                         seed=seed)
        o = opts
        self.first_marker = self.first_word + o.num_words
        # tables[c, s, r]: cluster c's objects (its own draw: clusters share no fact by construction).
        self.tables = np.stack([
            np.random.default_rng([o.table_seed, 0xC105, c]).integers(
                self.first_object, self.first_object + o.num_objects,
                (o.num_subjects, o.num_relations, o.object_length))
            for c in range(o.num_clusters)]).astype(np.int32)

    def marker_token(self, c: int) -> int:
        return self.first_marker + c

    def render_in(self, c: int, template: tuple[int, ...], s: int, r: int) -> np.ndarray:
        """One sentence of cluster ``c``: the template with its slots filled, ``tables[c, s, r]``, SEP."""
        return np.array([*self.fill(template, s, r), *self.tables[c, s, r], SEP], np.int64)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        rng = example_rng(self.seed, self.split, int(index))
        c = int(rng.integers(self.opts.num_clusters))
        example = self.statements(rng, lambda t, s, r: self.render_in(c, t, s, r), prefix=[self.marker_token(c)])
        return {**example, "cluster": np.int32(c)}
