"""Tokenise the corpus once into an on-disk cache of token shards.

Layout: CACHE_ROOT/KEY/{manifest.json, shard_00000.npy, ...}. KEY hashes everything
the tokens depend on (sources with file sizes and mtimes, text_field, the tokenizer's
record), so a changed input gets a new cache rather than stale tokens.

The stream is every non-empty document's tokens followed by EOS, in source order.
It is written into a temp directory beside the final one and renamed into place
only once complete (manifest last): a directory at CACHE_ROOT/KEY is complete by
construction, and an interrupted run leaves nothing that a later run would trust.
The temp directory of an exception is removed; one left by a killed process is
never read (a different name) and can be deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptjax.config import DataConfig
from gptjax.data.shards import token_dtype
from gptjax.data.sources import DataError, fingerprint_sources, iter_documents
from gptjax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CACHE_VERSION = 1
MANIFEST = "manifest.json"
SHARD_TOKENS = 1 << 24  # tokens per shard: 32 MiB as uint16, so memmaps stay modest


@dataclasses.dataclass(frozen=True)
class TokenCache:
    key: str
    path: Path
    shards: tuple[np.ndarray, ...]  # read-only memmaps, in stream order
    tokens_sha256: str  # of the stream itself: equal tokens, equal digest, whatever the mtimes

    @property
    def total_tokens(self) -> int:
        return sum(len(s) for s in self.shards)


def cache_key(cfg: DataConfig, tokenizer: Tokenizer, shard_tokens: int) -> str:
    desc = {
        "version": CACHE_VERSION,
        "sources": fingerprint_sources(cfg),
        "text_field": cfg.text_field,
        "tokenizer": tokenizer.digest,
        "shard_tokens": shard_tokens,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32]


def _write_shard(path: Path, tokens: np.ndarray) -> None:
    np.save(path, tokens)


def _batches(docs, max_docs: int = 512, max_chars: int = 1 << 23):
    """Non-empty documents in groups, so the tokenizer can encode each group in parallel."""
    group, chars = [], 0
    for doc in docs:
        if doc:
            group.append(doc)
            chars += len(doc)
        if group and (len(group) >= max_docs or chars >= max_chars):
            yield group
            group, chars = [], 0
    if group:
        yield group


def _write_cache(tmp: Path, cfg: DataConfig, tokenizer: Tokenizer, shard_tokens: int) -> dict:
    """Tokenise every document into shards under tmp; returns the manifest written last."""
    dtype = token_dtype(tokenizer.vocab_size)
    buf = np.empty(shard_tokens, dtype)
    shards, fill, total, n_docs = [], 0, 0, 0
    digest = hashlib.sha256()

    def flush():
        name = f"shard_{len(shards):05d}.npy"
        _write_shard(tmp / name, buf[:fill])
        digest.update(buf[:fill].tobytes())
        shards.append({"file": name, "tokens": fill})

    bar = tqdm(desc="tokenizing", unit=" docs", mininterval=1.0)
    stats: dict = {}
    for docs in _batches(iter_documents(cfg, stats)):
        for ids in tokenizer.encode_batch(docs):
            ids = np.asarray(ids + [tokenizer.eos_id], dtype=dtype)
            total += len(ids)
            pos = 0
            while pos < len(ids):
                take = min(shard_tokens - fill, len(ids) - pos)
                buf[fill : fill + take] = ids[pos : pos + take]
                fill, pos = fill + take, pos + take
                if fill == shard_tokens:
                    flush()
                    fill = 0
        n_docs += len(docs)
        bar.update(len(docs))
        bar.set_postfix_str(f"{total:,} tokens", refresh=False)
    bar.close()
    if fill:
        flush()
    if total == 0:
        raise DataError(f"empty corpus: sources {list(cfg.sources)} gave no text to tokenize")
    manifest = {
        "version": CACHE_VERSION,
        "dtype": dtype.name,
        "total_tokens": total,
        "tokens_sha256": digest.hexdigest(),
        "documents": n_docs,
        "replaced_undecodable": stats.get("replaced", 0),  # utf-8 sequences -> U+FFFD
        "sources": list(cfg.sources),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        "shards": shards,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def open_cache(path: Path) -> TokenCache:
    """Memory-map a complete cache directory, checking it against its manifest."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        shards = tuple(np.load(path / s["file"], mmap_mode="r") for s in manifest["shards"])
        lengths = [s["tokens"] for s in manifest["shards"]]
        tokens_sha256 = manifest["tokens_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"token cache {path} is unreadable ({e}); delete it to rebuild") from None
    if [len(s) for s in shards] != lengths or any(s.dtype != manifest["dtype"] for s in shards):
        raise DataError(f"token cache {path} does not match its manifest; delete it to rebuild")
    return TokenCache(key=path.name, path=path, shards=shards, tokens_sha256=tokens_sha256)


def build_cache(
    cfg: DataConfig, tokenizer: Tokenizer, cache_root: Path, shard_tokens: int | None = None
) -> TokenCache:
    """The cache for these sources and tokenizer: reused if present, else built atomically."""
    shard_tokens = shard_tokens or SHARD_TOKENS
    cache_root = Path(cache_root)
    key = cache_key(cfg, tokenizer, shard_tokens)
    final = cache_root / key
    if final.exists():
        return open_cache(final)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _write_cache(tmp, cfg, tokenizer, shard_tokens)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not another process winning the race
                raise
        log.info(
            "token cache %s: %d documents, %d tokens in %d shard(s), %d undecodable utf-8 "
            "sequence(s) replaced",
            final,
            manifest["documents"],
            manifest["total_tokens"],
            len(manifest["shards"]),
            manifest["replaced_undecodable"],
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_cache(final)
