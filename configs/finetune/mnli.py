"""MultiNLI 1.0 jsonl (same fields as SNLI), entailment, three classes; dev is the
matched dev set. The data is not shipped: set task.train / task.dev.

Give the files with --config.task.train=... --config.task.dev=..., e.g.
mnli/multinli_1.0_train.jsonl and mnli/multinli_1.0_dev_matched.jsonl.
"""

from gptjax.config import FinetuneConfig, TaskConfig


def get_config() -> FinetuneConfig:
    return FinetuneConfig(
        task=TaskConfig(name="mnli"),
    )
