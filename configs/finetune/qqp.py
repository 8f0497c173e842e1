"""QQP (GLUE tsv: id, qid1, qid2, question1, question2, is_duplicate), similarity;
F1 picks the best epoch. Not shipped: set the paths.

Give the files with --config.task.train=... --config.task.dev=..., e.g. qqp/train.tsv
and qqp/dev.tsv.
"""

from gptjax.config import FinetuneConfig, TaskConfig


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task=TaskConfig(name="qqp"),
    )
