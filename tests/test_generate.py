"""KV-cache generation: cached logits equal a full forward pass; sampling; sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gptjax import generate, model, sharding
from gptjax.config import MeshConfig, ModelConfig
from gptjax.generate import Sampling, generate_ids
from gptjax.model import KVCache

BASE = ModelConfig(vocab_size=101, seq_len=24, n_layer=2, d_model=32, n_head=4)
VARIANTS = {
    "gpt2": BASE,
    "gpt1_postln": dataclasses.replace(BASE, prenorm=False),
    "llama_gqa": dataclasses.replace(
        BASE, norm="rmsnorm", position="rope", mlp="swiglu", n_kv_head=2, use_bias=False,
        tie_embeddings=False,
    ),
    "gpt3_banded": dataclasses.replace(BASE, attention_windows=(0, 4)),
}  # fmt: skip

# f32 on CPU: cached and full attention sum the same terms in a different order
# (masked slots contribute exact zeros), so differences stay at rounding level.
ATOL = 1e-5


def _model(cfg, seed=0):
    graphdef, _ = model.abstract_model(cfg)
    return graphdef, model.init_params(cfg, jax.random.key(seed))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_decoding_equals_full_forward(name):
    cfg = VARIANTS[name]
    graphdef, params = _model(cfg)
    m = nnx.merge(graphdef, params)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 14), 0, cfg.vocab_size))
    pad = np.array([0, 3], np.int32)  # row 1 is left-padded by 3 slots
    full_row0 = model.apply(graphdef, params, tokens[:1])
    full_row1 = model.apply(graphdef, params, tokens[1:, 3:])

    slots = 14
    key_valid = jnp.arange(slots)[None, :] >= pad[:, None]
    cache = KVCache.empty(cfg, 2, slots, key_valid)
    positions = np.maximum(np.arange(14)[None, :] - pad[:, None], 0)
    prefill = 6
    logits, cache = m.decode(tokens[:, :prefill], positions[:, :prefill], cache)
    steps = [logits]
    for t in range(prefill, 14):
        logits, cache = m.decode(tokens[:, t : t + 1], positions[:, t : t + 1], cache)
        steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(cached[0], full_row0[0], atol=ATOL)
    np.testing.assert_allclose(cached[1, 3:], full_row1[0], atol=ATOL)


def _naive_greedy(graphdef, params, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model.apply(graphdef, params, jnp.asarray([ids]))
        ids.append(int(jnp.argmax(logits[0, -1, : BASE.vocab_size])))
    return ids[len(prompt) :]


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_greedy_ragged_batch_matches_one_by_one_full_forward(name):
    cfg = VARIANTS[name]
    graphdef, params = _model(cfg, seed=2)
    prompts = [[5, 7, 9, 11, 3], [42], [8, 8, 1]]
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    batch = generate_ids(graphdef, params, cfg, prompts, greedy)
    for prompt, got in zip(prompts, batch, strict=True):
        assert got == _naive_greedy(graphdef, params, prompt, 8)


def test_sampling_controls():
    cfg = BASE
    graphdef, params = _model(cfg, seed=3)
    prompts = [[1, 2, 3], [4, 5]]
    greedy = generate_ids(
        graphdef, params, cfg, prompts, Sampling(temperature=0.0, max_new_tokens=6)
    )
    top1 = generate_ids(graphdef, params, cfg, prompts, Sampling(top_k=1, max_new_tokens=6), seed=9)
    nucleus = generate_ids(
        graphdef, params, cfg, prompts, Sampling(top_p=1e-6, max_new_tokens=6), seed=9
    )
    assert top1 == greedy and nucleus == greedy
    hot = Sampling(temperature=1.5, max_new_tokens=6)
    a = generate_ids(graphdef, params, cfg, prompts, hot, seed=1)
    assert a == generate_ids(graphdef, params, cfg, prompts, hot, seed=1)
    assert a != generate_ids(graphdef, params, cfg, prompts, hot, seed=2)
    # A stop id ends its row; the stop id itself is not returned.
    stop = greedy[0][2]
    stopped = generate_ids(
        graphdef,
        params,
        cfg,
        prompts,
        Sampling(temperature=0.0, max_new_tokens=6, stop_ids=(stop,)),
    )
    assert stopped[0] == greedy[0][: greedy[0].index(stop)]


def test_top_p_keeps_the_smallest_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = jax.vmap(lambda k: generate.sample_logits(logits, k, Sampling(top_p=0.7))[0])(keys)
    counts = np.bincount(np.asarray(draws), minlength=4)
    assert counts[2] == counts[3] == 0  # 0.5 + 0.3 >= 0.7: only the first two remain
    assert 0.55 < counts[0] / counts[:2].sum() < 0.70  # renormalised 0.5 / 0.8


def test_generation_on_a_sharded_model_matches_single_device():
    cfg = VARIANTS["llama_gqa"]
    graphdef, params = _model(cfg, seed=4)
    greedy = Sampling(temperature=0.0, max_new_tokens=5)
    want = generate_ids(graphdef, params, cfg, [[3, 1, 4, 1], [5, 9]], greedy)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    _, abstract = model.abstract_model(cfg)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(params, sharding.param_shardings(abstract, mesh))
        assert sharded["blocks"]["attn"]["wq"].sharding.spec == P(None, "fsdp", "tensor", None)
        got = generate_ids(graphdef, sharded, cfg, [[3, 1, 4, 1], [5, 9]], greedy)
    assert got == want


def test_prompt_longer_than_context_is_cut_from_the_left():
    cfg = BASE
    graphdef, params = _model(cfg)
    greedy = Sampling(temperature=0.0, max_new_tokens=4)
    long = list(range(1, 40))
    assert generate_ids(graphdef, params, cfg, [long], greedy) == generate_ids(
        graphdef, params, cfg, [long[-(cfg.seq_len - 4) :]], greedy
    )
    with pytest.raises(ValueError, match="no room"):
        generate_ids(graphdef, params, cfg, [[1]], Sampling(max_new_tokens=cfg.seq_len))


def test_cli_generates_from_a_training_workdir(tmp_path, corpus, sp_model, token_cache, capsys):
    from gptjax import cli, train
    from gptjax.checkpoint import load_params
    from gptjax.config import (
        Config,
        DataConfig,
        MeshConfig,
        TokenizerConfig,
        TrainConfig,
        from_dict,
    )  # fmt: skip

    cfg = Config(
        model=ModelConfig(seq_len=32, n_layer=2, d_model=32, n_head=4),
        tokenizer=TokenizerConfig(path=str(sp_model)),
        data=DataConfig(sources=(str(corpus),), cache_dir=str(token_cache)),
        train=TrainConfig(steps=3, batch_size=8, log_every=1, eval_batches=1, sample_tokens=0),
        mesh=MeshConfig(data=-1),
    )
    train.train(cfg, tmp_path)
    capsys.readouterr()
    args = ["generate", "--checkpoint", str(tmp_path), "--prompt-ids", "5,6,7", "--prompt-ids", "9"]
    assert cli.main([*args, "--format", "ids", "--temperature", "0", "--max-new-tokens", "6"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line]
    cfg_dict, params, _ = load_params(tmp_path)
    model_cfg = from_dict(cfg_dict).model
    graphdef, _ = model.abstract_model(model_cfg)
    # The checkpoint's sentencepiece tokenizer supplies EOS as the stop id.
    from gptjax.tokenizer import tokenizer_from_record

    eos = tokenizer_from_record(load_params(tmp_path)[2]).eos_id
    want = generate_ids(
        graphdef,
        params,
        model_cfg,
        [[5, 6, 7], [9]],
        Sampling(temperature=0.0, max_new_tokens=6, stop_ids=(eos,)),
    )
    assert printed == [",".join(map(str, w)) for w in want]
    assert (
        cli.main(
            [
                "generate",
                "--checkpoint",
                str(tmp_path),
                "--prompt",
                "ROMEO:",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
