"""The decoder: causality, variants, init, FLOP accounting."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import model
from gptjax.config import ModelConfig

TINY = ModelConfig(vocab_size=97, seq_len=16, n_layer=2, d_model=32, n_head=4)

VARIANTS = {
    "gpt2": TINY,
    "gpt1_postln_dropout": dataclasses.replace(TINY, prenorm=False, dropout=0.1, attn_dropout=0.1),
    "llama": dataclasses.replace(
        TINY,
        norm="rmsnorm",
        position="rope",
        mlp="swiglu",
        n_kv_head=2,
        use_bias=False,
        tie_embeddings=False,
    ),
    "mqa": dataclasses.replace(TINY, n_kv_head=1),
    "gpt3_banded": dataclasses.replace(TINY, attention_windows=(0, 4)),
    "remat_full": dataclasses.replace(TINY, remat="full"),
    "remat_dots": dataclasses.replace(TINY, remat="dots_saveable", compute_dtype="bfloat16"),
    "blocked_unrolled": dataclasses.replace(
        TINY, attention_impl="blocked", scan_layers=False, n_kv_head=2, attention_windows=(0, 5)
    ),
}


def _params(cfg, seed=0):
    graphdef, _ = model.abstract_model(cfg)
    return graphdef, model.init_params(cfg, jax.random.key(seed))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_causality_by_gradient(name):
    """d logits[t] / d input embedding[s] is zero for every s > t (dropout on too)."""
    cfg = VARIANTS[name]
    graphdef, params = _params(cfg)
    m = nnx.merge(graphdef, params)
    tokens = jax.random.randint(jax.random.key(1), (2, cfg.seq_len), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(cfg.seq_len), tokens.shape)
    rng = jax.random.key(3) if cfg.dropout else None
    x_BxLxD = m.embed(tokens, positions)
    t = 7

    def logits_at_t(x):
        return m.logits(m.layers(x, positions, rng))[:, t].astype(jnp.float32).sum()

    grad_BxLxD = jax.grad(logits_at_t)(x_BxLxD)
    per_position = jnp.abs(grad_BxLxD.astype(jnp.float32)).sum(axis=(0, 2))
    assert float(per_position[t + 1 :].max()) == 0.0
    assert float(per_position[: t + 1].min()) > 0.0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_forward_shapes_and_finite(name):
    cfg = VARIANTS[name]
    graphdef, params = _params(cfg)
    tokens = jnp.arange(2 * cfg.seq_len).reshape(2, cfg.seq_len) % cfg.vocab_size
    logits = model.apply(graphdef, params, tokens)
    assert logits.shape == (2, cfg.seq_len, cfg.padded_vocab)
    assert bool(jnp.isfinite(logits.astype(jnp.float32)).all())


def test_banded_attention_limits_reach():
    """With window w, position t does not depend on tokens before t - w + 1 in the banded
    layer; with every layer banded the receptive field is n_layer * (w - 1)."""
    cfg = dataclasses.replace(TINY, attention_windows=(3,), n_layer=2)
    graphdef, params = _params(cfg)
    base = jnp.zeros((1, cfg.seq_len), jnp.int32) + 5
    t = 12
    out = model.apply(graphdef, params, base)[0, t]
    reach = cfg.n_layer * (3 - 1)  # 4 positions back
    far = base.at[0, t - reach - 1].set(7)
    near = base.at[0, t - reach].set(7)
    np.testing.assert_array_equal(model.apply(graphdef, params, far)[0, t], out)
    assert not np.array_equal(model.apply(graphdef, params, near)[0, t], out)


def test_explicit_attention_matches_fused():
    """The dropout-capable attention path equals jax.nn.dot_product_attention at p=0."""
    cfg = dataclasses.replace(TINY, n_kv_head=2, attention_windows=(0, 5))
    graphdef, params = _params(cfg)
    m = nnx.merge(graphdef, params)
    x = jax.random.normal(jax.random.key(0), (2, cfg.seq_len, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(cfg.seq_len), (2, cfg.seq_len))
    graphdef_blocks, stacked = nnx.split(m.blocks)  # stacked layers; take layer 0
    block = nnx.merge(graphdef_blocks, jax.tree.map(lambda a: a[0], stacked))
    for window in (0, 5):
        fused = block.attn(x, positions, window, None)
        q = jnp.einsum("bld,dnh->blnh", x, block.attn.wq[...]) + block.attn.bq[...]
        k = jnp.einsum("bld,dkh->blkh", x, block.attn.wk[...]) + block.attn.bk[...]
        v = jnp.einsum("bld,dkh->blkh", x, block.attn.wv[...]) + block.attn.bv[...]
        explicit = block.attn._explicit(q, k, v, window, None)
        explicit = jnp.einsum("blnh,nhd->bld", explicit, block.attn.wo[...]) + block.attn.bo[...]
        np.testing.assert_allclose(fused, explicit, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 40])
def test_blocked_attention_matches_dot_product_attention(window):
    """Values and gradients of the block-skipping causal attention (GQA, 4 query blocks)
    equal jax.nn.dot_product_attention's, in f32 to rounding."""
    b, length, n, kv, h = 2, 128, 4, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, length, n, h))
    k = jax.random.normal(keys[1], (b, length, kv, h))
    v = jax.random.normal(keys[2], (b, length, kv, h))
    probe = jax.random.normal(keys[3], (b, length, n, h))

    def reference(q, k, v):
        local = (window - 1, 0) if window else None
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local)

    def blocked(q, k, v):
        return model.blocked_causal_attention(q, k, v, window)

    np.testing.assert_allclose(blocked(q, k, v), reference(q, k, v), atol=1e-5, rtol=1e-5)
    grads = [jax.grad(lambda *a, f=f: (f(*a) * probe).sum(), (0, 1, 2))(q, k, v)
             for f in (blocked, reference)]  # fmt: skip
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_blocked_unrolled_model_matches_default():
    cfg = dataclasses.replace(TINY, seq_len=128, n_kv_head=2, attention_windows=(0, 24))
    fast = dataclasses.replace(cfg, attention_impl="blocked", scan_layers=False)
    graphdef, params = _params(cfg)
    graphdef_fast, _ = _params(fast)
    tokens = jax.random.randint(jax.random.key(1), (2, cfg.seq_len), 0, cfg.vocab_size)
    np.testing.assert_allclose(
        model.apply(graphdef_fast, params, tokens),
        model.apply(graphdef, params, tokens),
        atol=1e-5,
        rtol=1e-5,
    )


