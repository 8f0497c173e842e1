"""The jitted scoring program of `gptjax eval` (gptjax.eval.scoring batches requests into
it; `gptjax plan --step eval` compiles it for a target): prefill of the contexts, a
packed chunk of continuations, and the LM head on the scored positions only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.model import KVCache

HEAD_BLOCK = 128  # positions per LM-head block in make_score_fn
HEAD_WIDTH = 4096  # at most this many vocabulary entries per LM-head chunk


def vocab_chunks(padded_vocab: int, multiple: int = 1) -> int:
    """Chunks C of the vocabulary for the LM head: the fewest whose width V / C is at
    most HEAD_WIDTH (and at least 256) and a multiple of `multiple` (the tensor shards);
    1, the whole vocabulary at once, where no such C divides V."""
    for c in range(1, padded_vocab // 256 + 1):
        width, rest = divmod(padded_vocab, c)
        if not rest and width <= HEAD_WIDTH and width % multiple == 0:
            return c
    return 1


def scoring_head(params: dict, cfg: ModelConfig, n_chunks: int):
    """The LM head as [C, D, V / C] in the compute dtype: chunk c holds vocabulary ids
    c, c + C, c + 2C, ... Strided, so that a vocabulary sharded over `tensor` stays
    sharded inside every chunk. Made by a jit of its own, once per set of weights (as
    model.decode_head, for the same reason: a real array, not a transpose to fold)."""
    from gptjax.sharding import constrain

    w_VxD = params["wte"] if cfg.tie_embeddings else params["lm_head"].T
    v, d = w_VxD.shape[0] // n_chunks, w_VxD.shape[1]
    w_vxCxD = w_VxD.astype(cfg.compute_dtype).reshape(v, n_chunks, d)
    return constrain(jnp.transpose(w_vxCxD, (1, 2, 0)), (None, "embed", "vocab"))


def make_score_fn(graphdef, cfg: ModelConfig):
    """(params, head_CxDxv, ctx [G, P] left-padded, ctx_pad [G], chunk [G, T], segment
    [G, T], positions [G, T], src [N], target [N], blocks) -> (log-prob [N], is-greedy
    [N]) of the target tokens. chunk: each row's continuations packed (all but their
    last tokens), segment ids -1 on its padding; src: where each target's predicting
    hidden state is, g < G the last context position of row g, else G + row * T + t.
    Only the first `blocks` blocks of HEAD_BLOCK entries of src are real. head_CxDxv:
    scoring_head, made outside this jit."""
    from gptjax.sharding import constrain

    def score(
        params, head_CxDxv, ctx_GxP, pad_G, chunk_GxT, seg_GxT, pos_GxT, src_N, tok_N, blocks
    ):
        model = nnx.merge(graphdef, params)
        g, p = ctx_GxP.shape
        t = chunk_GxT.shape[1]
        valid_GxS = jnp.arange(p + t)[None, :] >= pad_G[:, None]
        cache = KVCache.empty(cfg, g, p + t, valid_GxS)
        pos_GxP = jnp.maximum(jnp.arange(p)[None, :] - pad_G[:, None], 0)
        h_GxPxD, cache = model.layers(model.embed(ctx_GxP, pos_GxP), pos_GxP, None, cache)
        # A target is predicted by the hidden state before it: the context's last
        # position for a continuation's first token.
        h_all = h_GxPxD[:, -1]
        if t:  # T = 0: every continuation is one token (True/False, a label word)
            cache = KVCache(
                cache.k_BxKxSxH, cache.v_BxKxSxH, cache.index + p, valid_GxS, False, seg_GxT
            )
            h_GxTxD, _ = model.layers(model.embed(chunk_GxT, pos_GxT), pos_GxT, None, cache)
            h_all = jnp.concatenate([h_all, h_GxTxD.reshape(g * t, -1)], axis=0)
        # Only the real continuation tokens (src) go through the LM head, the bulk of the
        # work: none of the padding of the length buckets. It runs in a loop over blocks
        # of 128 positions and, inside, over the vocabulary in chunks of at most 4096
        # entries with a running (online) log-sum-exp: a [128, V/C] chunk of logits
        # stays in cache between its matmul and its reductions, where [64, V] row blocks
        # went through memory (the eval bench's head went from ~4.0 s to ~2.9 s). Padded
        # vocabulary entries are -inf: they take no mass and never win the max.
        n_chunks, _, width = head_CxDxv.shape
        n = src_N.shape[0]
        block = min(n, HEAD_BLOCK)
        h_NxD = jnp.take(h_all, src_N, axis=0)

        def head(h_BxD, tok_B):
            chunk_B, col_B = tok_B % n_chunks, tok_B // n_chunks

            def chunk(c, carry):
                max_B, sum_B, target_B = carry
                logits_Bxv = (h_BxD @ head_CxDxv[c]).astype(jnp.float32)
                real_v = jnp.arange(width) * n_chunks + c < cfg.vocab_size
                logits_Bxv = constrain(jnp.where(real_v, logits_Bxv, -jnp.inf), (None, "act_vocab"))
                new_max_B = jnp.maximum(max_B, jnp.max(logits_Bxv, axis=-1))
                sum_B = sum_B * jnp.exp(max_B - new_max_B) + jnp.sum(
                    jnp.exp(logits_Bxv - new_max_B[:, None]), axis=-1
                )
                mine_B = jnp.take_along_axis(logits_Bxv, col_B[:, None], axis=-1)[:, 0]
                return new_max_B, sum_B, jnp.where(chunk_B == c, mine_B, target_B)

            # Chunk 0 holds id 0, a real entry: the running max is finite after it.
            init = (jnp.full(tok_B.shape, -jnp.inf), jnp.zeros(tok_B.shape), jnp.zeros(tok_B.shape))
            max_B, sum_B, target_B = jax.lax.fori_loop(0, n_chunks, chunk, init)
            # Greedy: the target's logit is the maximum (lm-eval: argmax == target).
            return target_B - (jnp.log(sum_B) + max_B), target_B >= max_B

        # A loop with a traced trip count: the blocks of src's bucket padding (up to a
        # third of the bucket) are not computed at all, and the shape stays bucketed.
        h_MxBxD = h_NxD.astype(head_CxDxv.dtype).reshape(n // block, block, -1)
        tok_MxB = tok_N.reshape(n // block, block)

        def body(i, out):
            lp_B, hit_B = head(h_MxBxD[i], tok_MxB[i])
            return out[0].at[i].set(lp_B), out[1].at[i].set(hit_B)

        empty = (jnp.zeros(tok_MxB.shape, jnp.float32), jnp.zeros(tok_MxB.shape, bool))
        lp_MxB, hit_MxB = jax.lax.fori_loop(0, blocks, body, empty)
        # Per-token log-probs go back to the host, which sums them in float64.
        return lp_MxB.reshape(n), hit_MxB.reshape(n)

    return score
