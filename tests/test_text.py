"""The ``text`` task: directory index, file split, byte tokens, packing, errors, BPE."""
import json
import os
import shutil
import sys
import sysconfig

import numpy as np
import pytest

from memjax.config import Config, ConfigError, load_config, validate
from memjax.data import text as textmod
from memjax.data.text import Text
from memjax.data.text_stdlib import stdlib_options, stdlib_path

BOS, EOS, PAD = 256, 257, 258
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FILES = {
    "a.txt": "Alpha file.\nSecond line.\n",
    "b.py": "def f(x):\n    return x + 1\n",
    "empty.txt": "",
    "sub/c.txt": "caf\u00e9 \u2603 unicode " * 5,
    "sub/deeper/d.py": "import os\n" * 9,
    "sub/e.txt": "e" * 70,
    "f.txt": "short",
    "g.txt": "the quick brown fox " * 3,
    "h.py": "print('h')\n",
    "i.txt": "i" * 33,
}
JSONL = {"docs.jsonl": ["first json document", "", "second \u00fcber doc", "third"]}
IGNORED = {"notes.md": "not matched", ".hidden.txt": "hidden", "skip/x.py": "excluded dir",
           "k.txt.bak": "wrong ending"}


def write_corpus(root):
    for rel, content in {**FILES, **IGNORED}.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
    for rel, texts in JSONL.items():
        with open(os.path.join(root, rel), "w", encoding="utf-8") as f:
            for t in texts:
                f.write((json.dumps({"text": t, "id": 1}) if t else "   ") + "\n")
    return str(root)


def documents(rel):
    """Expected token documents of one file, written from the task's definition."""
    if rel.endswith(".jsonl"):
        return [[BOS, *t.encode("utf-8"), EOS] for t in JSONL[rel] if t]
    return [[BOS, *FILES[rel].encode("utf-8"), EOS]]


def task(path, split="train", seq_len=16, n=0, vocab_size=260, **opts):
    opts = {"path": path, "exclude": "skip", "heldout_fraction": 0.3, **opts}
    return Text(Text.Options(**opts), seq_len=seq_len, vocab_size=vocab_size, split=split,
                num_examples=n, seed=0)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def test_files_split_by_path_hash_disjoint_and_complete(corpus, tmp_path):
    train, ev = task(corpus), task(corpus, "eval")
    assert set(train.files) | set(ev.files) == set(FILES) | set(JSONL)
    assert not set(train.files) & set(ev.files)
    assert train.files == sorted(train.files) and len(ev.files) >= 1 and len(train.files) >= 1
    # the split is a function of the relative path: a copy elsewhere splits the same way,
    moved = shutil.copytree(corpus, tmp_path / "elsewhere" / "copy")
    assert task(str(moved), "eval").files == ev.files
    # and a new file moves no other file.
    with open(os.path.join(moved, "zz_new.txt"), "w") as f:
        f.write("new")
    textmod.clear_cache()
    t2, e2 = task(str(moved)), task(str(moved), "eval")
    assert set(t2.files) - {"zz_new.txt"} == set(train.files)
    assert set(e2.files) - {"zz_new.txt"} == set(ev.files)


def test_heldout_share_follows_heldout_fraction(tmp_path):
    for i in range(300):
        (tmp_path / f"doc{i:03d}.txt").write_text(str(i))
    for fraction in (0.1, 0.5):
        held = len(task(str(tmp_path), "eval", heldout_fraction=fraction).files)
        assert abs(held / 300 - fraction) < 4 * (fraction * (1 - fraction) / 300) ** 0.5  # 4 sigma


