"""The jitted scoring program of `gptjax eval` (gptjax.eval.scoring packs requests into
its rows; `gptjax plan --step eval` compiles it for a target): one pass of the model
over rows of packed requests, and the LM head on the scored positions only."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import ModelConfig

HEAD_BLOCK = 128  # positions per LM-head block in make_score_fn
HEAD_WIDTH = 4096  # at most this many vocabulary entries per LM-head chunk


def input_shapes(rows: int, length: int, shards: int = 1) -> list[tuple[int, ...]]:
    """Shapes of make_score_fn's int32 inputs after the weights, for `rows` rows of
    `length` tokens split over `shards` batch shards: tokens, positions, doc, seg
    [rows, length]; src, target [N]; blocks []. N, the scored entries, is at most one
    per token (scoring._Group.size), rounded up to whole head blocks on every shard: a
    function of the shape, so no shape of its own."""
    step = math.lcm(HEAD_BLOCK, shards)
    n = -(-(rows * length) // step) * step
    return [(rows, length)] * 4 + [(n,)] * 2 + [()]


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
    """(params, head_CxDxv, tokens [R, S], positions [R, S], doc [R, S], seg [R, S],
    src [N], target [N], blocks) -> (log-prob [N], is-greedy [N]) of the target tokens.
    Each row packs several requests (attention.tree_mask: doc and segment ids, -1 docs
    on padding), every token at the position it has alone; src: the flat index r * S + i
    of the hidden state that predicts each target. Only the first `blocks` blocks of
    HEAD_BLOCK entries of src are real. head_CxDxv: scoring_head, made outside this jit."""
    from gptjax.sharding import constrain

    def score(params, head_CxDxv, tokens_RxS, pos_RxS, doc_RxS, seg_RxS, src_N, tok_N, blocks):
        model = nnx.merge(graphdef, params)
        x_RxSxD = model.embed(tokens_RxS, pos_RxS)
        h_RxSxD = model.layers(x_RxSxD, pos_RxS, segments=(doc_RxS, seg_RxS))
        h_all = h_RxSxD.reshape(-1, h_RxSxD.shape[-1]).astype(head_CxDxv.dtype)
        # Only the real targets (src) go through the LM head, the bulk of the work: it
        # runs in a loop over blocks of 128 of them and, inside, over the vocabulary in
        # chunks of at most 4096 entries with a running (online) log-sum-exp: a [128,
        # V/C] chunk of logits stays in cache between its matmul and its reductions,
        # where [64, V] row blocks went through memory (the eval bench's head went from
        # ~4.0 s to ~2.9 s). Padded vocabulary entries are -inf: they take no mass and
        # never win the max.
        n_chunks, _, width = head_CxDxv.shape
        n = src_N.shape[0]
        block = min(n, HEAD_BLOCK)

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

        # A loop with a traced trip count: the blocks of src's padding are not computed
        # at all (nor gathered), and the shape stays that of the rows.
        src_MxB = src_N.reshape(n // block, block)
        tok_MxB = tok_N.reshape(n // block, block)

        def body(i, out):
            lp_B, hit_B = head(jnp.take(h_all, src_MxB[i], axis=0), tok_MxB[i])
            return out[0].at[i].set(lp_B), out[1].at[i].set(hit_B)

        empty = (jnp.zeros(tok_MxB.shape, jnp.float32), jnp.zeros(tok_MxB.shape, bool))
        lp_MxB, hit_MxB = jax.lax.fori_loop(0, blocks, body, empty)
        # Per-token log-probs go back to the host, which sums them in float64.
        return lp_MxB.reshape(n), hit_MxB.reshape(n)

    return score
