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


def test_sampling_arguments_are_checked():
    for bad, match in [
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            Sampling(**bad)
    graphdef, params = _model(BASE)
    four = Sampling(max_new_tokens=4)
    for prompts, sampling, match in [
        ([[1, 2]], Sampling(max_new_tokens=0), "max_new_tokens must be >= 1"),
        ([[1, 2]], Sampling(max_new_tokens=24), "leaves no room for a prompt"),
        ([[1, 2]], Sampling(top_k=102, max_new_tokens=4), "top_k=102 is larger than"),
        ([[1, 2], [3, 101]], four, r"prompt 1: token ids \[101\] .*\[0, 101\)"),
        ([[-1]], four, r"prompt 0: token ids \[-1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate_ids(graphdef, params, BASE, prompts, sampling)
    # top_k == vocab_size is allowed (it keeps every token).
    assert (
        len(generate_ids(graphdef, params, BASE, [[1]], Sampling(top_k=101, max_new_tokens=2))[0])
        == 2
    )


def test_cut_ids_at_stop():
    pieces = {0: "a", 1: "\n", 2: "b", 3: "x\ny", 4: "c"}

    def decode(ids):
        return "".join(pieces[i] for i in ids)

    cut = generate.cut_ids_at_stop
    assert cut(decode, [0, 2, 4], ["\n"]) == [0, 2, 4]  # no stop sequence: all ids
    assert cut(decode, [0, 1, 1, 2], ["\n\n"]) == [0]  # a stop over two tokens
    assert cut(decode, [0, 3, 4], ["\n"]) == [0]  # the token the stop begins in goes
    assert cut(decode, [0, 2, 1, 4], ["c", "b"]) == [0]  # the earliest stop sequence wins
    assert cut(decode, [1, 0], ["\n"]) == []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, corpus, sp_model, token_cache):
    """A training workdir (3 steps) whose checkpoint carries a sentencepiece tokenizer."""
    from gptjax import train
    from gptjax.config import Config, DataConfig, TokenizerConfig, TrainConfig

    out = tmp_path_factory.mktemp("workdir")
    cfg = Config(
        model=ModelConfig(seq_len=32, n_layer=2, d_model=32, n_head=4),
        tokenizer=TokenizerConfig(path=str(sp_model)),
        data=DataConfig(sources=(str(corpus),), cache_dir=str(token_cache)),
        train=TrainConfig(steps=3, batch_size=8, log_every=1, eval_batches=1, sample_tokens=0),
        mesh=MeshConfig(data=-1),
    )
    train.train(cfg, out)
    return out


def _reference(checkpoint, prompts, sampling):
    """(new ids by generate_ids on the loaded checkpoint, its tokenizer or None)."""
    from gptjax.checkpoint import load_params
    from gptjax.config import from_dict
    from gptjax.tokenizer import tokenizer_from_record

    cfg_dict, params, record = load_params(checkpoint)
    model_cfg = from_dict(cfg_dict).model
    graphdef, _ = model.abstract_model(model_cfg)
    tok = tokenizer_from_record(record) if record else None
    if tok is not None:  # the checkpoint's tokenizer supplies EOS as the stop id
        sampling = dataclasses.replace(sampling, stop_ids=(tok.eos_id,))
    return generate_ids(graphdef, params, model_cfg, prompts, sampling), tok


def _cli(capsys, *argv):
    from gptjax import cli

    capsys.readouterr()
    rc = cli.main(["generate", *argv])
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err


def test_cli_generates_from_a_training_workdir(workdir, capsys):
    ckpt = str(workdir)
    greedy = ["--temperature", "0", "--max-new-tokens", "6"]
    ids_args = ["--checkpoint", ckpt, "--prompt-ids", "5,6,7", "--prompt-ids", "9", *greedy]
    want, tok = _reference(workdir, [[5, 6, 7], [9]], Sampling(temperature=0.0, max_new_tokens=6))
    assert any(want)

    # --format ids: one comma-separated line of new ids per prompt.
    rc, out, _ = _cli(capsys, *ids_args, "--format", "ids")
    assert rc == 0 and out == [",".join(map(str, w)) for w in want]

    # --prompt-ids in the default text format: the decoded new text of each prompt.
    rc, out, _ = _cli(capsys, *ids_args)
    assert rc == 0 and len(out) == 2
    for prompt, new, line in zip([[5, 6, 7], [9]], want, out, strict=True):
        assert tok.decode(prompt) + line == tok.decode(prompt + new)

    # --prompt: the prompt, then its continuation (what the model generated, not just any text).
    rc, out, _ = _cli(capsys, "--checkpoint", ckpt, "--prompt", "ROMEO:", *greedy)
    [romeo], _ = _reference(
        workdir, [tok.encode("ROMEO:")], Sampling(temperature=0.0, max_new_tokens=6)
    )
    assert romeo
    assert rc == 0 and "\n".join(out) == tok.decode(tok.encode("ROMEO:") + romeo)
    assert "\n".join(out) != "ROMEO:"

    rc, _, err = _cli(capsys, "--checkpoint", str(workdir / "nope"), "--prompt", "x")
    assert rc == 2 and "not found" in err


def test_cli_stop_sequences_cut_text_and_ids(workdir, capsys):
    """--stop applies to --format ids as well: the ids stop before the token in which
    the stop sequence begins, consistently with the text."""
    ckpt = str(workdir)
    args = ["--checkpoint", ckpt, "--prompt-ids", "5,6,7", "--max-new-tokens", "12", "--seed", "3"]
    rc, out, _ = _cli(capsys, *args, "--format", "ids")
    assert rc == 0
    full = [int(t) for t in out[0].split(",")]
    _, tok = _reference(workdir, [[5]], Sampling(max_new_tokens=1))

    def text(n):
        return generate.continuation_text(tok, [5, 6, 7], full[:n])

    # A stop sequence that begins on a token boundary, first occurring at token k >= 1.
    k = next(
        k
        for k in range(1, len(full))
        if text(k + 1).startswith(text(k)) and text(k + 1)[len(text(k)) :].strip()
        and text(k + 1)[len(text(k)) :] not in text(k)
    )  # fmt: skip
    stop = text(k + 1)[len(text(k)) :]
    rc, out, _ = _cli(capsys, *args, "--format", "ids", "--stop", stop)
    assert rc == 0 and out == [",".join(map(str, full[:k]))]
    rc, out, _ = _cli(capsys, *args, "--stop", stop)
    assert rc == 0 and "\n".join(out) == text(k)


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory):
    """A converted-style checkpoint without a tokenizer (the llama GQA variant)."""
    from gptjax import config as config_lib
    from gptjax.checkpoint import save_params

    cfg = VARIANTS["llama_gqa"]
    out = tmp_path_factory.mktemp("plain") / "ckpt"
    params = model.init_params(cfg, jax.random.key(7))
    save_params(out, config_lib.to_dict(config_lib.Config(model=cfg)), params, None)
    return out


def test_cli_argument_errors_exit_2(plain_checkpoint, capsys):
    ckpt = ["--checkpoint", str(plain_checkpoint), "--format", "ids", "--max-new-tokens", "4"]
    cases = [
        (["--prompt-ids", "1,2", "--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt-ids", "1,2", "--top-p", "0"], r"top_p must be in (0, 1]"),
        (["--prompt-ids", "1,2", "--top-p", "1.01"], r"top_p must be in (0, 1]"),
        (["--prompt-ids", "1,2", "--top-k=-2"], "top_k must be >= 0"),
        (["--prompt-ids", "1,2", "--top-k", "102"], "larger than the model's vocabulary of 101"),
        (["--prompt-ids", "1,2", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["--prompt-ids", "1,101"], "outside the model's vocabulary [0, 101)"),
        (["--prompt-ids=-1,3"], "token ids [-1]"),
        (["--prompt-ids", "1,x"], "expected comma-separated integers"),
        (["--prompt-ids", "1", "--stop", "\n"], "give stop token ids (--stop-id)"),
        (["--prompt", "hello"], "give --prompt-ids instead of --prompt"),
        ([], "one of them"),
        (["--prompt-ids", "1", "--max-new-tokens", "24"], "leaves no room for a prompt"),
        (["--prompt-ids", "1", "--mesh", "data=16"], "--mesh 'data=16': mesh [16, 1, 1]"),
        (["--prompt-ids", "1", "--mesh", "pipe=2"], "not one of data=N"),
    ]
    for extra, message in cases:
        rc, out, err = _cli(capsys, *ckpt, *extra)
        assert (rc, out) == (2, []), extra
        assert message in err, (extra, err)
    # No tokenizer: text output is refused, pointing to --format ids.
    rc, out, err = _cli(capsys, "--checkpoint", str(plain_checkpoint), "--prompt-ids", "1")
    assert rc == 2 and "use --format ids" in err


def test_cli_generates_on_a_mesh_like_on_one_device(plain_checkpoint, capsys):
    """Issue 3: the same greedy ids with the parameters sharded over fsdp/tensor (and
    data), read straight onto the mesh."""
    assert jax.device_count() == 8
    args = ["--checkpoint", str(plain_checkpoint), "--prompt-ids", "3,1,4,1", "--prompt-ids",
            "5,9", "--format", "ids", "--temperature", "0", "--max-new-tokens", "6"]  # fmt: skip
    rc, single, _ = _cli(capsys, *args)
    assert rc == 0 and len(single) == 2
    want, _ = _reference(
        plain_checkpoint, [[3, 1, 4, 1], [5, 9]], Sampling(temperature=0.0, max_new_tokens=6)
    )
    assert single == [",".join(map(str, w)) for w in want]
    for mesh in ("data=1,fsdp=2,tensor=4", "data=2,fsdp=2,tensor=2"):
        rc, out, _ = _cli(capsys, *args, "--mesh", mesh)
        assert rc == 0 and out == single, mesh
    loaded = generate.load(plain_checkpoint, sharding.make_mesh("fsdp=2,tensor=4"))
    wq = loaded.params["blocks"]["attn"]["wq"]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    assert len(wq.sharding.device_set) == 8