@pytest.mark.parametrize("seq_len", [7, 16])
def test_packing_covers_every_token_once_in_order(corpus, seq_len):
    for split in ("train", "eval"):
        t = task(corpus, split, seq_len=seq_len)
        docs = [d for rel in t.files for d in documents(rel)]
        stream = np.concatenate(docs)
        doc = np.repeat(np.arange(len(docs)), [len(d) for d in docs])  # document of each token
        N = len(stream)
        assert len(t) == -(-N // seq_len)
        inputs, targets, masks, segs = (np.concatenate([t[i][k] for i in range(len(t))])
                                        for k in ("inputs", "targets", "mask", "segment_ids"))
        assert (inputs[:N] == stream).all() and (inputs[N:] == PAD).all()  # every token once, in order
        assert (targets[:N - 1] == stream[1:]).all()
        same_doc = np.zeros(len(inputs), bool)
        same_doc[:N - 1] = doc[1:] == doc[:-1]
        assert (masks > 0).tolist() == same_doc.tolist()  # EOS -> next BOS and the padding unscored
        assert masks[:N][stream == BOS].all()  # BOS -> first byte is scored
        for w in range(len(t)):
            s = segs[w * seq_len:(w + 1) * seq_len]
            d = doc[w * seq_len:(w + 1) * seq_len]
            expect = [sorted(set(d)).index(x) + 1 for x in d] + [0] * (seq_len - len(d))
            assert s.tolist() == expect


def test_fewer_examples_spread_over_the_windows(corpus):
    full, few = task(corpus), task(corpus, n=3)
    W = len(full)
    assert len(few) == 3 and W > 3
    for i in range(3):
        assert (few[i]["inputs"] == full[i * W // 3]["inputs"]).all()
    assert len(task(corpus, n=10 ** 9)) == W
    with pytest.raises(IndexError):
        few[3]


def test_decode_and_determinism(corpus):
    t = task(corpus)
    text = t.decode(np.concatenate([t[i]["inputs"] for i in range(len(t))]))
    assert text == "".join(("".join(JSONL[r]) if r in JSONL else FILES[r]) for r in t.files)
    textmod.clear_cache()
    again = task(corpus)
    for i in range(len(t)):
        assert all((t[i][k] == again[i][k]).all() for k in t[i])


def test_extensions_option_and_validation_through_config(corpus):
    t = task(corpus, extensions="py", heldout_fraction=0.5)
    assert set(t.files) | set(task(corpus, "eval", extensions="py", heldout_fraction=0.5).files) == {
        "b.py", "sub/deeper/d.py", "h.py"}
    cfg = Config()
    cfg.model.vocab_size, cfg.data.task, cfg.data.seq_len = 260, "text", 32
    cfg.data.options = {"path": corpus}
    validate(cfg)
    from memjax.data.pipeline import make_dataset

    batch = next(iter(make_dataset(cfg, "train", batch_size=4)))
    assert batch["inputs"].shape == batch["segment_ids"].shape == (4, 32)


# ----------------------------------------------------------------------------- errors


def test_empty_and_missing_directories_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no files ending in") as e:
        task(str(empty))
    assert str(empty) in str(e.value)
    (empty / "readme.md").write_text("x")
    with pytest.raises(ConfigError, match=str(empty)):
        task(str(empty))
    with pytest.raises(ConfigError, match="is not a directory"):
        task(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"data\.options\.path"):
        task("")
    (empty / "one.txt").write_text("x")
    with pytest.raises(ConfigError, match="at least 2"):
        task(str(empty))


def test_unreadable_file_names_the_path(tmp_path, corpus):
    broken = os.path.join(corpus, "x.txt")
    os.symlink(os.path.join(corpus, "missing-target"), broken)
    with pytest.raises(ConfigError, match="cannot read") as e:
        task(corpus)
    assert broken in str(e.value)


def test_a_file_removed_during_a_run_names_the_path(corpus):
    t = task(corpus)
    for rel in t.files:
        os.remove(os.path.join(corpus, rel))  # after indexing: the windows now read missing files
    with pytest.raises(OSError, match=r"cannot read '.*' \(indexed earlier\): .*No such file"):
        t[0]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_permission_denied_names_the_path(corpus):
    path = os.path.join(corpus, "a.txt")
    os.chmod(path, 0)
    try:
        with pytest.raises(ConfigError, match="cannot read") as e:
            task(corpus)
        assert path in str(e.value)
    finally:
        os.chmod(path, 0o644)


def test_a_directory_named_like_a_file_is_walked_not_read(corpus):
    os.makedirs(os.path.join(corpus, "dir.txt"))
    with open(os.path.join(corpus, "dir.txt", "inner.txt"), "w") as f:
        f.write("inside")
    files = set(task(corpus).files) | set(task(corpus, "eval").files)
    assert "dir.txt/inner.txt" in files and "dir.txt" not in files


def test_bad_jsonl_names_file_and_line(tmp_path):
    root = tmp_path / "j"
    root.mkdir()
    (root / "a.txt").write_text("a")
    (root / "b.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ConfigError, match=r"b\.jsonl:2 is not valid JSON"):
        task(str(root))
    (root / "b.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ConfigError, match=r"jsonl_field.*b\.jsonl:2.*'text'"):
        task(str(root))
    (root / "b.jsonl").write_text('{"body": "ok"}\n{"body": "has text"}\n')
    t = task(str(root), jsonl_field="body")
    assert "b.jsonl" in t.files + task(str(root), "eval", jsonl_field="body").files


@pytest.mark.parametrize("overrides,key", [
    ({"seq_len": 1}, "data.seq_len"),
    ({"vocab_size": 258}, "model.vocab_size"),
    ({"heldout_fraction": 0.0}, "data.options.heldout_fraction"),
    ({"tokenizer": "wordpiece"}, "data.options.tokenizer"),
    ({"extensions": " , "}, "data.options.extensions"),
    ({"tokenizer": "bpe", "bpe_vocab_size": 100}, "data.options.bpe_vocab_size"),
    ({"tokenizer": "bpe", "bpe_vocab_size": 1000, "vocab_size": 512}, "model.vocab_size"),
])
def test_bad_options_name_the_key(corpus, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        task(corpus, **overrides)


# ----------------------------------------------------------------------------- BPE


def test_bpe_without_tokenizers_is_a_clear_error(corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(ConfigError, match="pip install tokenizers"):
        task(corpus, tokenizer="bpe", vocab_size=300)


def test_bpe_tokenizer_round_trips_and_packs(corpus):
    pytest.importorskip("tokenizers")
    with open(os.path.join(corpus, "special.txt"), "w") as f:
        f.write("text that spells <bos> <eos> <pad> and [PAD] literally " * 4)
    for split in ("train", "eval"):
        t = task(corpus, split, tokenizer="bpe", vocab_size=320, seq_len=8)
        assert t.bos_id + 3 <= 320 and (t.eos_id, t.pad_id) == (t.bos_id + 1, t.bos_id + 2)
        ids = np.concatenate([t[i]["inputs"] for i in range(len(t))])
        ids = ids[ids != t.pad_id]
        bounds = np.where(ids == t.bos_id)[0]
        texts = []
        for r in t.files:
            texts += [x for x in JSONL[r] if x] if r in JSONL else [
                FILES.get(r, open(os.path.join(corpus, r), encoding="utf-8").read())]
        assert len(bounds) == len(texts) == (ids == t.eos_id).sum()
        docs = np.split(ids, bounds[1:])
        for d, text in zip(docs, texts):
            assert d[0] == t.bos_id and d[-1] == t.eos_id
            assert not np.isin(d[1:-1], [t.bos_id, t.eos_id, t.pad_id]).any()
            assert t.decode(d) == text
        assert (ids < 320).all()
        textmod.clear_cache()
        again = task(corpus, split, tokenizer="bpe", vocab_size=320, seq_len=8)
        assert all((again[i]["inputs"] == t[i]["inputs"]).all() for i in range(len(t)))  # deterministic


# ----------------------------------------------------------------------------- stdlib config


def test_stdlib_config_loads_and_splits_python_sources():
    assert stdlib_path() == sysconfig.get_paths()["stdlib"]
    assert os.path.isfile(os.path.join(stdlib_path(), "os.py"))
    cfg = load_config(os.path.join(ROOT, "configs", "text_stdlib.py"))
    assert cfg.data.options == stdlib_options()
    from memjax.data.pipeline import make_task

    train, ev = make_task(cfg, "train"), make_task(cfg, "eval")
    assert len(train.files) > 100 and len(ev.files) > 10 and not set(train.files) & set(ev.files)
    assert all(f.endswith(".py") and "site-packages" not in f.split("/") for f in train.files)
    ex = ev[len(ev) // 2]
    assert ex["inputs"].shape == (cfg.data.seq_len,) and (ex["inputs"] < cfg.model.vocab_size).all()
    assert len(ev) == cfg.data.num_eval_examples and len(train) == train.num_windows
