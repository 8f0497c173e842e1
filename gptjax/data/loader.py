"""From config to batches: the tokenizer, the train/val windows and their iterators.

Packing (the one implementation, for the in-process token cache and for prepared
ArrayRecord shards alike): a split is a list of contiguous token segments (cut at
shard boundaries and at the train/val split). Each segment of L tokens gives
(L - 1) // seq_len windows of seq_len + 1 tokens at stride seq_len, so consecutive
windows share one token and every token after a segment's first is a prediction
target exactly once. Windows never
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

from gptjax.config import Config, DataConfig
from gptjax.data.cache import build_cache
from gptjax.data.shards import Prepared, describe_tokenizer, open_prepared
from gptjax.data.sources import DataError, iter_documents
from gptjax.tokenizer import (
    NoTrainingText,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    train_sentencepiece,
)

log = logging.getLogger(__name__)

PREPARED = "prepared:"
_ENDLESS = 1 << 40  # global batches in a training pipeline: more than any run takes


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
    """cfg.tokenizer.path if set; else a prepared corpus's own tokenizer; else
    (sentencepiece) WORKDIR/tokenizer.model, trained on the corpus the first time.

    The tokenizer is trained on all documents, the held-out tail included: the split
    is defined on tokens, which do not exist before the tokenizer does.
    """
    tc = cfg.tokenizer
    try:
        if tc.path:
            return load_tokenizer(tc)
        if prepared := prepared_dir(cfg.data):
            return open_prepared(prepared).tokenizer
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


def prepared_dir(cfg: DataConfig) -> Path | None:
    """DIR of a `prepared:DIR` source (which must be the only one), else None."""
    prepared = [s for s in cfg.sources if s.startswith(PREPARED)]
    if not prepared:
        return None
    if len(cfg.sources) > 1:
        raise DataError(
            f"data.sources {list(cfg.sources)}: a {PREPARED}DIR source must be the only one "
            "(prepare all the sources into one directory)"
        )
    return Path(prepared[0][len(PREPARED) :])


def check_tokenizer(prepared: Prepared, tokenizer: Tokenizer) -> None:
    """DataError unless the run's tokenizer is the one the directory was prepared with."""
    if prepared.tokenizer.digest != tokenizer.digest:
        raise DataError(
            f"prepared data {prepared.path} was tokenised with "
            f"{describe_tokenizer(prepared.tokenizer)}, but this run's tokenizer is "
            f"{describe_tokenizer(tokenizer)}: prepare the data again with this tokenizer, "
            "or leave tokenizer.path empty to train with the directory's own"
        )


def load_splits(
    cfg: Config, tokenizer: Tokenizer, workdir: Path
) -> tuple[TokenWindows, TokenWindows]:
    """(train, val) windows of cfg.model.seq_len + 1 tokens from a prepared directory
    (`prepared:DIR`) or else the token cache.

    Validation is the last cfg.data.val_fraction of the token stream.
    """
    if path := prepared_dir(cfg.data):
        prepared = open_prepared(path)
        check_tokenizer(prepared, tokenizer)
        segments, tag = prepared.segments(), prepared.digest[:16]
    else:
        root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(workdir) / "token_cache"
        cache = build_cache(cfg.data, tokenizer, root)
        segments, tag = cache.shards, cache.tokens_sha256[:16]
    train, val = split_segments(segments, cfg.data.val_fraction)
    seq_len = cfg.model.seq_len
    splits = (TokenWindows(train, seq_len, "train", tag), TokenWindows(val, seq_len, "val", tag))
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


class GlobalRows:
    """k -> this process's rows of the k-th global batch after stream position `start`:
    stream[start + k * B + first_row + j] for j < rows. The one definition of a batch,
    picklable for grain workers."""

    def __init__(self, stream, start: int, global_batch: int, first_row: int, rows: int):
        self.stream, self.start, self.global_batch = stream, start, global_batch
        self.first_row, self.rows = first_row, rows

    def __call__(self, k) -> np.ndarray:
        first = self.start + int(k) * self.global_batch + self.first_row
        return np.stack([self.stream[first + j] for j in range(self.rows)])


class TrainBatches:
    """Endless shuffled batches: this process's rows of each global batch.

    The global stream is one shuffled order of all windows per epoch (grain's
    index_shuffle, reseeded each epoch); global batch g is stream positions
    [g * B, (g + 1) * B) and process p reads only its rows, [g * B + p * b, g * B +
    (p + 1) * b) with b = B / processes. So the global batch, and which device holds
    which row, do not depend on the number of processes, and the position (windows of
    the stream consumed, the same on every process) resumes on any process count.

    workers > 0: the batches are read by a grain pipeline over the global batch indices
    from the current position, in that many worker processes, each `prefetch` batches
    ahead. Only the position is state, not grain's iterator (whose state depends on the
    process and worker counts), so a resume rebuilds the pipeline at the position.
    """

    def __init__(
        self,
        source: TokenWindows,
        global_batch: int,
        seed: int,
        workers: int = 0,
        prefetch: int = 2,
    ):
        _check_size(source, global_batch, "training")
        self.first_row, self.rows = _process_rows(global_batch, "training")
        self.global_batch, self.seed, self.source = global_batch, seed % 2**32, source
        self.workers, self.prefetch = workers, prefetch
        self.position = 0
        self._stream = grain.MapDataset.source(source).shuffle(seed=self.seed)
        self._batches = None  # the worker pipeline's iterator, from self.position

    def __iter__(self):
        return self

    def _rows(self) -> GlobalRows:
        return GlobalRows(self._stream, self.position, self.global_batch, self.first_row, self.rows)

    def _pipeline(self):
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; keep defaults
            flags.FLAGS.mark_as_parsed()
        ds = grain.MapDataset.range(_ENDLESS).map(self._rows())
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=0))
        options = grain.MultiprocessingOptions(self.workers, per_worker_buffer_size=self.prefetch)
        return iter(ds.mp_prefetch(options))

    def __next__(self) -> np.ndarray:
        if self.workers:
            if self._batches is None:
                self._batches = self._pipeline()
            batch = next(self._batches)
        else:
            batch = self._rows()(0)
        self.position += self.global_batch
        return batch

    def close(self) -> None:
        """Stop the worker processes (also done when garbage-collected)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

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
        self.close()
        self.position = int(state["position"])


def train_iterator(
    source: TokenWindows, global_batch: int, seed: int, workers: int = 0, prefetch: int = 2
) -> TrainBatches:
    """Endless shuffled [global_batch / processes, seq_len + 1] int32 batches: this
    process's rows of each global batch (see TrainBatches); get_state()/set_state()
    resume exactly, on any number of processes."""
    return TrainBatches(source, global_batch, seed, workers, prefetch)


def eval_batches(source: TokenWindows, global_batch: int, n_batches: int) -> list[np.ndarray]:
    """This process's rows of the first n_batches global batches (fewer if the split is
    smaller) of an in-order pass: the same global batches on any number of processes."""
    _check_size(source, global_batch, "evaluation")
    first, rows = _process_rows(global_batch, "evaluation")
    n = min(n_batches, len(source) // global_batch)
    return [np.stack([source[b * global_batch + first + j] for j in range(rows)]) for b in range(n)]
