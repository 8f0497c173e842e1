"""CommitmentBank (SuperGLUE jsonl), entailment with three classes (entailment,
contradiction, neutral); accuracy and macro F1. 250 training, 56 dev pairs.

Give the files with --config.task.train=... --config.task.dev=..., e.g. cb/train.jsonl
and cb/val.jsonl.
"""

from gptjax.config import FinetuneConfig, TaskConfig


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task=TaskConfig(name="cb"),
    )
