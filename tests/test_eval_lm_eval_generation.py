"""lm-eval parity on the new request types, on one converted random GPT-2 (as
test_eval_lm_eval.py): the ten arithmetic tasks (loglikelihood, acc = is the completion
greedy) zero- and one-shot, and nq_open (greedy generate_until, lm-eval's exact match)
zero-shot, over local copies of the shared files with lm-eval's own task definitions (its
arithmetic yaml and process_docs, its nq_open.yaml). Three routes must agree: lm-eval's
hf backend, lm-eval on the "gptjax" adapter, and `gptjax eval --num-beams 1`.

One-shot: lm-eval draws demonstrations with one stateful Random over the docs in order,
gptjax with a seed per example (so a draw does not depend on --limit); the draws cannot
coincide. lm-eval is therefore given gptjax's draws (the demo_ids of its samples) through
a ContextSampler, and builds and scores the one-shot prompts itself."""

import json
import re
import shutil
from pathlib import Path

import pytest
from hf_reference import gpt2_bpe_dir, random_gpt2
from test_eval_lm_eval import N_CTX, REL_TOL_HF, lm_eval  # noqa: F401  (module fixture)

from gptjax import cli
from gptjax.eval.synthetic import ARITHMETIC, normalize_arithmetic

LIMIT = 24
ROWS = 6  # problems per arithmetic task
MAX_GEN = 12
ARITH = [n for n in ARITHMETIC if n.startswith("arithmetic_")]  # lm-eval's ten
NQ = "nq_open/NQ-open.dev.jsonl"
STOPS = (13, 11, 198)  # GPT-2 ids of ".", "," and "\n", made likelier so rows stop early


@pytest.fixture(scope="module")
def gpt2(lm_eval, shared_data, tmp_path_factory):  # noqa: F811
    """(HF directory, gptjax checkpoint, arithmetic folder) of a seeded random GPT-2 with
    the real BPE. Each arithmetic file is the shared one's first ROWS problems, every
    other completion replaced by the model's zero-shot greedy next token where that is a
    word (so the per-example comparison sees both outcomes)."""
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
    arith = work / "gpt3_synthetic"
    arith.mkdir()
    for name in ARITH:
        file = ARITHMETIC[name][0]
        lines = (shared_data / "gpt3_synthetic" / file).read_text().splitlines()[:ROWS]
        rows = [json.loads(x) for x in lines]
        for row in rows[::2]:
            ids = tok(normalize_arithmetic(row["context"]), return_tensors="pt").input_ids
            with torch.no_grad():
                logits = net(ids).logits[0, -1]
            text = tok.decode([int(logits.argmax())])
            if re.fullmatch(r" \w+", text):  # a word after a space, as the real completions
                row["completion"] = text
        (arith / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return hf, import_hf_gpt2(hf, work / "ckpt"), arith


@pytest.fixture(scope="module")
def ours(gpt2, shared_data, tmp_path_factory):  # noqa: F811
    """`gptjax eval` zero- and one-shot: ({(task, k): result}, {(task, k): samples})."""
    out = tmp_path_factory.mktemp("ours_gen")
    argv = ["--checkpoint", str(gpt2[1]), "--shots", "0,1", "--limit", str(LIMIT),
            "--batch-size", "8", "--mesh", "data=1", "--num-beams", "1",
            "--max-gen-tokens", str(MAX_GEN), "--output", str(out / "results.json"),
            "--log-samples", str(out / "samples.jsonl"), "--plot", str(out / "p.png"),
            *[f"--task={name}={gpt2[2]}" for name in ARITH],
            "--task", f"nq_open={shared_data / NQ}"]  # fmt: skip
    assert cli.main(["eval", *argv]) == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())["results"]
    results = {(r["task"], r["k"]): r for r in results}
    return results, {key: [s for s in samples if (s["task"], s["k"]) == key] for key in results}


