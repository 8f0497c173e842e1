"""RACE, multiple choice over 4 answers: [start] article question [delim] answer_k
[extract]. The original release (a directory of .txt JSON articles, e.g. RACE/train) or
JSONL (one article or one question a line). Contexts longer than n_ctx lose their
beginning. Not shipped: set the paths.

Give the files with --config.task.train=... --config.task.dev=..., e.g. race/train and
race/dev.
"""

from gptjax.config import FinetuneConfig, TaskConfig


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task=TaskConfig(name="race"),
    )
