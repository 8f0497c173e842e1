"""lm-eval parity on the shared HellaSwag and PIQA slices (zero-shot, lm-eval tasks over
local copies of the files, no download). One set of weights, three routes:

  hf      lm-eval's own `hf` backend on a seeded random transformers GPT2LMHeadModel
  gptjax  lm-eval on the model "gptjax" (gptjax.eval.lm_eval_adapter) over the same
          weights imported with gptjax.convert.import_hf_gpt2
  ours    `gptjax eval` on that checkpoint, with --log-samples

Each of hf and gptjax must agree with ours: the same prompts, identical acc and acc_norm
(and standard errors), and the same loglikelihood for every request. The adapter's
rolling loglikelihood and greedy generation are checked against an independent full
forward pass (model.apply over each window, log-softmax, gather / argmax).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import gpt2_bpe_dir, random_gpt2

from gptjax import cli, model
from gptjax.eval.scoring import EvalModel

LIMIT = 40
N_CTX = 128
TASKS = {"hellaswag": "hellaswag/hellaswag_val_first200.txt", "piqa": "piqa/valid_first200.jsonl"}
# Per-request loglikelihood tolerances, relative to |loglikelihood| (tens to hundreds of
# nats here: sums of 5-60 token log-probs of a 50257-way softmax).
# - hf vs ours: two float32 implementations (torch vs XLA) of the same network. A
#   float32 sum carries a relative rounding error of order n * 2^-24 ~ 1e-7 (the largest
#   seen on these slices is 1.6e-7); 2e-6 leaves a 10x margin, and is still far below
#   the gaps between options that decide acc and acc_norm.
# - gptjax (the adapter) vs ours: the same scoring code; only the batching differs (lm-eval
#   sends both tasks' requests in one call, so the length buckets, padding and the mesh
#   differ), which moves float32 results by a few ulps: 1e-6.
REL_TOL_HF = 2e-6
REL_TOL_ADAPTER = 1e-6


def cli_main(argv):
    """`gptjax eval ARGV`."""
    return cli.main(["eval", *argv])


@pytest.fixture(scope="module")
def lm_eval(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_cache")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", str(cache))
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")


@pytest.fixture(scope="module")
def task_dir(shared_data, tmp_path_factory):
    """lm-eval's hellaswag and piqa task definitions (prompts, choices, acc/acc_norm),
    over local files."""
    tmp = tmp_path_factory.mktemp("lm_eval_tasks")
    lines = (shared_data / TASKS["hellaswag"]).read_text().split("\n")
    with open(tmp / "hellaswag.jsonl", "w") as f:
        for i in range(0, 1200, 6):
            doc = {"query": lines[i], "label": lines[i + 1], "choices": lines[i + 2 : i + 6]}
            f.write(json.dumps(doc) + "\n")
    piqa = (shared_data / TASKS["piqa"]).read_text().splitlines()
    labels = (shared_data / "piqa" / "valid-labels_first200.lst").read_text().split()
    with open(tmp / "piqa.jsonl", "w") as f:
        for line, label in zip(piqa, labels, strict=True):
            f.write(json.dumps({**json.loads(line), "label": int(label)}) + "\n")
    common = "output_type: multiple_choice\ntest_split: test\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    (tmp / "hellaswag_local.yaml").write_text(
        "task: hellaswag_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp / 'hellaswag.jsonl'}\n"
        'doc_to_text: "{{query}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "choices"\n' + common
    )
    (tmp / "piqa_local.yaml").write_text(
        "task: piqa_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp / 'piqa.jsonl'}\n"
        'doc_to_text: "Question: {{goal}}\\nAnswer:"\ndoc_to_target: label\n'
        'doc_to_choice: "{{[sol1, sol2]}}"\n' + common
    )
    return tmp


@pytest.fixture(scope="module")
def gpt2(lm_eval, shared_data, tmp_path_factory):
    """(HF directory, gptjax checkpoint) of one seeded random GPT-2 with the real GPT-2
    BPE, so both sides tokenize identically. Every parameter is random (LayerNorm gains
    and biases too, so a misplaced one cannot hide) and the logits are far from uniform."""
    from gptjax.convert import import_hf_gpt2

    work = tmp_path_factory.mktemp("gpt2")
    hf = work / "hf"
    gpt2_bpe_dir(hf, shared_data / "gpt2_bpe")
    net = random_gpt2(
        0, vocab_size=50257, n_positions=N_CTX, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    net.save_pretrained(hf, safe_serialization=True)
    return hf, import_hf_gpt2(hf, work / "ckpt")


@pytest.fixture(scope="module")
def ours(gpt2, shared_data, tmp_path_factory):
    """`gptjax eval` on the imported checkpoint: {task: (result, per-example samples)}."""
    out = tmp_path_factory.mktemp("ours")
    argv = ["--checkpoint", str(gpt2[1]), "--shots", "0", "--limit", str(LIMIT),
            "--batch-size", "32", "--mesh", "data=1", "--output", str(out / "results.json"),
            "--log-samples", str(out / "samples.jsonl"), "--plot", str(out / "acc.png")]  # fmt: skip
    for name, rel in TASKS.items():
        argv += ["--task", f"{name}={shared_data / rel}"]
    assert cli_main(argv) == 0
    results = {r["task"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return {name: (results[name], [s for s in samples if s["task"] == name]) for name in TASKS}


def _run_lm_eval(lm_eval, task_dir, **kw) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        tasks=[f"{name}_local" for name in TASKS],
        task_manager=TaskManager(include_path=str(task_dir)),
        limit=LIMIT,
        log_samples=True,
        **kw,
    )


def _assert_agree(out: dict, ours: dict, rel_tol: float) -> float:
    """Same prompts, acc/acc_norm and their stderrs, and per-request loglikelihoods
    within rel_tol * |loglikelihood|. Returns the largest relative difference."""
    worst = 0.0
    for name, (result, samples) in ours.items():
        theirs = out["results"][f"{name}_local"]
        for metric in ("acc", "acc_norm"):
            assert result["metrics"][metric]["value"] == pytest.approx(
                theirs[f"{metric},none"], abs=1e-12
            ), (name, metric)
            assert result["metrics"][metric]["stderr"] == pytest.approx(
                theirs[f"{metric}_stderr,none"], rel=1e-9
            ), (name, metric)
        logged = sorted(out["samples"][f"{name}_local"], key=lambda s: s["doc_id"])
        assert len(logged) == len(samples) == LIMIT
        for doc, mine in zip(logged, samples, strict=True):
            # lm-eval's requests are (context, " " + choice) for each choice, in order.
            assert [tuple(a) for a in doc["arguments"]] == [
                (mine["context"], " " + c) for c in mine["choices"]
            ], (name, doc["doc_id"])
            lls = [float(r[0]) for r in doc["filtered_resps"]]
            for a, b in zip(lls, mine["loglikelihoods"], strict=True):
                rel = abs(a - b) / max(abs(b), 1.0)
                assert rel <= rel_tol, (name, doc["doc_id"], a, b)
                worst = max(worst, rel)
    return worst


def test_lm_eval_hf_backend_and_imported_weights_agree(lm_eval, gpt2, task_dir, ours):
    """Issue 4: transformers GPT-2 scored by lm-eval's own hf backend == the same weights
    imported into gptjax and scored by `gptjax eval`."""
    hf_dir, _ = gpt2
    out = _run_lm_eval(
        lm_eval, task_dir, model="hf", model_args=f"pretrained={hf_dir},dtype=float32",
        batch_size=16, device="cpu",
    )  # fmt: skip
    _assert_agree(out, ours, REL_TOL_HF)


def test_lm_eval_gptjax_adapter_and_gptjax_eval_agree(lm_eval, gpt2, task_dir, ours):
    """The registered model "gptjax" (from model_args, all 8 test devices data-parallel)
    == `gptjax eval` on one device, request for request."""
    import gptjax.eval.lm_eval_adapter  # noqa: F401  (registers "gptjax")

    out = _run_lm_eval(
        lm_eval, task_dir, model="gptjax", model_args=f"checkpoint={gpt2[1]},batch_size=32"
    )
    _assert_agree(out, ours, REL_TOL_ADAPTER)


def _full_forward_logp(em: EvalModel, tokens) -> np.ndarray:
    """[len(tokens), vocab] log-probabilities of the next token: one model.apply over the
    whole window, no cache, no buckets (the reference)."""
    assert len(tokens) <= em.n_ctx
    graphdef, _ = model.abstract_model(em.cfg)
    logits = model.apply(graphdef, em.scorer.params, jnp.asarray([tokens], jnp.int32))
    logits = logits[0, :, : em.cfg.vocab_size].astype(jnp.float32)
    return np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)


def test_registered_and_rolling_and_generate(lm_eval, gpt2, shared_data):
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from gptjax.eval.lm_eval_adapter import GptjaxLM

    assert get_model("gptjax") is GptjaxLM
    em = EvalModel.load(gpt2[1], batch_size=8)
    lm = GptjaxLM(model=em)
    eos, n = em.tokenizer.eos_id, em.n_ctx

    # Rolling: disjoint blocks of n_ctx predicted tokens, the first conditioned on EOS,
    # each later one on as much preceding text as fits (lm-eval's loglikelihood_rolling).
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text()[:1500]
    ids = em.tokenizer.encode(text)
    assert len(ids) > 2 * n  # three windows, the last one partial
    stream = [eos] + ids  # stream[j] is the token before ids[j]
    want = 0.0
    for s in range(0, len(ids), n):
        e = min(s + n, len(ids))
        start = max(0, e - n)
        logp = _full_forward_logp(em, stream[start:e])
        want += sum(logp[j - start, ids[j]] for j in range(s, e))
    [got] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert abs(got - want) <= REL_TOL_ADAPTER * abs(want), (got, want)

    # Greedy generation: the argmax of a full forward pass, token by token.
    prompt, max_new = "First Citizen:\nBefore we proceed", 6
    tokens, new = em.tokenizer.encode(prompt), []
    for _ in range(max_new):
        nxt = int(np.argmax(_full_forward_logp(em, tokens + new)[-1]))
        if nxt == eos:
            break
        new.append(nxt)
    want_text = em.tokenizer.decode(new).split("\n")[0]
    assert want_text  # something to compare (this seeded model: six tokens, no newline)
    [gen] = lm.generate_until(
        [Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": max_new}), 0)]
    )
    assert gen == want_text


def test_registering_gptjax_keeps_lm_eval_built_in_models():
    """Importing the adapter before lm-eval has loaded its models (a fresh process)
    must not hide them: simple_evaluate(model="hf") looks "hf" up with get_model."""
    import subprocess
    import sys

    code = (
        "import gptjax.eval.lm_eval_adapter as a\n"
        "from lm_eval.api.registry import get_model\n"
        "assert get_model('gptjax') is a.GptjaxLM\n"
        "print(get_model('hf').__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "HFLM", out.stderr[-2000:]
