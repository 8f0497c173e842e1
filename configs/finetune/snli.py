"""SNLI 1.0 jsonl (sentence1, sentence2, gold_label), entailment, three classes;
pairs whose gold label is '-' are skipped. Only ~10-example heads of the splits are
shipped with the development data: point task.train/dev at the full files.

Give the files with --config.task.train=... --config.task.dev=..., e.g.
snli/snli_1.0_train_head.jsonl and snli/snli_1.0_dev_head.jsonl.
"""

from gptjax.config import FinetuneConfig, TaskConfig


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task=TaskConfig(name="snli"),
    )
