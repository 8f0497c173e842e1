"""The GPT-1 fine-tuning model (Radford et al. 2018, section 3.2): the pretrained GPT with
rows for the special tokens, the linear head W_y on the [extract] state, and the
objective L3 = L2 + lm_coef * L1. The loop around it is gptjax/finetune.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gptjax import model
from gptjax.config import ModelConfig
from gptjax.finetune_data import N_SPECIALS, TaskSpec

# Settings a fine-tuning config may change on a pretrained model (all else is architecture).
RUNTIME_FIELDS = ("dropout", "attn_dropout", "compute_dtype", "remat", "attention_impl")


def with_specials(base: ModelConfig, runtime: ModelConfig) -> ModelConfig:
    """The fine-tuning model: the pretrained one with N_SPECIALS more token ids (padded
    to vocab_multiple, so sharding still divides) and the config's runtime settings."""
    return dataclasses.replace(
        base,
        vocab_size=base.vocab_size + N_SPECIALS,
        **{name: getattr(runtime, name) for name in RUNTIME_FIELDS},
    )


def extend_vocab(params: dict, base: ModelConfig, key) -> dict:
    """Pretrained parameters with rows for the special tokens at ids [V, V + 3) drawn
    N(0, init_std) like the others; the table grows (zero rows, masked out of the
    logits) when its padding has no room. Every pretrained value is kept bit for bit."""
    new = with_specials(base, base)
    grow, v = new.padded_vocab - base.padded_vocab, base.vocab_size

    def add_rows(table_VxD, key):
        rows = base.init_std * jax.random.normal(key, (N_SPECIALS, base.d_model), table_VxD.dtype)
        return jnp.pad(table_VxD, ((0, grow), (0, 0))).at[v : v + N_SPECIALS].set(rows)

    key_wte, key_head = jax.random.split(key)
    out = dict(params, wte=add_rows(params["wte"], key_wte))
    if not base.tie_embeddings:
        out["lm_head"] = add_rows(params["lm_head"].T, key_head).T
    return out


HEAD_AXES = {"w_y": ("embed", None), "b_y": (None,)}


def init_head(key, cfg: ModelConfig, n_outputs: int) -> dict:
    """W_y [D, C] ~ N(0, init_std) and a zero bias, in float32."""
    w = cfg.init_std * jax.random.normal(key, (cfg.d_model, n_outputs), jnp.float32)
    return {"w_y": w, "b_y": jnp.zeros((n_outputs,), jnp.float32)}


def forward(graphdef, params, tokens_BxKxL, extract_BxK, spec: TaskSpec, *, clf_dropout=0.0,
            rng=None, with_lm=False):  # fmt: skip
    """Task outputs and (with_lm) the LM logits [B*K, L, V] of the same pass.

    Outputs: class scores [B, C]; answer scores [B, K] (multiple choice, to be softmaxed
    over the answers); or a score [B] (regression). Similarity adds the [extract] states
    of its two orderings element-wise before the head."""
    b, k, length = tokens_BxKxL.shape
    gpt = nnx.merge(graphdef, params["model"])
    rng_body, rng_clf = (None, None) if rng is None else jax.random.split(rng)
    h_NxLxD = gpt.hidden(tokens_BxKxL.reshape(b * k, length), rng=rng_body)
    h_NxD = h_NxLxD[jnp.arange(b * k), extract_BxK.reshape(b * k)]
    h_BxKxD = h_NxD.reshape(b, k, -1).astype(jnp.float32)
    if spec.kind == "similarity":
        h_BxKxD = h_BxKxD.sum(axis=1, keepdims=True)
    h_BxKxD = model.dropout(h_BxKxD, clf_dropout, rng_clf)
    out_BxKxC = jnp.einsum("bkd,dc->bkc", h_BxKxD, params["head"]["w_y"]) + params["head"]["b_y"]
    if spec.kind == "multiple_choice":
        out = out_BxKxC[..., 0]
    elif spec.regression:
        out = out_BxKxC[:, 0, 0]
    else:
        out = out_BxKxC[:, 0]
    return out, gpt.logits(h_NxLxD) if with_lm else None


def finetune_loss(graphdef, params, batch, spec: TaskSpec, *, lm_coef: float,
                  clf_dropout: float = 0.0, rng=None):  # fmt: skip
    """(L3, (L2, L1)). L1 is the next-token loss over each sequence up to its [extract]
    token (padding excluded); with lm_coef == 0 the LM logits are never computed."""
    out, lm_logits = forward(
        graphdef, params, batch["tokens"], batch["extract"], spec,
        clf_dropout=clf_dropout, rng=rng, with_lm=lm_coef > 0,
    )  # fmt: skip
    label = batch["label"]
    if spec.regression:
        clf = jnp.mean((out - label / spec.score_scale) ** 2)
    else:
        clf = optax.softmax_cross_entropy_with_integer_labels(out, label.astype(jnp.int32)).mean()
    if lm_logits is None:
        return clf, (clf, jnp.zeros((), jnp.float32))
    length = batch["tokens"].shape[-1]
    tokens_NxL = batch["tokens"].reshape(-1, length)
    losses_NxL1 = optax.softmax_cross_entropy_with_integer_labels(
        lm_logits[:, :-1].astype(jnp.float32), tokens_NxL[:, 1:]
    )
    mask_NxL1 = jnp.arange(length - 1)[None, :] < batch["extract"].reshape(-1, 1)
    lm = (losses_NxL1 * mask_NxL1).sum() / jnp.maximum(mask_NxL1.sum(), 1)
    return clf + lm_coef * lm, (clf, lm)
