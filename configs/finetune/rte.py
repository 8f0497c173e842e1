"""RTE (SuperGLUE jsonl), entailment: [start] premise [delim] hypothesis [extract].

2,490 training and 277 dev pairs, labels entailment / not_entailment.

Give the files with --config.task.train=... --config.task.dev=..., e.g. rte/train.jsonl
and rte/val.jsonl.
"""

from gptjax.config import FinetuneConfig, TaskConfig


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task=TaskConfig(name="rte"),
    )
