"""Corpus -> token cache -> packed windows -> grain batches.

sources: documents from builtin:pydoc, text/jsonl files and TFDS; cache: tokenise once
into atomic on-disk shards; loader: tokenizer, train/val windows and iterators.
"""

from gptjax.data.cache import TokenCache, build_cache
from gptjax.data.loader import (
    TokenWindows,
    eval_batches,
    get_tokenizer,
    load_splits,
    split_segments,
    train_iterator,
)
from gptjax.data.sources import DataError, iter_documents

__all__ = [
    "DataError",
    "TokenCache",
    "TokenWindows",
    "build_cache",
    "eval_batches",
    "get_tokenizer",
    "iter_documents",
    "load_splits",
    "split_segments",
    "train_iterator",
]
