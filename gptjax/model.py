"""The GPT decoder: one module family for GPT-1, GPT-2, GPT-3 and common variants.

Every parameter carries logical axis names (`out_sharding` metadata); gptjax/sharding.py
maps them to mesh axes. Layers are stacked (a leading "layers" axis) and applied
with `jax.lax.scan`, so compile time does not grow with depth.

Shape suffixes: B batch, L sequence, D d_model, N query heads, K kv heads,
H head dim, F ffn dim, V (padded) vocabulary.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.attention import attention_mask, blocked_causal_attention, tree_mask
from gptjax.config import ModelConfig
from gptjax.sharding import constrain, manual_axes
from gptjax.xla_cpu import cotangent_barrier, cpu_lowering, project

# Parameters are created unsharded (under eval_shape or a jit whose out_shardings
# come from sharding.py); Flax must not try to place them itself.
nnx.use_eager_sharding(False)

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    if std == 0.0:
        value = jnp.zeros(shape, dtype)
    else:
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, out_sharding=axes)


def _ones(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), out_sharding=axes)


def dropout(x, rate: float, rng):
    """Inverted dropout; the identity without an rng or at rate 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Norm(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.param_dtype)
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.scale = _ones((cfg.d_model,), ("norm",), dtype)
        has_bias = cfg.norm == "layernorm" and cfg.use_bias
        self.bias = _param(rngs, (cfg.d_model,), ("norm",), 0.0, dtype) if has_bias else None

    def __call__(self, x_BxLxD):
        x = x_BxLxD.astype(jnp.float32)  # statistics in f32 whatever the compute dtype
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps) * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(x_BxLxD.dtype)


def apply_rope(x_BxLxNxH, positions_BxL, theta: float):
    """Rotary embedding, interleaved-pair convention: (x[2i], x[2i+1]) rotate together."""
    h = x_BxLxNxH.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    angle_BxLx1xH2 = (positions_BxL[..., None].astype(jnp.float32) * inv_freq)[:, :, None, :]
    cos, sin = jnp.cos(angle_BxLx1xH2), jnp.sin(angle_BxLx1xH2)
    x = x_BxLxNxH.astype(jnp.float32)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x_BxLxNxH.dtype)


