"""Beam search equals transformers' generate(num_beams, length_penalty, early_stopping=True)
token for token, on a random GPT-2 imported with gptjax.convert: a ragged batch (left
padding), and an EOS the beams reach at different lengths."""

import numpy as np
import pytest
from hf_reference import random_gpt2

from gptjax import convert, generate
from gptjax.generate import Sampling

N_NEW = 12
EOS = 699  # one of this seeded model's frequent tokens, made likelier below
PROMPT_LENGTHS = (7, 3, 12, 1, 9, 5, 4, 10)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch = pytest.importorskip("torch")
    hf = random_gpt2(0, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.no_grad():  # EOS likelier (tied head), so beams finish at many lengths
        hf.transformer.wte.weight[EOS] *= 1.3
    tmp = tmp_path_factory.mktemp("beam")
    hf.save_pretrained(tmp / "hf")
    ckpt = convert.import_hf_gpt2(tmp / "hf", tmp / "ckpt")
    return hf, generate.load(ckpt), ckpt


def _prompts():
    rng = np.random.default_rng(0)
    return [[int(t) for t in rng.integers(0, 999, n)] for n in PROMPT_LENGTHS]


def _hf_beam(hf, prompts, num_beams, length_penalty):
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(
            ids, attention_mask=mask, num_beams=num_beams, length_penalty=length_penalty,
            early_stopping=True, max_new_tokens=N_NEW, do_sample=False, eos_token_id=EOS,
            pad_token_id=EOS,
        )  # fmt: skip
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(EOS)] if EOS in row else row)
    return rows


@pytest.mark.parametrize("num_beams,length_penalty", [(4, 0.6), (3, 1.0), (4, 2.0)])
def test_beam_search_equals_transformers(models, num_beams, length_penalty):
    hf, loaded, _ = models
    prompts = _prompts()
    want = _hf_beam(hf, prompts, num_beams, length_penalty)
    sampling = Sampling(
        temperature=0.0, max_new_tokens=N_NEW, stop_ids=(EOS,), num_beams=num_beams,
        length_penalty=length_penalty,
    )  # fmt: skip
    got = loaded.generate(prompts, sampling)
    assert got == want
    # The case is a real one: hypotheses ended by EOS won at several lengths short of
    # N_NEW, and beam search chose differently from greedy decoding somewhere.
    assert len({len(w) for w in want if len(w) < N_NEW}) >= 2, [len(w) for w in want]
    greedy = loaded.generate(prompts, Sampling(0.0, max_new_tokens=N_NEW, stop_ids=(EOS,)))
    assert greedy != got


def test_cli_beam_search(models, capsys):
    """`gptjax generate --num-beams 4 --length-penalty 0.6` prints transformers' tokens."""
    from gptjax import cli

    hf, _, ckpt = models
    prompts = _prompts()[:3]
    argv = ["generate", "--checkpoint", str(ckpt), "--num-beams", "4", "--length-penalty",
            "0.6", "--max-new-tokens", str(N_NEW), "--stop-id", str(EOS), "--format", "ids"]  # fmt: skip
    for p in prompts:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    capsys.readouterr()
    assert cli.main(argv) == 0
    got = [[int(t) for t in line.split(",") if t] for line in capsys.readouterr().out.splitlines()]
    assert got == _hf_beam(hf, prompts, 4, 0.6)
    assert cli.main([*argv, "--top-k", "5"]) == 2
    assert "top_k/top_p do not apply" in capsys.readouterr().err


def test_beam_arguments_are_checked():
    with pytest.raises(ValueError, match="num_beams"):
        Sampling(num_beams=0)
    with pytest.raises(ValueError, match="top_k/top_p"):
        Sampling(num_beams=2, top_k=5)
    with pytest.raises(ValueError, match="length_penalty"):
        Sampling(num_beams=2, length_penalty=float("nan"))