@pytest.fixture(scope="module")
def task_dir(lm_eval, gpt2, ours, shared_data, tmp_path_factory):  # noqa: F811
    """lm-eval's ten arithmetic tasks and nq_open, unchanged but for local data files,
    and `<task>_local_1shot`: num_fewshot 1 with gptjax's demonstrations for each doc."""
    from lm_eval.api import samplers

    tmp = tmp_path_factory.mktemp("lm_eval_gen_tasks")
    tasks = Path(lm_eval.__file__).parent / "tasks"
    shutil.copy(tasks / "arithmetic" / "utils.py", tmp / "utils.py")
    base = (
        (tasks / "arithmetic" / "arithmetic_1dc.yaml")
        .read_text()
        .replace("tag:\n  - arithmetic\n", "")
    )
    demos = {}  # (context, completion) of an eval doc -> its demos' row numbers
    for name in ARITH:
        file = ARITHMETIC[name][0]
        yaml = base.replace("task: arithmetic_1dc", f"task: {name}_local")
        yaml = yaml.replace(
            "hf://datasets/EleutherAI/arithmetic/data/single_digit_three_ops.jsonl",
            str(gpt2[2] / file),
        )
        assert file in (tasks / "arithmetic" / f"{name}.yaml").read_text()
        (tmp / f"{name}_local.yaml").write_text(yaml)
        (tmp / f"{name}_local_1shot.yaml").write_text(
            f"include: {name}_local.yaml\ntask: {name}_local_1shot\nnum_fewshot: 1\n"
            "fewshot_config:\n  sampler: gptjax_demos\n"
        )
        rows = [json.loads(x) for x in (gpt2[2] / file).read_text().splitlines()]
        for sample in ours[1][name, 1]:
            row = rows[int(sample["doc_id"].rsplit(":", 1)[1]) - 1]
            key = (normalize_arithmetic(row["context"]), row["completion"])
            assert key not in demos and len(sample["demo_ids"]) == 1, sample
            demos[key] = [int(d.rsplit(":", 1)[1]) - 1 for d in sample["demo_ids"]]

    class GptjaxDemos(samplers.ContextSampler):
        """The demonstrations gptjax drew for each eval doc."""

        def sample(self, n, eval_doc=None, df=None, **kwargs):
            chosen = [
                self.fewshot_docs()[i] for i in demos[eval_doc["context"], eval_doc["completion"]]
            ]
            assert len(chosen) == n and eval_doc not in chosen
            return chosen

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
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(samplers.SAMPLER_REGISTRY, "gptjax_demos", GptjaxDemos)
        yield tmp


def _run(lm_eval, task_dir, **kw):  # noqa: F811
    from lm_eval.tasks import TaskManager

    names = [f"{n}_local{s}" for n in ARITH for s in ("", "_1shot")]
    return lm_eval.simple_evaluate(
        tasks=[*names, "nq_open_local"],
        task_manager=TaskManager(include_path=str(task_dir)),
        limit=LIMIT, log_samples=True, **kw,
    )  # fmt: skip


def _assert_agree(out, ours):
    results, samples = ours
    for k in (0, 1):
        seen = []
        for name in ARITH:
            task = f"{name}_local" + ("_1shot" if k else "")
            docs = sorted(out["samples"][task], key=lambda s: s["doc_id"])
            assert len(docs) == len(samples[name, k]) == ROWS, (name, k)
            for doc, mine in zip(docs, samples[name, k], strict=True):
                assert tuple(doc["arguments"][0]) == (mine["context"], mine["target"]), (name, k)
                assert float(doc["acc"]) == float(mine["is_greedy"]), (name, k, doc["doc_id"])
                ll = float(doc["filtered_resps"][0][0])  # the looser (hf) tolerance for both
                assert mine["loglikelihood"] == pytest.approx(ll, rel=REL_TOL_HF), (name, k)
                seen.append(float(doc["acc"]))
            acc = out["results"][task]["acc,none"]
            got = results[name, k]["metrics"]["acc"]["value"]
            assert got == pytest.approx(acc, abs=1e-12), (name, k)
        assert 0 < sum(seen) < len(seen), (k, seen)  # both outcomes, at each K

    nq = sorted(out["samples"]["nq_open_local"], key=lambda s: s["doc_id"])
    assert len(nq) == len(samples["nq_open", 0]) == LIMIT
    for doc, mine in zip(nq, samples["nq_open", 0], strict=True):
        assert doc["arguments"][0][0] == mine["context"]
        assert doc["filtered_resps"][0] == mine["generation"].strip(), doc["doc_id"]
        assert float(doc["exact_match"]) == mine["exact_match"], doc["doc_id"]
    em = out["results"]["nq_open_local"]["exact_match,remove_whitespace"]
    assert results["nq_open", 0]["metrics"]["exact_match"]["value"] == pytest.approx(em, abs=1e-12)
    # Rows stopped at stop sequences, at different points, and some ran to MAX_GEN.
    lengths = [len(s["generation"]) for s in samples["nq_open", 0]]
    assert len(set(lengths)) > 3 and min(lengths) < max(lengths), lengths


def test_generation_and_arithmetic_hf_backend_agree(lm_eval, gpt2, task_dir, ours):  # noqa: F811
    out = _run(lm_eval, task_dir, model="hf", batch_size=8, device="cpu",
               model_args=f"pretrained={gpt2[0]},dtype=float32")  # fmt: skip
    _assert_agree(out, ours)
    for k in (0, 1):
        print(f"K={k} acc:", [ours[0][n, k]["metrics"]["acc"]["value"] for n in ARITH])
    print("nq_open generations:", [s["generation"] for s in ours[1]["nq_open", 0]][:8])


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
