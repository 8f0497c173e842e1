"""Quickstart: a small GPT trained on the built-in corpus (CPython's pydoc topics)
in a few minutes on 2 CPU cores. Sentencepiece tokenizer trained on the fly."""

from gptjax.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TokenizerConfig,
    TrainConfig,
)


def get_config() -> Config:
    return Config(
        model=ModelConfig(seq_len=128, n_layer=4, d_model=128, n_head=4),
        tokenizer=TokenizerConfig(kind="sentencepiece", vocab_size=2048),
        data=DataConfig(sources=("builtin:pydoc",), val_fraction=0.05),
        optim=OptimConfig(lr=2e-3, warmup_steps=40, min_lr_ratio=0.1, weight_decay=0.1),
        train=TrainConfig(steps=400, batch_size=16, log_every=20, eval_every=100, eval_batches=8),
        checkpoint=CheckpointConfig(every_steps=200, keep=2),
    )
