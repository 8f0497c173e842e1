"""Shared builder for the paper configs in configs/gpt2/ and configs/gpt3/.

Not a config itself: the leading underscore keeps it out of the config tests. Config
files are loaded by path (gptjax.config.load uses importlib), so configs/ is not a
package and this module cannot be imported by name; each size file loads it by its
path relative to its own `__file__`:

    _spec = importlib.util.spec_from_file_location(
        "gptjax_configs_common", Path(__file__).resolve().parent.parent / "_common.py")
    _common = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_common)

Choices shared by every size (each is an ordinary field: override any of them with
--config.section.field=value):

Tokenizer and vocabulary. GPT-2 and GPT-3 both use GPT-2's byte-level BPE. No config
refers to files outside the repository, so `tokenizer.path` is empty: set
--config.tokenizer.path=DIR, DIR holding encoder.json and vocab.bpe. `model.vocab_size`
is set explicitly to 50,257 (GPT-1's config does the same), so a config alone fixes the
model's shape, parameter count and FLOPs; the embedding is padded to 50,304 rows
(vocab_multiple=128) for sharding, as nanoGPT does. The tokenizer must have at most
50,257 ids (the trainer checks).

Data. The papers' corpora (WebText, GPT-3's Common Crawl mix) are not shipped: data.sources
keeps the default `builtin:pydoc`, a smoke-test corpus. Point --config.data.sources at
your own text, jsonl or tfds:NAME sources for a real run.

Schedules. The GPT-3 paper states its schedule in tokens; gptjax schedules in optimizer
steps, so every token budget is converted with `steps_for_tokens`, which replays the
batch-size ramp exactly as the trainer runs it (gptjax.train.microbatches_at). With a
ramp a step early in training holds fewer tokens than batch_size * seq_len, so a budget
spent during the ramp takes more steps than budget / batch tokens: GPT-3 Small's
375M-token warmup is 4,324 steps, not 375e6 / 524,288 = 715 (the simple division, which
is what the conversion gives without a ramp, e.g. for GPT-2). The step counts are
computed for the ramp and batch configured here; changing them on the command line
does not recompute warmup/decay/steps.
"""

from __future__ import annotations

from gptjax.config import (
    CheckpointConfig,
    Config,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TokenizerConfig,
    TrainConfig,
)

GPT2_VOCAB = 50257  # GPT-2 byte-level BPE: 50,000 merges + 256 bytes + <|endoftext|>

# GPT-3 (Brown et al. 2020, section 2.3 and appendix B), in tokens.
GPT3_SEQ_LEN = 2048
WARMUP_TOKENS = 375e6  # linear warmup
DECAY_TOKENS = 260e9  # cosine decay to 10% of the peak LR over this many tokens ...
TOTAL_TOKENS = 300e9  # ... of a 300B-token run; the LR stays at 10% after 260B
RAMP_START_TOKENS = 32 * 1024  # batch ramp starts at 32k tokens = 16 sequences of 2048
# Sequences per forward/backward pass for every GPT-3 size. The trainer ramps the batch
# in whole microbatches, so the 32k-token ramp start must be a whole number of them:
# a microbatch of 16 sequences makes the ramp start exactly one microbatch and grow one
# 32k-token microbatch at a time. It also bounds activation memory per pass whatever
# the final batch (3.2M tokens at 175B), like Megatron's micro-batch size. The cost: a
# microbatch must split over mesh data*fsdp, so at most 16 devices share the batch
# axis; beyond that, shard with mesh.tensor (175B does), or raise the microbatch
# (e.g. --config.train.microbatches=<batch/32> --config.train.batch_ramp_start=32,
# i.e. a 64k-token ramp start) or drop the ramp (--config.train.batch_ramp_start=0).
# Each distinct microbatch count in the ramp compiles its own train step (the
# microbatch scan length is static): 16 compilations for Small, 96 for 175B.
GPT3_MICROBATCH = 16
# Window of the locally banded layers. The paper says only "alternating dense and
# locally banded sparse attention patterns ... similar to the Sparse Transformer" and
# gives no band width. 256 is the band EleutherAI's GPT-Neo (a GPT-3 replication) uses
# in its alternating global/local layers. It is 1/8 of n_ctx, and of the order of the
# Sparse Transformer's local blocks on text (128 positions, at a 12,288-token context).
GPT3_WINDOW = 256


