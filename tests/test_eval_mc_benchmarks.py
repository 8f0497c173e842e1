"""The GPT-3 paper's other multiple-choice benchmarks (gptjax/eval/benchmarks_mc.py): RACE,
ANLI, SuperGLUE WiC / WSC / MultiRC / ReCoRD, on a few rows in each public format.

Agreement: lm-eval 0.4's own task definitions (its yaml files `include`d, over local
copies of the same rows in the Hugging Face layout lm-eval reads) build the zero- and
one-shot prompts and requests, which must equal the ones `gptjax eval` scores. Metrics
are recomputed from the scored loglikelihoods; the CLI prints the paper-style table.
"""

import importlib.util
import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from gptjax import cli
from gptjax.eval import fewshot, harness, metrics, tasks
from gptjax.eval.example import EvalInputError
from gptjax.eval.scoring import EvalModel

N_CTX = 512  # a RACE article and one demonstration fit


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- fixtures
# Each task: (evaluated rows, one training row) in the public format gptjax reads, and
# the same rows in the Hugging Face layout lm-eval reads.

RACE = [  # original RACE: one JSON object per article file
    {"id": "high1.txt", "article": "Tom has a brown dog. Every morning he walks it in the park.",
     "questions": ["What colour is the dog?", "Tom walks the dog in the  _  .", "Who has a dog?"],
     "options": [["Red.", "Brown.", "Black.", "White."], ["park", "shop", "school", "river"],
                 ["Tom.", "Mary.", "Ann.", "Bob."]],
     "answers": ["B", "A", "A"]},
    {"id": "high2.txt", "article": "The library opens at nine. Students read there after class.",
     "questions": ["When does the library open?", "Students read in the library  _  ."],
     "options": [["At eight.", "At nine.", "At ten.", "At noon."],
                 ["before class", "after class", "at night", "on Sundays"]],
     "answers": ["B", "B"]},
]  # fmt: skip
RACE_TRAIN = {"id": "high9.txt", "article": "Ann likes apples. She buys them on Friday.",
              "questions": ["What does Ann like?"],
              "options": [["Pears.", "Apples.", "Milk.", "Bread."]], "answers": ["B"]}  # fmt: skip


def _race_eleuther(doc):  # EleutherAI/race (what lm-eval reads): problems as a literal
    problems = [{"answer": a, "options": o, "question": q}
                for q, o, a in zip(doc["questions"], doc["options"], doc["answers"], strict=True)]  # fmt: skip
    return {"article": doc["article"], "problems": repr(problems)}


def _race_ehovy(doc):  # ehovy/race: one row per question
    return [{"example_id": doc["id"], "article": doc["article"], "answer": a, "question": q,
             "options": o}
            for q, o, a in zip(doc["questions"], doc["options"], doc["answers"], strict=True)]  # fmt: skip


ANLI = [  # anli_v1.0/R1/test.jsonl
    {"uid": "a1", "context": "The cat slept on the warm mat all afternoon.",
     "hypothesis": "The cat was asleep.", "label": "e", "reason": ""},
    {"uid": "a2", "context": "Paris is the capital of France.",
     "hypothesis": "Paris is in Germany.", "label": "c", "reason": ""},
    {"uid": "a3", "context": "She bought a new car last year.",
     "hypothesis": "The car is red.", "label": "n", "reason": ""},
]  # fmt: skip
ANLI_TRAIN = {"uid": "t1", "context": "Bob ran a marathon in May.",
              "hypothesis": "Bob ran in May.", "label": "e", "reason": ""}  # fmt: skip


def _anli_hf(doc):
    return {"uid": doc["uid"], "premise": doc["context"], "hypothesis": doc["hypothesis"],
            "label": "enc".index(doc["label"]), "reason": doc["reason"]}  # fmt: skip


def _wic(i, word, s1, s2, label):
    start1, start2 = s1.index(word), s2.index(word)
    return {"word": word, "sentence1": s1, "sentence2": s2, "idx": i, "label": label,
            "start1": start1, "end1": start1 + len(word), "start2": start2,
            "end2": start2 + len(word), "version": 1.1}  # fmt: skip


