"""Data pipeline: sources, the token cache, packing, grain iterators, errors."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gptjax.data.cache as cache_mod
from gptjax.config import Config, DataConfig, ModelConfig, TokenizerConfig
from gptjax.data import (
    DataError,
    TokenWindows,
    eval_batches,
    get_tokenizer,
    iter_documents,
    load_splits,
    split_segments,
    train_iterator,
)
from gptjax.tokenizer import load_tokenizer, train_sentencepiece

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory) -> Path:
    """A small SentencePiece model trained on builtin:pydoc (no shared data needed)."""
    path = tmp_path_factory.mktemp("tok") / "pydoc.model"
    return train_sentencepiece(iter_documents(DataConfig()), 512, path, texts=True)


@pytest.fixture(scope="module")
def tok(tok_path):
    return load_tokenizer(TokenizerConfig(path=str(tok_path)))


def make_cfg(tmp_path, sources, seq_len=16, val_fraction=0.1, **data) -> Config:
    data = DataConfig(
        sources=tuple(str(s) for s in sources),
        val_fraction=val_fraction,
        cache_dir=str(tmp_path / "cache"),
        **data,
    )
    return dataclasses.replace(Config(), data=data, model=ModelConfig(seq_len=seq_len))


def write_docs(folder: Path, docs: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        paths.append(folder / f"doc{i:02d}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    return paths


def expected_stream(tok, docs) -> np.ndarray:
    return np.array([t for d in docs if d for t in tok.encode(d) + [tok.eos_id]])


# --- packing -----------------------------------------------------------------


def test_packing_layout_on_a_hand_made_stream():
    sizes, seq_len = [50, 23, 7, 9, 40], 8
    bounds = np.cumsum([0] + sizes)
    shards = [
        np.arange(a, b, dtype=np.uint16) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    windows = TokenWindows(shards, seq_len, "train")
    assert len(windows) == sum((n - 1) // seq_len for n in sizes) == 6 + 2 + 0 + 1 + 4
    targets = []
    for i in range(len(windows)):
        w = windows[i]
        assert w.dtype == np.int32 and w.shape == (seq_len + 1,)
        np.testing.assert_array_equal(w, np.arange(w[0], w[0] + seq_len + 1))  # contiguous
        shard = np.searchsorted(bounds, w[0], side="right") - 1
        assert w[-1] < bounds[shard + 1], f"window {i} crosses a shard boundary"
        assert (w[0] - bounds[shard]) % seq_len == 0  # stride seq_len from the shard start
        targets.extend(w[1:].tolist())
    # Every target exactly once: all tokens after each shard's first, up to the last full window.
    expected = [
        t
        for a, n in zip(bounds[:-1], sizes, strict=True)
        for t in range(a + 1, a + 1 + (n - 1) // seq_len * seq_len)
    ]
    assert targets == expected
    for bad in (len(windows), -1):
        with pytest.raises(IndexError):
            windows[bad]


def test_split_segments_takes_the_tail_for_validation():
    shards = [np.arange(0, 50), np.arange(50, 100)]
    train, val = split_segments(shards, 0.3)
    np.testing.assert_array_equal(np.concatenate(train), np.arange(70))
    np.testing.assert_array_equal(np.concatenate(val), np.arange(70, 100))
    assert [len(s) for s in train] == [50, 20] and [len(s) for s in val] == [30]
    train, val = split_segments(shards, 0.0)
    assert [len(s) for s in train] == [50, 50] and val == []


# --- sources -----------------------------------------------------------------


def test_builtin_pydoc_yields_many_documents():
    from pydoc_data.topics import topics

    docs = list(iter_documents(DataConfig(sources=("builtin:pydoc",))))
    assert len(docs) == len(topics) >= 50
    assert docs == [topics[k] for k in sorted(topics)]
    assert sum(map(len, docs)) > 300_000


def test_text_files_globs_and_jsonl(tmp_path, shared_data):
    texts = write_docs(tmp_path / "t", ["first doc", "second doc"])
    jsonl = tmp_path / "j.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b", "x": 1}\n', encoding="utf-8")
    cfg = DataConfig(sources=(str(tmp_path / "t" / "*.txt"), str(jsonl), str(texts[0])))
    assert list(iter_documents(cfg)) == ["first doc", "second doc", "a", "b", "first doc"]
    rte = list(
        iter_documents(
            DataConfig(sources=(str(shared_data / "rte/val.jsonl"),), text_field="premise")
        )
    )
    assert len(rte) == 277 and rte[0].startswith("Dana Reeve")


@pytest.mark.parametrize(
    "source, message",
    [
        ("{tmp}/missing.txt", "missing.txt': file not found"),
        ("{tmp}/nowhere/*.txt", "nowhere/\\*.txt': glob matched no files"),
        ("{tmp}", "is a directory"),
        ("hf:wikitext", "unknown source prefix 'hf:'"),
        ("builtin:wikipedia", "unknown builtin"),
        ("tfds:", "expected tfds:NAME"),
    ],
)
def test_bad_sources_name_the_problem(tmp_path, source, message):
    with pytest.raises(DataError, match=message):
        list(iter_documents(DataConfig(sources=(source.format(tmp=tmp_path),))))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok too"}\n{"text": "cut off\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        list(iter_documents(DataConfig(sources=(str(path),))))
    path.write_text('{"text": "ok"}\n\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: no string field 'text' \(found \['body'\]\)"):
        list(iter_documents(DataConfig(sources=(str(path),))))


def test_undecodable_bytes_are_counted_and_reported(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    # Three bad sequences (\xff, \xfe, \x80) and one genuine U+FFFD that must not be counted.
    path.write_bytes(b"caf\xff \xfe ok \x80 end " + "\ufffd".encode())
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "x\xe9y"}\n{"text": "fine"}\n')
    with caplog.at_level("WARNING"):
        docs = list(iter_documents(DataConfig(sources=(str(path), str(jsonl)))))
    assert docs == ["caf\ufffd \ufffd ok \ufffd end \ufffd", "x\ufffdy", "fine"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(path) in w and "3 undecodable" in w for w in warnings), warnings
    assert any(str(jsonl) in w and "1 undecodable" in w for w in warnings), warnings
    stats = {}
    list(iter_documents(DataConfig(sources=(str(path), str(jsonl))), stats))
    assert stats == {"replaced": 4, "replaced_files": {str(path): 3, str(jsonl): 1}}


def test_the_token_cache_records_the_replaced_bytes(tmp_path, tok, caplog):
    path = tmp_path / "docs" / "latin1.txt"
    path.parent.mkdir()
    path.write_bytes(b"caf\xff and more text " * 40)
    with caplog.at_level("INFO"):
        load_splits(make_cfg(tmp_path, [path]), tok, tmp_path)
    [manifest] = (tmp_path / "cache").glob("*/manifest.json")
    assert json.loads(manifest.read_text())["replaced_undecodable"] == 40
    assert "40 undecodable utf-8 sequence(s) replaced" in caplog.text


# --- cache -------------------------------------------------------------------


def test_load_splits_packs_the_documents_in_order(tmp_path, tok):
    docs = [f"Document {i}: " + "spam and eggs. " * (5 + 3 * i) for i in range(12)] + [""]
    cfg = make_cfg(tmp_path, [tmp_path / "docs" / "*.txt"], seq_len=16, val_fraction=0.25)
    write_docs(tmp_path / "docs", docs)
    train, val = load_splits(cfg, tok, tmp_path / "work")
    stream = expected_stream(tok, docs)
    n_val = int(round(len(stream) * 0.25))
    assert (train.n_tokens, val.n_tokens) == (len(stream) - n_val, n_val)
    assert len(train) == (train.n_tokens - 1) // 16 and len(val) == (n_val - 1) // 16
    for i in (0, 1, len(train) - 1):
        np.testing.assert_array_equal(train[i], stream[16 * i : 16 * i + 17])
    cut = len(stream) - n_val
    np.testing.assert_array_equal(val[0], stream[cut : cut + 17])
    (cache_dir,) = (tmp_path / "cache").iterdir()
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["total_tokens"] == len(stream) and manifest["documents"] == 12
    assert manifest["dtype"] == "uint16"
    assert (
        manifest["tokens_sha256"] == hashlib.sha256(stream.astype(np.uint16).tobytes()).hexdigest()
    )
    assert np.load(cache_dir / "shard_00000.npy", mmap_mode="r").dtype == np.uint16


def test_cache_is_reused_and_invalidated(tmp_path, tok, monkeypatch):
    write_docs(tmp_path / "docs", ["one two three " * 50, "four five six " * 50])
    cfg = make_cfg(tmp_path, [tmp_path / "docs" / "*.txt"])
    calls = []
    encode_batch = tok.encode_batch
    monkeypatch.setattr(
        tok, "encode_batch", lambda texts: calls.extend(texts) or encode_batch(texts)
    )
    first, _ = load_splits(cfg, tok, tmp_path / "work")
    assert len(calls) == 2
    (cache_dir,) = (tmp_path / "cache").iterdir()
    shard = cache_dir / "shard_00000.npy"
    before = os.stat(shard)
    again, _ = load_splits(cfg, tok, tmp_path / "work")
    assert len(calls) == 2, "second load re-tokenised"
    after = os.stat(shard)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert repr(again) == repr(first)
    np.testing.assert_array_equal(again[0], first[0])
    # A touched file (same text, new mtime) is re-read, and its windows keep their
    # identity (repr, which the data position checks on resume), since the tokens are the same.
    doc = tmp_path / "docs" / "doc01.txt"
    os.utime(doc, ns=(before.st_mtime_ns + 10**9, before.st_mtime_ns + 10**9))
    touched, _ = load_splits(cfg, tok, tmp_path / "work")
    assert len(calls) == 4 and repr(touched) == repr(first)
    # A changed source file gets a new cache, never the stale tokens.
    doc.write_text("seven eight nine " * 60)
    changed, _ = load_splits(cfg, tok, tmp_path / "work")
    assert len(calls) == 6 and repr(changed) != repr(first)
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_interrupted_write_leaves_no_trusted_cache(tmp_path, tok, monkeypatch):
    docs = [("word " * (40 + 7 * i)).strip() for i in range(10)]
    write_docs(tmp_path / "docs", docs)
    cfg = make_cfg(tmp_path, [tmp_path / "docs" / "*.txt"], seq_len=8, val_fraction=0.0)
    monkeypatch.setattr(cache_mod, "SHARD_TOKENS", 64)
    real_write = cache_mod._write_shard
    written = []

    def crash_on_third(path, tokens):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill mid-write")
        written.append(path)
        real_write(path, tokens)

    monkeypatch.setattr(cache_mod, "_write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        load_splits(cfg, tok, tmp_path / "work")
    assert len(written) == 2
    assert list((tmp_path / "cache").iterdir()) == []  # nothing in place, no temp dir left
    # A temp dir left by a killed process is never mistaken for a cache.
    (tmp_path / "cache" / ".tmp-stale-1-x").mkdir()
    (tmp_path / "cache" / ".tmp-stale-1-x" / "shard_00000.npy").write_bytes(b"junk")

    monkeypatch.setattr(cache_mod, "_write_shard", real_write)
    train, _ = load_splits(cfg, tok, tmp_path / "work")
    stream = expected_stream(tok, docs)
    shard_sizes = [64] * (len(stream) // 64) + [len(stream) % 64]
    assert len(train) == sum((n - 1) // 8 for n in shard_sizes if n)
    starts = [64 * s + 8 * k for s, n in enumerate(shard_sizes) for k in range((n - 1) // 8)]
    for i, start in enumerate(starts):  # each window lies inside its own 64-token shard
        np.testing.assert_array_equal(train[i], stream[start : start + 9])
        assert start // 64 == (start + 8) // 64


def test_empty_corpus_is_an_error(tmp_path, tok):
    write_docs(tmp_path / "docs", ["", ""])
    cfg = make_cfg(tmp_path, [tmp_path / "docs" / "*.txt"])
    with pytest.raises(DataError, match="empty corpus"):
        load_splits(cfg, tok, tmp_path / "work")
    assert list((tmp_path / "cache").iterdir()) == []


def test_too_small_for_a_batch_is_an_error(tmp_path, tok):
    write_docs(tmp_path / "docs", ["a short text, " * 20])
    cfg = make_cfg(tmp_path, [tmp_path / "docs" / "*.txt"], seq_len=16, val_fraction=0.0)
    train, val = load_splits(cfg, tok, tmp_path / "work")
    assert 0 < len(train) < 64 and len(val) == 0
    with pytest.raises(
        DataError, match=rf"train split has {len(train)} windows of 17 tokens.*= 64"
    ):
        train_iterator(train, 64, seed=0)
    with pytest.raises(DataError, match="val split has 0 windows"):
        eval_batches(val, 1, 4)


# --- TFDS --------------------------------------------------------------------


def test_tfds_source_reads_a_real_prepared_dataset(tmp_path):
    import tensorflow_datasets as tfds

    texts = [f"record {i}: caf\u00e9 \u6f22\u5b57 " + "x" * i for i in range(7)]

    class GptjaxTinyCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(texts[:5]),
                "test": self._generate_examples(texts[5:]),
            }

        def _generate_examples(self, items):
            for i, t in enumerate(items):
                yield i, {"text": t}

    builder = GptjaxTinyCorpus(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    assert list((tmp_path / "gptjax_tiny_corpus" / "1.0.0").glob("*.array_record*"))

    def docs(source):
        return list(iter_documents(DataConfig(sources=(source,), tfds_data_dir=str(tmp_path))))

    assert sorted(docs("tfds:gptjax_tiny_corpus")) == sorted(texts[:5])
    assert sorted(docs("tfds:gptjax_tiny_corpus:test")) == sorted(texts[5:])
    with pytest.raises(DataError, match="gptjax_tiny_corpus.*validation"):
        docs("tfds:gptjax_tiny_corpus:validation")
    with pytest.raises(DataError, match="no_such_dataset_xyz"):
        docs("tfds:no_such_dataset_xyz")

    # A training run has no builder class: it must read the prepared files alone, and
    # neither importing gptjax.data nor reading TFDS may pull in TensorFlow or torch.
    script = textwrap.dedent(
        f"""
        import json, sys
        import gptjax.data as data
        heavy = lambda: sorted(m for m in ("tensorflow", "torch") if m in sys.modules)
        assert heavy() == [] and "tensorflow_datasets" not in sys.modules, heavy()
        from gptjax.config import DataConfig
        cfg = DataConfig(sources=("tfds:gptjax_tiny_corpus",), tfds_data_dir={str(tmp_path)!r})
        print(json.dumps({{"docs": list(data.iter_documents(cfg)), "heavy": heavy()}}))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(result["docs"]) == sorted(texts[:5]) and result["heavy"] == []


