"""The GPT-3 synthetic tasks, the free-form task loaders on small fixtures in their public
formats, their prompts (zero- and few-shot), answer matching, BLEU, the paper-layout
tables, and `gptjax eval` running each of them with beam search and greedily."""

import json

import pytest

from gptjax import cli
from gptjax.eval import fewshot, generation, metrics, synthetic, tasks
from gptjax.eval.tasks import EvalInputError

SYNTHETIC = "gpt3_synthetic"


def test_synthetic_tasks_load_the_published_files(shared_data):
    registered = {n for n, t in tasks.TASKS.items() if t.self_pool}
    assert registered == set(synthetic.ARITHMETIC) | set(synthetic.WORDS)
    for name in registered:
        task = tasks.resolve_task(f"{name}={shared_data / SYNTHETIC}")
        assert len(task.examples) == (2000 if name in synthetic.ARITHMETIC else 10000), name
        assert task.fewshot_pool is None and task.fewshot_warning == ""  # the paper's pool
    [ex] = tasks.resolve_task(f"arithmetic_2ds={shared_data / SYNTHETIC}").examples[:1]
    assert (ex.kind, ex.context, ex.delimiter, ex.target) == (
        "loglik", "Question: What is 17 minus 14?\nAnswer:", "", " 3",
    )  # fmt: skip
    [word] = tasks.resolve_task(f"reversed_words={shared_data / SYNTHETIC}").examples[:1]
    assert (word.kind, word.context, word.gold, word.stop, word.match) == (
        "generate", "\ntaefed =", " defeat", ("\n",), "exact",
    )  # fmt: skip


def test_arithmetic_contexts_are_lm_evals(shared_data):
    """Our normalisation == lm-eval's own arithmetic process_docs on every 2dm problem."""
    datasets = pytest.importorskip("datasets")
    utils = pytest.importorskip("lm_eval.tasks.arithmetic.utils")
    path = shared_data / SYNTHETIC / "two_digit_multiplication.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    theirs = utils.process_docs(datasets.Dataset.from_list(rows))
    ours = synthetic.LOADERS["arithmetic_2dm"](path)
    assert [e.context for e in ours] == theirs["context"]
    assert [e.target for e in ours] == theirs["completion"]


def _shots(task, k, seed=1234):
    return fewshot.build(task.examples[:3], k, pool=task.fewshot_pool or task.examples,
                         pool_is_eval_set=task.fewshot_pool is None, seed=seed,
                         fits=lambda _: True)  # fmt: skip


def test_fewshot_prompts(shared_data):
    arith = tasks.resolve_task(f"arithmetic_1dc={shared_data / SYNTHETIC}")
    [s] = _shots(arith, 2)[:1]
    assert s.k == 2 and arith.examples[0].doc_id not in s.demo_ids
    demos = s.example.context.split("\n\n")
    assert len(demos) == 3 and demos[0].startswith("Question: What is") and "Answer: " in demos[0]
    words = tasks.resolve_task(f"anagrams1={shared_data / SYNTHETIC}")
    [w] = _shots(words, 3)[:1]
    lines = w.example.context.split("\n")  # demonstrations concatenated as published
    assert lines[0] == "" and len(lines) == 5 and all(" = " in x for x in lines[1:4])
    assert lines[4] == words.examples[0].context.strip()

    nq = tasks.resolve_task(f"nq_open={shared_data / 'nq_open' / 'NQ-open.dev.jsonl'}")
    assert nq.fewshot_source.endswith("NQ-open.efficientqa.dev.1.1.jsonl")
    zero, two = _shots(nq, 0)[0].example.context, _shots(nq, 2)[0].example.context
    assert (
        zero == "Answer these questions:\n\nQ: when was the last time anyone was on the moon?\nA:"
    )
    head, *qa_lines = two.split("\n")
    assert head == "Answer these questions:" and qa_lines[0] == ""
    assert [x[:3] for x in qa_lines[1:]] == ["Q: ", "A: ", "Q: ", "A: ", "Q: ", "A:"]


