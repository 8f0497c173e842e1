"""MRPC (GLUE tsv: Quality, #1 ID, #2 ID, #1 String, #2 String), similarity: both
orderings, [extract] states added; F1 picks the best epoch. Not shipped: set the paths.

Give the files with --config.task.train=... --config.task.dev=..., e.g. mrpc/train.tsv
and mrpc/dev.tsv.
"""

from gptjax.config import FinetuneConfig, TaskConfig


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task=TaskConfig(name="mrpc"),
    )
