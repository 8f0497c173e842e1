"""The Optax chain: warmup + decay schedule, global-norm clipping, AdamW with a decay mask.

Gradient accumulation lives in the train step (a scan over microbatches), so the
number of microbatches can change during a batch-size ramp without touching the
optimizer state.
"""

from __future__ import annotations

import jax
import optax

from gptjax.config import OptimConfig

# Top-level parameter names that are embeddings (decayed only if optim.decay_embeddings).
EMBEDDINGS = ("wte", "wpe")


def lr_schedule(o: OptimConfig, steps: int) -> optax.Schedule:
    """Linear warmup, then the decay over optim.decay_steps (0: the run's `steps`)."""
    decay_steps = o.decay_steps or steps
    floor = o.lr * o.min_lr_ratio
    warmup = optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1))
    span = max(decay_steps - o.warmup_steps, 1)
    if o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(o.lr, span, alpha=o.min_lr_ratio)
    elif o.schedule == "linear":
        decay = optax.linear_schedule(o.lr, floor, span)
    else:
        decay = optax.constant_schedule(o.lr)
    return optax.join_schedules([warmup, decay], [o.warmup_steps])


def decay_mask(params, decay_embeddings: bool = False):
    """True where weight decay applies: matrices, not biases or norm gains (GPT-1's
    'non bias or gain weights'); embeddings as configured."""

    def decays(path, _) -> bool:
        name = path[-1].key
        if name in EMBEDDINGS:
            return decay_embeddings
        # Matrices are named w* (wq, wo, w_in, ...) and lm_head; biases b*, norms scale/bias.
        return name.startswith("w") or name == "lm_head"

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(o: OptimConfig, steps: int) -> optax.GradientTransformation:
    """AdamW on lr_schedule(o, steps), after global-norm clipping when o.clip_norm > 0."""
    adamw = optax.adamw(
        lr_schedule(o, steps),
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        mask=lambda params: decay_mask(params, o.decay_embeddings),
    )
    if o.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw)
    return adamw
