"""Sampling from a trained model.

`sample_text` runs the full forward pass over a fixed [1, seq_len] window for each
new token (one compiled shape, no cache); it serves the end-of-training sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import model
from gptjax.config import ModelConfig


def sample_text(
    graphdef,
    params,
    tokenizer,
    cfg: ModelConfig,
    prompt: str,
    max_new_tokens: int,
    seed: int = 0,
    temperature: float = 0.8,
    top_k: int = 40,
) -> str:
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    window = cfg.seq_len

    @jax.jit
    def next_token(params, tokens_1xL, last, key):
        logits_V = model.apply(graphdef, params, tokens_1xL)[0, last].astype(jnp.float32)
        logits_V = logits_V[: cfg.vocab_size] / temperature
        kth = jax.lax.top_k(logits_V, top_k)[0][-1]
        logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
        return jax.random.categorical(key, logits_V)

    key = jax.random.key(seed)
    params = jax.device_get(params)  # one host copy, replicated onto the default device
    new: list[int] = []
    for _ in range(max_new_tokens):
        context = (ids + new)[-window:]
        tokens = np.zeros((1, window), np.int32)
        tokens[0, : len(context)] = context
        key, sub = jax.random.split(key)
        token = int(next_token(params, tokens, len(context) - 1, sub))
        if token == tokenizer.eos_id:
            break
        new.append(token)
    return tokenizer.decode(new)
