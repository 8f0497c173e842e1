"""gptjax's GPT-2 tokenizer against two references built here from the same files:
tiktoken with GPT-2's original regex and ranks converted from encoder.json/vocab.bpe
(the data-gym conversion, written out below, not gptjax's), and transformers'
GPT2TokenizerFast."""

import json
import random
import re
import shutil

import pytest

from gptjax.config import TokenizerConfig
from gptjax.tokenizer import load_tokenizer

tiktoken = pytest.importorskip("tiktoken")

# The pre-tokenisation regex of OpenAI's gpt-2 encoder.py.
GPT2_ORIGINAL_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
CORPORA = (
    "tinyshakespeare/input.txt",
    "wikitext-2/valid.txt",
    "gutenberg/pg1661.txt",  # Sherlock Holmes: CRLF, some UTF-8
    "gutenberg/pg345.txt",  # Dracula: CRLF, some UTF-8
)


def bytes_to_unicode() -> dict[int, str]:
    """gpt-2 encoder.py: the printable character standing for each byte."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def reference_encoding(bpe_dir) -> "tiktoken.Encoding":
    """data-gym -> mergeable BPE ranks: single bytes first (in bytes_to_unicode order),
    then one rank per merge line; checked against encoder.json."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def decode(token: str) -> bytes:
        return bytes(byte_of[c] for c in token)

    ranks = {bytes([b]): i for i, b in enumerate(bytes_to_unicode())}
    merges = (bpe_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    assert merges[0].startswith("#version")
    for line in merges[1:]:
        if line:
            first, second = line.split(" ")
            ranks[decode(first) + decode(second)] = len(ranks)
    encoder = json.loads((bpe_dir / "encoder.json").read_text(encoding="utf-8"))
    eot = encoder.pop("<|endoftext|>")
    assert {decode(k): v for k, v in encoder.items()} == ranks
    return tiktoken.Encoding(
        name="gpt2_reference",
        pat_str=GPT2_ORIGINAL_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": eot},
    )


def lines_of(path) -> list[str]:
    """Every line, newline kept (CRLF files keep their \\r\\n)."""
    text = path.read_bytes().decode("utf-8")
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


@pytest.fixture(scope="module")
def corpora(shared_data):
    missing = [c for c in CORPORA if not (shared_data / c).is_file()]
    if missing or not (shared_data / "gpt2_bpe").is_dir():
        pytest.skip(f"shared data incomplete: {missing or 'gpt2_bpe'}")
    return {c: lines_of(shared_data / c) for c in CORPORA}


@pytest.fixture(scope="module")
def ours(shared_data):
    return load_tokenizer(TokenizerConfig(kind="gpt2", path=str(shared_data / "gpt2_bpe")))


def test_matches_tiktoken_reference_on_every_line(shared_data, corpora, ours):
    ref = reference_encoding(shared_data / "gpt2_bpe")
    assert ours.vocab_size == ref.n_vocab == 50257 and ours.eos_id == ref.eot_token == 50256
    for name, lines in corpora.items():
        got = ours.encode_batch(lines)
        want = ref.encode_ordinary_batch(lines)
        for i, (line, g, w) in enumerate(zip(lines, got, want, strict=True)):
            assert g == w, f"{name}:{i + 1}: {line!r}"
        for i, (line, g) in enumerate(zip(lines, got, strict=True)):
            assert ours.decode(g) == line, f"{name}:{i + 1}: decode(encode(x)) != x"
        # single encode() calls agree with the batched ones on a sample
        for line, g in random.Random(0).sample(list(zip(lines, got, strict=True)), 200):
            assert ours.encode(line) == g
        whole = "".join(lines)  # across line boundaries too (runs of newlines)
        assert ours.encode(whole) == ref.encode_ordinary(whole), name
    assert sum(len(v) for v in corpora.values()) > 60_000


def test_matches_transformers_gpt2_tokenizer_fast(tmp_path, shared_data, corpora, ours):
    transformers = pytest.importorskip("transformers")
    bpe = shared_data / "gpt2_bpe"
    shutil.copy(bpe / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(bpe / "vocab.bpe", tmp_path / "merges.txt")
    # from_pretrained reads vocab.json + merges.txt in every transformers version (v5's
    # constructor takes vocab=/merges= and silently builds an empty vocabulary from
    # vocab_file=/merges_file=).
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    assert len(hf) == 50257
    rng = random.Random(0)
    for name, lines in corpora.items():
        sample = [x for x in rng.sample(lines, 500) if "<|endoftext|>" not in x]
        want = hf(sample, add_special_tokens=False)["input_ids"]
        for line, w in zip(sample, want, strict=True):
            assert ours.encode(line) == w, f"{name}: {line!r}"
