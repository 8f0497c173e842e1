"""Tokenizers on real text: exact round trips, GPT-2's published ids, records, errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gptjax.config import TokenizerConfig
from gptjax.tokenizer import (
    GPT2Tokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
    tokenizer_from_record,
    train_sentencepiece,
)

ODD_TEXTS = [
    "",
    " ",
    "   leading and trailing spaces   ",
    "\ttabs\tinside\t\tand\tat the end\t",
    "multiple    spaces     between  words",
    "\n\nnewlines\n\n\nin the middle\nand at the end\n",
    "windows\r\nline\r\nendings\r\n",
    "emoji 😀🎉👩‍👩‍👧 and flags 🇫🇷",
    "CJK 漢字かなカナ 한국어 and Arabic مرحبا",
    "accents: naïve café résumé Ångström, NFKC-sensitive: ﬁ ① Ｆｕｌｌ",
    "control \x00\x01\x7f and non-breaking\u00a0space, zero\u200bwidth",
    "<s></s><unk> look like special pieces but are text",
    "x" * 5000 + "\n" + "  indented code:\n    return f(x)  # comment\n",
]


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


@pytest.fixture(scope="module")
def sp_model(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp") / "shakespeare.model"
    return train_sentencepiece([shared_data / "tinyshakespeare/input.txt"], 512, out)


@pytest.fixture(scope="module")
def sp(sp_model) -> SentencePieceTokenizer:
    return load_tokenizer(TokenizerConfig(kind="sentencepiece", path=str(sp_model)))


@pytest.fixture(scope="module")
def gpt2(shared_data) -> GPT2Tokenizer:
    return load_tokenizer(TokenizerConfig(kind="gpt2", path=str(shared_data / "gpt2_bpe")))


REAL_FILES = ["tinyshakespeare/input.txt", "gutenberg/pg1661.txt", "wikitext-2/valid.txt"]


@pytest.mark.parametrize("name", REAL_FILES)
def test_sentencepiece_round_trips_every_line(sp, shared_data, name):
    lines = lines_of(shared_data / name)
    assert len(lines) > 3000
    for line in lines:
        assert sp.decode(sp.encode(line)) == line
    text = "".join(lines)
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert max(ids) < sp.vocab_size and sp.eos_id not in ids


def test_sentencepiece_round_trips_odd_text(sp):
    for text in ODD_TEXTS:
        ids = sp.encode(text)
        assert sp.decode(ids) == text, repr(text[:60])
    # Unseen characters fall back to bytes instead of <unk>.
    assert sp.decode(sp.encode("漢")) == "漢" and len(sp.encode("漢")) == 3


def test_sentencepiece_model_is_small_and_useful(sp, shared_data):
    assert (sp.kind, sp.vocab_size, sp.eos_id) == ("sentencepiece", 512, 2)
    text = (shared_data / "tinyshakespeare/input.txt").read_text()
    # A 512-piece BPE compresses English well below one token per 2 characters.
    assert len(sp.encode(text)) < len(text) / 1.7


def test_sentencepiece_training_is_deterministic_and_atomic(shared_data, tmp_path):
    text = (shared_data / "gutenberg/pg11.txt").read_text()
    a = train_sentencepiece([text], 400, tmp_path / "a" / "m.model")
    b = train_sentencepiece([text], 400, tmp_path / "b" / "m.model")
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in a.parent.iterdir()) == ["m.model"]  # no temp file left
    # A failed training writes nothing.
    with pytest.raises(TokenizerError, match="Vocabulary size too high"):
        train_sentencepiece(["a tiny text\nof two lines"], 4096, tmp_path / "c" / "m.model")
    assert not (tmp_path / "c" / "m.model").exists()


def test_train_inputs_paths_and_texts(shared_data, tmp_path):
    src = shared_data / "gutenberg/pg11.txt"
    by_path = train_sentencepiece([src], 400, tmp_path / "p.model")
    by_str_path = train_sentencepiece([str(src)], 400, tmp_path / "s.model")
    by_text = train_sentencepiece([src.read_text()], 400, tmp_path / "t.model")
    assert by_path.read_bytes() == by_str_path.read_bytes() == by_text.read_bytes()
    with pytest.raises(TokenizerError, match="no-such-file.txt"):
        train_sentencepiece([str(tmp_path / "no-such-file.txt")], 400, tmp_path / "x.model")
    with pytest.raises(TokenizerError, match="no text"):
        train_sentencepiece(["", "\n\n"], 400, tmp_path / "x.model")


def test_gpt2_known_ids(gpt2):
    assert (gpt2.kind, gpt2.vocab_size, gpt2.eos_id) == ("gpt2", 50257, 50256)
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.decode([50256]) == "<|endoftext|>"
    # Inside a document the separator's text is ordinary text, never the EOS id.
    assert 50256 not in gpt2.encode("a <|endoftext|> b")


@pytest.mark.parametrize("name", REAL_FILES)
def test_gpt2_round_trips(gpt2, shared_data, name):
    lines = lines_of(shared_data / name)
    for line in lines[:2000]:
        assert gpt2.decode(gpt2.encode(line)) == line
    text = "".join(lines)
    assert gpt2.decode(gpt2.encode(text)) == text
    for text in ODD_TEXTS:
        assert gpt2.decode(gpt2.encode(text)) == text


def test_encode_batch_matches_encode(sp, gpt2, shared_data):
    texts = lines_of(shared_data / "wikitext-2/valid.txt")[:300] + ODD_TEXTS
    for tok in (sp, gpt2):
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_accepts_arrays_and_padding_ids(sp, gpt2):
    for tok in (sp, gpt2):
        ids = tok.encode("to be or not")
        assert tok.decode(np.asarray(ids, np.int32)) == "to be or not"
        assert tok.decode(ids + [tok.vocab_size + 3] + ids) == "to be or not\ufffdto be or not"
        assert tok.decode([]) == ""


def test_records_round_trip_without_the_files(sp_model, shared_data, tmp_path):
    probe = "".join(lines_of(shared_data / "gutenberg/pg345.txt")[:500]) + "".join(ODD_TEXTS)
    sp_copy, gpt2_copy = tmp_path / "sp.model", tmp_path / "gpt2"
    shutil.copy(sp_model, sp_copy)
    shutil.copytree(shared_data / "gpt2_bpe", gpt2_copy)
    originals = [
        load_tokenizer(TokenizerConfig(kind="sentencepiece", path=str(sp_copy))),
        load_tokenizer(TokenizerConfig(kind="gpt2", path=str(gpt2_copy))),
    ]
    records = [json.loads(json.dumps(t.to_record())) for t in originals]  # JSON-safe
    sp_copy.unlink()
    shutil.rmtree(gpt2_copy)  # self-contained: the files are gone
    for tok, record in zip(originals, records, strict=True):
        back = tokenizer_from_record(record)
        assert (back.kind, back.vocab_size, back.eos_id) == (tok.kind, tok.vocab_size, tok.eos_id)
        assert back.encode(probe) == tok.encode(probe)
        assert back.digest == tok.digest


def test_bad_paths_and_records(shared_data, tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.path is empty"):
        load_tokenizer(TokenizerConfig(kind="sentencepiece", path=""))
    with pytest.raises(TokenizerError, match="missing.model"):
        load_tokenizer(TokenizerConfig(kind="sentencepiece", path=str(tmp_path / "missing.model")))
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(TokenizerConfig(kind="sentencepiece", path=str(shared_data / "SOURCES.md")))
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(shared_data / "gpt2_bpe/encoder.json", half)
    with pytest.raises(TokenizerError, match="vocab.bpe"):
        load_tokenizer(TokenizerConfig(kind="gpt2", path=str(half)))
    # Merges that do not match the encoder (one merge dropped) are caught, not mis-tokenised.
    merges = (shared_data / "gpt2_bpe/vocab.bpe").read_text(encoding="utf-8").split("\n")
    (half / "vocab.bpe").write_text("\n".join(merges[:100] + merges[101:]), encoding="utf-8")
    with pytest.raises(TokenizerError, match="does not match"):
        load_tokenizer(TokenizerConfig(kind="gpt2", path=str(half)))
    with pytest.raises(TokenizerError, match="unknown kind"):
        tokenizer_from_record({"format": 1, "kind": "bytes"})
    with pytest.raises(TokenizerError, match="base64"):
        tokenizer_from_record({"format": 1, "kind": "sentencepiece", "model": "not base64!"})
