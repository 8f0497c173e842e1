"""CoLA (GLUE tsv, no header: source, label, mark, sentence), classification;
Matthews correlation picks the best epoch. Not shipped: set task.train / task.dev.

Give the files with --config.task.train=... --config.task.dev=..., e.g. cola/train.tsv
and cola/dev.tsv.
"""

from gptjax.config import FinetuneConfig, TaskConfig


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task=TaskConfig(name="cola"),
    )
