"""lm-eval parity on the new request types, on one converted random GPT-2 (as
test_eval_lm_eval.py): arithmetic (loglikelihood, acc = is the completion greedy) and
nq_open (greedy generate_until, lm-eval's exact match), zero-shot, over local copies of
the shared files with lm-eval's own task definitions (its arithmetic process_docs, its
nq_open.yaml). Three routes must agree: lm-eval's hf backend, lm-eval on the "gptjax"
adapter, and `gptjax eval --num-beams 1`."""

import json
import re
import shutil
from pathlib import Path

import pytest
from hf_reference import gpt2_bpe_dir, random_gpt2
from test_eval_lm_eval import N_CTX, lm_eval  # noqa: F401  (module fixture)

from gptjax import cli
from gptjax.eval.synthetic import normalize_arithmetic

LIMIT = 24
MAX_GEN = 12
ARITH = "gpt3_synthetic/two_digit_addition.jsonl"
NQ = "nq_open/NQ-open.dev.jsonl"
STOPS = (13, 11, 198)  # GPT-2 ids of ".", "," and "\n", made likelier so rows stop early


@pytest.fixture(scope="module")
def gpt2(lm_eval, shared_data, tmp_path_factory):  # noqa: F811
    """(HF directory, gptjax checkpoint, arithmetic file) of a seeded random GPT-2 with
    the real BPE. The arithmetic file is the shared one's first LIMIT problems, every
    other completion replaced by the model's greedy next token where that is no stop
    token (so the per-example comparison sees both outcomes)."""
    torch = pytest.importorskip("torch")
    from gptjax.convert import import_hf_gpt2

    work = tmp_path_factory.mktemp("gpt2_gen")
    hf = work / "hf"
    tok = gpt2_bpe_dir(hf, shared_data / "gpt2_bpe")
    net = random_gpt2(
        0, vocab_size=50257, n_positions=N_CTX, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    with torch.no_grad():
        for t in STOPS:
            net.transformer.wte.weight[t] *= 4.0
    net.save_pretrained(hf, safe_serialization=True)
    rows = [json.loads(x) for x in (shared_data / ARITH).read_text().splitlines()[:LIMIT]]
    for row in rows[::2]:
        ids = tok(normalize_arithmetic(row["context"]), return_tensors="pt").input_ids
        with torch.no_grad():
            logits = net(ids).logits[0, -1]
        text = tok.decode([int(logits.argmax())])
        if re.fullmatch(r" \w+", text):  # a word after a space, as the real completions
            row["completion"] = text
    arith = work / "two_digit_addition.jsonl"
    arith.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return hf, import_hf_gpt2(hf, work / "ckpt"), arith


@pytest.fixture(scope="module")
def task_dir(lm_eval, gpt2, shared_data, tmp_path_factory):  # noqa: F811
    """lm-eval's arithmetic_2da and nq_open, unchanged but for local data files."""
    tmp = tmp_path_factory.mktemp("lm_eval_gen_tasks")
    tasks = Path(lm_eval.__file__).parent / "tasks"
    shutil.copy(tasks / "arithmetic" / "utils.py", tmp / "utils.py")
    yaml = (tasks / "arithmetic" / "arithmetic_1dc.yaml").read_text()
    yaml = yaml.replace("task: arithmetic_1dc", "task: arithmetic_2da_local").replace(
        "hf://datasets/EleutherAI/arithmetic/data/single_digit_three_ops.jsonl",
        str(gpt2[2]),
    )
    (tmp / "arithmetic_2da_local.yaml").write_text(yaml.replace("tag:\n  - arithmetic\n", ""))
    nq = (tasks / "nq_open" / "nq_open.yaml").read_text()
    nq = nq.replace("task: nq_open", "task: nq_open_local").replace(
        "dataset_path: google-research-datasets/nq_open",
        "dataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    train: {shared_data / 'nq_open' / 'NQ-open.efficientqa.dev.1.1.jsonl'}\n"
        f"    validation: {shared_data / NQ}",
    )
    nq = nq.replace("  do_sample: false", f"  do_sample: false\n  max_gen_toks: {MAX_GEN}")
    assert "max_gen_toks" in nq and "data_files" in nq
    (tmp / "nq_open_local.yaml").write_text(nq)
    return tmp


@pytest.fixture(scope="module")
def ours(gpt2, shared_data, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ours_gen")
    argv = ["--checkpoint", str(gpt2[1]), "--shots", "0", "--limit", str(LIMIT),
            "--batch-size", "8", "--mesh", "data=1", "--num-beams", "1",
            "--max-gen-tokens", str(MAX_GEN), "--output", str(out / "results.json"),
            "--log-samples", str(out / "samples.jsonl"), "--plot", str(out / "p.png"),
            "--task", f"arithmetic_2da={gpt2[2]}",
            "--task", f"nq_open={shared_data / NQ}"]  # fmt: skip
    assert cli.main(["eval", *argv]) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    results = {r["task"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    return results, {t: [s for s in samples if s["task"] == t] for t in results}


def _run(lm_eval, task_dir, **kw):  # noqa: F811
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        tasks=["arithmetic_2da_local", "nq_open_local"],
        task_manager=TaskManager(include_path=str(task_dir)),
        limit=LIMIT, log_samples=True, **kw,
    )  # fmt: skip


def _assert_agree(out, ours):
    results, samples = ours
    arith = sorted(out["samples"]["arithmetic_2da_local"], key=lambda s: s["doc_id"])
    assert len(arith) == len(samples["arithmetic_2da"]) == LIMIT
    for doc, mine in zip(arith, samples["arithmetic_2da"], strict=True):
        assert tuple(doc["arguments"][0]) == (mine["context"], mine["target"])
        assert float(doc["acc"]) == float(mine["is_greedy"]), doc["doc_id"]
    acc = out["results"]["arithmetic_2da_local"]["acc,none"]
    assert 0 < acc <= 0.5
    assert results["arithmetic_2da"]["metrics"]["acc"]["value"] == pytest.approx(acc, abs=1e-12)

    nq = sorted(out["samples"]["nq_open_local"], key=lambda s: s["doc_id"])
    assert len(nq) == len(samples["nq_open"]) == LIMIT
    for doc, mine in zip(nq, samples["nq_open"], strict=True):
        assert doc["arguments"][0][0] == mine["context"]
        assert doc["filtered_resps"][0] == mine["generation"].strip(), doc["doc_id"]
        assert float(doc["exact_match"]) == mine["exact_match"], doc["doc_id"]
    em = out["results"]["nq_open_local"]["exact_match,remove_whitespace"]
    assert results["nq_open"]["metrics"]["exact_match"]["value"] == pytest.approx(em, abs=1e-12)
    # Rows stopped at stop sequences, at different points, and some ran to MAX_GEN.
    lengths = [len(s["generation"]) for s in samples["nq_open"]]
    assert len(set(lengths)) > 3 and min(lengths) < max(lengths), lengths


def test_generation_and_arithmetic_hf_backend_agree(lm_eval, gpt2, task_dir, ours):  # noqa: F811
    out = _run(lm_eval, task_dir, model="hf", batch_size=8, device="cpu",
               model_args=f"pretrained={gpt2[0]},dtype=float32")  # fmt: skip
    _assert_agree(out, ours)
    print("arithmetic_2da acc:", ours[0]["arithmetic_2da"]["metrics"]["acc"]["value"])
    print("nq_open generations:", [s["generation"] for s in ours[1]["nq_open"]][:8])


def test_generation_and_arithmetic_adapter_agree(lm_eval, gpt2, task_dir, ours):  # noqa: F811
    import gptjax.eval.lm_eval_adapter  # noqa: F401  (registers "gptjax")

    out = _run(lm_eval, task_dir, model="gptjax", model_args=f"checkpoint={gpt2[1]},batch_size=8")
    _assert_agree(out, ours)


@pytest.mark.parametrize("pred,refs", [
    ("The Beatles", ["the beatles"]), ("THE Beatles", ["Beatles"]), ("a  dog", ["dog"]),
    ("Paris!", ["paris"]), ("An apple", ["apple", "pear"]), ("the-end", ["theend"]),
    ("Anne", ["ne"]), ("", ["x"]), ("14 December 1972", ["December 1972", "14 december 1972"]),
])  # fmt: skip
def test_exact_match_is_lm_evals(lm_eval, pred, refs):  # noqa: F811
    from lm_eval.api.metrics import exact_match_hf_evaluate

    from gptjax.eval.metrics import exact_match_lm_eval

    regex = ["\\b(?:The |the |An |A |The |a |an )"]
    for articles, kw in ((True, {"regexes_to_ignore": regex}), (False, {})):
        want = max(
            exact_match_hf_evaluate([pred], [r], ignore_case=True, ignore_punctuation=True, **kw)[
                "exact_match"
            ]
            for r in refs
        )
        assert exact_match_lm_eval(pred, refs, articles=articles) == want, (pred, refs, articles)