def test_init_statistics_and_residual_scaling():
    cfg = ModelConfig(vocab_size=512, seq_len=64, n_layer=8, d_model=256, n_head=4)
    _, params = _params(cfg)
    assert abs(float(jnp.std(params["wte"])) - 0.02) < 0.001
    expected_out = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert abs(float(jnp.std(params["blocks"]["mlp"]["w_out"])) - expected_out) < 0.0005
    assert abs(float(jnp.std(params["blocks"]["attn"]["wo"])) - expected_out) < 0.0005
    assert float(jnp.abs(params["blocks"]["attn"]["bq"]).max()) == 0.0
    assert float(jnp.min(params["blocks"]["norm1"]["scale"])) == 1.0


def test_every_parameter_has_logical_axes():
    cfg = VARIANTS["llama"]
    _, abstract = model.abstract_model(cfg)
    specs = nnx.get_partition_spec(abstract)
    for path, var in nnx.to_flat_state(specs):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.get_value()), path


def test_gpt2_124m_parameter_count():
    cfg = ModelConfig(
        vocab_size=50257, vocab_multiple=1, seq_len=1024, n_layer=12, d_model=768, n_head=12
    )
    _, abstract = model.abstract_model(cfg)
    assert model.param_count(nnx.to_pure_dict(abstract)) == 124_439_808


def test_flops_per_token_accounting():
    cfg = ModelConfig(vocab_size=50257, seq_len=1024, n_layer=12, d_model=768, n_head=12)
    n = model.non_embedding_params(cfg)
    dense = model.flops_per_token(cfg)
    assert dense == pytest.approx(6 * (n + 768 * cfg.padded_vocab) + 12 * 12 * 768 * (1024 + 1) / 2)
    banded = model.flops_per_token(dataclasses.replace(cfg, attention_windows=(0, 256)))
    assert banded < dense


def test_padded_vocabulary_rows_get_no_probability():
    cfg = TINY  # vocab 97 padded to 128
    graphdef, params = _params(cfg)
    params = {**params, "wte": params["wte"].at[cfg.vocab_size :].set(0.0)}  # as an import pads
    logits = model.apply(graphdef, params, jnp.zeros((1, 4), jnp.int32))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    assert float(probs[..., cfg.vocab_size :].max()) == 0.0
    np.testing.assert_allclose(probs[..., : cfg.vocab_size].sum(-1), 1.0, rtol=1e-5)