# --- iterators ---------------------------------------------------------------


def windows(n: int, seq_len: int = 4, tag: str = "t") -> TokenWindows:
    return TokenWindows([np.arange(n * seq_len + 1)], seq_len, "train", tag)


def take(it, k):
    return [next(it) for _ in range(k)]


def test_train_iterator_is_seeded_and_reshuffles_each_epoch():
    src = windows(20)
    a, b, c = (take(train_iterator(src, 4, seed), 15) for seed in (7, 7, 8))
    assert all(x.shape == (4, 5) and x.dtype == np.int32 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    epochs = [np.concatenate(a[i : i + 5])[:, 0] // 4 for i in (0, 5, 10)]  # window ids
    for ids in epochs:
        assert sorted(ids.tolist()) == list(range(20))  # each window once per epoch
    assert not np.array_equal(epochs[0], epochs[1])  # a new order each epoch


def test_train_iterator_resumes_exactly_from_its_state():
    it = train_iterator(windows(20), 3, seed=5)
    take(it, 8)  # crosses an epoch boundary (6 batches of 3 per epoch)
    state = it.get_state()
    expected = take(it, 10)
    fresh = train_iterator(windows(20), 3, seed=5)  # a new process: new objects, same data
    fresh.set_state(state)
    got = take(fresh, 10)
    assert all(np.array_equal(x, y) for x, y in zip(expected, got, strict=True))
    with pytest.raises(ValueError, match="DataSource"):  # other data: refused, not misread
        train_iterator(windows(20, tag="other"), 3, seed=5).set_state(state)


def test_eval_batches_are_the_in_order_prefix():
    src = windows(10)
    batches = eval_batches(src, 3, 2)
    again = eval_batches(src, 3, 2)
    assert len(batches) == 2 and all(
        np.array_equal(x, y) for x, y in zip(batches, again, strict=True)
    )
    np.testing.assert_array_equal(batches[1], np.stack([src[3], src[4], src[5]]))
    assert len(eval_batches(src, 3, 100)) == 3  # fewer when the split is smaller
    with pytest.raises(DataError, match="10 windows"):
        eval_batches(src, 11, 1)


# --- tokenizer wiring ----------------------------------------------------------


def test_get_tokenizer_trains_once_into_the_workdir(tmp_path, shared_data):
    cfg = make_cfg(tmp_path, [shared_data / "gutenberg" / "pg11.txt"])
    cfg = dataclasses.replace(cfg, tokenizer=TokenizerConfig(kind="sentencepiece", vocab_size=400))
    tok = get_tokenizer(cfg, tmp_path / "w1")
    model = tmp_path / "w1" / "tokenizer.model"
    assert tok.vocab_size == 400 and model.is_file()
    stat = os.stat(model)
    assert get_tokenizer(cfg, tmp_path / "w1").digest == tok.digest
    assert os.stat(model).st_mtime_ns == stat.st_mtime_ns  # loaded, not retrained
    assert get_tokenizer(cfg, tmp_path / "w2").digest == tok.digest  # deterministic
    text = (shared_data / "gutenberg" / "pg11.txt").read_text()
    assert tok.decode(tok.encode(text)) == text

    gpt2 = dataclasses.replace(cfg, tokenizer=TokenizerConfig(kind="gpt2"))
    with pytest.raises(DataError, match="needs tokenizer.path"):
        get_tokenizer(gpt2, tmp_path / "w3")
    gpt2 = dataclasses.replace(
        cfg, tokenizer=TokenizerConfig(kind="gpt2", path=str(shared_data / "gpt2_bpe"))
    )
    assert get_tokenizer(gpt2, tmp_path / "w3").encode("Hello world") == [15496, 995]
    missing = dataclasses.replace(cfg, tokenizer=TokenizerConfig(path=str(tmp_path / "nope.model")))
    with pytest.raises(DataError, match="nope.model"):
        get_tokenizer(missing, tmp_path / "w3")


# --- bad input at the command line --------------------------------------------


@pytest.mark.parametrize("case", ["missing", "empty", "too_small", "empty_no_tokenizer"])
def test_cli_bad_corpus_is_a_clear_error_and_leaves_no_cache(tmp_path, tok_path, capsys, case):
    """`gptjax train` on a missing file, an empty corpus (with a tokenizer given, or one to
    train), or a corpus smaller than one batch: exit 2, a message naming the problem, no
    traceback, and nothing half-written in the token cache."""
    from gptjax import cli

    corpus = tmp_path / "corpus.txt"
    if case != "missing":
        corpus.write_text("" if case.startswith("empty") else "a few words only.\n")
    flags = [
        f"--config.data.sources={corpus}",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        "--config.train.steps=2",
    ]
    if case != "empty_no_tokenizer":
        flags.append(f"--config.tokenizer.path={tok_path}")
    argv = ["train", "--config", str(REPO / "configs/quickstart.py"), "--workdir"]
    assert cli.main([*argv, str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    expected = {
        "missing": f"source {str(corpus)!r}: file not found",
        "empty": "empty corpus",
        "empty_no_tokenizer": "empty corpus",
        "too_small": "train split has 0 windows",
    }[case]
    assert expected in err and "Traceback" not in err, err
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.iterdir() if p.name.startswith(".tmp")]


def test_cli_tokenizer_train_refuses_a_missing_input(tmp_path, capsys):
    from gptjax import cli

    out = tmp_path / "tok.model"
    assert (
        cli.main(["tokenizer", "train", "--input", "no such file.txt", "--output", str(out)]) == 2
    )
    assert "no such file.txt" in capsys.readouterr().err
    assert not out.exists()
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n" * 50)
    args = ["--input", str(text), "--vocab-size", "300", "--output", str(out)]
    assert cli.main(["tokenizer", "train", *args]) == 0
    tokenizer = load_tokenizer(TokenizerConfig(path=str(out)))
    assert tokenizer.decode(tokenizer.encode("lazy fox")) == "lazy fox"