def _write(path, obj):
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def test_qa_loaders_on_public_formats(tmp_path):
    trivia = _write(tmp_path / "unfiltered-web-dev.json", {"Data": [
        {"Question": "Who wrote Hamlet", "Answer": {"Aliases": ["Shakespeare", "W. Shakespeare"],
                                                     "Value": "Shakespeare"}}]})  # fmt: skip
    [t] = tasks.resolve_task(f"triviaqa={trivia}").examples
    assert (t.context, t.gold, t.match) == (
        "Question: Who wrote Hamlet?\nAnswer:", ["Shakespeare", "W. Shakespeare"], "case_punct",
    )  # fmt: skip
    webq = _write(tmp_path / "webquestions.examples.test.json", [
        {"url": "u", "utterance": "what does jamaican people speak?",
         "targetValue": '(list (description "Jamaican English") (description Creole))'}])  # fmt: skip
    [w] = tasks.resolve_task(f"webquestions={webq}").examples
    assert w.gold == ["Jamaican English", "Creole"] and w.context.endswith("speak?\nAnswer:")
    coqa = _write(tmp_path / "coqa-dev-v1.0.json", {"data": [{
        "story": "Ann has a cat.", "questions": [{"input_text": "Who?"}, {"input_text": "What?"}],
        "answers": [{"input_text": "Ann"}, {"input_text": "a cat"}],
        "additional_answers": {"0": [{"input_text": "ann"}, {"input_text": "cat"}]}}]})  # fmt: skip
    c0, c1 = tasks.resolve_task(f"coqa={coqa}").examples
    assert c0.gold == ["Ann"] and c1.gold == ["a cat", "cat"]
    assert c1.context == "Ann has a cat.\n\nQ: Who?\n\nA: Ann\n\nQ: What?\n\nA:"
    drop = _write(tmp_path / "drop_dataset_dev.json", {"nfl_1": {"passage": "P.", "qa_pairs": [
        {"question": "How many?", "answer": {"number": "3", "spans": [], "date": {}},
         "validated_answers": [{"number": "", "spans": ["three"], "date": {}}]},
        {"question": "When?", "answer": {"number": "", "spans": [],
                                         "date": {"day": "1", "month": "May", "year": "2000"}}}]}})  # fmt: skip
    d0, d1 = tasks.resolve_task(f"drop={drop}").examples
    assert (d0.context, d0.gold, d1.gold) == ("P. How many?", ["3", "three"], ["1 May 2000"])
    squad = _write(tmp_path / "dev-v2.0.json", {"data": [{"title": "T", "paragraphs": [{
        "context": "C.", "qas": [{"question": "Q?", "id": "a", "answers": [{"text": "x"}]},
                                 {"question": "R?", "id": "b", "answers": [],
                                  "is_impossible": True}]}]}]})  # fmt: skip
    s0, s1 = tasks.resolve_task(f"squad2={squad}").examples
    assert s0.context == "Title: T\n\nBackground: C.\n\nQuestion: Q?\n\n Answer:"
    assert (s0.gold, s1.gold) == (["x"], ["unanswerable"])
    with pytest.raises(EvalInputError, match="not a CoQA file"):
        tasks.resolve_task(f"coqa={squad}")


def test_translation_loader_and_bleu(tmp_path):
    (tmp_path / "test.de-en.de").write_text("Guten Morgen .\nDanke .\n")
    (tmp_path / "test.de-en.en").write_text("Good morning .\nThank you .\n")
    task = tasks.resolve_task(f"translation={tmp_path / 'test.de-en'}")
    assert [e.context for e in task.examples] == [
        "German phrase: Guten Morgen .\nEnglish phrase:", "German phrase: Danke .\nEnglish phrase:",
    ]  # fmt: skip
    assert task.primary == "bleu"
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["the cat sat on the mat today .", "Thanks a lot , my friend ."]
    refs = ["the cat sat on the mat .", "Thank you a lot , my friend ."]
    values, _ = generation.score([" " + h for h in hyps], refs, "bleu")
    assert values["bleu"][0] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert 0 < values["bleu"][0] < 100
    (tmp_path / "bad.de-en.de").write_text("a\nb\n")
    (tmp_path / "bad.de-en.en").write_text("a\n")
    with pytest.raises(EvalInputError, match="has 2 lines"):
        tasks.resolve_task(f"translation={tmp_path / 'bad.de-en'}")
    with pytest.raises(EvalInputError, match="NAME.SRC-TGT"):
        tasks.resolve_task(f"translation={tmp_path / 'test.de-en.de'}")


def test_answer_matching():
    assert metrics.exact_match_strict(" defeat\n", " defeat") == 1.0
    assert metrics.exact_match_strict("Defeat", " defeat") == 0.0  # case counts (3.9.2)
    values, samples = generation.score([" The  Moon!", "x"], [["moon"], "y"], "squad")
    assert values["exact_match"] == [1.0, 0.0] and samples[0]["f1"] == 1.0
    values, _ = generation.score([" THE Moon"], [["moon"]], "lm_eval")
    assert values["exact_match"] == [0.0]  # lm-eval ignores "The ", not "THE "
    with pytest.raises(ValueError, match="unknown answer match"):
        generation.score(["a"], ["a"], "fuzzy")


