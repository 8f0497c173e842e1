"""Conversion against reference implementations: transformers' GPT2LMHeadModel (import
and export), and an independent NumPy forward pass of llama2.c's run.c for its
version-0 model.bin format; plus the refusals of bad input."""

import argparse
import json
import math
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from hf_reference import random_gpt2

from gptjax import convert
from gptjax.checkpoint import load_params
from gptjax.config import from_dict
from gptjax.convert import ConvertError

# Only the tests of Hugging Face GPT-2 (and of pytorch_model.bin) need the reference
# packages; llama2.c and the refusals of bad input need NumPy alone.


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def transformers(torch):
    return pytest.importorskip("transformers")


# ----------------------------------------------------------------------------- helpers


def gptjax_logits(ckpt, tokens_BxL):
    """(config, logits [B, L, vocab_size] f32, tokenizer record) of a converted checkpoint."""
    import jax

    from gptjax import model

    cfg_dict, params, record = load_params(ckpt)
    cfg = from_dict(cfg_dict)
    graphdef, _ = model.abstract_model(cfg.model)
    logits = jax.jit(lambda p, t: model.apply(graphdef, p, t))(params, np.asarray(tokens_BxL))
    logits = np.asarray(logits, np.float32)
    assert logits.shape[-1] == cfg.model.padded_vocab
    return cfg, logits[..., : cfg.model.vocab_size], record


def hf_logits(model, tokens_BxL):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens_BxL), dtype=torch.long)).logits.numpy()


def random_tokens(vocab, batch=2, length=64, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


# ----------------------------------------------------------------------------- HF GPT-2


def test_hf_gpt2_safetensors_import_and_export_roundtrip(tmp_path, torch, transformers):
    hf = random_gpt2(seed=0)
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    tokens = random_tokens(1000)
    want = hf_logits(hf, tokens)

    out = convert.convert("hf-gpt2", None, str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    cfg, got, record = gptjax_logits(out, tokens)
    err = float(np.abs(got - want).max())
    print(f"hf-gpt2 safetensors import: max |logit diff| = {err:.3g}")
    assert np.abs(want).max() > 1.0  # logits far from zero: the test can tell
    assert err < 1e-4
    m = cfg.model
    assert (m.vocab_size, m.padded_vocab, m.n_layer, m.d_model, m.n_head) == (1000, 1024, 2, 64, 4)
    assert (m.position, m.norm, m.mlp, m.use_bias, m.tie_embeddings) == (
        "learned",
        "layernorm",
        "gelu",
        True,
        True,
    )
    assert cfg.tokenizer.kind == "gpt2" and record is None  # no tokenizer files given
    _, params, _ = load_params(out)
    assert not np.asarray(params["wte"])[1000:].any()  # padded rows are zero

    # The same model saved in shards (model.safetensors.index.json) imports identically.
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded = convert.import_hf_gpt2(tmp_path / "sharded", tmp_path / "ckpt_sharded")
    assert np.array_equal(gptjax_logits(sharded, tokens)[1], got)

    # Export back; transformers reloads it and computes the very same logits.
    exported = convert.convert(None, "hf-gpt2", str(out), str(tmp_path / "export"))
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    again = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    back = hf_logits(again, tokens)
    err_back = float(np.abs(back - want).max())
    print(f"hf-gpt2 export round trip: max |logit diff| = {err_back:.3g}")
    assert err_back <= 1e-6
    for name, p in hf.state_dict().items():
        assert torch.equal(p, again.state_dict()[name]), name


def test_hf_gpt2_pytorch_bin_hub_layout(tmp_path, torch, transformers):
    """pytorch_model.bin as the Hub's gpt2 has it: no `transformer.` prefix, the causal-
    mask buffers stored, lm_head.weight present; non-default n_inner, epsilon,
    activation name and reorder_and_upcast_attn (same function, other precision order)."""
    hf = random_gpt2(
        seed=1,
        n_inner=96,
        layer_norm_epsilon=1e-6,
        activation_function="gelu_pytorch_tanh",
        reorder_and_upcast_attn=True,
    )
    d = tmp_path / "hf"
    hf.config.save_pretrained(d)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] = hf.lm_head.weight.detach().clone()
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, d / "pytorch_model.bin")
    tokens = random_tokens(1000, seed=1)
    out = convert.import_hf_gpt2(d, tmp_path / "ckpt")
    cfg, got, _ = gptjax_logits(out, tokens)
    err = float(np.abs(got - hf_logits(hf, tokens)).max())
    print(f"hf-gpt2 pytorch_model.bin import: max |logit diff| = {err:.3g}")
    assert err < 1e-4
    assert cfg.model.ffn_dim == 96 and cfg.model.norm_eps == 1e-6