@flax.struct.dataclass
class LayerCache:
    """One layer's key/value cache for decoding, plus what every layer shares."""

    k_BxKxSxH: jax.Array
    v_BxKxSxH: jax.Array
    index: jax.Array  # slot of the first token of the current chunk
    key_valid_BxS: jax.Array  # False at left-padding slots
    fresh: bool = flax.struct.field(pytree_node=False, default=False)  # nothing cached yet


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for B sequences of up to S slots.

    One array per layer, heads before slots ([B, K, S, H]): decoding reads each layer's
    cache where it lies, and the matmuls take it in its own layout (q k^T contracts H,
    probs v contracts S). A stacked [L, B, S, K, H] cache cost a copy of every layer's
    slice and a transpose of it at every decode step on XLA:CPU.
    """

    k_BxKxSxH: tuple[jax.Array, ...]  # n_layer arrays
    v_BxKxSxH: tuple[jax.Array, ...]
    index: jax.Array  # int32 scalar: next slot to write
    key_valid_BxS: jax.Array  # bool: False at left-padding slots
    # Static: True until the first chunk is written, so prefill attends to its own
    # chunk only (no work, and no constant folding, over an all-zero cache).
    fresh: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int, key_valid_BxS=None, dtype=None):
        shape = (batch, cfg.kv_heads, slots, cfg.head_dim)
        dtype = dtype or jnp.dtype(cfg.compute_dtype)
        if key_valid_BxS is None:
            key_valid_BxS = jnp.ones((batch, slots), bool)
        zeros = (jnp.zeros(shape, dtype),) * cfg.n_layer
        return cls(zeros, zeros, jnp.zeros((), jnp.int32), key_valid_BxS, fresh=True)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim
        dtype, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layer)  # GPT-2 residual-projection scaling
        self.cfg = cfg
        self.wq = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, dtype)
        self.wk = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, dtype)
        self.wv = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, dtype)
        self.wo = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, dtype)
        if cfg.use_bias:
            self.bq = _param(rngs, (n, h), ("heads", "head_dim"), 0.0, dtype)
            self.bk = _param(rngs, (k, h), ("kv_heads", "head_dim"), 0.0, dtype)
            self.bv = _param(rngs, (k, h), ("kv_heads", "head_dim"), 0.0, dtype)
            self.bo = _param(rngs, (d,), ("norm",), 0.0, dtype)

    def __call__(
        self, x_BxLxD, positions_BxL, window: int, rng, cache: LayerCache | None = None, mask=None
    ):
        """Attention output [B, L, D], and with a cache also the layer's updated (k, v).
        mask: attention.tree_mask of packed scoring rows, attended in float32."""
        cfg, dt = self.cfg, x_BxLxD.dtype
        if cache is None and cfg.kv_heads == cfg.n_head:
            # One [D, 3NH] matmul instead of three. Not when decoding: stacking would
            # copy the weights at every step of a memory-bound loop.
            w_Dx3xNxH = jnp.stack([self.wq[...], self.wk[...], self.wv[...]], axis=1)
            qkv_BxLx3xNxH = project(x_BxLxD, w_Dx3xNxH.astype(dt))
            if cfg.use_bias:  # one add (and one bias-gradient reduction), not three
                b_3xNxH = jnp.stack([self.bq[...], self.bk[...], self.bv[...]], axis=0)
                qkv_BxLx3xNxH += b_3xNxH.astype(dt)
            q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = (qkv_BxLx3xNxH[:, :, i] for i in range(3))
        else:
            q_BxLxNxH = project(x_BxLxD, self.wq[...].astype(dt))
            k_BxLxKxH = project(x_BxLxD, self.wk[...].astype(dt))
            v_BxLxKxH = project(x_BxLxD, self.wv[...].astype(dt))
            if cfg.use_bias:
                q_BxLxNxH += self.bq[...].astype(dt)
                k_BxLxKxH += self.bk[...].astype(dt)
                v_BxLxKxH += self.bv[...].astype(dt)
        if cfg.position == "rope":
            q_BxLxNxH = apply_rope(q_BxLxNxH, positions_BxL, cfg.rope_theta)
            k_BxLxKxH = apply_rope(k_BxLxKxH, positions_BxL, cfg.rope_theta)
        q_BxLxNxH = constrain(q_BxLxNxH, ("batch", None, "act_heads", None))

        if cache is not None:
            out_BxLxNxH, new_kv = self._cached(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, window, cache)
        elif mask is not None:
            f32 = (a.astype(jnp.float32) for a in (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH))
            out_BxLxNxH = blocked_causal_attention(*f32, window, mask_BxLxL=mask).astype(dt)
        elif rng is not None and cfg.attn_dropout > 0.0:
            out_BxLxNxH = self._explicit(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, window, rng)
        elif cfg.attention_impl == "blocked":
            out_BxLxNxH = blocked_causal_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, window)
        else:
            out_BxLxNxH = jax.nn.dot_product_attention(
                q_BxLxNxH,
                k_BxLxKxH,
                v_BxLxKxH,
                is_causal=True,
                local_window_size=(window - 1, 0) if window else None,
                implementation=cfg.attention_impl,
            )
        out_BxLxD = project(out_BxLxNxH, self.wo[...].astype(dt), n_in=2)
        if cfg.use_bias:
            out_BxLxD += self.bo[...].astype(dt)
        return (out_BxLxD, new_kv) if cache is not None else out_BxLxD

    def _cached(self, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, window: int, cache: LayerCache):
        """Attend over the cached slots [0, index) plus this chunk's own keys; returns
        the output and the chunk's (k, v), which the caller writes into the cache once.

        Slots are shared by the batch (prompts are left-padded), so causality and the
        band are slot arithmetic; padding slots are masked by cache.key_valid_BxS. The
        cache is only read here: writing the chunk into a copy of it first would copy
        the whole cache in every layer of every decode step. A fresh cache (prefill)
        holds nothing: only the chunk's own keys are attended to.
        """
        b, t, n, h = q_BxTxNxH.shape
        kv_heads = k_BxTxKxH.shape[2]
        g = n // kv_heads
        q_BxKxGxTxH = q_BxTxNxH.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4)
        q_BxKxGxTxH = q_BxKxGxTxH.astype(jnp.float32) / math.sqrt(h)
        k_new_BxKxTxH = k_BxTxKxH.transpose(0, 2, 1, 3).astype(jnp.float32)
        v_new_BxKxTxH = v_BxTxKxH.transpose(0, 2, 1, 3).astype(jnp.float32)
        neg = jnp.finfo(jnp.float32).min

        new_ok_TxT = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
        if window:
            new_ok_TxT &= jnp.arange(t)[:, None] - jnp.arange(t)[None, :] < window
        new_valid_BxT = jax.lax.dynamic_slice_in_dim(cache.key_valid_BxS, cache.index, t, axis=1)
        new_ok_BxTxT = new_ok_TxT[None] & new_valid_BxT[:, None, :]
        q_slot_BxTx1 = cache.index + jnp.arange(t)[None, :, None]
        new_BxKxGxTxT = jnp.einsum("bkgth,bksh->bkgts", q_BxKxGxTxH, k_new_BxKxTxH)
        scores = [jnp.where(new_ok_BxTxT[:, None, None], new_BxKxGxTxT, neg)]
        values = [v_new_BxKxTxH]
        if not cache.fresh:
            s = cache.k_BxKxSxH.shape[2]
            old_slot_1x1xS = jnp.arange(s)[None, None, :]
            old_ok_BxTxS = (old_slot_1x1xS < cache.index) & cache.key_valid_BxS[:, None, :]
            if window:
                old_ok_BxTxS &= q_slot_BxTx1 - old_slot_1x1xS < window
            k_old_BxKxSxH = cache.k_BxKxSxH.astype(jnp.float32)
            old_BxKxGxTxS = jnp.einsum("bkgth,bksh->bkgts", q_BxKxGxTxH, k_old_BxKxSxH)
            scores.insert(0, jnp.where(old_ok_BxTxS[:, None, None], old_BxKxGxTxS, neg))
            values.insert(0, cache.v_BxKxSxH.astype(jnp.float32))
        probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
        out_BxKxGxTxH, start = 0.0, 0
        for v_BxKxSxH in values:  # the cache's and the chunk's values, each where it lies
            width = v_BxKxSxH.shape[2]
            p_part = probs[..., start : start + width]
            out_BxKxGxTxH = out_BxKxGxTxH + jnp.einsum("bkgts,bksh->bkgth", p_part, v_BxKxSxH)
            start += width
        out = out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_BxTxNxH.dtype)
        return out, (k_BxTxKxH, v_BxTxKxH)

    def _explicit(self, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, window: int, rng):
        """Softmax attention written out, for attention-probability dropout (GPT-1/2),
        which jax.nn.dot_product_attention does not offer."""
        b, length, n, h = q_BxLxNxH.shape
        groups = n // k_BxLxKxH.shape[2]
        k_BxLxNxH = jnp.repeat(k_BxLxKxH, groups, axis=2)
        v_BxLxNxH = jnp.repeat(v_BxLxKxH, groups, axis=2)
        scores_BxNxLxL = jnp.einsum("bqnh,bknh->bnqk", q_BxLxNxH, k_BxLxNxH).astype(jnp.float32)
        scores_BxNxLxL /= math.sqrt(h)
        mask_LxL = attention_mask(length, length, window)
        scores_BxNxLxL = jnp.where(mask_LxL, scores_BxNxLxL, jnp.finfo(jnp.float32).min)
        probs_BxNxLxL = jax.nn.softmax(scores_BxNxLxL, axis=-1).astype(q_BxLxNxH.dtype)
        probs_BxNxLxL = dropout(probs_BxNxLxL, self.cfg.attn_dropout, rng)
        return jnp.einsum("bnqk,bknh->bqnh", probs_BxNxLxL, v_BxLxNxH)


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.ffn_dim
        dtype, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        self.cfg = cfg
        self.w_in = _param(rngs, (d, f), ("embed", "mlp"), std, dtype)
        if cfg.mlp == "swiglu":
            self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), std, dtype)
        self.w_out = _param(rngs, (f, d), ("mlp", "embed"), std / math.sqrt(2 * cfg.n_layer), dtype)
        if cfg.use_bias:
            self.b_in = _param(rngs, (f,), ("mlp",), 0.0, dtype)
            self.b_out = _param(rngs, (d,), ("norm",), 0.0, dtype)

    def __call__(self, x_BxLxD):
        dt = x_BxLxD.dtype
        h_BxLxF = project(x_BxLxD, self.w_in[...].astype(dt))
        if self.cfg.use_bias:
            h_BxLxF += self.b_in[...].astype(dt)
        if self.cfg.mlp == "swiglu":
            gate_BxLxF = project(x_BxLxD, self.w_gate[...].astype(dt))
            h_BxLxF = jax.nn.silu(gate_BxLxF) * h_BxLxF
        else:
            h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=True)  # GPT-2's tanh GELU
        h_BxLxF = constrain(h_BxLxF, ("batch", None, "act_mlp"))
        out_BxLxD = project(h_BxLxF, self.w_out[...].astype(dt))
        if self.cfg.use_bias:
            out_BxLxD += self.b_out[...].astype(dt)
        return out_BxLxD


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.prenorm, self.dropout = cfg.prenorm, cfg.dropout
        self.norm1 = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.norm2 = Norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs)

    def __call__(
        self, x_BxLxD, positions_BxL, window: int, rng, cache: LayerCache | None = None, mask=None
    ):
        """New residual stream [B, L, D]; with a cache, also the layer's updated (k, v)."""
        rngs = (None, None, None) if rng is None else jax.random.split(rng, 3)
        attn_in = self.norm1(x_BxLxD) if self.prenorm else x_BxLxD
        h = self.attn(attn_in, positions_BxL, window, rngs[0], cache, mask)
        h, new_kv = h if cache is not None else (h, None)
        if self.prenorm:  # GPT-2/3: x + f(norm(x))
            x_BxLxD = x_BxLxD + dropout(h, self.dropout, rngs[1])
            x_BxLxD = x_BxLxD + dropout(self.mlp(self.norm2(x_BxLxD)), self.dropout, rngs[2])
        else:  # GPT-1: norm(x + f(x))
            x_BxLxD = self.norm1(x_BxLxD + dropout(h, self.dropout, rngs[1]))
            x_BxLxD = self.norm2(x_BxLxD + dropout(self.mlp(x_BxLxD), self.dropout, rngs[2]))
        return (x_BxLxD, new_kv) if cache is not None else x_BxLxD


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) first")
        dtype, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        self.cfg = cfg
        self.wte = _param(rngs, (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"), std, dtype)
        if cfg.position == "learned":
            # GPT-2 used 0.01 for positions; N(0, 0.02) as the GPT-1 paper states.
            self.wpe = _param(rngs, (cfg.seq_len, cfg.d_model), ("pos", "embed"), std, dtype)

        @nnx.split_rngs(splits=cfg.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.norm_f = Norm(cfg, rngs) if cfg.prenorm else None
        if not cfg.tie_embeddings:
            self.lm_head = _param(
                rngs, (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"), std, dtype
            )

    def hidden(self, tokens_BxL, *, positions_BxL=None, rng=None):
        """Final hidden states [B, L, D] (after the final norm where there is one)."""
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        rng_embed, rng_layers = (None, None) if rng is None else jax.random.split(rng)
        x_BxLxD = self.embed(tokens_BxL, positions_BxL, rng_embed)
        return self.layers(x_BxLxD, positions_BxL, rng_layers)

    def embed(self, tokens_BxL, positions_BxL, rng=None):
        cfg = self.cfg
        dt = jnp.dtype(cfg.compute_dtype)
        wte_VxD, wpe_LxD = self.wte[...].astype(dt), None
        if cfg.position == "learned":
            wpe_LxD = self.wpe[...].astype(dt)
        if manual_axes():
            # Inside a shard_map manual over some axes (train._reduce_once_over_data),
            # XLA's SPMD partitioner aborts on a gather from a split table (jax 0.10.2,
            # ExpandDeviceGroupsWithIota): gather from whole tables there.
            wte_VxD = constrain(wte_VxD, (None, None))
            wpe_LxD = None if wpe_LxD is None else constrain(wpe_LxD, (None, None))
        x_BxLxD = wte_VxD[tokens_BxL]
        if wpe_LxD is not None:
            x_BxLxD += wpe_LxD[positions_BxL]
        x_BxLxD = dropout(x_BxLxD, cfg.dropout, rng)
        return constrain(x_BxLxD, ("batch", None, "act_embed"))

    def layers(self, x_BxLxD, positions_BxL, rng=None, cache: KVCache | None = None,
               layer_params=None, segments=None):  # fmt: skip
        """The stacked blocks and the final norm, on embeddings [B, L, D]. With a cache
        (decoding) also returns the updated cache; layer_params: see `layer_params`.
        segments: (doc_BxL, seg_BxL) of packed scoring rows (attention.tree_mask)."""
        if cache is not None:
            return self._layers_cached(x_BxLxD, positions_BxL, cache, layer_params)
        cfg = self.cfg
        windows = cfg.attention_windows
        period = len(windows)
        masks = {}  # window -> tree mask, made once for all layers
        if segments is not None:
            for w in dict.fromkeys(windows):
                masks[w] = constrain(tree_mask(*segments, positions_BxL, w), ("batch", None, None))
        graphdef, stacked = nnx.split(self.blocks)

        # One scan step applies one period of the attention pattern, so every window is
        # a static argument. Each sub-layer's weights are scanned as their own stacked
        # array (split once, outside the loop): indexing a stacked array inside the body
        # is fused into the matmuls by XLA:CPU and makes them several times slower. The
        # split is a copy of every layer's weights, so the scoring program (segments)
        # indexes inside the body instead off the CPU: a 175B evaluation on TPU holds
        # the weights once (40.7 GiB a chip of 8), not twice.
        if period == 1 or segments is None or cpu_lowering():
            xs_params = tuple(
                jax.tree.map(lambda a, i=i: a[i::period], stacked) for i in range(period)
            )

            def sublayer(step_params, i):
                return step_params[i]
        else:
            xs_params = jax.tree.map(lambda a: a.reshape(-1, period, *a.shape[1:]), stacked)

            def sublayer(step_params, i):
                return jax.tree.map(lambda a: a[i], step_params)

        def group_fn(x_BxLxD, xs):
            step_params, group_index = xs
            for i, window in enumerate(windows):
                block = nnx.merge(graphdef, sublayer(step_params, i))
                layer_rng = None
                if rng is not None:
                    layer_rng = jax.random.fold_in(rng, group_index * period + i)
                x_BxLxD = block(
                    cotangent_barrier(x_BxLxD), positions_BxL, window, layer_rng, None,
                    masks.get(window),
                )  # fmt: skip
                x_BxLxD = constrain(x_BxLxD, ("batch", None, "act_embed"))
            return x_BxLxD, None

        if cfg.remat != "none":
            group_fn = jax.checkpoint(group_fn, policy=REMAT_POLICIES[cfg.remat])
        xs = (xs_params, jnp.arange(cfg.n_layer // period))
        x_BxLxD, _ = jax.lax.scan(group_fn, x_BxLxD, xs, unroll=not cfg.scan_layers)
        if self.norm_f is not None:
            x_BxLxD = self.norm_f(x_BxLxD)
        return x_BxLxD

    def layer_params(self) -> tuple:
        """Each layer's parameters as arrays of their own (slices of the stacked ones).
        A decode loop takes them once, before the loop: sliced inside it, XLA:CPU copies
        every layer's weights at every step."""
        _, stacked = nnx.split(self.blocks)
        return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(self.cfg.n_layer))

    def _layers_cached(self, x_BxTxD, positions_BxT, cache: KVCache, layer_params=None):
        """layers() for decoding: a loop over the layers (each reads its own cache array,
        no slicing of a stacked one), then one write of the chunk into each cache."""
        cfg = self.cfg
        graphdef, _ = nnx.split(self.blocks)
        layer_params = layer_params or self.layer_params()
        new_k, new_v = [], []
        for layer in range(cfg.n_layer):
            block = nnx.merge(graphdef, layer_params[layer])
            window = cfg.attention_windows[layer % len(cfg.attention_windows)]
            layer_cache = LayerCache(
                cache.k_BxKxSxH[layer], cache.v_BxKxSxH[layer], cache.index,
                cache.key_valid_BxS, cache.fresh,
            )  # fmt: skip
            x_BxTxD, (k_BxTxKxH, v_BxTxKxH) = block(
                x_BxTxD, positions_BxT, window, None, layer_cache
            )
            x_BxTxD = constrain(x_BxTxD, ("batch", None, "act_embed"))

            # The chunk's slots written into the layer's cache (in place in a decode loop).
            def write(full_BxKxSxH, chunk_BxTxKxH):
                chunk = chunk_BxTxKxH.transpose(0, 2, 1, 3).astype(full_BxKxSxH.dtype)
                return jax.lax.dynamic_update_slice_in_dim(full_BxKxSxH, chunk, cache.index, 2)

            new_k.append(write(cache.k_BxKxSxH[layer], k_BxTxKxH))
            new_v.append(write(cache.v_BxKxSxH[layer], v_BxTxKxH))
        if self.norm_f is not None:
            x_BxTxD = self.norm_f(x_BxTxD)
        return x_BxTxD, cache.replace(k_BxKxSxH=tuple(new_k), v_BxKxSxH=tuple(new_v))

    def decode(self, tokens_BxT, positions_BxT, cache: KVCache, head_DxV=None, layer_params=None):
        """Logits [B, T, V] for a chunk at slots cache.index.., and the updated cache
        (index advanced by T). Prefill is a chunk of the whole prompt; decode, of one.
        head_DxV: see `decode_head`; layer_params: see `layer_params`."""
        x_BxTxD = self.embed(tokens_BxT, positions_BxT)
        h_BxTxD, cache = self.layers(x_BxTxD, positions_BxT, None, cache, layer_params)
        return self.logits(h_BxTxD, head_DxV), cache.replace(
            index=cache.index + tokens_BxT.shape[1], fresh=False
        )

    def prefill(self, tokens_BxP, pad_B, slots: int, head_DxV=None, layer_params=None):
        """Logits [B, P, V] of left-padded prompts (pad_B padding slots each) and a fresh
        cache of `slots` slots holding them: the start of every decoding loop."""
        b, p = tokens_BxP.shape
        key_valid_BxS = jnp.arange(slots)[None, :] >= pad_B[:, None]
        cache = KVCache.empty(self.cfg, b, slots, key_valid_BxS)
        positions_BxP = jnp.maximum(jnp.arange(p)[None, :] - pad_B[:, None], 0)
        return self.decode(tokens_BxP, positions_BxP, cache, head_DxV, layer_params)

    def logits(self, h_BxLxD, head_DxV=None):
        """Logits [B, L, V_padded]. head_DxV (see `decode_head`) replaces a tied head."""
        dt = h_BxLxD.dtype
        if head_DxV is None and self.cfg.tie_embeddings:
            logits_BxLxV = jnp.einsum("bld,vd->blv", h_BxLxD, self.wte[...].astype(dt))
        else:
            head_DxV = self.lm_head[...] if head_DxV is None else head_DxV
            logits_BxLxV = jnp.einsum("bld,dv->blv", h_BxLxD, head_DxV.astype(dt))
        if self.cfg.padded_vocab > self.cfg.vocab_size:
            # Padding rows exist for sharding only: they must never take probability mass
            # (an imported model's zero rows would otherwise score logit 0).
            real_V = jnp.arange(self.cfg.padded_vocab) < self.cfg.vocab_size
            logits_BxLxV = jnp.where(real_V, logits_BxLxV, jnp.finfo(dt).min)
        return constrain(logits_BxLxV, ("batch", None, "act_vocab"))

    def __call__(self, tokens_BxL, *, positions_BxL=None, rng=None):
        """Logits [B, L, V_padded] in the compute dtype."""
        return self.logits(self.hidden(tokens_BxL, positions_BxL=positions_BxL, rng=rng))


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameters as ShapeDtypeStructs with logical metadata."""
    # Outside any mesh: shardings come from sharding.py, not from Flax's defaults.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        model = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
    return nnx.split(model)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh parameters as a plain nested dict of arrays (jit this with out_shardings)."""
    return nnx.to_pure_dict(nnx.split(GPT(cfg, nnx.Rngs(params=key)))[1])


def apply(graphdef: nnx.GraphDef, params: dict, tokens_BxL, **kwargs):
    """Logits from plain params: the functional entry point used under jit."""
    return nnx.merge(graphdef, params)(tokens_BxL, **kwargs)


def decode_head(params: dict, cfg: ModelConfig):
    """A tied model's output head as a [D, V] array for `GPT.logits(h, head_DxV)`, or
    None for an untied head (already [D, V]). Call it under a jax.jit of its own, once
    per set of weights: the transpose must be a real array, because XLA:CPU multiplies a
    few rows by wte^T ~1.6x slower than by [D, V], and inside the caller's jit it would
    be folded back into the matmul. Decoding uses it (scoring: eval.score_program.scoring_head)."""
    if not cfg.tie_embeddings:
        return None
    return jnp.transpose(params["wte"].astype(cfg.compute_dtype))


def param_count(params) -> int:
    return sum(int(math.prod(p.shape)) for p in jax.tree.leaves(params))


def non_embedding_params(cfg: ModelConfig) -> int:
    """N of the scaling-law papers: parameters outside the token/position embeddings."""
    _, state = abstract_model(cfg)
    pure = nnx.to_pure_dict(state)
    total = param_count(pure)
    total -= param_count(pure["wte"])
    total -= param_count(pure.get("wpe", {}))
    return total


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 N (non-embedding weights) + 6 D V (the LM head matmul)
    + attention scores and values, 12 n_layer d_attn L_eff, where L_eff is the mean
    number of keys a query attends to (causal: (L+1)/2; a band of w: about w), i.e.
    only the computed half of causal attention is counted. An untied head is already
    in N (it is not an embedding), so only a tied one adds its 6 D V."""
    n = non_embedding_params(cfg)
    head = cfg.d_model * cfg.padded_vocab if cfg.tie_embeddings else 0
    d_attn = cfg.n_head * cfg.head_dim
    attn = 0.0
    for layer in range(cfg.n_layer):
        w = cfg.attention_windows[layer % len(cfg.attention_windows)]
        l_eff = (
            (cfg.seq_len + 1) / 2
            if not w or w >= cfg.seq_len
            else w - (w * w - w) / (2 * cfg.seq_len)
        )
        attn += 12 * d_attn * l_eff
    return 6.0 * (n + head) + attn
