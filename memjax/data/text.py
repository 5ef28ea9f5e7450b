"""Text files as a language-modelling task: index a directory, split, tokenise, pack.

Documents. Every file under ``path`` (recursively; hidden files and directories and
anything matching ``exclude`` skipped; symlinked directories not followed) whose name
ends in one of ``extensions`` is read as bytes. A ``.txt``/``.py`` (any non-JSONL) file is
one document; a ``.jsonl`` file holds one document per non-blank line, the string
under ``jsonl_field``.

Split. A file is held out (eval split) iff ``sha256(relative path) / 2**256 <
heldout_fraction``, so the split depends only on the file's path relative to ``path``
(moving the directory changes nothing, adding a file moves no other file). Both
splits must be non-empty: if the hash puts no file in one of them, the file whose hash
is nearest the threshold moves over (still a deterministic function of the file set).

Tokens. ``tokenizer="byte"`` (default): ids ``0..255`` are the raw bytes (no decoding,
so any encoding works), ``256`` BOS, ``257`` EOS, ``258`` PAD; 259 ids in all, so
``model.vocab_size >= 259``. ``tokenizer="bpe"`` trains a byte-level BPE on the training
split's documents with the optional ``tokenizers`` package (not a dependency; a clear
error if missing) with ``bpe_vocab_size - 3`` entries (0: ``model.vocab_size``); the three
ids after its vocabulary are BOS, EOS, PAD (``task.bos_id`` etc.). Files are decoded as
UTF-8 with replacement characters for BPE only.

Packing. Each document becomes ``BOS content EOS``; a split's documents, in sorted
path order, form one token stream ``S`` of ``N`` tokens. Window ``w`` (= example) holds
``inputs = S[w*T : (w+1)*T]`` and ``targets = S[w*T+1 : (w+1)*T+1]`` (``T = seq_len``), so
every token of the split is an input exactly once, in order; the last window is padded
with PAD (segment id 0, unscored). ``segment_ids`` number the documents inside the
window from 1 (the document of ``inputs[0]`` is 1). ``mask`` is 1 wherever input and
target belong to the same document: the BOS -> first token and last token -> EOS
transitions are scored, the EOS -> next BOS transition across documents is not.
Decision on continuations: a document that began in an earlier window is still scored
from its first position in this window (no context beyond the window, as in standard
packed LM training); masking it would throw away ~1/T of the data for no gain.

Length. ``len(task)`` is the split's window count, or ``num_examples`` if smaller, in
which case example ``i`` is window ``i * windows // num_examples`` (an even spread).

Cost. The index (file list, per-document byte offsets and token counts) is built once
per process and cached in memory (key: the resolved path and the options); byte-level
windows are read from disk on access (files must not change while a run uses them);
BPE tokenises the whole corpus up front and keeps the token ids in memory.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os

import numpy as np

from memjax.config import ConfigError
from memjax.data.registry import register_task

BYTE_BOS, BYTE_EOS, BYTE_PAD = 256, 257, 258
BYTE_VOCAB = 259
MIN_SEQ_LEN = 2

_CORPORA: dict[tuple, "Corpus"] = {}


def clear_cache() -> None:
    """Forget every indexed corpus (e.g. after the files changed)."""
    _CORPORA.clear()


@dataclasses.dataclass
class _Split:
    files: list[str]  # relative paths, sorted
    doc_file: np.ndarray  # [D] index into files
    doc_offset: np.ndarray  # [D] byte offset of the document (line) in its file
    doc_nbytes: np.ndarray  # [D] raw bytes to read (the file, or the JSONL line)
    starts: np.ndarray  # [D + 1] token offset of each document in the stream; starts[-1] = N
    jsonl: np.ndarray  # [D] bool: the raw bytes are a JSON line to parse
    tokens: np.ndarray | None = None  # [N] the whole stream (BPE only)

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])


class Corpus:
    """A directory indexed into two document streams (``"train"``, ``"eval"``)."""

    def __init__(self, root: str, opts: "Text.Options", vocab_size: int):
        self.root, self.opts = root, opts
        self.field = opts.jsonl_field
        files = _list_files(root, opts)
        if not files:
            raise ConfigError(
                f"config key 'data.options.path': no files ending in {opts.extensions!r} under {root!r}"
                + (f" (exclude={opts.exclude!r})" if opts.exclude else "")
            )
        if len(files) < 2:
            raise ConfigError(
                f"config key 'data.options.path': {root!r} has one matching file ({files[0]!r}); "
                "at least 2 are needed (one for training, one held out)"
            )
        held = _heldout(files, opts.heldout_fraction)
        docs = {f: self._index_file(f) for f in files}  # (offset, nbytes, content_len, is_jsonl) per doc
        split_files = {"train": [f for f in files if f not in held], "eval": [f for f in files if f in held]}
        if opts.tokenizer == "bpe":
            self.tokenizer = _BPE(self, split_files["train"], docs, opts.bpe_vocab_size or vocab_size)
        else:
            self.tokenizer = _ByteTokenizer()
        self.splits = {s: self._build_split(fs, docs) for s, fs in split_files.items()}
        for s, sp in self.splits.items():
            if len(sp.doc_file) == 0:
                raise ConfigError(
                    f"config key 'data.options.path': the {s} split's files {sp.files} hold no documents"
                )

    # ---------------------------------------------------------------- indexing
    def abspath(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def _index_file(self, rel: str) -> list[tuple[int, int, int, bool]]:
        path = self.abspath(rel)
        try:
            with open(path, "rb") as f:
                if not rel.lower().endswith(".jsonl"):
                    size = os.fstat(f.fileno()).st_size
                    return [(0, size, size, False)]
                data = f.read()
        except OSError as e:
            raise ConfigError(f"config key 'data.options.path': cannot read {path!r}: {e.strerror or e}") from None
        out, offset = [], 0
        for lineno, line in enumerate(data.split(b"\n"), 1):
            if line.strip():
                text = _jsonl_text(line, self.field, path, lineno)
                out.append((offset, len(line), len(text.encode("utf-8")), True))
            offset += len(line) + 1
        return out

    def _build_split(self, files: list[str], docs: dict) -> _Split:
        split = _Split(files, *_doc_arrays(files, docs))
        rows = len(split.doc_file)
        if isinstance(self.tokenizer, _BPE):
            ids = self.tokenizer.encode_docs([self.read_text(split, d) for d in range(rows)])
            split.starts[1:] = np.cumsum([len(x) for x in ids])
            split.tokens = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        else:
            content = [c for f in files for (_, _, c, _) in docs[f]]
            split.starts[1:] = np.cumsum(np.asarray(content, np.int64) + 2)  # BOS + bytes + EOS
        return split

    # ---------------------------------------------------------------- reading
    def read_bytes(self, split: _Split, d: int, lo: int = 0, hi: int | None = None) -> bytes:
        """Content bytes ``[lo, hi)`` of document ``d`` (UTF-8 of the JSON string for JSONL)."""
        path = self.abspath(split.files[split.doc_file[d]])
        try:
            with open(path, "rb") as f:
                if split.jsonl[d]:
                    f.seek(int(split.doc_offset[d]))
                    line = f.read(int(split.doc_nbytes[d]))
                    return _jsonl_text(line, self.field, path, None).encode("utf-8")[lo:hi]
                f.seek(int(split.doc_offset[d]) + lo)
                n = (int(split.doc_nbytes[d]) if hi is None else hi) - lo
                return f.read(n)
        except OSError as e:
            raise OSError(f"cannot read {path!r} (indexed earlier): {e}") from e

    def read_text(self, split: _Split, d: int) -> str:
        return self.read_bytes(split, d).decode("utf-8", errors="replace")

    def doc_tokens(self, split: _Split, d: int, lo: int, hi: int) -> np.ndarray:
        """Tokens ``[lo, hi)`` of document ``d`` as laid out in the stream (BOS at 0, EOS last)."""
        if split.tokens is not None:
            s = int(split.starts[d])
            return split.tokens[s + lo:s + hi]
        length = int(split.starts[d + 1] - split.starts[d])
        out = np.empty(hi - lo, np.int32)
        a, b = max(lo, 1), min(hi, length - 1)  # content occupies local positions 1 .. length - 2
        if lo == 0:
            out[0] = BYTE_BOS
        if hi == length:
            out[-1] = BYTE_EOS
        if b > a:
            content = self.read_bytes(split, d, a - 1, b - 1)
            if len(content) != b - a:
                raise OSError(
                    f"{self.abspath(split.files[split.doc_file[d]])!r} changed since it was indexed"
                )
            out[a - lo:b - lo] = np.frombuffer(content, np.uint8)
        return out


class _ByteTokenizer:
    vocab_size, bos_id, eos_id, pad_id = BYTE_VOCAB, BYTE_BOS, BYTE_EOS, BYTE_PAD

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class _BPE:
    """Byte-level BPE trained on the training split (``tokenizers`` package, optional)."""

    def __init__(self, corpus: Corpus, train_files: list[str], docs: dict, size: int):
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError:
            raise ConfigError(
                "config key 'data.options.tokenizer' is 'bpe', which needs the optional 'tokenizers' "
                "package (pip install tokenizers); or use tokenizer='byte'"
            ) from None
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # BOS/EOS/PAD live outside the tokenizer: registered special tokens would also match
        # their literal text inside a document.
        trainer = trainers.BpeTrainer(vocab_size=size - 3, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        split = _Split(train_files, *_doc_arrays(train_files, docs))
        tok.train_from_iterator((corpus.read_text(split, d) for d in range(len(split.doc_file))), trainer)
        self.tok = tok
        n = tok.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = n, n + 1, n + 2
        self.vocab_size = n + 3

    def encode_docs(self, texts: list[str]) -> list[np.ndarray]:
        """``BOS ids EOS`` per text."""
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        return [np.array([self.bos_id, *e.ids, self.eos_id], np.int32) for e in encs]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) < self.bos_id])


def _doc_arrays(files: list[str], docs: dict):
    rows = [(i, *d) for i, f in enumerate(files) for d in docs[f]]
    return (np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], np.int64),
            np.array([r[2] for r in rows], np.int64), np.zeros(len(rows) + 1, np.int64),
            np.array([r[4] for r in rows], bool))


def _jsonl_text(line: bytes, field: str, path: str, lineno: int | None) -> str:
    where = f"{path}:{lineno}" if lineno is not None else path
    try:
        record = json.loads(line)
    except ValueError as e:
        raise ConfigError(f"config key 'data.options.path': {where} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise ConfigError(
            f"config key 'data.options.jsonl_field': {where} has no string field {field!r}"
        )
    return record[field]


def _parse_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _extensions(opts: "Text.Options") -> tuple[str, ...]:
    return tuple(sorted({e.lower() if e.startswith(".") else "." + e.lower() for e in _parse_list(opts.extensions)}))


def _list_files(root: str, opts: "Text.Options") -> list[str]:
    exts, exclude = _extensions(opts), _parse_list(opts.exclude)

    def skipped(name: str) -> bool:
        return name.startswith(".") or any(fnmatch.fnmatch(name, p) for p in exclude)

    def fail(err: OSError):
        raise ConfigError(f"config key 'data.options.path': cannot list {err.filename!r}: {err.strerror}")

    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames[:] = sorted(d for d in dirnames if not skipped(d))
        for name in filenames:
            if not skipped(name) and name.lower().endswith(exts):
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def _path_hash(rel: str) -> float:
    digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 256


def _heldout(files: list[str], fraction: float) -> set[str]:
    u = {f: _path_hash(f) for f in files}
    held = {f for f in files if u[f] < fraction}
    if not held:
        held = {min(files, key=u.get)}
    elif len(held) == len(files):
        held.discard(max(files, key=u.get))
    return held


def load_corpus(opts: "Text.Options", vocab_size: int) -> Corpus:
    """The indexed corpus for these options (built on first use, then cached)."""
    if not opts.path:
        raise ConfigError("config key 'data.options.path' is required: a directory of text files")
    root = os.path.realpath(os.path.expanduser(opts.path))
    if not os.path.isdir(root):
        raise ConfigError(f"config key 'data.options.path': {opts.path!r} is not a directory")
    bpe_size = (opts.bpe_vocab_size or vocab_size) if opts.tokenizer == "bpe" else 0
    key = (root, _extensions(opts), opts.exclude, opts.jsonl_field, opts.heldout_fraction,
           opts.tokenizer, bpe_size)
    if key not in _CORPORA:
        _CORPORA[key] = Corpus(root, opts, vocab_size)
    return _CORPORA[key]


@register_task("text")
class Text:
    @dataclasses.dataclass
    class Options:
        path: str = ""  # directory of text files (required)
        extensions: str = ".txt,.jsonl,.py"  # comma-separated file name endings
        exclude: str = ""  # comma-separated fnmatch patterns on file / directory names
        jsonl_field: str = "text"
        heldout_fraction: float = 0.1  # share of files (by path hash) in the eval split
        tokenizer: str = "byte"  # "byte" or "bpe" (needs the optional tokenizers package)
        bpe_vocab_size: int = 0  # 0: model.vocab_size

        def validate(self, data_cfg, model_cfg):
            self.check(data_cfg.seq_len, model_cfg.vocab_size)
            # Scan now so a bad directory or file fails at config time, not mid-run.
            load_corpus(self, model_cfg.vocab_size)

        def check(self, seq_len: int, vocab_size: int) -> None:
            if self.tokenizer not in ("byte", "bpe"):
                raise ConfigError(f"config key 'data.options.tokenizer' must be 'byte' or 'bpe', got {self.tokenizer!r}")
            if not 0.0 < self.heldout_fraction < 1.0:
                raise ConfigError(
                    f"config key 'data.options.heldout_fraction' must be in (0, 1), got {self.heldout_fraction}"
                )
            if not _parse_list(self.extensions):
                raise ConfigError("config key 'data.options.extensions' is empty")
            if seq_len < MIN_SEQ_LEN:
                raise ConfigError(
                    f"config key 'data.seq_len' ({seq_len}) too small: text windows need seq_len >= {MIN_SEQ_LEN}"
                )
            if self.tokenizer == "byte" and vocab_size < BYTE_VOCAB:
                raise ConfigError(
                    f"config key 'model.vocab_size' ({vocab_size}) too small for the byte tokenizer: "
                    f"needs >= {BYTE_VOCAB} (256 bytes + BOS, EOS, PAD)"
                )
            if self.tokenizer == "bpe":
                size = self.bpe_vocab_size or vocab_size
                if size < BYTE_VOCAB:
                    raise ConfigError(
                        f"config key 'data.options.bpe_vocab_size' ({size}) must be >= {BYTE_VOCAB} "
                        "(256 byte symbols + BOS, EOS, PAD)"
                    )
                if size > vocab_size:
                    raise ConfigError(
                        f"config key 'model.vocab_size' ({vocab_size}) is smaller than "
                        f"data.options.bpe_vocab_size ({size})"
                    )

    def __init__(self, opts: "Text.Options", *, seq_len: int, vocab_size: int, split: str,
                 num_examples: int, seed: int):
        opts.check(seq_len, vocab_size)
        self.opts, self.seq_len, self.vocab_size, self.split = opts, seq_len, vocab_size, split
        self.seed = seed  # unused: the data are the files; the pipeline shuffles windows
        self.corpus = load_corpus(opts, vocab_size)
        tok = self.corpus.tokenizer
        self.bos_id, self.eos_id, self.pad_id = tok.bos_id, tok.eos_id, tok.pad_id
        self.index = self.corpus.splits[split]
        self.num_windows = -(-self.index.num_tokens // seq_len)
        self.num_examples = self.num_windows if num_examples <= 0 else min(num_examples, self.num_windows)

    @property
    def files(self) -> list[str]:
        """This split's files, relative to ``options.path``, in stream order."""
        return list(self.index.files)

    def __len__(self) -> int:
        return self.num_examples

    def decode(self, ids) -> str:
        """Text of token ids (BOS/EOS/PAD dropped)."""
        return self.corpus.tokenizer.decode(ids)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        w = int(index) * self.num_windows // self.num_examples
        T, sp = self.seq_len, self.index
        lo, hi = w * T, min(w * T + T + 1, sp.num_tokens)
        toks = np.full(T + 1, self.pad_id, np.int32)
        doc = np.full(T + 1, -1, np.int64)
        d = int(np.searchsorted(sp.starts, lo, side="right")) - 1
        pos = lo
        while pos < hi:
            end = min(int(sp.starts[d + 1]), hi)
            s = int(sp.starts[d])
            toks[pos - lo:end - lo] = self.corpus.doc_tokens(sp, d, pos - s, end - s)
            doc[pos - lo:end - lo] = d
            pos, d = end, d + 1
        valid = doc[:T] >= 0
        seg = 1 + np.concatenate([[0], np.cumsum(doc[1:T] != doc[:T - 1])])
        return {
            "inputs": toks[:T],
            "targets": toks[1:].copy(),
            "mask": (valid & (doc[1:] == doc[:T])).astype(np.float32),
            "segment_ids": np.where(valid, seg, 0).astype(np.int32),
        }
