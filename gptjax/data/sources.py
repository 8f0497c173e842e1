"""Where documents come from: each entry of cfg.data.sources becomes a stream of texts.

Sources, in the order given:
  builtin:pydoc        CPython's pydoc_data.topics, one document per topic (sorted by
                       key): a real English corpus on every Python install, so the
                       default config trains with no download and no text in the repo.
  PATH or GLOB         each file is one document; `.jsonl` files give one document
                       per line, from the field cfg.text_field.
  tfds:NAME[:SPLIT]    a prepared TFDS dataset in array_record format, read through
                       tfds.data_source (no TensorFlow); split defaults to train.

Files are decoded as utf-8 with errors="replace": one bad byte in a large crawl should
not stop a run, but it should not pass silently either, so replacements are counted
and logged per file.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from gptjax.config import DataConfig

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["
_TFDS_READ_BATCH = 256
_TFDS_RECORD_BYTES = 4096  # assumed record size when cutting a TFDS split into pieces


class DataError(ValueError):
    """Bad input data or data config; the message names the source (file, line, counts)."""


def _decode(raw: bytes) -> tuple[str, int]:
    """utf-8 with replacement; also returns how many undecodable sequences were replaced."""
    text = raw.decode("utf-8", errors="replace")
    return text, text.count("\ufffd") - raw.count("\ufffd".encode())


def _warn_replaced(where: str, n: int, stats: dict | None) -> None:
    if n:
        log.warning("%s: %d undecodable utf-8 byte sequence(s) replaced by U+FFFD", where, n)
    if stats is not None:
        stats["replaced"] = stats.get("replaced", 0) + n
        if n:
            files = stats.setdefault("replaced_files", {})
            files[where] = files.get(where, 0) + n


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _parse_tfds(spec: str) -> tuple[str, str]:
    name, _, split = spec[len("tfds:") :].partition(":")
    if not name:
        raise DataError(f"source {spec!r}: expected tfds:NAME or tfds:NAME:SPLIT")
    return name, split or "train"


def open_tfds(name: str, split: str, data_dir: str | None):
    """tfds.data_source over a locally prepared (array_record) dataset, never a download;
    TFDS is imported only here (it is heavy). A DataError says how to prepare it."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises several types; its first line says what is wrong
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"cannot open TFDS dataset {name!r} split {split!r} "
            f"(data_dir={data_dir or 'TFDS default'}): {first}. It must be prepared "
            f"in array_record format, e.g. `tfds build {name} --file_format=array_record`."
        ) from None


def _open_tfds(spec: str, cfg: DataConfig):
    name, split = _parse_tfds(spec)
    try:
        return open_tfds(name, split, cfg.tfds_data_dir or None)
    except DataError as e:
        raise DataError(f"source {spec!r}: {e}") from None


def _source_files(spec: str) -> list[Path]:
    """The files a path or glob names, sorted; DataError if there are none."""
    is_glob = any(c in spec for c in _GLOB_CHARS)
    if is_glob:
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    else:
        files = [Path(spec)] if os.path.isfile(spec) else []
    if files:
        return files
    prefix, sep, _ = spec.partition(":")
    if sep and prefix.isidentifier():  # "hf:x", "s3://x": a scheme, not a missing file
        raise DataError(
            f"source {spec!r}: unknown source prefix {prefix + ':'!r} (known: builtin:pydoc, "
            "tfds:NAME[:SPLIT], or a text/.jsonl file path or glob)"
        )
    if is_glob:
        raise DataError(f"source {spec!r}: glob matched no files")
    if os.path.isdir(spec):
        raise DataError(f"source {spec!r} is a directory; name its files with a glob")
    raise DataError(f"source {spec!r}: file not found")


def _check_builtin(spec: str) -> None:
    if spec != "builtin:pydoc":
        raise DataError(f"source {spec!r}: unknown builtin (the one builtin is builtin:pydoc)")


def _jsonl_line_number(path: Path, offset: int, index: int) -> int:
    """The 1-based line number of the index-th line after byte offset (errors only)."""
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + index + 1


def _jsonl_documents(piece: Piece, field: str, stats: dict | None) -> Iterator[str]:
    path, replaced = Path(piece.path), 0
    with open(path, "rb") as f:
        f.seek(piece.start)
        data = f.read(piece.stop - piece.start) if piece.stop >= 0 else f.read()
    for index, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        line, n = _decode(raw)
        replaced += n
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            lineno = _jsonl_line_number(path, piece.start, index)
            raise DataError(
                f"{path}:{lineno}: malformed JSON line ({e.msg}, column {e.colno})"
            ) from None
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            lineno = _jsonl_line_number(path, piece.start, index)
            raise DataError(f"{path}:{lineno}: no string field {field!r} (found {keys})")
        yield text
    _warn_replaced(str(path), replaced, stats)