def ramp_microbatches(step: int, microbatches: int, start_micro: int, ramp_steps: int) -> int:
    """Microbatches in optimizer step `step` (same formula as gptjax.train.microbatches_at,
    restated here so a config does not import the trainer)."""
    if not start_micro or step >= ramp_steps:
        return microbatches
    return min(microbatches, start_micro + (microbatches - start_micro) * step // ramp_steps)


def steps_for_tokens(
    tokens: float,
    *,
    batch_size: int,
    seq_len: int,
    microbatches: int = 1,
    ramp_start: int = 0,
    ramp_steps: int = 0,
) -> int:
    """The step count whose cumulative tokens are nearest `tokens`, batch ramp included.
    Without a ramp this is round(tokens / (batch_size * seq_len))."""
    micro_tokens = batch_size // microbatches * seq_len
    start_micro = ramp_start // (batch_size // microbatches) if ramp_start else 0
    done, step = 0, 0
    while step < ramp_steps and start_micro:
        nxt = done + ramp_microbatches(step, microbatches, start_micro, ramp_steps) * micro_tokens
        if nxt >= tokens:
            return step + 1 if nxt - tokens <= tokens - done else step
        done, step = nxt, step + 1
    return step + round((tokens - done) / (batch_size * seq_len))


def ramp_steps_for_tokens(
    tokens: float, *, batch_size: int, seq_len: int, microbatches: int, ramp_start: int
) -> int:
    """Ramp length in steps such that the ramp from ramp_start to batch_size sequences
    covers about `tokens`. In microbatches: step s of R runs a + (M - a) s // R of them,
    and the floors sum to ((M - a - 1)(R - 1) + gcd - 1) / 2, so the ramp holds about
    R (M + a - 1) / 2 microbatches."""
    micro = batch_size // microbatches
    a = ramp_start // micro
    return round(2 * tokens / ((microbatches + a - 1) * micro * seq_len))


def gpt3(
    *,
    n_layer: int,
    d_model: int,
    n_head: int,
    d_head: int,
    batch_size: int,
    lr: float,
    ramp_tokens: float,
    remat: str = "none",
    mesh: MeshConfig | None = None,
) -> Config:
    """One row of GPT-3's Table 2.1 plus the training recipe of section 2.3 / appendix B.

    batch_size is in sequences of 2048 tokens (0.5M -> 256, 1M -> 512, 2M -> 1024,
    3.2M -> 1536). ramp_tokens is the length of the batch-size ramp ("the first 4-12
    billion tokens, depending on the model size"; per-size values are not published).

    remat and mesh are set per size file. Without rematerialisation a layer keeps at
    most (34 d_model + 5 n_head n_ctx) bytes per token for backward (Korthikanti et al.
    2022, bf16, softmax stored by the XLA attention path), i.e. per 2048-token sequence
    3.7 GB (Small), 10-11 GB (Medium, Large, XL), 27 GB (2.7B), 31 GB (6.7B), 48 GB
    (13B), 275 GB (175B). A 16-sequence microbatch on one 8-device node is 2 sequences
    per device: at most 23 GB up to XL, which fits an 80 GB device beside the state, but
    54 GB and more from 2.7B up, which does not. So Small to XL use remat="none" and
    2.7B and larger remat="full" (each scanned layer group is recomputed in backward;
    only the residual stream at group boundaries, 2 d_model bytes per token per group,
    is kept) for about a third more compute. On smaller devices set
    --config.model.remat=full (or dots_saveable) for the smaller sizes too.
    XL and larger shard parameters and optimizer state over all devices (mesh data=1,
    fsdp=-1): f32 parameters, two Adam moments, the gradient accumulator and the
    gradients are about 20 bytes per parameter, 26 GB at 1.3B and 134 GB at 6.7B if
    replicated.
    """
    if n_head * d_head != d_model:
        raise ValueError(f"n_head * d_head = {n_head * d_head} != d_model = {d_model}")
    seq = GPT3_SEQ_LEN
    ramp_start = RAMP_START_TOKENS // seq
    microbatches = batch_size // GPT3_MICROBATCH
    ramp_steps = ramp_steps_for_tokens(
        ramp_tokens,
        batch_size=batch_size,
        seq_len=seq,
        microbatches=microbatches,
        ramp_start=ramp_start,
    )
    schedule = dict(
        batch_size=batch_size,
        seq_len=seq,
        microbatches=microbatches,
        ramp_start=ramp_start,
        ramp_steps=ramp_steps,
    )
    return Config(
        model=ModelConfig(
            vocab_size=GPT2_VOCAB,
            seq_len=seq,
            n_layer=n_layer,
            d_model=d_model,
            n_head=n_head,
            d_ff=0,  # 4 * d_model, also after a d_model override
            prenorm=True,
            position="learned",
            mlp="gelu",
            use_bias=True,
            tie_embeddings=True,
            attention_windows=(0, GPT3_WINDOW),
            dropout=0.0,
            attn_dropout=0.0,
            param_dtype="float32",
            compute_dtype="bfloat16",
            remat=remat,
        ),
        tokenizer=TokenizerConfig(kind="gpt2", path=""),
        optim=OptimConfig(
            lr=lr,
            schedule="cosine",
            warmup_steps=steps_for_tokens(WARMUP_TOKENS, **schedule),
            decay_steps=steps_for_tokens(DECAY_TOKENS, **schedule),
            min_lr_ratio=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            clip_norm=1.0,
        ),
        train=TrainConfig(
            steps=steps_for_tokens(TOTAL_TOKENS, **schedule),
            batch_size=batch_size,
            microbatches=microbatches,
            batch_ramp_start=ramp_start,
            batch_ramp_steps=ramp_steps,
            log_every=10,
            eval_every=1000,
        ),
        mesh=mesh or MeshConfig(),
        checkpoint=CheckpointConfig(every_steps=1000, keep=3),
    )


# GPT-2 (Radford et al. 2019). The paper gives the shapes, n_ctx 1024, the 50,257-token
# vocabulary and a batch of 512 sequences; it says each size's LR was tuned on held-out
# WebText but publishes neither the LRs nor the optimizer settings, schedule or length.
GPT2_SEQ_LEN = 1024
GPT2_BATCH = 512  # 512 x 1024 = 524,288 tokens, the same batch as GPT-3 Small
# Passes of 32 sequences (32k tokens, as for GPT-3): 4 sequences per device on an
# 8-device node, whose saved activations (dropout masks included, no remat) are at most
# 4.4 / 12 / 22 / 36 GB for 124M / 355M / 774M / 1.5B: inside an 80 GB device, with
# 1.5B's 31 GB of f32 state sharded by FSDP. Override for other hardware.
GPT2_MICROBATCHES = 16


def gpt2(
    *,
    n_layer: int,
    d_model: int,
    n_head: int,
    lr: float,
    remat: str = "none",
    mesh: MeshConfig | None = None,
) -> Config:
    """A GPT-2 size. What the paper leaves out comes from GPT-3, which uses the GPT-2
    architecture and whose Small size has GPT-2's batch of 0.5M tokens: the LR of the
    GPT-3 size nearest in parameters, Adam b2 0.95 / eps 1e-8, weight decay 0.1, clip
    1.0, 375M-token warmup and cosine decay to 10% over 260B of 300B tokens (no batch
    ramp: GPT-2 does not mention one). 300B tokens is also about what nanoGPT's GPT-2
    124M reproduction trains on (600k steps of 0.49M tokens).

    Dropout 0.1 on embeddings, residuals and attention probabilities. The GPT-2 paper
    says it follows GPT-1 except for the changes it lists, and dropout is not among
    them; GPT-1 used 0.1 everywhere. The released GPT-2 code (openai/gpt-2, inference
    only) has no dropout at all, and Hugging Face's GPT2Config 0.1 defaults carry no
    information about training. Attention dropout forces the explicit (non-fused)
    attention path; for single-epoch runs on a large corpus,
    --config.model.dropout=0 --config.model.attn_dropout=0 is the usual choice.
    """
    seq = GPT2_SEQ_LEN
    schedule = dict(batch_size=GPT2_BATCH, seq_len=seq)
    return Config(
        model=ModelConfig(
            vocab_size=GPT2_VOCAB,
            seq_len=seq,
            n_layer=n_layer,
            d_model=d_model,
            n_head=n_head,
            d_ff=0,  # 4 * d_model, also after a d_model override
            prenorm=True,  # pre-LN blocks plus a final LayerNorm
            position="learned",
            mlp="gelu",
            use_bias=True,
            tie_embeddings=True,
            attention_windows=(0,),
            dropout=0.1,
            attn_dropout=0.1,
            param_dtype="float32",
            compute_dtype="bfloat16",
            remat=remat,
        ),
        tokenizer=TokenizerConfig(kind="gpt2", path=""),
        optim=OptimConfig(
            lr=lr,
            schedule="cosine",
            warmup_steps=steps_for_tokens(WARMUP_TOKENS, **schedule),
            decay_steps=steps_for_tokens(DECAY_TOKENS, **schedule),
            min_lr_ratio=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            clip_norm=1.0,
        ),
        train=TrainConfig(
            steps=steps_for_tokens(TOTAL_TOKENS, **schedule),
            batch_size=GPT2_BATCH,
            microbatches=GPT2_MICROBATCHES,
            log_every=10,
            eval_every=1000,
        ),
        mesh=mesh or MeshConfig(),
        checkpoint=CheckpointConfig(every_steps=1000, keep=3),
    )
