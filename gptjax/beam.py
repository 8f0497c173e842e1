"""Beam search on the KV cache, with transformers' semantics (`generate(num_beams=K,
length_penalty=L, early_stopping=True)`, its vectorised beam search of v4.50+).

Each prompt is prefilled once and its cache copied to K beam rows. At every step the
2K best continuations of a prompt over all K beams x vocabulary (by summed log-prob)
are taken; those ending in a stop id, or reaching max_new_tokens, that rank among the
first K become finished hypotheses scored sum_logprob / n_generated ** L (n_generated
counts the stop token), and the best K unfinished ones continue (the cache rows are
gathered to follow them). A prompt is done once it holds K finished hypotheses
(early_stopping=True; transformers' look-ahead heuristic never acts before that then),
and its best hypothesis is the answer. Length penalties are a float32 table made on the
host, so the division is the one transformers does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax.config import ModelConfig
from gptjax.model import KVCache

NEG = -1.0e9  # transformers' "impossible" score


def gather_rows(cache: KVCache, rows_R) -> KVCache:
    """The cache with its batch rows replaced by rows[r] (copy for beams, reorder)."""
    return cache.replace(
        k_BxKxSxH=tuple(k[rows_R] for k in cache.k_BxKxSxH),
        v_BxKxSxH=tuple(v[rows_R] for v in cache.v_BxKxSxH),
        key_valid_BxS=cache.key_valid_BxS[rows_R],
    )


def make_beam_fn(graphdef, cfg: ModelConfig, sampling):
    """jit-able (params, head_DxV, tokens_BxP, pad_B, key) -> (new tokens [B, max_new],
    lengths [B]) of the best hypothesis, as make_generate_fn returns (key unused)."""
    n_new, k = sampling.max_new_tokens, sampling.num_beams
    stop = jnp.asarray(sampling.stop_ids or (-1,), jnp.int32)
    penalty_N = jnp.asarray(
        np.array([float(n) ** sampling.length_penalty for n in range(1, n_new + 1)], np.float32)
    )
    v = cfg.vocab_size

    def search(params, head_DxV, tokens_BxP, pad_B, key):
        del key  # deterministic
        model = nnx.merge(graphdef, params)
        b, p = tokens_BxP.shape
        layer_params = model.layer_params()
        logits_BxPxV, cache = model.prefill(tokens_BxP, pad_B, p + n_new, head_DxV, layer_params)
        rows = jnp.repeat(jnp.arange(b), k)  # prompt of each beam row
        cache = gather_rows(cache, rows)
        logits_RxV = logits_BxPxV[:, -1][rows]
        pad_R = pad_B[rows]
        in_top_k_C = jnp.arange(2 * k) < k

        def cond(carry):
            i, done_B = carry[0], carry[-1]
            return (i < n_new) & ~jnp.all(done_B)

        def body(carry):
            i, logits_RxV, cache, run_tok, run_score, fin_tok, fin_score, fin, done_B = carry
            logp_RxV = jax.nn.log_softmax(logits_RxV[:, :v].astype(jnp.float32), axis=-1)
            total_BxKV = (logp_RxV.reshape(b, k, v) + run_score[:, :, None]).reshape(b, k * v)
            score_BxC, flat_BxC = jax.lax.top_k(total_BxKV, 2 * k)
            src_BxC, tok_BxC = flat_BxC // v, (flat_BxC % v).astype(jnp.int32)
            cand_tok = jnp.take_along_axis(run_tok, src_BxC[:, :, None], axis=1)
            cand_tok = cand_tok.at[:, :, i].set(tok_BxC)
            hits_BxC = jnp.isin(tok_BxC, stop) | (i + 1 >= n_new)
            # The best K that did not stop go on.
            _, keep_BxK = jax.lax.top_k(jnp.where(hits_BxC, score_BxC + NEG, score_BxC), k)
            new_run_tok = jnp.take_along_axis(cand_tok, keep_BxK[:, :, None], axis=1)
            new_run_score = jnp.take_along_axis(score_BxC + hits_BxC * NEG, keep_BxK, axis=1)
            # Stopped ones among the first K join the finished, unless the prompt is done.
            joins_BxC = hits_BxC & in_top_k_C[None, :] & ~done_B[:, None]
            norm_BxC = jnp.where(joins_BxC, score_BxC / penalty_N[i], NEG)
            merged_score = jnp.concatenate([fin_score, norm_BxC], axis=1)
            _, best_BxK = jax.lax.top_k(merged_score, k)
            fin_score = jnp.take_along_axis(merged_score, best_BxK, axis=1)
            fin_tok = jnp.take_along_axis(
                jnp.concatenate([fin_tok, cand_tok], axis=1), best_BxK[:, :, None], axis=1
            )
            fin = jnp.take_along_axis(jnp.concatenate([fin, joins_BxC], axis=1), best_BxK, axis=1)
            done_B = done_B | jnp.all(fin, axis=1)
            # Follow the surviving beams' caches and feed their last tokens.
            beam_src = jnp.take_along_axis(src_BxC, keep_BxK, axis=1)
            cache = gather_rows(cache, (beam_src + jnp.arange(b)[:, None] * k).reshape(-1))
            token_R = new_run_tok[:, :, i].reshape(-1)
            positions_Rx1 = (p + i - pad_R)[:, None]
            logits_Rx1xV, cache = model.decode(
                token_R[:, None], positions_Rx1, cache, head_DxV, layer_params
            )
            return (i + 1, logits_Rx1xV[:, 0], cache, new_run_tok, new_run_score,
                    fin_tok, fin_score, fin, done_B)  # fmt: skip

        run_score = jnp.where(jnp.arange(k)[None, :] == 0, 0.0, NEG) * jnp.ones((b, 1))
        init = (
            jnp.zeros((), jnp.int32),
            logits_RxV,
            cache,
            jnp.zeros((b, k, n_new), jnp.int32),
            run_score.astype(jnp.float32),
            jnp.zeros((b, k, n_new), jnp.int32),
            jnp.full((b, k), NEG, jnp.float32),
            jnp.zeros((b, k), bool),
            jnp.zeros((b,), bool),
        )
        out = jax.lax.while_loop(cond, body, init)
        best_BxN = out[5][:, 0]
        is_stop_BxN = jnp.isin(best_BxN, stop)
        first_stop_B = jnp.where(is_stop_BxN.any(-1), jnp.argmax(is_stop_BxN, -1) + 1, n_new)
        return best_BxN, first_stop_B

    return search
