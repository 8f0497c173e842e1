"""Free-form tasks on their public formats: closed-book QA (nq_open, TriviaQA,
WebQuestions), reading comprehension (CoQA, DROP, SQuAD v2) and translation (plain
parallel text). Prompts follow lm-eval's task definitions; the metric of each is named
by its `match` rule (gptjax.eval.generation).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gptjax.eval.example import EvalInputError, Example
from gptjax.eval.loaders import build, check_file, records

QA_STOP = ("\n", ".", ",")  # lm-eval's nq_open / triviaqa generation_kwargs.until


def _answers(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise EvalInputError("answers must be a non-empty list of strings")
    return list(value)


def load_nq_open(path: Path) -> list[Example]:
    """NQ-open jsonl {"question", "answer": [...]} as lm-eval's nq_open: the description
    "Answer these questions:\\n\\n", "Q: {question}?\\nA:", demonstrations joined by one
    newline, generation until a newline, "." or ",", lm-eval's exact match vs any answer."""
    path = check_file(path)

    def make(doc):
        return Example(
            "generate", f"Q: {doc['question']}?\nA:", gold=_answers(doc["answer"]), stop=QA_STOP,
            match="lm_eval", description="Answer these questions:\n\n", fewshot_delimiter="\n",
        )  # fmt: skip

    return build(path, records(path), make)


def load_triviaqa(path: Path) -> list[Example]:
    """TriviaQA: the original release's JSON {"Data": [{"Question", "Answer": {"Aliases",
    "Value"}}]} (e.g. unfiltered-web-dev.json), or jsonl {"question", "answer":
    {"aliases"}} (the rc.nocontext layout). lm-eval's triviaqa prompt and exact match
    (ignore case and punctuation)."""
    path = check_file(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))["Data"]
        except (ValueError, KeyError, TypeError) as e:
            raise EvalInputError(f"{path}: not a TriviaQA JSON file ({e!r})") from None
        rows = [(i + 1, {"question": d["Question"], "answer": {"aliases": d["Answer"]["Aliases"]}})
                for i, d in enumerate(data)]  # fmt: skip
    else:
        rows = records(path)

    def make(doc):
        answer = doc["answer"]
        aliases = (
            answer.get("aliases", answer.get("Aliases")) if isinstance(answer, dict) else answer
        )
        return Example(
            "generate", f"Question: {doc['question']}?\nAnswer:", gold=_answers(aliases),
            stop=QA_STOP, match="case_punct",
        )  # fmt: skip

    return build(path, rows, make)


_WEBQ_TARGET = re.compile(r'\(description (?:"((?:[^"\\]|\\.)*)"|([^()\s]+))\)')


