"""From config to batches: the tokenizer, the train/val windows and their iterators.

Packing: a split is a list of contiguous token segments (cut at shard boundaries and
at the train/val split). Each segment of L tokens gives (L - 1) // seq_len windows of
seq_len + 1 tokens at stride seq_len, so consecutive windows share one token and every
token after a segment's first is a prediction target exactly once. Windows never
cross a segment; the < seq_len tokens left at a segment's end are unused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import grain
import jax
import numpy as np

from gptjax.config import Config
from gptjax.data.cache import build_cache
from gptjax.data.sources import DataError, iter_documents
from gptjax.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_sentencepiece

log = logging.getLogger(__name__)


class TokenWindows:
    """Packed windows over token segments; a grain RandomAccessDataSource.

    `tag` (a digest of the token stream) goes into repr(): grain checks repr(source)
    when an iterator state is restored, so a resume onto other tokens fails loudly
    instead of silently reading other windows, while a re-copied corpus with new
    mtimes (a new cache, the same tokens) still resumes.
    """

    def __init__(self, segments: Sequence[np.ndarray], seq_len: int, name: str, tag: str = ""):
        if seq_len <= 0:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.seq_len, self.name, self.tag = seq_len, name, tag
        self._segments = list(segments)
        counts = [max(0, (len(s) - 1) // seq_len) for s in self._segments]
        self._first = np.cumsum([0] + counts)  # index of each segment's first window
        self.n_tokens = int(sum(len(s) for s in self._segments))

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, i) -> np.ndarray:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} {self.name} windows")
        seg = int(np.searchsorted(self._first, i, side="right")) - 1
        start = (i - int(self._first[seg])) * self.seq_len
        return np.asarray(self._segments[seg][start : start + self.seq_len + 1], dtype=np.int32)

    def __repr__(self) -> str:
        return (
            f"TokenWindows(name={self.name!r}, tag={self.tag!r}, seq_len={self.seq_len}, "
            f"windows={len(self)})"
        )


def split_segments(
    shards: Sequence[np.ndarray], val_fraction: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Cut the stream: the last round(val_fraction * total) tokens are validation.

    The split is in token space and at the tail so that it needs no second pass over
    the documents and train and val never share a window.
    """
    total = sum(len(s) for s in shards)
    cut = total - int(round(total * val_fraction))
    train, val, pos = [], [], 0
    for s in shards:
        end = pos + len(s)
        if cut > pos:
            train.append(s[: min(cut, end) - pos])
        if cut < end:
            val.append(s[max(cut, pos) - pos :])
        pos = end
    return train, val


def get_tokenizer(cfg: Config, workdir: Path) -> Tokenizer:
    """cfg.tokenizer.path if set; else (sentencepiece) WORKDIR/tokenizer.model, trained
    on the corpus the first time.

    The tokenizer is trained on all documents, the held-out tail included: the split
    is defined on tokens, which do not exist before the tokenizer does.
    """
    tc = cfg.tokenizer
    try:
        if tc.path:
            return load_tokenizer(tc)
        if tc.kind != "sentencepiece":
            raise DataError(
                f"tokenizer.kind={tc.kind} needs tokenizer.path "
                "(a directory holding encoder.json and vocab.bpe)"
            )
        path = Path(workdir) / "tokenizer.model"
        if not path.is_file():
            log.info("training a %d-piece SentencePiece model into %s", tc.vocab_size, path)
            train_sentencepiece(iter_documents(cfg.data), tc.vocab_size, path, texts=True)
        return load_tokenizer(dataclasses.replace(tc, path=str(path)))
    except TokenizerError as e:
        raise DataError(str(e)) from e


def load_splits(
    cfg: Config, tokenizer: Tokenizer, workdir: Path
) -> tuple[TokenWindows, TokenWindows]:
    """(train, val) windows of cfg.model.seq_len + 1 tokens from the token cache.

    Validation is the last cfg.data.val_fraction of the token stream.
    """
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(workdir) / "token_cache"
    cache = build_cache(cfg.data, tokenizer, root)
    train, val = split_segments(cache.shards, cfg.data.val_fraction)
    seq_len = cfg.model.seq_len
    splits = (
        TokenWindows(train, seq_len, "train", cache.tokens_sha256[:16]),
        TokenWindows(val, seq_len, "val", cache.tokens_sha256[:16]),
    )
    for s in splits:
        log.info("%s split: %d tokens, %d windows of %d", s.name, s.n_tokens, len(s), seq_len + 1)
    return splits


def _check_size(source: TokenWindows, batch_size: int, purpose: str) -> int:
    """Raise unless every process gets at least one full batch; returns process count."""
    if batch_size <= 0:
        raise DataError(f"{purpose}: batch size must be positive, got {batch_size}")
    procs = jax.process_count()
    if len(source) < batch_size * procs:
        raise DataError(
            f"{source.name} split has {len(source)} windows of {source.seq_len + 1} tokens "
            f"({source.n_tokens} tokens) but {purpose} needs {batch_size} per process x "
            f"{procs} process(es) = {batch_size * procs}: add data or lower the batch size "
            f"or model.seq_len, or {'lower' if source.name == 'train' else 'raise'} "
            "data.val_fraction"
        )
    return procs


def train_iterator(source: TokenWindows, batch_size: int, seed: int):
    """Endless shuffled batches [batch_size, seq_len + 1] int32 for this process.

    batch_size is per process. Each process reads its own contiguous share of the
    windows (ShardByJaxProcess), shuffled with a per-epoch seed. worker_count=0 keeps
    it deterministic, so get_state()/set_state() resume exactly.
    """
    _check_size(source, batch_size, "training")
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
        shuffle=True,
        num_epochs=None,
        seed=seed % 2**32,
    )
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[grain.transforms.Batch(batch_size=batch_size, drop_remainder=True)],
        worker_count=0,
    )
    return iter(loader)


def eval_batches(source: TokenWindows, batch_size: int, n_batches: int) -> list[np.ndarray]:
    """The first n_batches (fewer if the split is smaller) of an in-order pass.

    This process gets the same contiguous share that ShardByJaxProcess would give it.
    """
    procs = _check_size(source, batch_size, "evaluation")
    share = len(source) // procs
    start = jax.process_index() * share
    n = min(n_batches, share // batch_size)
    return [
        np.stack([source[start + b * batch_size + j] for j in range(batch_size)]) for b in range(n)
    ]
