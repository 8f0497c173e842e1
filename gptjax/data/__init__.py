"""Corpus -> tokens -> packed windows -> grain batches.

sources: documents from builtin:pydoc, text/jsonl files and TFDS; cache: tokenise once
into atomic on-disk shards inside a training run; prepare/shards/beam: `gptjax data
prepare`, the same at corpus scale into ArrayRecord shards (prepared:DIR); loader:
tokenizer, train/val windows and iterators.

The names below are loaded on first use (PEP 562), so that `gptjax data prepare`'s
worker processes import the sources and the tokenizer without grain and JAX.
"""

import importlib

from gptjax.data.sources import DataError, iter_documents

_LAZY = {
    "TokenCache": "gptjax.data.cache",
    "build_cache": "gptjax.data.cache",
    "TokenWindows": "gptjax.data.loader",
    "eval_batches": "gptjax.data.loader",
    "get_tokenizer": "gptjax.data.loader",
    "load_splits": "gptjax.data.loader",
    "prepared_dir": "gptjax.data.loader",
    "split_segments": "gptjax.data.loader",
    "train_iterator": "gptjax.data.loader",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gptjax.data' has no attribute {name!r}")


__all__ = ["DataError", "iter_documents", *_LAZY]
