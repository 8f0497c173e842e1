"""STS-B (GLUE tsv, score 0-5 in the last column), similarity with a regression
head (squared error on score / 5); Pearson picks the best epoch, Spearman is reported.
Not shipped: set the paths.

Give the files with --config.task.train=... --config.task.dev=..., e.g. stsb/train.tsv
and stsb/dev.tsv.
"""

from gptjax.config import FinetuneConfig, TaskConfig


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task=TaskConfig(name="stsb"),
    )
