"""One tokenizer interface over SentencePiece models and GPT-2's byte-level BPE.

A tokenizer is fully described by the bytes of its files, so `to_record()` carries
them (base64) and a checkpoint can restore the exact tokenizer it was trained with,
without the original files.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gptjax.config import TokenizerConfig

RECORD_FORMAT = 1
# GPT-2's pre-tokenisation regex, exactly as tiktoken's "gpt2" encoding has it.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT2_EOS = "<|endoftext|>"
# Training reads the corpus line by line; SentencePiece drops lines longer than
# max_sentence_length, so long lines are cut into pieces no longer than this.
_SP_CHUNK = 4096
# Bound on the text a tokenizer is trained on: a vocabulary is settled long before
# a large corpus is exhausted, and SentencePiece holds its whole input in memory.
SP_MAX_TRAIN_CHARS = 200_000_000
_SP_SEED = 0
_SP_THREADS = 4  # fixed, not the machine's core count: it is written into the model
_ENCODE_THREADS = os.cpu_count() or 1  # encoding does not depend on it


class TokenizerError(ValueError):
    """A tokenizer file, directory or record that cannot be used."""


class NoTrainingText(TokenizerError):
    """Tokenizer training got no text: every input was empty."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(record: dict, key: str) -> bytes:
    try:
        return base64.b64decode(record[key], validate=True)
    except (KeyError, TypeError, ValueError) as e:
        raise TokenizerError(f"tokenizer record has no valid base64 field {key!r}") from e