def test_paper_tables_layout():
    def r(task, k, metric, v):
        return {"task": task, "k": k, "metrics": {metric: {"value": v, "stderr": 0.0}}}

    results = [r("arithmetic_2da", 0, "acc", 0.5), r("arithmetic_1dc", 0, "acc", 0.25),
               r("arithmetic_2da", 1, "acc", 0.75), r("anagrams1", 0, "exact_match", 0.1)]  # fmt: skip
    text = synthetic.paper_tables(results, "tiny")
    lines = text.splitlines()
    assert lines[0].startswith("Table 3.9")
    assert lines[1].split() == ["Setting", "2D+", "1DC"]
    assert lines[3].split() == ["tiny", "Zero-Shot", "50.0", "25.0"]
    assert lines[4].split() == ["tiny", "One-Shot", "75.0", "-"]
    assert lines[5].startswith("Table 3.10") and lines[6].split() == ["Setting", "A1"]
    assert synthetic.paper_tables([r("hellaswag", 0, "acc", 1.0)]) == ""


@pytest.fixture(scope="module")
def ckpt(gpt2_checkpoint):
    return gpt2_checkpoint(seq_len=128, n_layer=1)


def test_gptjax_eval_runs_every_freeform_task(ckpt, shared_data, tmp_path, capsys):
    """Each new kind of task zero- and one-shot through `gptjax eval`, the free-form ones
    with beam search, then greedily; the synthetic tables are printed in the paper's layout."""
    (tmp_path / "test.de-en.de").write_text("Guten Morgen .\nDanke .\nJa .\n")
    (tmp_path / "test.de-en.en").write_text("Good morning .\nThank you .\nYes .\n")
    story = {"story": "Ann has a cat.", "questions": [{"input_text": "Who?"}, {"input_text": "What?"}],
             "answers": [{"input_text": "Ann"}, {"input_text": "a cat"}]}  # fmt: skip
    qa_pairs = [{"question": f"How many {i}?", "answer": {"number": str(i)}} for i in range(3)]
    squad = [{"question": f"Q{i}?", "id": str(i), "answers": [{"text": "x"}]} for i in range(3)]
    files = {
        "coqa": _write(tmp_path / "coqa.json", {"data": [story, story]}),
        "triviaqa": _write(tmp_path / "tqa.json", {"Data": [
            {"Question": f"Q{i}", "Answer": {"Aliases": ["a", "b"]}} for i in range(3)]}),
        "webquestions": _write(tmp_path / "webq.json", [
            {"utterance": f"what {i}?", "targetValue": "(list (description A))"} for i in range(3)]),
        "drop": _write(tmp_path / "drop.json", {"p": {"passage": "P.", "qa_pairs": qa_pairs}}),
        "squad2": _write(tmp_path / "squad.json", {"data": [{"title": "T", "paragraphs": [
            {"context": "C.", "qas": squad}]}]}),
        "translation": tmp_path / "test.de-en",
        "nq_open": shared_data / "nq_open" / "NQ-open.dev.jsonl",
    }  # fmt: skip
    synth = ["arithmetic_2da", "sum_of_digits", "reversed_words"]
    common = ["--checkpoint", str(ckpt), "--shots", "0,1", "--limit", "3", "--mesh", "data=1",
              "--max-gen-tokens", "6", "--output", str(tmp_path / "r.json")]  # fmt: skip
    synth_args = [x for n in synth for x in ("--task", f"{n}={shared_data / SYNTHETIC}")]
    free_args = [x for n, p in files.items() for x in ("--task", f"{n}={p}")]
    assert cli.main(["eval", *common, *synth_args, *free_args, "--num-beams", "2"]) == 0
    out = capsys.readouterr().out
    assert "Table 3.9 layout" in out and "Table 3.10 layout" in out
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert {(r["task"], r["k"]) for r in results} == {
        (n, k) for n in [*synth, *files] for k in (0, 1)
    }
    assert all("error" not in r for r in results)
    gen = [r for r in results if r["kind"] == "generate"]
    assert all(r["decoding"]["num_beams"] == 2 for r in gen)
    assert "bleu" in next(r for r in gen if r["task"] == "translation")["metrics"]
    assert cli.main(["eval", *common, *synth_args, "--num-beams", "1"]) == 0  # greedy
    greedy = json.loads((tmp_path / "r.json").read_text())["results"]
    assert {r["decoding"]["num_beams"] for r in greedy if r["kind"] == "generate"} == {1}
    assert cli.main(["eval", *common, *synth_args, "--num-beams", "0"]) == 2
    assert "--num-beams must be >= 1" in capsys.readouterr().err
