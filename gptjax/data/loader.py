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
from gptjax.tokenizer import (
    NoTrainingText,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_sentencepiece,
)

log = logging.getLogger(__name__)


class TokenWindows:
    """Packed windows over token segments; a grain RandomAccessDataSource.

    `tag` (a digest of the token stream) goes into repr(), which the saved data position
    records (TrainBatches.set_state compares it), so a resume onto other tokens fails loudly
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
            docs = iter_documents(cfg.data)
            try:
                train_sentencepiece(docs, tc.vocab_size, path, texts=True)
            except NoTrainingText:
                raise DataError(
                    f"empty corpus: sources {list(cfg.data.sources)} gave no text to train "
                    "the tokenizer on"
                ) from None
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


def _process_rows(global_batch: int, purpose: str) -> tuple[int, int]:
    """(first row, rows) of a global batch that this process reads."""
    procs = jax.process_count()
    if global_batch % procs:
        raise DataError(
            f"{purpose}: a global batch of {global_batch} sequences does not split over "
            f"{procs} processes"
        )
    rows = global_batch // procs
    return jax.process_index() * rows, rows


def _check_size(source: TokenWindows, batch_size: int, purpose: str) -> None:
    """Raise unless the split holds at least one full global batch."""
    if batch_size <= 0:
        raise DataError(f"{purpose}: batch size must be positive, got {batch_size}")
    if len(source) < batch_size:
        raise DataError(
            f"{source.name} split has {len(source)} windows of {source.seq_len + 1} tokens "
            f"({source.n_tokens} tokens) but {purpose} needs a global batch of "
            f"{jax.process_count()} process(es) x {batch_size // jax.process_count()} = "
            f"{batch_size}: add data or lower the batch size or model.seq_len, or "
            f"{'lower' if source.name == 'train' else 'raise'} data.val_fraction"
        )


class TrainBatches:
    """Endless shuffled batches: this process's rows of each global batch.

    The global stream is one shuffled order of all windows per epoch (grain's
    index_shuffle, reseeded each epoch); global batch g is stream positions
    [g * B, (g + 1) * B) and process p reads only its rows, [g * B + p * b, g * B +
    (p + 1) * b) with b = B / processes. So the global batch, and which device holds
    which row, do not depend on the number of processes, and the position (windows of
    the stream consumed, the same on every process) resumes on any process count.
    """

    def __init__(self, source: TokenWindows, global_batch: int, seed: int):
        _check_size(source, global_batch, "training")
        self.first_row, self.rows = _process_rows(global_batch, "training")
        self.global_batch, self.seed, self.source = global_batch, seed % 2**32, source
        self.position = 0
        self._stream = grain.MapDataset.source(source).shuffle(seed=self.seed)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        start = self.position + self.first_row
        batch = np.stack([self._stream[start + j] for j in range(self.rows)])
        self.position += self.global_batch
        return batch

    def get_state(self) -> dict:
        return {"position": self.position, "seed": self.seed, "source": repr(self.source)}

    def set_state(self, state: dict) -> None:
        """Resume at a saved position; refuses another DataSource or seed, which would
        silently read other windows."""
        if state["source"] != repr(self.source):
            raise ValueError(
                f"the saved data position is for DataSource {state['source']}, not "
                f"{self.source!r}: the training data changed since the checkpoint"
            )
        if state["seed"] != self.seed:
            raise ValueError(
                f"the saved data position is for seed {state['seed']}, not {self.seed}"
            )
        self.position = int(state["position"])


def train_iterator(source: TokenWindows, global_batch: int, seed: int) -> TrainBatches:
    """Endless shuffled [global_batch / processes, seq_len + 1] int32 batches: this
    process's rows of each global batch (see TrainBatches); get_state()/set_state()
    resume exactly, on any number of processes."""
    return TrainBatches(source, global_batch, seed)


def eval_batches(source: TokenWindows, global_batch: int, n_batches: int) -> list[np.ndarray]:
    """This process's rows of the first n_batches global batches (fewer if the split is
    smaller) of an in-order pass: the same global batches on any number of processes."""
    _check_size(source, global_batch, "evaluation")
    first, rows = _process_rows(global_batch, "evaluation")
    n = min(n_batches, len(source) // global_batch)
    return [np.stack([source[b * global_batch + first + j] for j in range(rows)]) for b in range(n)]
