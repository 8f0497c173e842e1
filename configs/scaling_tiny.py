"""Base of the tiny CPU scaling-law sweep in docs/scaling.md: a 1024-piece SentencePiece
model trained once per sweep, short runs with a cosine schedule matched to each run's
length and one validation pass at the end. `gptjax sweep` sets the shape, LR and steps
of each run from get_sweep_config()'s rule. The corpus is given on the command line, as
docs/scaling.md shows (--config.data.sources=DIR/*.txt); without it the sweep stops."""

from gptjax.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    SweepConfig,
    TokenizerConfig,
    TrainConfig,
)


def get_config() -> Config:
    return Config(
        model=ModelConfig(seq_len=128, n_layer=2, d_model=64, n_head=4),
        tokenizer=TokenizerConfig(kind="sentencepiece", vocab_size=1024),
        data=DataConfig(sources=(), val_fraction=0.05),  # give them: see the docstring
        optim=OptimConfig(lr=3e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1),
        train=TrainConfig(
            steps=200,
            batch_size=16,
            log_every=10,
            eval_every=1_000_000,  # evaluate once, at the last step
            eval_batches=24,
            sample_tokens=0,
        ),
        checkpoint=CheckpointConfig(every_steps=100, keep=1),
    )


def get_sweep_config() -> SweepConfig:
    return SweepConfig(
        aspect_ratio=32.0,
        head_dim=16,
        lr_rule="inverse_width",
        base_lr=3e-3,
        base_width=64,
        warmup_fraction=0.05,
        flops_rule="model",
        min_tokens_per_param=0.2,
        max_tokens_per_param=100.0,
        min_steps=20,
    )
