"""Attention kernels written out for XLA: causal or banded, and masked by a tree of
segments (several scoring requests packed into one row, gptjax.eval.scoring)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def attention_mask(q_len: int, k_len: int, window: int):
    """Causal (and, for window > 0, banded) mask [q_len, k_len]."""
    q_pos = jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(k_len)[None, :]
    mask = k_pos <= q_pos
    if window:
        mask &= q_pos - k_pos < window
    return mask


def tree_mask(doc_BxL, seg_BxL, positions_BxL, window: int):
    """[B, L, L]: which keys each query of a packed row attends to. A row holds several
    documents (doc ids, -1 on padding), each a shared prefix (segment 0: a context) then
    branches (segments 1, 2, ...: its continuations). A token sees the earlier tokens of
    its own document that are in the prefix or in its own branch, and, for window > 0,
    only those fewer than `window` positions back: every branch is scored exactly as if
    it followed the prefix alone."""
    length = doc_BxL.shape[1]
    index = jnp.arange(length)
    ok = (index[None, :] <= index[:, None])[None]
    ok &= doc_BxL[:, :, None] == doc_BxL[:, None, :]
    ok &= (seg_BxL[:, None, :] == 0) | (seg_BxL[:, :, None] == seg_BxL[:, None, :])
    if window:
        ok &= positions_BxL[:, :, None] - positions_BxL[:, None, :] < window
    return ok


def blocked_causal_attention(
    q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, window: int, blocks: int = 4, mask_BxLxL=None
):
    """Causal (banded for window > 0) softmax attention computed per block of queries
    over only the keys up to that block's end: about half the work of the full L x L
    scores, forward and backward. XLA:CPU's dot_product_attention computes them all.
    mask_BxLxL (tree_mask; it implies causality) replaces the causal band."""
    b, length, n, h = q_BxLxNxH.shape
    kv = k_BxLxKxH.shape[2]
    if length % blocks or length < 64:
        blocks = 1
    size = length // blocks
    dt = q_BxLxNxH.dtype
    # Heads-major [B, K, G, L, H] (queries) and [B, K, 1, L, H] (keys, values) for GQA.
    q = q_BxLxNxH.reshape(b, length, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    q = q * jnp.asarray(1 / math.sqrt(h), dt)
    k = k_BxLxKxH.transpose(0, 2, 1, 3)[:, :, None]
    v = v_BxLxKxH.transpose(0, 2, 1, 3)[:, :, None]
    outs = []
    for i in range(blocks):
        end = (i + 1) * size
        scores = jnp.matmul(
            q[..., i * size : end, :], jnp.swapaxes(k[..., :end, :], -1, -2)
        ).astype(jnp.float32)
        if mask_BxLxL is None:
            q_pos, k_pos = i * size + jnp.arange(size)[:, None], jnp.arange(end)[None, :]
            ok = k_pos <= q_pos
            if window:
                ok &= q_pos - k_pos < window
        else:
            ok = mask_BxLxL[:, None, None, i * size : end, :end]
        scores = jnp.where(ok, scores, -jnp.inf)  # every row keeps its own key: finite max
        peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
        weights = jnp.exp(scores - peak)
        # Normalising after the product with v divides L x H values, not L x L.
        out = jnp.matmul(weights.astype(dt), v[..., :end, :]).astype(jnp.float32)
        outs.append((out / jnp.sum(weights, axis=-1, keepdims=True)).astype(dt))
    out = jnp.concatenate(outs, axis=3)  # [B, K, G, L, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, length, n, h)