def load_webquestions(path: Path) -> list[Example]:
    """WebQuestions: the release's JSON list [{"utterance", "targetValue": "(list
    (description ...) ...)"}] or jsonl {"question", "answers": [...]}; generated
    answers (GPT-3 section 3.1), SQuAD-normalised exact match vs any answer."""
    path = check_file(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = []
            for i, d in enumerate(data):
                found = _WEBQ_TARGET.findall(d["targetValue"])
                answers = [a.replace('\\"', '"') if a else b for a, b in found]
                rows.append((i + 1, {"question": d["utterance"], "answers": answers}))
        except (ValueError, KeyError, TypeError) as e:
            raise EvalInputError(f"{path}: not a WebQuestions JSON file ({e!r})") from None
    else:
        rows = records(path)

    def make(doc):
        return Example(
            "generate", f"Question: {doc['question']}\nAnswer:", gold=_answers(doc["answers"]),
            stop=QA_STOP,
        )  # fmt: skip

    return build(path, rows, make)


def _json(path: Path) -> dict:
    path = check_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise EvalInputError(f"{path}: malformed JSON ({e})") from None


def load_coqa(path: Path) -> list[Example]:
    """CoQA JSON (coqa-dev-v1.0.json): every turn of every story, with the conversation
    so far, in lm-eval's prompt ("{story}\\n\\nQ: ...\\n\\nA: ...\\n\\n...Q: {q}\\n\\nA:"),
    generation until "\\nQ:", F1 (SQuAD normalisation) against the answer and the
    additional answers of that turn."""
    data = _json(path)
    out = []
    try:
        for s, story in enumerate(data["data"]):
            extra = story.get("additional_answers") or {}
            history = story["story"] + "\n\n"
            for t, (q, a) in enumerate(zip(story["questions"], story["answers"], strict=True)):
                golds = [a["input_text"]]
                for alt in extra.values():
                    if t < len(alt) and alt[t]["input_text"].lower() not in map(str.lower, golds):
                        golds.append(alt[t]["input_text"])
                context = history + f"Q: {q['input_text']}\n\nA:"
                out.append(
                    Example(
                        "generate",
                        context,
                        gold=golds,
                        stop=("\nQ:",),
                        doc_id=f"{Path(path).name}:{s}:{t}",
                    )  # fmt: skip
                )
                history += f"Q: {q['input_text']}\n\nA: {a['input_text']}\n\n"
    except (KeyError, TypeError, ValueError) as e:
        raise EvalInputError(f"{path}: not a CoQA file ({e!r})") from None
    return out


def _drop_answer(answer: dict) -> str:
    if answer.get("number"):
        return str(answer["number"])
    if answer.get("spans"):
        return ", ".join(answer["spans"])
    date = answer.get("date") or {}
    return " ".join(str(date[k]) for k in ("day", "month", "year") if date.get(k)).strip()


def load_drop(path: Path) -> list[Example]:
    """DROP JSON (drop_dataset_dev.json {id: {"passage", "qa_pairs": [...]}}): lm-eval's
    prompt "{passage} {question}", generation until ".", F1 with SQuAD normalisation
    against the answer and the validated answers (DROP's own number-aware F1 is not used)."""
    data = _json(path)
    out = []
    try:
        for pid, item in data.items():
            for j, qa in enumerate(item["qa_pairs"]):
                golds = [_drop_answer(a) for a in [qa["answer"], *qa.get("validated_answers", [])]]
                golds = [g for g in dict.fromkeys(golds) if g]
                if not golds:
                    continue
                out.append(Example(
                    "generate", f"{item['passage']} {qa['question']}", gold=golds, delimiter="",
                    stop=(".",), doc_id=f"{Path(path).name}:{pid}:{j}",
                ))  # fmt: skip
    except (KeyError, TypeError, AttributeError) as e:
        raise EvalInputError(f"{path}: not a DROP file ({e!r})") from None
    return out


def load_squad2(path: Path) -> list[Example]:
    """SQuAD v2 JSON (dev-v2.0.json): lm-eval's squadv2 prompt ("Title: ...\\n\\n
    Background: ...\\n\\nQuestion: ...\\n\\n Answer:"), generation until a newline, F1 and
    exact match (SQuAD normalisation); an unanswerable question's answer is "unanswerable"."""
    data = _json(path)
    out = []
    try:
        for article in data["data"]:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    golds = [a["text"] for a in qa["answers"]] or ["unanswerable"]
                    context = (f"Title: {article['title']}\n\nBackground: {para['context']}\n\n"
                               f"Question: {qa['question']}\n\n Answer:")  # fmt: skip
                    out.append(Example("generate", context, gold=golds, stop=("\n",),
                                       doc_id=f"{Path(path).name}:{qa['id']}"))  # fmt: skip
    except (KeyError, TypeError) as e:
        raise EvalInputError(f"{path}: not a SQuAD v2 file ({e!r})") from None
    return out


LANGUAGES = {"en": "English", "fr": "French", "de": "German", "ro": "Romanian",
             "es": "Spanish", "ru": "Russian", "zh": "Chinese", "cs": "Czech"}  # fmt: skip


def load_translation(path: Path) -> list[Example]:
    """Plain parallel text, fairseq's layout: PATH = DIR/NAME.SRC-TGT names the aligned
    files NAME.SRC-TGT.SRC (one source sentence a line) and NAME.SRC-TGT.TGT (its
    reference). lm-eval's wmt prompt "{Source} phrase: {src}\\n{Target} phrase:",
    generation until a newline, corpus BLEU (sacrebleu)."""
    path = Path(path)
    m = re.search(r"\.([a-z]{2,3})-([a-z]{2,3})$", path.name)
    if not m:
        raise EvalInputError(
            f"translation data {path}: expected DIR/NAME.SRC-TGT (e.g. test.de-en) naming "
            "the files NAME.SRC-TGT.SRC and NAME.SRC-TGT.TGT"
        )
    src, tgt = m.groups()
    src_path = check_file(path.with_name(f"{path.name}.{src}"))
    tgt_path = check_file(path.with_name(f"{path.name}.{tgt}"))
    sources = src_path.read_text(encoding="utf-8").split("\n")
    targets = tgt_path.read_text(encoding="utf-8").split("\n")
    while sources and sources[-1] == "" and targets and targets[-1] == "":
        sources.pop()
        targets.pop()
    if len(sources) != len(targets):
        raise EvalInputError(
            f"{src_path} has {len(sources)} lines but {tgt_path} has {len(targets)}"
        )
    s_name, t_name = LANGUAGES.get(src, src), LANGUAGES.get(tgt, tgt)
    return [
        Example(
            "generate",
            f"{s_name} phrase: {a.strip()}\n{t_name} phrase:",
            gold=b.strip(),
            stop=("\n",),
            match="bleu",
            doc_id=f"{src_path.name}:{i}",
        )  # fmt: skip
        for i, (a, b) in enumerate(zip(sources, targets, strict=True), 1)
    ]


LOADERS = {
    "nq_open": load_nq_open,
    "triviaqa": load_triviaqa,
    "webquestions": load_webquestions,
    "coqa": load_coqa,
    "drop": load_drop,
    "squad2": load_squad2,
    "translation": load_translation,
}
