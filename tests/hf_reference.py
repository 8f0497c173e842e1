"""Reference models for parity tests (torch and transformers: test-only dependencies)."""

import math

import pytest


def random_gpt2(seed=0, **overrides):
    """A transformers GPT-2 with every parameter random (LayerNorms and biases too, so
    a misplaced bias or gain cannot hide), in eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kwargs = dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=1000)
    kwargs.update(overrides)
    kwargs.setdefault("bos_token_id", kwargs["vocab_size"] - 1)
    kwargs.setdefault("eos_token_id", kwargs["vocab_size"] - 1)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "wte" in name or "wpe" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[0]))
    return model


def gpt2_bpe_dir(hf, bpe):
    """hf (a new directory) with the real GPT-2 BPE saved as transformers saves it; the
    GPT2TokenizerFast. from_pretrained reads vocab.json + merges.txt (the names the
    gptjax importer records too)."""
    transformers = pytest.importorskip("transformers")
    hf.mkdir()
    (hf / "vocab.json").write_bytes((bpe / "encoder.json").read_bytes())
    (hf / "merges.txt").write_bytes((bpe / "vocab.bpe").read_bytes())
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(hf))
    assert tok("Hello world").input_ids == [15496, 995], "GPT-2 tokenizer did not load"
    tok.save_pretrained(hf)
    return tok