def test_hf_gpt2_untied_head_imports_but_does_not_export(tmp_path, torch, transformers):
    hf = random_gpt2(seed=2, tie_word_embeddings=False)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    hf.save_pretrained(tmp_path / "hf")
    tokens = random_tokens(1000, seed=2)
    out = convert.import_hf_gpt2(tmp_path / "hf", tmp_path / "ckpt")
    cfg, got, _ = gptjax_logits(out, tokens)
    assert not cfg.model.tie_embeddings
    assert float(np.abs(got - hf_logits(hf, tokens)).max()) < 1e-4
    with pytest.raises(ConvertError, match="tie_embeddings=False"):
        convert.export_hf_gpt2(out, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_hf_gpt2_tokenizer_files_recorded_and_exported(tmp_path, shared_data, torch, transformers):
    """GPT-2's real vocabulary: the HF names (vocab.json/merges.txt) are recorded, and
    the export writes them back for transformers' tokenizer."""
    from gptjax.config import TokenizerConfig
    from gptjax.tokenizer import load_tokenizer, tokenizer_from_record

    bpe = shared_data / "gpt2_bpe"
    hf = random_gpt2(seed=3, n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=50257)
    d = tmp_path / "hf"
    hf.save_pretrained(d)
    shutil.copy(bpe / "encoder.json", d / "vocab.json")
    shutil.copy(bpe / "vocab.bpe", d / "merges.txt")
    out = convert.import_hf_gpt2(d, tmp_path / "ckpt")
    tokens = random_tokens(50257, batch=1, length=16, seed=3)
    cfg, got, record = gptjax_logits(out, tokens)
    assert float(np.abs(got - hf_logits(hf, tokens)).max()) < 1e-4
    assert cfg.model.padded_vocab == 50304
    ours = load_tokenizer(TokenizerConfig(kind="gpt2", path=str(bpe)))
    assert record == ours.to_record()
    assert tokenizer_from_record(record).eos_id == 50256

    exported = convert.export_hf_gpt2(out, tmp_path / "export")
    assert (exported / "vocab.json").read_bytes() == (bpe / "encoder.json").read_bytes()
    assert (exported / "merges.txt").read_bytes() == (bpe / "vocab.bpe").read_bytes()
    hf_config = json.loads((exported / "config.json").read_text())
    assert hf_config["eos_token_id"] == 50256 and hf_config["vocab_size"] == 50257
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    text = "Hello world, it's 2024: naïve café!\n  indented"
    assert hf_tok(text)["input_ids"] == ours.encode(text)
    again = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    assert np.array_equal(hf_logits(again, tokens), hf_logits(hf, tokens))


# ----------------------------------------------------------------------------- llama2.c

LLAMA = dict(
    dim=64, hidden_dim=172, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, seq_len=32
)


def llama2c_weights(seed, p=LLAMA, tied=True):
    """Random weights in llama2.c's own layout: torch Linear weights [out, in]."""
    rng = np.random.default_rng(seed)
    D, F, L = p["dim"], p["hidden_dim"], p["n_layers"]
    hs = D // p["n_heads"]
    kv = p["n_kv_heads"] * hs

    def normal(*shape, std=1.0):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    # llama2.c model.py's precompute_freqs_cis, in float32 like torch.
    freqs = 1.0 / (10000.0 ** (np.arange(0, hs, 2)[: hs // 2].astype(np.float32) / hs))
    angles = np.outer(np.arange(p["seq_len"], dtype=np.float32), freqs.astype(np.float32))
    w = {
        "token_embedding_table": normal(p["vocab_size"], D),
        "rms_att_weight": 1.0 + normal(L, D, std=0.1),
        "wq": normal(L, D, D, std=1.5 / math.sqrt(D)),
        "wk": normal(L, kv, D, std=1.5 / math.sqrt(D)),
        "wv": normal(L, kv, D, std=1.0 / math.sqrt(D)),
        "wo": normal(L, D, D, std=1.0 / math.sqrt(D)),
        "rms_ffn_weight": 1.0 + normal(L, D, std=0.1),
        "w1": normal(L, F, D, std=1.0 / math.sqrt(D)),
        "w2": normal(L, D, F, std=1.0 / math.sqrt(F)),
        "w3": normal(L, F, D, std=1.0 / math.sqrt(D)),
        "rms_final_weight": 1.0 + normal(D, std=0.1),
        "freq_cis_real": np.cos(angles).astype(np.float32),
        "freq_cis_imag": np.sin(angles).astype(np.float32),
    }
    if not tied:
        w["wcls"] = normal(p["vocab_size"], D, std=1.0 / math.sqrt(D))
    return w


def write_llama2c(path, w, p=LLAMA):
    """A version-0 file: export.py's legacy_export order (header of 7 int32, negative
    vocab_size when the classifier is stored, then float32 tensors)."""
    vocab = p["vocab_size"] if "wcls" not in w else -p["vocab_size"]
    header = struct.pack(
        "7i",
        p["dim"],
        p["hidden_dim"],
        p["n_layers"],
        p["n_heads"],
        p["n_kv_heads"],
        vocab,
        p["seq_len"],
    )
    order = [
        "token_embedding_table",
        "rms_att_weight",
        "wq",
        "wk",
        "wv",
        "wo",
        "rms_ffn_weight",
        "w1",
        "w2",
        "w3",
        "rms_final_weight",
        "freq_cis_real",
        "freq_cis_imag",
    ] + (["wcls"] if "wcls" in w else [])
    with open(path, "wb") as f:
        f.write(header)
        for name in order:
            f.write(np.ascontiguousarray(w[name], "<f4").tobytes())


def llama2c_reference(w, tokens, p=LLAMA):
    """run.c's forward, one position at a time with a KV cache, in float64: logits [T, V]."""
    D, L = p["dim"], p["n_layers"]
    n_heads, n_kv = p["n_heads"], p["n_kv_heads"]
    hs = D // n_heads
    kv_dim = D * n_kv // n_heads
    kv_mul = n_heads // n_kv
    w = {k: v.astype(np.float64) for k, v in w.items()}
    wcls = w.get("wcls", w["token_embedding_table"])

    def rmsnorm(x, weight):
        return weight * (x / np.sqrt(np.mean(x * x) + 1e-5))

    key_cache = np.zeros((L, len(tokens), kv_dim))
    value_cache = np.zeros((L, len(tokens), kv_dim))
    out = []
    for pos, token in enumerate(tokens):
        x = w["token_embedding_table"][token].copy()
        for layer in range(L):
            xb = rmsnorm(x, w["rms_att_weight"][layer])
            q = w["wq"][layer] @ xb
            k = w["wk"][layer] @ xb
            v = w["wv"][layer] @ xb
            for i in range(0, D, 2):  # rotate pairs (i, i+1) with the stored tables
                fcr = w["freq_cis_real"][pos, (i % hs) // 2]
                fci = w["freq_cis_imag"][pos, (i % hs) // 2]
                vecs = (q, k) if i < kv_dim else (q,)
                for vec in vecs:
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
            key_cache[layer, pos], value_cache[layer, pos] = k, v
            xb = np.zeros(D)
            for h in range(n_heads):
                qh = q[h * hs : (h + 1) * hs]
                kv_off = (h // kv_mul) * hs
                att = np.array(
                    [
                        qh @ key_cache[layer, t, kv_off : kv_off + hs] / math.sqrt(hs)
                        for t in range(pos + 1)
                    ]
                )
                att = np.exp(att - att.max())
                att /= att.sum()
                for t in range(pos + 1):
                    xb[h * hs : (h + 1) * hs] += (
                        att[t] * value_cache[layer, t, kv_off : kv_off + hs]
                    )
            x = x + w["wo"][layer] @ xb
            xb = rmsnorm(x, w["rms_ffn_weight"][layer])
            hb = w["w1"][layer] @ xb
            hb2 = w["w3"][layer] @ xb
            hb = hb * (1.0 / (1.0 + np.exp(-hb))) * hb2
            x = x + w["w2"][layer] @ hb
        out.append(wcls @ rmsnorm(x, w["rms_final_weight"]))
    return np.stack(out)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_llama2c_matches_run_c_reference(tmp_path, tied):
    w = llama2c_weights(seed=10 + tied, tied=tied)
    write_llama2c(tmp_path / "model.bin", w)
    out = convert.convert("llama2c", None, str(tmp_path / "model.bin"), str(tmp_path / "ckpt"))
    tokens = np.random.default_rng(5).integers(0, LLAMA["vocab_size"], LLAMA["seq_len"])
    cfg, got, record = gptjax_logits(out, tokens[None].astype(np.int32))
    want = llama2c_reference(w, tokens)
    err = float(np.abs(got[0] - want).max())
    print(f"llama2c ({'tied' if tied else 'untied'}): max |logit diff| = {err:.3g}")
    assert np.abs(want).max() > 1.0  # logits far from zero: the test can tell
    assert err < 1e-4
    m = cfg.model
    assert (m.n_kv_head, m.d_ff, m.seq_len, m.tie_embeddings) == (2, 172, 32, tied)
    assert (m.norm, m.position, m.mlp, m.use_bias) == ("rmsnorm", "rope", "swiglu", False)
    assert record is None
    # A GPT-2 export of this architecture is refused, naming the reasons.
    with pytest.raises(ConvertError, match="position=rope.*norm=rmsnorm"):
        convert.export_hf_gpt2(out, tmp_path / "export")


# ----------------------------------------------------------------------------- bad input


def assert_not_created(path):
    assert not path.exists()
    assert not list(path.parent.glob(f".{path.name}*")), "a temporary directory was left"


def test_llama2c_truncated_file(tmp_path):
    write_llama2c(tmp_path / "model.bin", llama2c_weights(0))
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-1000])
    with pytest.raises(ConvertError, match=r"cut\.bin.*truncated"):
        convert.import_llama2c(tmp_path / "cut.bin", tmp_path / "out")
    assert_not_created(tmp_path / "out")
    (tmp_path / "tiny.bin").write_bytes(data[:12])
    with pytest.raises(ConvertError, match="too short"):
        convert.import_llama2c(tmp_path / "tiny.bin", tmp_path / "out")
    assert_not_created(tmp_path / "out")


def test_llama2c_header_does_not_match_file(tmp_path):
    w = llama2c_weights(0)
    write_llama2c(tmp_path / "model.bin", w)
    data = bytearray((tmp_path / "model.bin").read_bytes())
    data[4:8] = struct.pack("i", 200)  # hidden_dim 172 -> 200: sizes no longer add up
    (tmp_path / "bad.bin").write_bytes(bytes(data))
    with pytest.raises(ConvertError, match=r"hidden_dim=200.*implies \d+ bytes"):
        convert.import_llama2c(tmp_path / "bad.bin", tmp_path / "out")
    assert_not_created(tmp_path / "out")
    data[4:8] = struct.pack("i", 172)
    data[20:24] = struct.pack("i", -100)  # claims an untied classifier that is not there
    (tmp_path / "bad.bin").write_bytes(bytes(data))
    with pytest.raises(ConvertError, match="separate classifier.*truncated"):
        convert.import_llama2c(tmp_path / "bad.bin", tmp_path / "out")
    data[20:24] = struct.pack("i", 100)
    data[12:16] = struct.pack("i", 5)  # n_heads 5 does not divide dim 64
    (tmp_path / "bad.bin").write_bytes(bytes(data))
    with pytest.raises(ConvertError, match="inconsistent header"):
        convert.import_llama2c(tmp_path / "bad.bin", tmp_path / "out")
    (tmp_path / "v1.bin").write_bytes(struct.pack("Ii", 0x616B3432, 1) + bytes(data[8:]))
    with pytest.raises(ConvertError, match="version-1"):
        convert.import_llama2c(tmp_path / "v1.bin", tmp_path / "out")
    assert_not_created(tmp_path / "out")


def test_llama2c_rope_tables_are_checked(tmp_path):
    """Tables of another convention (here: real/imag swapped) are refused, not imported."""
    w = llama2c_weights(0)
    w["freq_cis_real"], w["freq_cis_imag"] = w["freq_cis_imag"], w["freq_cis_real"]
    write_llama2c(tmp_path / "model.bin", w)
    with pytest.raises(ConvertError, match="freq_cis_real differs from rope"):
        convert.import_llama2c(tmp_path / "model.bin", tmp_path / "out")
    assert_not_created(tmp_path / "out")


def test_hf_gpt2_bad_directories(tmp_path, torch, transformers):
    hf = random_gpt2(seed=4, n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=50)
    good = tmp_path / "good"
    hf.save_pretrained(good)
    out = tmp_path / "out"

    def case(name, edit, match):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        with pytest.raises(ConvertError, match=match):
            convert.import_hf_gpt2(d, out)
        assert_not_created(out)

    case("noweights", lambda d: (d / "model.safetensors").unlink(), "no weights found")
    case("noconfig", lambda d: (d / "config.json").unlink(), r"config\.json: file not found")

    def set_config(**kv):
        def edit(d):
            c = json.loads((d / "config.json").read_text())
            c.update(kv)
            (d / "config.json").write_text(json.dumps(c))

        return edit

    case("llama", set_config(model_type="llama"), "model_type is 'llama'")
    case("relu", set_config(activation_function="relu"), "activation_function 'relu'")
    case("erf", set_config(activation_function="gelu"), "activation_function 'gelu'")
    case(
        "invlayer",
        set_config(scale_attn_by_inverse_layer_idx=True),
        "scale_attn_by_inverse_layer_idx",
    )
    case("layers", set_config(n_layer=2), r"missing 12 GPT-2 tensors.*h\.1\.ln_1\.weight")
    case("width", set_config(n_positions=32), r"wpe\.weight is \(16, 32\), expected \(32, 32\)")

    def truncate(d):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])

    case("truncated", truncate, r"model\.safetensors.*truncated")
    case("halftok", lambda d: (d / "vocab.json").write_text("{}"), "not merges.txt")

    def pickled(d):
        (d / "model.safetensors").unlink()
        torch.save({"wte.weight": argparse.Namespace(x=1)}, d / "pytorch_model.bin")

    case("pickle", pickled, "weights_only")
    with pytest.raises(ConvertError, match="not found"):
        convert.import_hf_gpt2(tmp_path / "nowhere", out)


def test_non_empty_output_dir_is_refused(tmp_path):
    write_llama2c(tmp_path / "model.bin", llama2c_weights(0))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConvertError, match="not empty"):
        convert.import_llama2c(tmp_path / "model.bin", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ConvertError, match="not empty"):
        convert.convert(None, "hf-gpt2", str(tmp_path / "whatever"), str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_convert_dispatch_errors(tmp_path):
    with pytest.raises(ConvertError, match="exactly one of --from"):
        convert.convert("hf-gpt2", "hf-gpt2", "a", "b")
    with pytest.raises(ConvertError, match="exactly one of --from"):
        convert.convert(None, None, "a", "b")
    with pytest.raises(ConvertError, match="unknown --from format 'gguf'"):
        convert.convert("gguf", None, "a", "b")
    with pytest.raises(ConvertError, match="unknown --to format 'llama2c'"):
        convert.convert(None, "llama2c", "a", "b")


def test_truncated_legacy_pytorch_bin_is_reported_as_truncated(tmp_path, torch):
    """A legacy (pre-zip) pytorch_model.bin cut short: truncation, wherever the cut
    falls (inside a pickle, where torch's weights_only unpickler raises UnpicklingError,
    or inside the tensor data), never "pickled objects other than tensors"."""
    d = tmp_path / "hf"
    d.mkdir()
    config = dict(model_type="gpt2", n_layer=1, n_embd=8, n_head=2, n_positions=4, vocab_size=10)
    (d / "config.json").write_text(json.dumps(config))
    state = {"wte.weight": torch.randn(10, 8), "h.0.ln_1.bias": torch.randn(8)}
    torch.save(state, tmp_path / "full.bin", _use_new_zipfile_serialization=False)
    data = (tmp_path / "full.bin").read_bytes()
    out = tmp_path / "out"
    unpickling_errors = 0
    for cut in [*range(1, 700, 7), len(data) // 2, len(data) - 1]:
        (d / "pytorch_model.bin").write_bytes(data[:cut])
        try:
            torch.load(d / "pytorch_model.bin", weights_only=True)
        except Exception as e:  # what torch itself says about this cut
            unpickling_errors += type(e).__name__ == "UnpicklingError"
        with pytest.raises(ConvertError) as e:
            convert.import_hf_gpt2(d, out)
        assert "truncated" in str(e.value) and "pickled objects" not in str(e.value), cut
        assert_not_created(out)
    assert unpickling_errors  # the misleading case is among the cuts
    # A complete legacy file is read (and then refused for its missing GPT-2 tensors).
    (d / "pytorch_model.bin").write_bytes(data)
    with pytest.raises(ConvertError, match="missing 14 GPT-2 tensors"):
        convert.import_hf_gpt2(d, out)


def test_export_without_safetensors_is_a_clear_error(tmp_path, monkeypatch):
    import jax

    from gptjax import config as config_lib
    from gptjax import model
    from gptjax.checkpoint import save_params
    from gptjax.config import ModelConfig

    cfg = ModelConfig(vocab_size=50, seq_len=16, n_layer=1, d_model=16, n_head=2)
    params = model.init_params(cfg, jax.random.key(0))
    save_params(tmp_path / "ckpt", config_lib.to_dict(config_lib.Config(model=cfg)), params, None)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ConvertError, match="needs the safetensors package.*pip install"):
        convert.export_hf_gpt2(tmp_path / "ckpt", tmp_path / "export")
    assert_not_created(tmp_path / "export")


def test_llama2c_with_a_tokenizer_generates_text(tmp_path, sp_model, capsys):
    """`convert --tokenizer` records a SentencePiece model into a llama2.c checkpoint,
    which then generates from text prompts; a tokenizer with more ids than the model
    embeds is refused."""
    from gptjax import cli
    from gptjax.tokenizer import SentencePieceTokenizer, tokenizer_from_record

    p = dict(LLAMA, vocab_size=512)  # the sp_model fixture's vocabulary
    write_llama2c(tmp_path / "model.bin", llama2c_weights(0, p=p), p=p)
    argv = ["convert", "--from", "llama2c", "--input", str(tmp_path / "model.bin"),
            "--tokenizer", str(sp_model), "--output", str(tmp_path / "ckpt")]  # fmt: skip
    assert cli.main(argv) == 0
    cfg_dict, _, record = load_params(tmp_path / "ckpt")
    tok = SentencePieceTokenizer(sp_model.read_bytes())
    assert record == tok.to_record() and from_dict(cfg_dict).tokenizer.kind == "sentencepiece"
    assert tokenizer_from_record(record).vocab_size == 512

    gen = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--temperature", "0",
           "--max-new-tokens", "5"]  # fmt: skip
    capsys.readouterr()
    assert cli.main([*gen, "--prompt-ids", ",".join(map(str, tok.encode("ROMEO:"))),
                     "--format", "ids"]) == 0  # fmt: skip
    new = [int(t) for t in capsys.readouterr().out.strip().split(",") if t]
    assert cli.main([*gen, "--prompt", "ROMEO:"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(tok.encode("ROMEO:") + new)

    # The 100-id model of LLAMA cannot take the 512-id tokenizer.
    write_llama2c(tmp_path / "small.bin", llama2c_weights(0))
    with pytest.raises(ConvertError, match="tokenizer has 512 ids but the model only 100"):
        convert.import_llama2c(tmp_path / "small.bin", tmp_path / "out", tokenizer=sp_model)
    assert_not_created(tmp_path / "out")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ConvertError, match="not a SentencePiece .model file"):
        convert.import_llama2c(
            tmp_path / "model.bin", tmp_path / "out", tokenizer=tmp_path / "junk.model"
        )
    with pytest.raises(ConvertError, match="not found"):
        convert.import_llama2c(
            tmp_path / "model.bin", tmp_path / "out", tokenizer=tmp_path / "nope"
        )
    with pytest.raises(ConvertError, match="--tokenizer applies to imports"):
        convert.convert(None, "hf-gpt2", str(tmp_path / "ckpt"), str(tmp_path / "out"), sp_model)
    assert_not_created(tmp_path / "out")


def test_convert_tokenizer_directory_is_gpt2_bpe(tmp_path, shared_data):
    write_llama2c(tmp_path / "model.bin", llama2c_weights(0))
    with pytest.raises(ConvertError, match="tokenizer has 50257 ids but the model only 100"):
        convert.import_llama2c(tmp_path / "model.bin", tmp_path / "out", shared_data / "gpt2_bpe")
    with pytest.raises(ConvertError, match="GPT-2 BPE directory"):
        convert.import_llama2c(tmp_path / "model.bin", tmp_path / "out", tokenizer=tmp_path)
    assert_not_created(tmp_path / "out")


def test_import_is_light():
    code = (
        "import sys, gptjax.convert; "
        "print([m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cli_convert_then_greedy_generation_matches_transformers(
    tmp_path, capsys, torch, transformers
):
    """End to end through the commands: an imported GPT-2 greedily continues a prompt
    exactly as transformers' generate (use_cache=True) does."""
    from gptjax import cli

    hf = random_gpt2(seed=5)
    hf.save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", "--from", "hf-gpt2", "--input", str(tmp_path / "hf"),
                     "--output", str(tmp_path / "ckpt")]) == 0  # fmt: skip
    prompt = [17, 250, 3, 999, 42]
    with torch.no_grad():
        want = hf.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, use_cache=True,
            eos_token_id=None, pad_token_id=0,
        )[0, len(prompt) :].tolist()  # fmt: skip
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt-ids",
            ",".join(map(str, prompt)), "--format", "ids", "--temperature", "0",
            "--max-new-tokens", "12"]  # fmt: skip
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == ",".join(map(str, want))
    assert cli.main(["convert", "--to", "hf-gpt2", "--input", str(tmp_path / "missing"),
                     "--output", str(tmp_path / "out")]) == 2  # fmt: skip


