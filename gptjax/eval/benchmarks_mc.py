"""The GPT-3 paper's remaining multiple-choice benchmarks, read from their public files:
RACE, ANLI R1-R3 and SuperGLUE WiC, WSC, MultiRC and ReCoRD.

Prompts, choices and targets are lm-eval 0.4's (tasks/race, tasks/anli,
tasks/super_glue/{wic,wsc,multirc,record}); tests compare every request with lm-eval's
own construct_requests on the same rows. Where gptjax departs from lm-eval:

  RACE     primary metric acc_uncond, the paper's normalisation by the unconditional
           probability P(option | "Answer:") (as ARC and OpenBookQA); lm-eval's acc is
           reported beside it, equal to lm-eval's.
  MultiRC  lm-eval lists the choices [".. yes", ".. no"] and takes the label (1 = the
           answer is correct) as the index, so a correct answer's gold is "no"; gptjax
           lists [".. no", ".. yes"] with the label as the index (the same requests, the
           right gold). Besides lm-eval's per-answer acc it reports SuperGLUE's (and the
           paper's) em, all answers of a question right, and f1a, F1 over all answers.
  ReCoRD   as lm-eval and the paper: each entity fills the query's @placeholder as one
           option; em / f1 of the highest-loglikelihood entity against the answers.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from gptjax.eval.example import EvalInputError, Example
from gptjax.eval.loaders import check_file, label_index
from gptjax.rows import read_jsonl

Row = tuple[str, dict]  # (where: "file:line", the row)


# ----------------------------------------------------------------------------- reading


def _json_rows(path: Path) -> Iterator[Row]:
    """A JSONL file's objects, or a file holding one JSON object (RACE's per-article .txt)."""
    if path.suffix.lower() != ".jsonl":
        text = path.read_text(encoding="utf-8")
        try:
            doc = json.loads(text) if text.lstrip().startswith("{") else None
        except json.JSONDecodeError:
            doc = None  # several objects: JSON lines
        if isinstance(doc, dict):
            yield f"{path.name}:1", doc
            return
    for n, doc in read_jsonl(path, EvalInputError):
        yield f"{path.name}:{n}", doc


def _examples(base: Path, rows: Iterable[Row], make: Callable[[dict], list[Example]]):
    """Each row's examples (a SuperGLUE MultiRC/ReCoRD row holds several) with doc ids
    "file:line[#i]"; a bad row is named by its file (under `base`) and line."""
    out = []
    for where, doc in rows:
        try:
            made = make(doc)
        except EvalInputError as e:
            raise EvalInputError(f"{base / where}: {e}") from None
        except KeyError as e:
            raise EvalInputError(f"{base / where}: missing field {e}") from None
        except (ValueError, TypeError, IndexError, AttributeError, SyntaxError) as e:
            raise EvalInputError(f"{base / where}: {e}") from None
        for i, ex in enumerate(made):
            out.append(dataclasses.replace(ex, doc_id=where + (f"#{i}" if len(made) > 1 else "")))
    return out


def _load(make: Callable[[dict], list[Example]]):
    def load(path: Path) -> list[Example]:
        path = check_file(path)
        return _examples(path.parent, _json_rows(path), make)

    load.__doc__ = make.__doc__
    return load


# ----------------------------------------------------------------------------- RACE


def _race_problems(doc: dict) -> list[dict]:
    """One row's problems: original RACE {questions, options, answers}, EleutherAI/race
    {problems} (a list, or its Python-literal string), or an ehovy/race row (one)."""
    if "problems" in doc:
        problems = doc["problems"]
        if isinstance(problems, str):
            problems = ast.literal_eval(problems)  # literals only, never code
        return [{"question": p["question"], "options": p["options"], "answer": p["answer"]}
                for p in problems]  # fmt: skip
    if "questions" in doc:
        qs, opts, answers = doc["questions"], doc["options"], doc["answers"]
        if not len(qs) == len(opts) == len(answers):
            raise EvalInputError("questions, options and answers differ in length")
        return [{"question": q, "options": o, "answer": a}
                for q, o, a in zip(qs, opts, answers, strict=True)]  # fmt: skip
    return [{"question": doc["question"], "options": doc["options"], "answer": doc["answer"]}]


def _race_answer(problem: dict) -> int:
    letter = problem["answer"]
    if letter not in ("A", "B", "C", "D")[: len(problem["options"])]:
        raise EvalInputError(f"answer {letter!r} is not a letter A-D naming an option")
    return "ABCD".index(letter)


def race_example(article: str, problems: list[dict]) -> Example:
    """lm-eval's race: the article, its earlier questions answered (a cloze question
    "..  _  ." filled in), then the last question, whose options are the choices."""
    text = "Article: " + article + "\n\n"
    for p in problems[:-1]:
        answer = p["options"][_race_answer(p)]
        if p["question"][-6:] == "  _  .":
            text += p["question"][:-5] + answer + "\n"
        else:
            text += "Question: " + p["question"] + "\n" + "Answer: " + answer + "\n"
    last = problems[-1]
    text += last["question"]
    choices = tuple(str(o) for o in last["options"])
    if len(choices) < 2:
        raise EvalInputError("a RACE question needs at least two options")
    return Example("mc", text, choices, _race_answer(last), uncond_context="Answer:")


def load_race(path: Path) -> list[Example]:
    """RACE: the original per-article JSON (one file such as RACE/test/high/1234.txt, or
    a directory of them), or JSONL rows of ehovy/race (one per question) or EleutherAI/race
    ({article, problems}). Questions are collated by article text as lm-eval's data was
    (lm-eval 0.3's race, which made EleutherAI/race): one example per article."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".json"))
        if not files:
            raise EvalInputError(f"{path}: no RACE article files (*.txt, *.json) in it")
        rows = [(f"{f.relative_to(path)}:{where.rpartition(':')[2]}", doc)
                for f in files for where, doc in _json_rows(f)]  # fmt: skip
        base = path
    else:
        rows, base = list(_json_rows(check_file(path))), path.parent
    articles: dict[str, tuple[str, list[dict]]] = {}
    for where, doc in rows:
        try:
            problems = _race_problems(doc)
            article = doc["article"]
        except KeyError as e:
            raise EvalInputError(f"{base / where}: missing field {e}") from None
        except (ValueError, SyntaxError, TypeError) as e:
            raise EvalInputError(f"{base / where}: bad 'problems' ({e})") from None
        articles.setdefault(article, (where, []))[1].extend(problems)
    return _examples(
        base, ((w, {"article": a, "problems": p}) for a, (w, p) in articles.items()),
        lambda doc: [race_example(doc["article"], doc["problems"])],
    )  # fmt: skip


# ----------------------------------------------------------------------------- ANLI

ANLI_LABELS = ("e", "n", "c")  # entailment, neutral, contradiction: facebook/anli's 0, 1, 2


def _anli(doc: dict) -> list[Example]:
    """ANLI: original anli_v1.0/R*/*.jsonl {context, hypothesis, label e|n|c} or
    facebook/anli rows {premise, hypothesis, label 0-2}."""
    premise = doc["premise"] if "premise" in doc else doc["context"]
    context = f"{premise}\nQuestion: {doc['hypothesis']} True, False, or Neither?\nAnswer:"
    return [Example("mc", context, ("True", "Neither", "False"), label_index(doc, ANLI_LABELS))]


# ----------------------------------------------------------------------------- SuperGLUE


def _wic(doc: dict) -> list[Example]:
    """SuperGLUE WiC {sentence1, sentence2, start1, end1, label}."""
    word = doc["sentence1"][int(doc["start1"]) : int(doc["end1"])]
    context = (
        f"Sentence 1: {doc['sentence1']}\nSentence 2: {doc['sentence2']}\nQuestion: Is the "
        f"word '{word}' used in the same way in the two sentences above?\nAnswer:"
    )
    return [Example("mc", context, ("no", "yes"), label_index(doc, ("False", "True")))]


def fix_wsc_spans(doc: dict) -> dict:
    """Hugging Face's `wsc.fixed` (lm-eval's data): a span text that is not a substring
    of the text gets the case of the word at its index, no trailing period, no newline."""
    doc = dict(doc)
    for k in ("span1", "span2"):
        text, index = doc[f"{k}_text"], int(doc[f"{k}_index"])
        if text in doc["text"] or text in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
            continue
        if "theyscold" in text:
            doc["span2_index"] = 10
        first = doc["text"].split()[index]
        text = (text[0].lower() if first[0].islower() else text[0].upper()) + text[1:]
        doc[f"{k}_text"] = text.rstrip(".").replace("\n", " ")
    return doc


def detokenize(text: str) -> str:
    """lm-eval's general_detokenize (utils.py): undo tokenised spacing."""
    for a, b in ((" n't", "n't"), (" )", ")"), ("( ", "("), ('" ', '"'), (' "', '"')):
        text = text.replace(a, b)
    return re.sub(r" (['.,])", r"\1", text)


def _wsc(doc: dict) -> list[Example]:
    """SuperGLUE WSC {text, target {span1_text, span2_text, span1_index, span2_index},
    label} or the flattened rows of super_glue/wsc.fixed."""
    doc = fix_wsc_spans({**doc, **doc.get("target", {})})
    text, pronoun, noun = doc["text"], doc["span2_text"], doc["span1_text"]
    pre = " ".join(text.split()[: int(doc["span2_index"])])  # indices count words
    post = text[len(pre) + len(pronoun) + 1 :]
    passage = detokenize(pre + f" *{pronoun}*" + post)
    context = (
        f"Passage: {passage}\n"
        f'Question: In the passage above, does the pronoun "*{pronoun}*" refer to "*{noun}*"?\n'
        "Answer:"
    )
    return [Example("mc", context, ("no", "yes"), label_index(doc, ("False", "True")))]


def _multirc_example(paragraph: str, question: str, answer: dict, group: str) -> Example:
    """One answer {text, label}: is it correct? (label 1: yes)."""
    context = f"{paragraph}\nQuestion: {question}\nAnswer:"
    choices = tuple(f"{answer['text']}\nIs the answer correct? {yn}" for yn in ("no", "yes"))
    return Example("mc", context, choices, label_index(answer, ("False", "True")), group=group)


def _multirc(doc: dict) -> list[Example]:
    """SuperGLUE MultiRC {passage {text, questions [{question, idx, answers [{text,
    label}]}]}} (one example per answer) or super_glue/multirc rows {paragraph,
    question, answer, idx, label}."""
    if "paragraph" not in doc:
        return [
            _multirc_example(doc["passage"]["text"], q["question"], a,
                             f"p{doc.get('idx', '')}q{q.get('idx', i)}")
            for i, q in enumerate(doc["passage"]["questions"]) for a in q["answers"]
        ]  # fmt: skip
    idx = doc.get("idx") or {}  # the same question id as the original layout's
    group = f"p{idx['paragraph']}q{idx['question']}" if idx else doc["paragraph"] + doc["question"]
    return [
        _multirc_example(doc["paragraph"], doc["question"], {**doc, "text": doc["answer"]}, group)
    ]


def record_example(passage: str, query: str, entities, answers) -> Example:
    """lm-eval's record: the passage with its @highlight lines as "  - ..." bullets; an
    option per entity (sorted, unique), the query with the entity in its @placeholder."""
    initial, *highlights = passage.strip().split("\n@highlight\n")
    text = initial + "\n\n" + "".join(f"  - {h}.\n" for h in highlights)
    entities, answers = sorted(set(entities)), sorted(set(answers))
    if not entities:
        raise EvalInputError("no entities to choose from")
    if not answers:
        raise EvalInputError("no answers (an unlabelled test split?)")
    if answers[0] not in entities:
        raise EvalInputError(f"answer {answers[0]!r} is not one of the passage's entities")
    choices = tuple(f"  - {query}".replace("@placeholder", e) for e in entities)
    return Example(
        "mc", text, choices, entities.index(answers[0]),
        entities=tuple(entities), answers=tuple(answers),
    )  # fmt: skip


def _record(doc: dict) -> list[Example]:
    """SuperGLUE ReCoRD {passage {text, entities [{start, end}]}, qas [{query, answers
    [{text}]}]} (end inclusive; one example per query) or super_glue/record rows
    {passage, query, entities, answers}."""
    if isinstance(doc["passage"], dict):
        text = doc["passage"]["text"]
        entities = [text[e["start"] : e["end"] + 1] for e in doc["passage"]["entities"]]
        return [
            record_example(text, qa["query"], entities, [a["text"] for a in qa.get("answers", [])])
            for qa in doc["qas"]
        ]
    return [record_example(doc["passage"], doc["query"], doc["entities"], doc.get("answers", []))]


load_anli = _load(_anli)
load_wic = _load(_wic)
load_wsc = _load(_wsc)
load_multirc = _load(_multirc)
load_record = _load(_record)
