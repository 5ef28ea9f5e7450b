"""Fact recall: a fixed table of ``subject -> relation -> object`` facts, stated in phrasings.

The "world" (the fact table and the phrasings) is drawn from ``table_seed`` alone, so it
is the same for every ``data.seed``, split and example; examples only choose which
facts to state and in which phrasing. Training sequences state facts in the training
phrasings; the eval split asks for facts in held-out phrasings (``num_eval_templates``
of the ``num_templates``), so the model must have stored the fact, not memorised a
string. ``eval_phrasings="train"`` evaluates in the training phrasings instead
(memorisation without the phrasing shift).

Token ids (``S, R, O, W`` = ``num_subjects, num_relations, num_objects, num_words``)::

    0 PAD | 1 SEP | subjects 2 .. | relations 2+S .. | objects 2+S+R .. | words 2+S+R+O .. 2+S+R+O+W-1

With ``subject_length = L > 1`` a subject is named by ``L`` tokens instead of one: the block
``subjects`` then holds a name alphabet of ``subject_alphabet = A`` tokens (``A ** L >= S``), and
subject ``s`` is a fixed random tuple of ``L`` of them (distinct tuples, drawn from ``table_seed``).
The vocabulary then no longer grows with the number of facts, so a model cannot keep a subject's
facts in that subject's own embedding row: they have to live in the weights that read the name
(attention, FFN, memory layer), which is what a capacity study needs.

A phrasing (template) is ``w* X w* Y w* OBJ SEP`` where ``X Y`` is ``SUBJ REL`` or
``REL SUBJ``, each ``w*`` is 0..``max_words`` word tokens, and ``OBJ`` is the
``object_length`` tokens of ``table[s, r]``; e.g. ``w3 SUBJ w7 REL OBJ SEP``
("the capital of France is Paris."). A sequence of ``seq_len + 1`` tokens is as many
such sentences as fit (distinct ``(s, r)`` pairs, so no fact can be copied from
earlier in the same sequence), then PAD. ``inputs = seq[:-1]``, ``targets = seq[1:]``;
the scored positions are those whose target is an object token. Each example also
carries ``fact_index`` (int32; at scored positions the 1-based sentence number, else
0) for :meth:`FactRecall.metrics`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memjax.config import ConfigError
from memjax.data.mqar import example_rng
from memjax.data.registry import register_task

PAD, SEP, FIRST_SUBJECT = 0, 1, 2
SUBJ_SLOT, REL_SLOT = -1, -2  # placeholders inside a template


@register_task("fact_recall")
class FactRecall:
    @dataclasses.dataclass
    class Options:
        num_subjects: int = 64
        subject_length: int = 1  # tokens per subject name
        subject_alphabet: int = 0  # name tokens when subject_length > 1 (0: one token per subject)
        num_relations: int = 4
        num_objects: int = 32  # object alphabet
        object_length: int = 1  # tokens per object
        num_words: int = 16  # alphabet of the phrasings' filler words
        max_words: int = 2  # words per gap (three gaps per phrasing)
        num_templates: int = 8  # phrasings in all
        num_eval_templates: int = 2  # of which held out for the eval split
        table_seed: int = 0  # the world: fact table and phrasings (independent of data.seed)
        eval_phrasings: str = "heldout"  # "heldout" or "train"

        def validate(self, data_cfg, model_cfg):
            self.check(data_cfg.seq_len, model_cfg.vocab_size)

        def name_tokens(self) -> int:
            """Ids in the subject block: one per subject, or the name alphabet."""
            return self.subject_alphabet if self.subject_length > 1 else self.num_subjects

        def vocab_needed(self) -> int:
            return FIRST_SUBJECT + self.name_tokens() + self.num_relations + self.num_objects + self.num_words

        def longest_sentence(self) -> int:
            return 3 * self.max_words + self.subject_length + 1 + self.object_length + 1

        def check(self, seq_len: int, vocab_size: int) -> None:
            for key in ("num_subjects", "subject_length", "num_relations", "num_objects", "object_length", "num_words",
                        "num_templates", "num_eval_templates"):
                if getattr(self, key) <= 0:
                    raise ConfigError(f"config key 'data.options.{key}' must be positive, got {getattr(self, key)}")
            if self.max_words < 0:
                raise ConfigError(f"config key 'data.options.max_words' must be >= 0, got {self.max_words}")
            if self.subject_length > 1 and self.subject_alphabet ** self.subject_length < self.num_subjects:
                raise ConfigError(
                    f"config key 'data.options.subject_alphabet' ({self.subject_alphabet}) too small: "
                    f"{self.subject_alphabet} ** subject_length ({self.subject_length}) names cannot tell "
                    f"num_subjects={self.num_subjects} subjects apart"
                )
            if self.subject_length == 1 and self.subject_alphabet not in (0, self.num_subjects):
                raise ConfigError(
                    f"config key 'data.options.subject_alphabet' ({self.subject_alphabet}) only applies with "
                    f"subject_length > 1 (one-token names use one id per subject); leave it 0"
                )
            if self.num_eval_templates >= self.num_templates:
                raise ConfigError(
                    f"config key 'data.options.num_eval_templates' ({self.num_eval_templates}) must be smaller "
                    f"than data.options.num_templates ({self.num_templates}): training needs phrasings too"
                )
            possible = 2 * sum(self.num_words ** k for k in range(self.max_words + 1)) ** 3
            if self.num_templates > possible:
                raise ConfigError(
                    f"config key 'data.options.num_templates' ({self.num_templates}) exceeds the {possible} "
                    f"distinct phrasings that num_words={self.num_words}, max_words={self.max_words} allow"
                )
            if self.eval_phrasings not in ("heldout", "train"):
                raise ConfigError(
                    f"config key 'data.options.eval_phrasings' must be 'heldout' or 'train', got {self.eval_phrasings!r}"
                )
            if vocab_size < self.vocab_needed():
                raise ConfigError(
                    f"config key 'model.vocab_size' ({vocab_size}) too small: fact recall needs "
                    f">= {self.vocab_needed()} (2 specials + subjects + relations + objects + words)"
                )
            if seq_len + 1 < self.longest_sentence():
                raise ConfigError(
                    f"config key 'data.seq_len' ({seq_len}) too small: the longest phrasing takes "
                    f"{self.longest_sentence()} tokens, so seq_len must be >= {self.longest_sentence() - 1}"
                )

    def __init__(self, opts: "FactRecall.Options", *, seq_len: int, vocab_size: int, split: str,
                 num_examples: int, seed: int):
        opts.check(seq_len, vocab_size)
        self.opts, self.seq_len, self.vocab_size = opts, seq_len, vocab_size
        self.split, self.num_examples, self.seed = split, num_examples, seed
        o = opts
        self.first_relation = FIRST_SUBJECT + o.name_tokens()
        self.first_object = self.first_relation + o.num_relations
        self.first_word = self.first_object + o.num_objects
        world = np.random.default_rng([o.table_seed, 0xFAC75])
        # table[s, r] = the object token ids of fact (s, r).
        self.table = world.integers(self.first_object, self.first_object + o.num_objects,
                                    (o.num_subjects, o.num_relations, o.object_length)).astype(np.int32)
        templates: list[tuple[int, ...]] = []
        while len(templates) < o.num_templates:
            t = self._draw_template(world)
            if t not in templates:
                templates.append(t)
        self.names = self._draw_names()
        n_train = o.num_templates - o.num_eval_templates
        self.train_templates, self.eval_templates = templates[:n_train], self._heldout(templates, n_train, world)
        if split == "train" or o.eval_phrasings == "train":
            self.templates = self.train_templates
        else:
            self.templates = self.eval_templates

    def _draw_names(self) -> np.ndarray:
        """``[S, L]`` token ids: subject ``s`` is named ``names[s]`` (distinct rows). One-token names are
        the identity; longer ones a random injection into the alphabet's tuples (its own stream of
        ``table_seed``, so one-token worlds are unchanged)."""
        o = self.opts
        if o.subject_length == 1:
            return (FIRST_SUBJECT + np.arange(o.num_subjects, dtype=np.int64))[:, None]
        rng = np.random.default_rng([o.table_seed, 0x4A3E5])
        codes = rng.choice(o.subject_alphabet ** o.subject_length, o.num_subjects, replace=False)
        digits = np.stack([(codes // o.subject_alphabet ** i) % o.subject_alphabet
                           for i in range(o.subject_length)], axis=1)
        return FIRST_SUBJECT + digits.astype(np.int64)

    def _heldout(self, templates: list, n_train: int, rng: np.random.Generator) -> list:
        """The held-out phrasings, each redrawn until every filler word in it also occurs in a
        training phrasing: a word the model never saw would cap held-out recall by itself (its
        embedding is untrained), which is not what the held-out split is for."""
        seen = {x for t in templates[:n_train] for x in t if x >= self.first_word}
        out = []
        for t in templates[n_train:]:
            for _ in range(1000):
                if all(x < self.first_word or x in seen for x in t) and t not in out and t not in templates[:n_train]:
                    break
                t = self._draw_template(rng)
            else:
                raise ConfigError("data.options: could not draw held-out phrasings from the training phrasings' "
                                  f"{len(seen)} filler words; raise num_templates or max_words, or lower num_words "
                                  f"(got num_words={self.opts.num_words}, max_words={self.opts.max_words})")
            out.append(t)
        return out

    def _draw_template(self, rng: np.random.Generator) -> tuple[int, ...]:
        o = self.opts
        counts = rng.integers(0, o.max_words + 1, 3)
        words = [list(self.first_word + rng.integers(0, o.num_words, c)) for c in counts]
        slots = (SUBJ_SLOT, REL_SLOT) if rng.integers(2) == 0 else (REL_SLOT, SUBJ_SLOT)
        return tuple(int(x) for x in (*words[0], slots[0], *words[1], slots[1], *words[2]))

    def subject_tokens(self, s: int) -> tuple[int, ...]:
        """The name of subject ``s`` (``subject_length`` token ids)."""
        return tuple(int(x) for x in self.names[s])

    def relation_token(self, r: int) -> int:
        return self.first_relation + r

    def fill(self, template: tuple[int, ...], s: int, r: int) -> list[int]:
        """The template with the subject's name and the relation in its slots."""
        out: list[int] = []
        for x in template:
            out.extend(self.subject_tokens(s) if x == SUBJ_SLOT else (self.relation_token(r),) if x == REL_SLOT else (x,))
        return out

    def render(self, template: tuple[int, ...], s: int, r: int) -> np.ndarray:
        """One sentence: the template with its slots filled, then the object and SEP."""
        return np.array([*self.fill(template, s, r), *self.table[s, r], SEP], np.int64)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        rng = example_rng(self.seed, self.split, int(index))
        return self.statements(rng, self.render)

    def statements(self, rng: np.random.Generator, render, prefix=()) -> dict:
        """An example of ``prefix`` tokens then as many distinct facts as fit, each a sentence
        ``render(template, subject, relation)`` in a random template; the object tokens of each
        are scored (``fact_index`` numbers the facts from 1) and the rest is padded."""
        o, total = self.opts, self.seq_len + 1
        prefix = np.asarray(prefix, np.int64)
        shortest = o.subject_length + 1 + o.object_length + 1
        n_pairs = o.num_subjects * o.num_relations
        facts = rng.choice(n_pairs, min(n_pairs, (total - len(prefix)) // shortest), replace=False)
        which = rng.integers(0, len(self.templates), len(facts))
        pieces, labels, used = [prefix], [np.zeros(len(prefix), np.int64)], len(prefix)
        for k, (f, t) in enumerate(zip(facts, which)):
            sentence = render(self.templates[t], *divmod(int(f), o.num_relations))
            if used + len(sentence) > total:
                break
            lab = np.zeros(len(sentence), np.int64)
            lab[-1 - o.object_length:-1] = k + 1  # the object tokens, before SEP
            pieces.append(sentence)
            labels.append(lab)
            used += len(sentence)
        pieces.append(np.full(total - used, PAD, np.int64))
        labels.append(np.zeros(total - used, np.int64))
        seq, lab = np.concatenate(pieces), np.concatenate(labels)
        fact_index = lab[1:].astype(np.int32)  # input position t predicts seq[t + 1]
        return {
            "inputs": seq[:-1].astype(np.int32),
            "targets": seq[1:].astype(np.int32),
            "mask": (fact_index > 0).astype(np.float32),
            "segment_ids": np.ones(self.seq_len, np.int32),
            "fact_index": fact_index,
        }

    def metrics(self, batch: dict, predictions: np.ndarray) -> dict:
        """``fact_accuracy``: fraction of stated facts whose every object token is right."""
        fi = batch["fact_index"]
        wrong = (predictions != batch["targets"]) & (fi > 0)
        n_facts = fi.max(axis=1)
        total = int(n_facts.sum())
        if total == 0:
            return {}
        right = 0
        for b in range(fi.shape[0]):
            bad = np.unique(fi[b][wrong[b]])
            right += int(n_facts[b]) - len(bad)
        return {"fact_accuracy": right / total}