class _Marker:
    """Unpickling this would create a file: proof that nothing was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _cli_convert(*argv) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-m", "gptjax", "convert", *map(str, argv)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    return out.returncode, out.stderr


def test_a_plain_pickle_in_pytorch_model_bin_is_named_as_such(tmp_path):
    """Not a torch.save file but pickle.dump (of tensors' lists, or of an object that
    would run code): refused as what it is, never unpickled, never called truncated."""
    import pickle

    d = tmp_path / "hf"
    d.mkdir()
    config = dict(model_type="gpt2", n_layer=1, n_embd=8, n_head=2, n_positions=4, vocab_size=10)
    (d / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "executed"
    for payload in ({"wte.weight": [[0.0] * 8] * 10}, {"wte.weight": _Marker(str(marker))}):
        (d / "pytorch_model.bin").write_bytes(pickle.dumps(payload, protocol=2))
        rc, err = _cli_convert("--from", "hf-gpt2", "--input", d, "--output", tmp_path / "out")
        assert rc == 2, err
        assert err.strip().splitlines() == [
            f"gptjax: {d / 'pytorch_model.bin'}: not a torch.save file (a plain pickle): "
            "pickled objects refused"
        ], err
        assert not marker.exists() and not (tmp_path / "out").exists()


def test_pytorch_bin_without_torch_says_which_extra(tmp_path, torch, transformers):
    """With torch unimportable: a pytorch_model.bin is one line naming the `reference`
    extra; the same model as safetensors converts without torch."""
    hf = random_gpt2(seed=6, n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=50)
    hf.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "st" / "config.json", tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    no_torch = (
        "import sys; sys.modules['torch'] = None; from gptjax import cli; "
        "sys.exit(cli.main(['convert', '--from', 'hf-gpt2', '--input', sys.argv[1], "
        "'--output', sys.argv[2]]))"
    )
    for name, want_rc in (("bin", 2), ("st", 0)):
        out = subprocess.run(
            [sys.executable, "-c", no_torch, str(tmp_path / name), str(tmp_path / f"{name}_out")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == want_rc, out.stderr[-3000:]
        if name == "bin":
            bin_path = tmp_path / "bin" / "pytorch_model.bin"
            assert out.stderr.strip().splitlines() == [
                f"gptjax: {bin_path}: .bin weights need torch: install the `reference` extra "
                "(pip install 'gptjax[reference]') or torch; model.safetensors needs nothing "
                "more"
            ], out.stderr
    np.testing.assert_array_equal(
        load_params(tmp_path / "st_out")[1]["wte"][:50],
        hf.transformer.wte.weight.detach().numpy(),
    )