def _tfds_documents(piece: Piece, cfg: DataConfig, stats: dict | None) -> Iterator[str]:
    spec = piece.spec
    ds = _open_tfds(spec, cfg)
    stop = len(ds) if piece.stop < 0 else min(piece.stop, len(ds))
    replaced = 0
    for start in range(piece.start, stop, _TFDS_READ_BATCH):
        for i, ex in enumerate(
            ds.__getitems__(list(range(start, min(stop, start + _TFDS_READ_BATCH))))
        ):
            value = ex.get(cfg.text_field) if isinstance(ex, dict) else None
            if isinstance(value, bytes):
                value, n = _decode(value)
                replaced += n
            if not isinstance(value, str):
                keys = sorted(ex) if isinstance(ex, dict) else type(ex).__name__
                raise DataError(
                    f"source {spec!r} record {start + i}: no text field {cfg.text_field!r} "
                    f"(found {keys})"
                )
            yield value
    _warn_replaced(f"source {spec!r}", replaced, stats)


@dataclasses.dataclass(frozen=True)
class Piece:
    """A contiguous run of one source's documents: a whole text file; a byte range of a
    .jsonl file starting at a line start; a range of builtin or TFDS records. stop -1:
    to the end. size: its input bytes (characters for builtin), for grouping pieces."""

    spec: str
    kind: str  # "builtin" | "text" | "jsonl" | "tfds"
    path: str = ""
    start: int = 0
    stop: int = -1
    size: int = 0


def _jsonl_pieces(spec: str, path: Path, max_bytes: int | None) -> Iterator[Piece]:
    size = path.stat().st_size
    if not max_bytes or size <= max_bytes:
        yield Piece(spec, "jsonl", str(path), 0, -1, size)
        return
    start = 0
    with open(path, "rb") as f:
        while start < size:
            f.seek(min(size, start + max_bytes))
            f.readline()  # to the next line start
            stop = min(size, f.tell())
            yield Piece(spec, "jsonl", str(path), start, stop, stop - start)
            start = stop


def source_pieces(cfg: DataConfig, max_bytes: int | None = None) -> list[Piece]:
    """Every source as pieces in config order (files sorted within a glob); with
    max_bytes, large .jsonl files and TFDS splits are cut into pieces of about that size."""
    if not cfg.sources:
        raise DataError("data.sources is empty")
    out = []
    for spec in cfg.sources:
        if spec.startswith("builtin:"):
            _check_builtin(spec)
            docs = _pydoc_documents()
            out.append(Piece(spec, "builtin", "", 0, -1, sum(len(d) for d in docs)))
        elif spec.startswith("tfds:"):
            if not max_bytes:
                out.append(Piece(spec, "tfds"))
                continue
            n = len(_open_tfds(spec, cfg))
            step = max(1, max_bytes // _TFDS_RECORD_BYTES)
            for a in range(0, n, step):
                b = min(n, a + step)
                out.append(Piece(spec, "tfds", "", a, b, (b - a) * _TFDS_RECORD_BYTES))
        else:
            for path in _source_files(spec):
                if path.suffix == ".jsonl":
                    out += _jsonl_pieces(spec, path, max_bytes)
                else:
                    out.append(Piece(spec, "text", str(path), 0, -1, path.stat().st_size))
    return out


def piece_documents(piece: Piece, cfg: DataConfig, stats: dict | None = None) -> Iterator[str]:
    """The documents of one piece, in order (see iter_documents for stats)."""
    if piece.kind == "builtin":
        docs = _pydoc_documents()
        yield from docs[piece.start : None if piece.stop < 0 else piece.stop]
    elif piece.kind == "tfds":
        yield from _tfds_documents(piece, cfg, stats)
    elif piece.kind == "jsonl":
        yield from _jsonl_documents(piece, cfg.text_field, stats)
    else:
        text, n = _decode(Path(piece.path).read_bytes())
        _warn_replaced(piece.path, n, stats)
        if not text and stats is not None:
            stats.setdefault("empty_files", []).append(piece.path)
        yield text


def iter_documents(cfg: DataConfig, stats: dict | None = None) -> Iterator[str]:
    """Every document of every source, in config order (files sorted within a glob).
    stats, when given, receives the total of replaced undecodable sequences ("replaced"),
    the count per file ("replaced_files") and the empty text files ("empty_files")."""
    for piece in source_pieces(cfg):
        yield from piece_documents(piece, cfg, stats)


def _file_stats(paths) -> list:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def fingerprint_sources(cfg: DataConfig) -> list:
    """A JSON-able description that changes whenever the documents could have changed.

    Files: path, size and mtime (cheap; no read). builtin:pydoc: a hash of the text,
    which moves with the Python version. tfds: the prepared dataset's files.
    """
    out = []
    for spec in cfg.sources:
        if spec.startswith("builtin:"):
            _check_builtin(spec)
            digest = hashlib.sha256("\0".join(_pydoc_documents()).encode()).hexdigest()
            out.append([spec, digest])
        elif spec.startswith("tfds:"):
            data_dir = Path(str(_open_tfds(spec, cfg).dataset_info.data_dir))
            out.append([spec, _file_stats(sorted(p for p in data_dir.rglob("*") if p.is_file()))])
        else:
            out.append([spec, _file_stats(_source_files(spec))])
    return out