WIC = [
    _wic(0, "bank", "He sat on the bank of the river.", "She works at the bank.", False),
    _wic(1, "run", "I run every morning.", "They run to school.", True),
]
WIC_TRAIN = _wic(5, "light", "Turn on the light.", "The light is bright.", True)

WSC = [  # SuperGLUE WSC: spans under "target"; the first needs wsc.fixed's case fix
    {"text": "The trophy doesn't fit into the brown suitcase because it is too large .",
     "target": {"span1_index": 0, "span1_text": "the trophy", "span2_index": 9,
                "span2_text": "it"}, "idx": 0, "label": True},
    {"text": "Mark told Pete many lies about himself , which Pete included in his book . "
             "He should have been more skeptical .",
     "target": {"span1_index": 0, "span1_text": "Mark", "span2_index": 15, "span2_text": "He"},
     "idx": 1, "label": False},
]  # fmt: skip
WSC_TRAIN = {"text": "Joe's uncle can still beat him at tennis , even though he is 30 years older .",
             "target": {"span1_index": 0, "span1_text": "Joe's uncle", "span2_index": 11,
                        "span2_text": "he"}, "idx": 7, "label": True}  # fmt: skip


def _wsc_hf(doc, fixed_span1=None):  # super_glue/wsc.fixed: flattened, spans fixed
    t = doc["target"]
    return {"text": doc["text"], "span1_index": t["span1_index"], "span2_index": t["span2_index"],
            "span1_text": fixed_span1 or t["span1_text"], "span2_text": t["span2_text"],
            "idx": doc["idx"], "label": int(doc["label"])}  # fmt: skip


MULTIRC = [  # SuperGLUE MultiRC: a paragraph per line, questions, answers with labels
    {"idx": 0, "version": 1.1, "passage": {
        "text": "<b>Sent 1: </b>Sara has a red bike.<br><b>Sent 2: </b>She rides it to school.<br>",
        "questions": [
            {"question": "What colour is Sara's bike?", "idx": 0, "answers": [
                {"text": "Red", "idx": 0, "label": 1}, {"text": "Blue", "idx": 1, "label": 0},
                {"text": "A red one", "idx": 2, "label": 1}]},
            {"question": "Where does Sara ride?", "idx": 1, "answers": [
                {"text": "To school", "idx": 3, "label": 1},
                {"text": "To the beach", "idx": 4, "label": 0}]}]}},
    {"idx": 1, "version": 1.1, "passage": {
        "text": "<b>Sent 1: </b>The shop closes at six.<br>",
        "questions": [{"question": "When does the shop close?", "idx": 2, "answers": [
            {"text": "At six", "idx": 5, "label": 1}, {"text": "At noon", "idx": 6, "label": 0}]}]}},
]  # fmt: skip
MULTIRC_TRAIN = {"idx": 9, "version": 1.1, "passage": {
    "text": "<b>Sent 1: </b>Leo has two cats.<br>",
    "questions": [{"question": "How many cats?", "idx": 0,
                   "answers": [{"text": "Three", "idx": 0, "label": 0}]}]}}  # fmt: skip


def _multirc_hf(doc):
    p = doc["passage"]
    return [{"paragraph": p["text"], "question": q["question"], "answer": a["text"],
             "idx": {"paragraph": doc["idx"], "question": q["idx"], "answer": a["idx"]},
             "label": a["label"]} for q in p["questions"] for a in q["answers"]]  # fmt: skip


def _record(idx, text, entities, qas):
    """A ReCoRD row; entity spans found in the text (end inclusive, as the release)."""
    spans = [{"start": text.index(e), "end": text.index(e) + len(e) - 1} for e in entities]
    return {"source": "Daily mail", "idx": idx, "passage": {"text": text, "entities": spans},
            "qas": [{"query": q, "idx": f"{idx}-{i}",
                     "answers": [{"start": text.index(a), "end": text.index(a) + len(a) - 1,
                                  "text": a} for a in answers]}
                    for i, (q, answers) in enumerate(qas)]}  # fmt: skip


