"""GPT-1 (Radford et al. 2018, "Improving Language Understanding by Generative
Pre-Training"): the 117M pretraining run.

Model, as in the paper: 12 post-LN blocks (LayerNorm after each residual add, no final
norm) of d_model 768, 12 heads, FFN 3072, GELU, learned position embeddings over 512
positions, weights initialised N(0, 0.02), tied input/output embeddings, dropout 0.1 on
embeddings, residuals and attention probabilities.

Tokenizer. GPT-1's 40,000-merge BPE (40,478 ids with its base characters) is not
available here, so this config uses GPT-2's byte-level BPE, like the GPT-2/3 configs:
set --config.tokenizer.path=DIR, DIR holding encoder.json and vocab.bpe. As in all the
paper configs, model.vocab_size is explicit (50,257, padded to 50,304 rows), so the
config alone fixes the shape: 124.08M parameters here against 116.53M with the paper's
40,478-token vocabulary (the "117M"); the blocks are identical (85.05M), the
difference is all in the token embedding.

Optimizer. The paper: Adam, max LR 2.5e-4, linear warmup over 2000 updates then cosine
annealing to 0, and "a modified version of L2 regularization" (Loshchilov & Hutter's
decoupled weight decay) with w = 0.01 on all non-bias or gain weights. Decoupled AdamW
with weight_decay 0.01 is that regularisation: OpenAI's released GPT-1 code
(finetune-transformer-lm, opt.py) subtracts lr_t * 0.01 * p outside the Adam update,
which is what optax.adamw does (up to Adam's bias-correction factor, which that code
also applies to the decay term). That code decays every matrix, the token and position
embeddings included, and no vector, so decay_embeddings=True. Adam's betas and epsilon
are not in the paper; we use Adam's
defaults b1 0.9, b2 0.999, eps 1e-8, which are also the released code's defaults.
Gradient clipping: not in the paper; the released code clips the global norm at 1
(max_grad_norm=1), and so do we.

Length. The paper trains for 100 epochs over BooksCorpus in minibatches of 64 x 512
tokens (32,768 per step) and gives no step count. BooksCorpus is 985M words (Zhu et al.
2015); at ~1.0-1.3 BPE tokens per word an epoch is ~1.0-1.3B tokens, so 100 epochs is
~3.0-3.9M steps. We take train.steps = 3,000,000 (98B tokens, the low end); the cosine
reaches 0 at the last step. BooksCorpus is not shipped: data.sources keeps the
smoke-test default `builtin:pydoc`; for anything but a smoke test set
--config.data.sources (and scale train.steps to your corpus).

Precision: bfloat16 compute, float32 parameters and optimizer state (the paper's
single-precision training predates bf16; this does not change the recipe).
"""

from gptjax.config import (
    CheckpointConfig,
    Config,
    ModelConfig,
    OptimConfig,
    TokenizerConfig,
    TrainConfig,
)


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=50257,  # GPT-2 BPE in place of GPT-1's 40,478 (see above)
            seq_len=512,
            n_layer=12,
            d_model=768,
            n_head=12,
            d_ff=0,  # 4 * d_model = 3072
            prenorm=False,  # post-LN: norm(x + f(x)), no final norm
            position="learned",
            mlp="gelu",
            use_bias=True,
            tie_embeddings=True,
            attention_windows=(0,),
            dropout=0.1,
            attn_dropout=0.1,
            init_std=0.02,
            param_dtype="float32",
            compute_dtype="bfloat16",
        ),
        tokenizer=TokenizerConfig(kind="gpt2", path=""),  # --config.tokenizer.path=DIR
        optim=OptimConfig(
            lr=2.5e-4,
            schedule="cosine",
            warmup_steps=2000,
            decay_steps=0,  # cosine over the whole run
            min_lr_ratio=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            decay_embeddings=True,
            clip_norm=1.0,
        ),
        train=TrainConfig(
            steps=3_000_000,
            batch_size=64,
            microbatches=1,
            log_every=100,
            eval_every=5000,
        ),
        checkpoint=CheckpointConfig(every_steps=10_000, keep=3),
    )
