"""The small pretraining run of docs/finetune.md: a 4-layer, d_model 128 GPT on Tiny
Shakespeare + ten Project Gutenberg books (~6.7 MB of text), sized for ~10 minutes on 2
CPU cores. The corpora are given on the command line, as docs/finetune.md shows
(--config.data.sources=A.txt,DIR/*.txt); without them the run stops at once."""

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
        tokenizer=TokenizerConfig(kind="sentencepiece", vocab_size=4096),
        data=DataConfig(sources=(), val_fraction=0.02),  # give them: see the docstring
        optim=OptimConfig(lr=2e-3, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.1),
        train=TrainConfig(
            steps=1000,
            batch_size=16,
            log_every=50,
            eval_every=250,
            eval_batches=8,
            sample_tokens=0,
        ),
        checkpoint=CheckpointConfig(every_steps=250, keep=2),
    )