RECORD = [
    _record(0, "London (CNN) Alice Smith won the race in London on Sunday.\n@highlight\nAlice "
            "Smith won in London\n@highlight\nThe race drew big crowds",
            ["London", "CNN", "Alice Smith", "Alice"],
            [("@placeholder said the win was her best yet.", ["Alice Smith", "Alice"]),
             ("The crowd in @placeholder cheered.", ["London"])]),
    _record(1, "Paris (AP) The Louvre reopened on Monday.\n@highlight\nThe Louvre is open "
            "again", ["Paris", "AP", "Louvre"], [("Visitors returned to the @placeholder.",
                                                  ["Louvre"])]),
]  # fmt: skip
RECORD_TRAIN = _record(5, "Rome (AP) Marco Rossi opened a cafe.\n@highlight\nA new cafe",
                       ["Rome", "AP", "Marco Rossi"],
                       [("@placeholder serves coffee.", ["Marco Rossi"])])  # fmt: skip


def _record_hf(doc):
    text = doc["passage"]["text"]
    ents = sorted({text[e["start"] : e["end"] + 1] for e in doc["passage"]["entities"]})
    return [{"passage": text, "query": qa["query"], "entities": ents,
             "answers": sorted({a["text"] for a in qa["answers"]}),
             "idx": {"passage": doc["idx"], "query": i}}
            for i, qa in enumerate(doc["qas"])]  # fmt: skip


def _flat(rows, f):
    out = []
    for r in rows:
        x = f(r)
        out.extend(x if isinstance(x, list) else [x])
    return out


# name: (lm-eval yaml, its evaluated split, gptjax eval file, gptjax rows, lm rows (eval,
# train)); RACE's eval data is a directory of article files as in RACE.tar.gz.
def _fixtures(root: Path) -> dict:
    for i, doc in enumerate(RACE):
        (root / "RACE" / "test" / "high").mkdir(parents=True, exist_ok=True)
        (root / "RACE" / "test" / "high" / f"{i + 1}.txt").write_text(json.dumps(doc))
    (root / "RACE" / "train" / "high").mkdir(parents=True)
    (root / "RACE" / "train" / "high" / "9.txt").write_text(json.dumps(RACE_TRAIN))
    wsc_fixed = ["The trophy", None]
    return {
        "race": ("race/race.yaml", "test", root / "RACE" / "test" / "high",
                 [_race_eleuther(d) for d in RACE], [_race_eleuther(RACE_TRAIN)],
                 root / "RACE" / "train" / "high"),
        "anli_r1": ("anli/anli_r1.yaml", "test_r1",
                    _jsonl(root / "anli" / "R1" / "test.jsonl", ANLI),
                    [_anli_hf(d) for d in ANLI], [_anli_hf(ANLI_TRAIN)],
                    _jsonl(root / "anli" / "R1" / "train.jsonl", [ANLI_TRAIN])),
        "wic": ("super_glue/wic/default.yaml", "validation",
                _jsonl(root / "WiC" / "val.jsonl", WIC),
                [{**d, "label": int(d["label"])} for d in WIC], [{**WIC_TRAIN, "label": 1}],
                _jsonl(root / "WiC" / "train.jsonl", [WIC_TRAIN])),
        "wsc": ("super_glue/wsc/default.yaml", "validation",
                _jsonl(root / "WSC" / "val.jsonl", WSC),
                [_wsc_hf(d, f) for d, f in zip(WSC, wsc_fixed, strict=True)],
                [_wsc_hf(WSC_TRAIN)], _jsonl(root / "WSC" / "train.jsonl", [WSC_TRAIN])),
        "multirc": ("super_glue/multirc/default.yaml", "validation",
                    _jsonl(root / "MultiRC" / "val.jsonl", MULTIRC), _flat(MULTIRC, _multirc_hf),
                    _multirc_hf(MULTIRC_TRAIN),
                    _jsonl(root / "MultiRC" / "train.jsonl", [MULTIRC_TRAIN])),
        "record": ("super_glue/record/default.yaml", "validation",
                   _jsonl(root / "ReCoRD" / "val.jsonl", RECORD), _flat(RECORD, _record_hf),
                   _record_hf(RECORD_TRAIN),
                   _jsonl(root / "ReCoRD" / "train.jsonl", [RECORD_TRAIN])),
    }  # fmt: skip


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return _fixtures(tmp_path_factory.mktemp("mc_benchmarks"))