class Tokenizer:
    """Base class: text <-> ids. Subclasses set kind, vocab_size and eos_id."""

    kind: str
    vocab_size: int  # number of ids the model must embed
    eos_id: int  # appended after every document in the training stream

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() of each text, on all cores where the backend can (the cache build)."""
        return [self.encode(t) for t in texts]

    def _decode_valid(self, ids: list[int]) -> str:
        raise NotImplementedError

    def decode(self, ids) -> str:
        """Ids -> text. Accepts lists, numpy or jax arrays.

        Ids outside [0, vocab_size) (rows the model's embedding is padded with)
        decode to U+FFFD rather than raising, so sampling never crashes on them.
        """
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        out, run = [], []
        for i in flat:
            if 0 <= i < self.vocab_size:
                run.append(i)
                continue
            if run:
                out.append(self._decode_valid(run))
                run = []
            out.append("\ufffd")
        if run or not out:
            out.append(self._decode_valid(run))
        return "".join(out)

    def to_record(self) -> dict:
        raise NotImplementedError

    @property
    def digest(self) -> str:
        """sha256 of the record: identifies the tokenizer in cache keys."""
        if not hasattr(self, "_digest"):
            text = json.dumps(self.to_record(), sort_keys=True)
            self._digest = hashlib.sha256(text.encode()).hexdigest()
        return self._digest

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, held as its serialised proto bytes."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, origin: str = "<bytes>"):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise TokenizerError(f"{origin} is not a SentencePiece model: {e}") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise TokenizerError(f"{origin}: SentencePiece model has no end-of-sequence piece")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=_ENCODE_THREADS)

    def _decode_valid(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def to_record(self) -> dict:
        return {"format": RECORD_FORMAT, "kind": self.kind, "model": _b64(self._proto)}


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (its `bytes_to_unicode`)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class GPT2Tokenizer(Tokenizer):
    """GPT-2 byte-level BPE from its encoder.json + vocab.bpe, run by tiktoken.

    The files are converted here from their bytes, not through tiktoken's loader,
    which caches by path in a temp dir (stale if the file changes) and cannot take
    bytes from a checkpoint record.
    """

    kind = "gpt2"

    def __init__(self, encoder_json: bytes, vocab_bpe: bytes, origin: str = "<bytes>"):
        import tiktoken

        self._files = (bytes(encoder_json), bytes(vocab_bpe))
        try:
            encoder = json.loads(encoder_json)
            merges = vocab_bpe.decode("utf-8").split("\n")[1:]
        except (ValueError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{origin}: unreadable encoder.json / vocab.bpe: {e}") from None
        byte_of = _gpt2_byte_decoder()

        def to_bytes(piece: str) -> bytes:
            return bytes(byte_of[c] for c in piece)

        try:
            ranks = {bytes([b]): i for i, b in enumerate(byte_of.values())}
            for line in merges:
                if line.strip():
                    first, second = line.split()
                    ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
            special = {k: v for k, v in encoder.items() if k == GPT2_EOS}
            from_json = {to_bytes(k): v for k, v in encoder.items() if k not in special}
        except (KeyError, ValueError, AttributeError) as e:
            raise TokenizerError(f"{origin}: malformed encoder.json / vocab.bpe ({e!r})") from None
        # tiktoken needs ranks that are merge priorities; GPT-2's ids are exactly that.
        if ranks != from_json:
            raise TokenizerError(f"{origin}: encoder.json does not match the merges in vocab.bpe")
        if GPT2_EOS not in special:
            raise TokenizerError(f"{origin}: encoder.json has no {GPT2_EOS} entry")
        self.eos_id = int(special[GPT2_EOS])
        self.vocab_size = max(len(ranks), self.eos_id + 1)
        self._enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=special,
            explicit_n_vocab=self.vocab_size,
        )

    def encode(self, text: str) -> list[int]:
        # Ordinary: "<|endoftext|>" inside a document is text, not a separator.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=_ENCODE_THREADS)

    def _decode_valid(self, ids: list[int]) -> str:
        return self._enc.decode(ids, errors="replace")

    def to_record(self) -> dict:
        return {
            "format": RECORD_FORMAT,
            "kind": self.kind,
            "encoder_json": _b64(self._files[0]),
            "vocab_bpe": _b64(self._files[1]),
        }


def tokenizer_from_record(record: dict) -> Tokenizer:
    """Rebuild the tokenizer a `to_record()` described."""
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise TokenizerError(f"not a tokenizer record of format {RECORD_FORMAT}")
    if record.get("kind") == "sentencepiece":
        return SentencePieceTokenizer(_unb64(record, "model"), origin="tokenizer record")
    if record.get("kind") == "gpt2":
        return GPT2Tokenizer(
            _unb64(record, "encoder_json"), _unb64(record, "vocab_bpe"), origin="tokenizer record"
        )
    raise TokenizerError(f"tokenizer record has unknown kind {record.get('kind')!r}")


def load_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """Load cfg.path: a SentencePiece .model file, or a GPT-2 directory."""
    if not cfg.path:
        raise TokenizerError(f"tokenizer.path is empty (kind={cfg.kind})")
    path = Path(cfg.path)
    if cfg.kind == "sentencepiece":
        if not path.is_file():
            raise TokenizerError(f"tokenizer.path {path}: no such SentencePiece model file")
        return SentencePieceTokenizer(path.read_bytes(), origin=str(path))
    if cfg.kind == "gpt2":
        files = [path / "encoder.json", path / "vocab.bpe"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise TokenizerError(
                f"tokenizer.path {path} must be a directory holding encoder.json and vocab.bpe; "
                f"missing: {', '.join(missing)}"
            )
        return GPT2Tokenizer(files[0].read_bytes(), files[1].read_bytes(), origin=str(path))
    raise TokenizerError(f"unknown tokenizer kind {cfg.kind!r}")


def _read_input(item: str | os.PathLike, as_text: bool) -> str:
    """Text of one training input: see train_sentencepiece for how items are told apart."""
    if not isinstance(item, os.PathLike):
        if as_text or "\n" in item:
            return item
        if not os.path.isfile(item):
            if item and not any(c.isspace() for c in item):
                raise TokenizerError(f"training input {item!r}: no such file")
            return item
    path = Path(item)
    if not path.is_file():
        raise TokenizerError(f"training input {str(path)!r}: no such file")
    return path.read_bytes().decode("utf-8", errors="replace")


def _training_lines(items, max_chars: int, as_text: bool) -> Iterator[str]:
    """Non-empty lines of the inputs, cut to _SP_CHUNK chars, up to max_chars in all."""
    seen = 0
    for item in items:
        for line in _read_input(item, as_text).split("\n"):
            for i in range(0, len(line), _SP_CHUNK):
                yield line[i : i + _SP_CHUNK]
                seen += min(_SP_CHUNK, len(line) - i)
                if seen >= max_chars:
                    return


def train_sentencepiece(
    input_paths_or_texts: Iterable[str | os.PathLike],
    vocab_size: int,
    output_path: str | os.PathLike,
    *,
    texts: bool = False,
    max_chars: int = SP_MAX_TRAIN_CHARS,
) -> Path:
    """Train a byte-fallback BPE SentencePiece model and write it atomically.

    Inputs: os.PathLike items are files (read as utf-8). A str is a file if it names
    one, and text otherwise; a str without whitespace that names no file is taken
    for a mistyped path and is an error. texts=True reads every str as text (for
    documents, which may happen to look like file names).
    The options make decode(encode(x)) == x for any text: identity normalisation
    (no NFKC), no extra-whitespace removal, no dummy leading space, and byte fallback
    so nothing is ever <unk>. (One exception inherent to SentencePiece: a literal
    U+2581 "▁" in the input decodes as a space.) A fixed seed and thread count make
    the model a deterministic function of the input. Written to a temp file and
    renamed, so a reader never sees a partial model.
    """
    import sentencepiece as spm

    output_path = Path(output_path)
    lines = _training_lines(input_paths_or_texts, max_chars, texts)
    first = next(lines, None)
    if first is None:
        raise NoTrainingText("SentencePiece training got no text (every input was empty)")
    buf = io.BytesIO()
    spm.set_random_generator_seed(_SP_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], lines),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9995,
            max_sentence_length=4 * _SP_CHUNK + 16,  # bytes; a chunk is _SP_CHUNK chars
            shuffle_input_sentence=True,
            input_sentence_size=5_000_000,
            num_threads=_SP_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high (4096). Please set it to <= 700."
        raise TokenizerError(f"SentencePiece training failed: {e}") from None
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(f".{output_path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return output_path
