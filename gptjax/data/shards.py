"""A prepared corpus on disk: ArrayRecord shards of the token stream and their manifest.

Layout of DIR (written by gptjax.data.prepare):
  manifest.json                 MANIFEST_FORMAT: tokenizer record, sources fingerprint,
                                counts, the stream digest and every shard's digest
  shard_00000.arrayrecord, ...  shard k: the tokens of the documents of work unit k,
                                each document followed by EOS, in records of
                                `record_tokens` tokens (the last one shorter)

Records are fixed runs of the stream rather than one document each, so a training
window of seq_len + 1 tokens is at most a few record reads whatever the documents'
lengths; document boundaries stay in the stream as EOS. A shard is one segment of
the packing (gptjax.data.loader): windows never cross it.

A shard's sha256 is of its file's bytes; the stream digest is sha256 over the shards'
token digests in order, so it names the tokens and their cut into shards (which the
windows depend on) and is computed without a second pass over the data. Opening checks
every shard's size against the manifest (a torn or truncated write); a re-run of
`gptjax data prepare` on a complete DIR checks every digest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from gptjax.data.sources import DataError
from gptjax.tokenizer import Tokenizer, TokenizerError, tokenizer_from_record

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gptjax-prepared-1"
RECORD_TOKENS = 1 << 14  # 32 KiB as uint16: one or two reads per training window
_WRITER_OPTIONS = "group_size:1,zstd:3"  # a record alone is one chunk: random access


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.arrayrecord"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_shard(path: Path, tokens: np.ndarray, record_tokens: int = RECORD_TOKENS) -> dict:
    """Write tokens as an ArrayRecord file (via PATH.tmp, then renamed): its manifest entry."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), _WRITER_OPTIONS)
    try:
        for start in range(0, len(tokens), record_tokens):
            writer.write(tokens[start : start + record_tokens].tobytes())
    finally:
        writer.close()
    os.replace(tmp, path)
    return {
        "file": path.name,
        "tokens": int(len(tokens)),
        "records": -(-len(tokens) // record_tokens),
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
    }


def stream_sha256(shards: list[dict]) -> str:
    return hashlib.sha256("".join(s["tokens_sha256"] for s in shards).encode()).hexdigest()


class RecordSegment:
    """Tokens [start, start + length) of one shard, read on demand from a grain
    ArrayRecordDataSource over all shards. Slicing gives a view; np.asarray reads it.
    Picklable (the data source reopens its files), so grain workers can hold one."""

    def __init__(
        self, source, first_record: int, record_tokens: int, dtype: str, start=0, length=0
    ):
        self._source, self._first = source, first_record
        self._record_tokens, self._dtype = record_tokens, np.dtype(dtype)
        self._start, self._length = start, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, sl: slice) -> RecordSegment:
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("RecordSegment takes contiguous slices only")
        start, stop, _ = sl.indices(self._length)
        stop = max(start, stop)
        return RecordSegment(
            self._source, self._first, self._record_tokens, self._dtype.name,
            self._start + start, stop - start,
        )  # fmt: skip

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if not self._length:
            return np.zeros(0, dtype or self._dtype)
        r = self._record_tokens
        first, last = self._start // r, (self._start + self._length - 1) // r
        keys = list(range(self._first + first, self._first + last + 1))
        raw = b"".join(self._source.__getitems__(keys))
        out = np.frombuffer(raw, self._dtype)
        off = self._start - first * r
        out = out[off : off + self._length]
        return out.astype(dtype) if dtype is not None else out


@dataclasses.dataclass(frozen=True)
class Prepared:
    path: Path
    manifest: dict
    tokenizer: Tokenizer

    @property
    def digest(self) -> str:
        return self.manifest["stream_sha256"]

    def segments(self) -> list[RecordSegment]:
        """One lazily read segment per shard, in stream order."""
        import grain

        shards = self.manifest["shards"]
        source = grain.sources.ArrayRecordDataSource([str(self.path / s["file"]) for s in shards])
        out, first = [], 0
        for s in shards:
            out.append(
                RecordSegment(
                    source,
                    first,
                    self.manifest["record_tokens"],
                    self.manifest["dtype"],
                    0,
                    s["tokens"],
                )  # fmt: skip
            )
            first += s["records"]
        return out


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"prepared data {path}: no such directory (run `gptjax data prepare`)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise DataError(
            f"prepared data {path} has no {MANIFEST}: not a complete `gptjax data prepare` "
            "output (an interrupted one is never renamed into place)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"prepared data {path}: unreadable {MANIFEST} ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"prepared data {path}: {MANIFEST} is not of format {MANIFEST_FORMAT}")
    return manifest


def check_shards(path: Path, manifest: dict, full: bool = False) -> None:
    """DataError naming the first shard whose size (or, full, sha256) differs."""
    for s in manifest["shards"]:
        f = Path(path) / s["file"]
        if not f.is_file():
            raise DataError(f"prepared data {path}: shard {s['file']} is missing")
        size = f.stat().st_size
        if size != s["bytes"]:
            raise DataError(
                f"prepared data {path}: shard {s['file']} has {size} bytes, the manifest "
                f"{s['bytes']} (a torn or altered write): prepare it again"
            )
        if full and file_sha256(f) != s["sha256"]:
            raise DataError(
                f"prepared data {path}: shard {s['file']} does not match its sha256 in the "
                "manifest (corrupted or altered): prepare it again"
            )


def open_prepared(path: Path, full_check: bool = False) -> Prepared:
    """A complete prepared directory, its shards checked against the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        tokenizer = tokenizer_from_record(manifest["tokenizer"]["record"])
        check_shards(path, manifest, full_check)
    except (KeyError, TypeError) as e:
        raise DataError(f"prepared data {path}: malformed {MANIFEST} ({e!r})") from None
    except TokenizerError as e:
        raise DataError(f"prepared data {path}: {e}") from None
    return Prepared(path=path, manifest=manifest, tokenizer=tokenizer)


def describe_tokenizer(tokenizer: Tokenizer) -> str:
    return f"{tokenizer.kind} (vocab {tokenizer.vocab_size}, sha256 {tokenizer.digest[:12]})"