@pytest.fixture(scope="module")
def ckpt(gpt2_checkpoint):
    return gpt2_checkpoint(seq_len=N_CTX, n_layer=1)


@pytest.fixture(scope="module")
def em(ckpt):
    return EvalModel.load(ckpt, batch_size=8)


@pytest.fixture(scope="module")
def lm_eval_tasks(fixtures, tmp_path_factory):
    """lm-eval's task objects for the fixtures: its yaml `include`d, the data local."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    from lm_eval.tasks import TaskManager, get_task_dict

    tmp = tmp_path_factory.mktemp("lm_eval_tasks")
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp / "hf_cache"))
    base = Path(lm_eval.__file__).parent / "tasks"
    for name, (yaml, split, _, rows, train, _) in fixtures.items():
        _jsonl(tmp / f"{name}.jsonl", rows)
        _jsonl(tmp / f"{name}_train.jsonl", train * 2)  # lm-eval draws K + 1, drops self
        (tmp / f"{name}_local.yaml").write_text(
            f"include: {base / yaml}\ntask: {name}_local\ndataset_path: json\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    {split}: {tmp / name}.jsonl\n"
            f"    train: {tmp / name}_train.jsonl\ntraining_split: train\n"
            f"validation_split: {'validation' if split == 'validation' else 'null'}\n"
            f"test_split: {'null' if split == 'validation' else split}\n"
        )
    # lm-eval 0.4.13's record/util.py imports transformers.data.metrics.squad_metrics,
    # which transformers 5 removed; it is used only by process_results (its em / f1),
    # never by the prompts compared here, so an empty stand-in lets the module import.
    stand_ins = {}
    if importlib.util.find_spec("transformers.data.metrics") is None:
        package = types.ModuleType("transformers.data.metrics")
        package.squad_metrics = types.ModuleType("transformers.data.metrics.squad_metrics")
        stand_ins = {
            package.__name__: package,
            package.squad_metrics.__name__: package.squad_metrics,
        }
    sys.modules.update(stand_ins)
    try:
        manager = TaskManager(include_path=str(tmp), include_defaults=False)
        loaded = get_task_dict([f"{n}_local" for n in fixtures], manager)
    finally:
        for module in stand_ins:
            del sys.modules[module]
    return {n: loaded[f"{n}_local"] for n in fixtures}


def _lm_docs(task):
    return list(task.validation_docs() if task.has_validation_docs() else task.test_docs())


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("k", [0, 1])
def test_requests_equal_lm_evals_zero_and_one_shot(fixtures, lm_eval_tasks, k):
    """Every (context, continuation) gptjax scores is lm-eval's, at K=0 and K=1 (the
    training file holds one row, so both draw the same demonstration). MultiRC: lm-eval's
    gold is the opposite option (its [yes, no] list indexed by the label, 1 = correct),
    so its demonstration ends in the other word; everything else is identical."""
    for name, (_, _, path, _, _, train) in fixtures.items():
        task = tasks.resolve_task(f"{name}={path}", {name: str(train)})
        lm_task = lm_eval_tasks[name]
        docs = _lm_docs(lm_task)
        assert len(docs) == len(task.examples), name
        shots = fewshot.build(task.examples, k, pool=task.fewshot_pool, seed=1234,
                              fits=lambda ex: True, name=name)  # fmt: skip
        for doc, shot in zip(docs, shots, strict=True):
            ex, ctx = shot.example, lm_task.fewshot_context(doc, k)
            if name == "multirc" and k:
                demo, _, last = ctx.rpartition("\n\n")
                head, word = demo.rsplit(" ", 1)
                ctx = f"{head} {dict(yes='no', no='yes')[word]}\n\n{last}"
            args = [
                i.arguments for i in lm_task.construct_requests(doc, ctx, metadata=(name, 0, 1))
            ]
            assert shot.k == k and ex.context == ctx, name
            assert sorted(ex.requests()) == sorted(args), name
            target = lm_task.doc_to_target(doc)
            lm_gold = lm_task.doc_to_choice(doc)[target] if isinstance(target, int) else target
            if name == "multirc":  # the label says the answer is correct: ours says "yes"
                assert ex.gold == doc["label"] and ex.choices[ex.gold].endswith(
                    "yes" if doc["label"] else "no"
                )
                assert ex.choices[1 - ex.gold] == lm_gold
            else:
                assert ex.choices[ex.gold] == lm_gold, name


def test_public_and_hugging_face_layouts_give_the_same_examples(fixtures, tmp_path):
    """Each loader reads the original release and the Hugging Face rows identically (RACE
    also ehovy/race's per-question rows), with the SuperGLUE WSC span fix applied."""
    for name, (_, _, path, hf_rows, _, _) in fixtures.items():
        ours = tasks.resolve_task(f"{name}={path}").examples
        hf = tasks.resolve_task(f"{name}={_jsonl(tmp_path / name / 'hf.jsonl', hf_rows)}").examples
        strip = [(e.context, e.choices, e.gold, e.uncond_context, e.group, e.entities, e.answers)
                 for e in ours]  # fmt: skip
        assert strip == [
            (e.context, e.choices, e.gold, e.uncond_context, e.group, e.entities, e.answers)
            for e in hf
        ], name
    ehovy = _jsonl(tmp_path / "ehovy.jsonl", _flat(RACE, _race_ehovy))
    race = tasks.resolve_task(f"race={ehovy}").examples
    assert [e.context for e in race] == [
        e.context for e in tasks.resolve_task(f"race={fixtures['race'][2]}").examples
    ]
    first = race[0]
    assert (
        first.context.endswith(
            "Question: What colour is the dog?\nAnswer: Brown.\nTom walks the dog in the park\n"
            "Who has a dog?"
        )
        and first.choices[first.gold] == "Tom."
        and first.uncond_context == "Answer:"
    )
    wsc = tasks.resolve_task(f"wsc={fixtures['wsc'][2]}").examples[0]
    assert wsc.context.startswith("Passage: The trophy doesn't fit into the brown suitcase "
                                  "because *it* is too large.\n") and '"*The trophy*"' in wsc.context  # fmt: skip
    mrc = tasks.resolve_task(f"multirc={fixtures['multirc'][2]}").examples
    assert [e.group for e in mrc] == ["p0q0"] * 3 + ["p0q1"] * 2 + ["p1q2"] * 2
    rec = tasks.resolve_task(f"record={fixtures['record'][2]}").examples[0]
    assert rec.entities == ("Alice", "Alice Smith", "CNN", "London")
    assert rec.answers == ("Alice", "Alice Smith") and rec.gold == 0


def test_metrics_from_the_scored_loglikelihoods(fixtures, em):
    """RACE's primary acc_uncond (P(option | article) / P(option | "Answer:")), ReCoRD's
    em / f1 of the max-loglikelihood entity, MultiRC's per-answer acc, em per question
    and f1a, each recomputed from the samples."""
    opts = harness.RunOptions()
    race_task = tasks.resolve_task(f"race={fixtures['race'][2]}")
    result, samples = harness.evaluate_task(em, race_task, 0, opts)
    assert result["primary"] == "acc_uncond"
    correct = []
    for ex, s in zip(race_task.examples, samples, strict=True):
        uncond = [ll for ll, _, _ in em.loglikelihood([("Answer:", " " + c) for c in ex.choices])]
        np.testing.assert_allclose(s["uncond_loglikelihoods"], uncond, rtol=1e-6)
        pred = int(np.argmax(np.subtract(s["loglikelihoods"], uncond)))
        assert s["pred"]["acc_uncond"] == pred
        correct.append(float(pred == ex.gold))
    assert result["metrics"]["acc_uncond"]["value"] == pytest.approx(np.mean(correct))

    rec_task = tasks.resolve_task(f"record={fixtures['record'][2]}")
    result, samples = harness.evaluate_task(em, rec_task, 0, opts)
    assert result["primary"] == "f1" and "acc" not in result["metrics"]
    ems, f1s = [], []
    for ex, s in zip(rec_task.examples, samples, strict=True):
        chosen = ex.entities[int(np.argmax(s["loglikelihoods"]))]
        ems.append(max(float(chosen == a) for a in ex.answers))  # no normalisation needed here
        f1s.append(metrics.f1(chosen, ex.answers))
        assert s["correct"] == {"entity": chosen, "answers": list(ex.answers), "em": ems[-1],
                                "f1": f1s[-1]}  # fmt: skip
    assert result["metrics"]["em"]["value"] == pytest.approx(np.mean(ems))
    assert result["metrics"]["f1"]["value"] == pytest.approx(np.mean(f1s))

    mrc_task = tasks.resolve_task(f"multirc={fixtures['multirc'][2]}")
    result, samples = harness.evaluate_task(em, mrc_task, 0, opts)
    preds = [int(np.argmax(s["loglikelihoods"])) for s in samples]
    golds = [ex.gold for ex in mrc_task.examples]
    assert golds == [1, 0, 1, 1, 0, 1, 0]
    right = [p == g for p, g in zip(preds, golds, strict=True)]
    assert result["metrics"]["acc"]["value"] == pytest.approx(np.mean(right))
    per_question = [all(right[0:3]), all(right[3:5]), all(right[5:7])]
    assert result["metrics"]["em"]["value"] == pytest.approx(np.mean(per_question))
    tp = sum(p == g == 1 for p, g in zip(preds, golds, strict=True))
    f1a = 2 * tp / (sum(preds) + sum(golds))
    assert result["metrics"]["f1a"]["value"] == pytest.approx(f1a)


def test_metric_functions():
    groups = ["q1", "q1", "q2", "q3", "q3"]
    assert metrics.all_correct_per_group(groups, [1, 0, 1, 0, 0], [1, 0, 0, 0, 0]) == [
        1.0,
        0.0,
        1.0,
    ]


def test_cli_table_zero_and_few_shot(ckpt, fixtures, tmp_path, capsys):
    argv = ["--checkpoint", str(ckpt), "--shots", "0,1", "--mesh", "data=1,fsdp=1,tensor=1", "--batch-size", "8",
            "--output", str(tmp_path / "r.json")]  # fmt: skip
    for name, (_, _, path, *_) in fixtures.items():
        argv += ["--task", f"{name}={path}"]  # the training split beside it is the pool
    assert cli.main(["eval", *argv]) == 0
    table = capsys.readouterr().out
    rows = {tuple(line.split()[:2]) for line in table.splitlines() if line.strip()}
    for row in [("race", "acc_uncond"), ("race", "acc"), ("anli_r1", "acc"), ("wic", "acc"),
                ("wsc", "acc"), ("multirc", "acc"), ("multirc", "em"), ("multirc", "f1a"),
                ("record", "f1"), ("record", "em")]:  # fmt: skip
        assert row in rows, row
    report = json.loads((tmp_path / "r.json").read_text())
    one_shot = {r["task"]: r for r in report["results"] if r["k"] == 1}
    assert all(r["k_used"] == 1 and r["fewshot_warning"] is None for r in one_shot.values())
    assert one_shot["wic"]["fewshot_source"].endswith("WiC/train.jsonl")
    assert one_shot["race"]["fewshot_source"].endswith("RACE/test/../train/high")


@pytest.mark.parametrize(
    "name, rows, message",
    [
        ("wic", [{**WIC[0], "label": None}], "val.jsonl:1: no 'label' (an unlabelled test split?)"),
        ("anli_r1", [{**ANLI[0], "label": "x"}], "val.jsonl:1: label 'x' is not one of"),
        ("record", [{**RECORD[0], "qas": [{"query": "q", "idx": 0}]}],
         "val.jsonl:1: no answers (an unlabelled test split?)"),
        ("multirc", [MULTIRC[0], {"idx": 3}], "val.jsonl:2: missing field 'passage'"),
        ("race", [{"article": "a", "problems": "[{'question': 'q'"}], "val.jsonl:1: bad 'problems'"),
        ("race", [_race_ehovy(RACE[0])[0] | {"answer": "E"}], "val.jsonl:1: answer 'E' is not"),
        ("race", [{"article": "a", "problems": "__import__('os').getcwd()"}],
         "val.jsonl:1: bad 'problems'"),  # a literal, never evaluated as code
    ],
)  # fmt: skip
def test_bad_rows_name_file_and_line(tmp_path, name, rows, message):
    path = _jsonl(tmp_path / "val.jsonl", rows)
    with pytest.raises(EvalInputError, match=re.escape(message)):
        tasks.resolve_task(f"{name}={path}")
