"""Loaders: each task file format, in its original public distribution, becomes a list
of Examples (a function from a path to Examples; the task table in tasks.py names them).

Prompts follow lm-evaluation-harness's task definitions (doc_to_text / doc_to_choice), so
that numbers agree with it; the differences are named where they occur. Most formats
also accept the common multiple-choice JSONL {"query"/"context", "choices", "gold"}.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

from gptjax.eval.example import EvalInputError, Example
from gptjax.rows import Rows, read_jsonl, read_rows


def records(path: Path) -> Rows:
    """Rows of a .jsonl, .csv or .tsv file as (line number, dict)."""
    return read_rows(path, EvalInputError)


def check_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"task data not found: {path}")
    return path


def build(path: Path, rows, make: Callable[[dict], Example]) -> list[Example]:
    """Apply a doc processor to each row, naming file and line on a bad row."""
    out = []
    for n, doc in rows:
        try:
            ex = make(doc)
        except EvalInputError as e:
            raise EvalInputError(f"{path}:{n}: {e}") from None
        except KeyError as e:
            raise EvalInputError(f"{path}:{n}: missing field {e}") from None
        except (ValueError, TypeError, IndexError, AttributeError) as e:
            raise EvalInputError(f"{path}:{n}: {e}") from None
        out.append(dataclasses.replace(ex, doc_id=f"{path.name}:{n}"))
    return out


def label_index(doc: dict, names: tuple[str, ...], key: str = "label") -> int:
    """A class index from an int, a numeric string or one of the class names."""
    if key not in doc or doc[key] in (None, "", -1):
        raise EvalInputError(f"no {key!r} (an unlabelled test split?)")
    value = doc[key]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value in names:
        return names.index(value)
    try:
        index = int(value)
    except (TypeError, ValueError):
        raise EvalInputError(f"label {value!r} is not one of {list(names)}") from None
    if not 0 <= index < len(names):
        raise EvalInputError(f"label {value!r} is out of range for {list(names)}")
    return index


def _common_mc(doc: dict, fmt: Callable[[str], str] = str, **kw) -> Example:
    """The common {"query"/"context", "choices", "gold"} JSONL layout."""
    context = doc["query"] if "query" in doc else doc["context"]
    choices = doc["choices"]
    if not isinstance(choices, list) or not choices:
        raise EvalInputError("'choices' must be a non-empty list")
    gold = int(doc["gold"])
    if not 0 <= gold < len(choices):
        raise EvalInputError(f"gold {gold} is out of range for {len(choices)} choices")
    return Example("mc", fmt(context), tuple(str(c) for c in choices), gold, **kw)


def _is_common(doc: dict) -> bool:
    return "choices" in doc and "gold" in doc and ("query" in doc or "context" in doc)


# ----------------------------------------------------------------------------- formats


def _hs_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: WikiHow bracket markers and double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: Path) -> list[Example]:
    """Original hellaswag_*.jsonl, or the 6-line text export (llama.cpp's --hellaswag
    format: context, gold 0-3, four endings), or the common mc JSONL."""
    path = check_file(path)
    if path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) % 6:
            raise EvalInputError(
                f"{path}:{len(lines) - len(lines) % 6 + 1}: incomplete task at the end "
                f"({len(lines) % 6} of 6 lines: context, gold label, four endings)"
            )
        out = []
        for i in range(0, len(lines), 6):
            gold = lines[i + 1].strip()
            if gold not in ("0", "1", "2", "3"):
                raise EvalInputError(f"{path}:{i + 2}: gold label {gold!r} is not 0-3")
            out.append(
                Example(
                    "mc",
                    lines[i],
                    tuple(lines[i + 2 : i + 6]),
                    int(gold),
                    doc_id=f"{path.name}:{i + 1}",
                )
            )
        return out

    def make(doc):
        if _is_common(doc):
            return _common_mc(doc)
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize() if "ctx_a" in doc else doc["ctx"]
        query = _hs_preprocess(doc["activity_label"] + ": " + ctx)
        endings = tuple(_hs_preprocess(e) for e in doc["endings"])
        return Example("mc", query, endings, label_index(doc, ("0", "1", "2", "3")))

    return build(path, records(path), make)


def _labels_file(path: Path) -> Path:
    """PIQA's aligned labels: valid.jsonl -> valid-labels.lst (and valid_first200.jsonl ->
    valid-labels_first200.lst)."""
    stem = path.stem
    candidates = [path.with_name(f"{stem}-labels.lst")]
    for split in ("train", "valid", "dev", "test", "tests"):
        if split in stem:
            candidates.insert(0, path.with_name(stem.replace(split, f"{split}-labels", 1) + ".lst"))
    for c in candidates:
        if c.is_file():
            return c
    raise EvalInputError(
        f"labels file for {path} not found: expected {candidates[0]} "
        "(PIQA keeps gold labels in a sibling .lst file, one 0/1 per line)"
    )


def load_piqa(path: Path) -> list[Example]:
    """PIQA valid.jsonl {goal, sol1, sol2} with its sibling labels .lst (or inline 'label')."""
    path = check_file(path)
    rows = list(records(path))
    if rows and all("label" in doc for _, doc in rows) or all(_is_common(d) for _, d in rows):
        labelled = rows
    else:
        labels_path = _labels_file(path)
        labels = labels_path.read_text(encoding="utf-8").split()
        if len(labels) != len(rows):
            raise EvalInputError(
                f"{labels_path} has {len(labels)} labels but {path} has {len(rows)} examples"
            )
        labelled = [(n, {**doc, "label": lab}) for (n, doc), lab in zip(rows, labels, strict=True)]

    def make(doc):
        if _is_common(doc):
            return _common_mc(doc)
        context = f"Question: {doc['goal']}\nAnswer:"
        return Example("mc", context, (doc["sol1"], doc["sol2"]), label_index(doc, ("0", "1")))

    return build(path, labelled, make)


def load_lambada(path: Path) -> list[Example]:
    """OpenAI's lambada_test.jsonl {"text"} (or plain text, one passage a line, as the
    original release's lambada_{development,test}_plain_text.txt): predict the last word.
    lm-eval's lambada_openai prompt: context and target joined by one space. Few-shot
    demonstrations have the same shape (the GPT-3 paper's fill-in-the-blank few-shot
    format is not implemented; see docs/eval.md)."""
    path = check_file(path)
    if path.suffix.lower() == ".txt":  # the original release's *_plain_text.txt files
        rows = [
            (n, {"text": t.rstrip("\r")})
            for n, t in enumerate(path.read_text("utf-8").split("\n"), 1)
            if t.strip()
        ]
    else:
        rows = records(path)

    def make(doc):
        words = doc["text"].split(" ")
        if len(words) < 2:
            raise EvalInputError("a LAMBADA passage needs at least two words")
        return Example("loglik", " ".join(words[:-1]), target=words[-1])

    return build(path, rows, make)


def _arc_like(doc: dict) -> Example:
    if _is_common(doc):
        return _common_mc(doc, uncond_context="Answer:")
    q = doc["question"]
    if isinstance(q, dict):  # original AI2 / OpenBookQA: question.stem, question.choices[]
        stem, texts = q["stem"], [c["text"] for c in q["choices"]]
        labels = [str(c["label"]) for c in q["choices"]]
    else:  # flattened (Hugging Face / TFDS): question, choices.text, choices.label
        stem, texts, labels = (
            q,
            list(doc["choices"]["text"]),
            [str(x) for x in doc["choices"]["label"]],
        )
    key = str(doc["answerKey"])
    if key not in labels:
        raise EvalInputError(f"answerKey {key!r} is not among the choice labels {labels}")
    context = f"Question: {stem}\nAnswer:"
    return Example("mc", context, tuple(texts), labels.index(key), uncond_context="Answer:")


def load_arc(path: Path) -> list[Example]:
    """ARC (Easy/Challenge) and OpenBookQA jsonl, original or flattened or common layout."""
    path = check_file(path)
    return build(path, records(path), _arc_like)


def load_winogrande(path: Path) -> list[Example]:
    """Winogrande jsonl {sentence, option1, option2, answer "1"/"2"}; partial scoring: the
    words after the blank are scored given each filled-in prefix (lm-eval, GPT-3)."""
    path = check_file(path)

    def make(doc):
        if _is_common(doc):
            sentence, options, gold = (
                doc.get("query", doc.get("context")),
                doc["choices"],
                int(doc["gold"]),
            )
        else:
            sentence, options = doc["sentence"], [doc["option1"], doc["option2"]]
            gold = label_index(doc, ("1", "2"), key="answer")
        if "_" not in sentence:
            raise EvalInputError("sentence has no '_' blank")
        i = sentence.index("_")
        contexts = tuple(sentence[:i] + o for o in options)
        return Example("mc", contexts, (sentence[i + 1 :].strip(),), gold)

    return build(path, records(path), make)


def load_copa(path: Path) -> list[Example]:
    """SuperGLUE COPA jsonl {premise, choice1, choice2, question cause|effect, label}."""
    path = check_file(path)

    def lower_first(s: str) -> str:
        return s[:1].lower() + s[1:]

    def make(doc):
        if _is_common(doc):
            return _common_mc(doc)
        connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
        context = doc["premise"].strip()[:-1] + f" {connector}"
        choices = (lower_first(doc["choice1"]), lower_first(doc["choice2"]))
        return Example("mc", context, choices, label_index(doc, ("0", "1")))

    return build(path, records(path), make)


def load_boolq(path: Path) -> list[Example]:
    """SuperGLUE BoolQ jsonl {question, passage, label true/false}."""
    path = check_file(path)

    def make(doc):
        if _is_common(doc):
            return _common_mc(doc)
        context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        label = doc.get("label", doc.get("answer"))
        gold = (
            label_index({"label": label}, ("False", "True"))
            if not isinstance(label, str)
            else (label_index({"label": label.capitalize()}, ("False", "True")))
        )
        return Example("mc", context, ("no", "yes"), gold)

    return build(path, records(path), make)


def load_storycloze(path: Path) -> list[Example]:
    """StoryCloze csv (ROCStories cloze test): InputSentence1-4, RandomFifthSentenceQuiz1/2,
    AnswerRightEnding 1/2."""
    path = check_file(path)

    def make(doc):
        if _is_common(doc):
            return _common_mc(doc)
        context = " ".join(doc[f"InputSentence{i}"] for i in range(1, 5))
        choices = (doc["RandomFifthSentenceQuiz1"], doc["RandomFifthSentenceQuiz2"])
        return Example(
            "mc", context, choices, label_index(doc, ("1", "2"), key="AnswerRightEnding")
        )

    return build(path, records(path), make)


def load_sst2(path: Path) -> list[Example]:
    """SST-2: GLUE tsv (sentence<TAB>label, with header), the sentence-level
    stsa.binary.* files ("<label> <sentence>" per line), or jsonl {sentence, label}."""
    path = check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".jsonl", ".json", ".csv"):
        rows = records(path)
    else:
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if not line.strip():
                continue
            label, _, sentence = line.partition(" ")
            if label not in ("0", "1") or not sentence:
                raise EvalInputError(f"{path}:{n}: expected '<0|1> <sentence>'")
            rows.append((n, {"sentence": sentence, "label": label}))

    def make(doc):
        if _is_common(doc):
            return _common_mc(doc)
        # lm-eval's doc_to_text, sentence as is: GLUE's sentences end in a space, which
        # stays (stripping it changed 5 of 872 answers against lm-eval's sst2).
        context = f"{doc['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:"
        return Example("mc", context, ("negative", "positive"), label_index(doc, ("0", "1")))

    return build(path, rows, make)


def _entailment_loader(names: tuple[str, ...], question: str, choices: tuple[str, ...]):
    def load(path: Path) -> list[Example]:
        path = check_file(path)

        def make(doc):
            if _is_common(doc):
                return _common_mc(doc)
            premise = doc.get("premise", doc.get("sentence1"))
            hypothesis = doc.get("hypothesis", doc.get("sentence2"))
            if premise is None or hypothesis is None:
                raise EvalInputError("missing field 'premise'/'hypothesis'")
            context = f"{premise}\nQuestion: {hypothesis}{question}\nAnswer:"
            return Example("mc", context, choices, label_index(doc, names))

        return build(path, records(path), make)

    return load


load_rte = _entailment_loader(
    ("entailment", "not_entailment"), " True or False?", ("True", "False")
)
load_cb = _entailment_loader(
    ("entailment", "contradiction", "neutral"),
    ". True, False, or Neither?",
    ("True", "False", "Neither"),
)


def wikitext_detokenize(text: str) -> str:
    """lm-eval's wikitext_detokenizer (undo the tokenised release's spacing)."""
    s = text.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n").replace(" N ", " 1 ").replace(" 's", "'s")
    return s


_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_pages(path: Path) -> list[tuple[int, str]]:
    """(first line, raw text) of each document of a WikiText file: one per top-level
    ' = Title = ' heading (lm-eval's wikitext_document_level pages)."""
    docs, start, current = [], 1, []
    lines = path.read_text(encoding="utf-8").split("\n")
    for n, line in enumerate(lines, 1):
        if _WIKI_TITLE.match(line) and current and "".join(current).strip():
            docs.append((start, "\n".join(current)))
            current, start = [], n
        elif _WIKI_TITLE.match(line) and not "".join(current).strip():
            current, start = [], n
        current.append(line)
    if "".join(current).strip():
        docs.append((start, "\n".join(current)))
    return docs


def load_wikitext(path: Path) -> list[Example]:
    """WikiText (wiki.*.tokens or raw): one document per top-level ' = Title = ' heading,
    detokenised as lm-eval does; rolling loglikelihood -> word/byte perplexity, bpb.
    Also jsonl {"page"} (lm-eval's wikitext_document_level)."""
    path = check_file(path)
    if path.suffix.lower() == ".jsonl":
        docs = [
            (n, d["page"] if "page" in d else d["text"])
            for n, d in read_jsonl(path, EvalInputError)
        ]
    else:
        docs = wikitext_pages(path)
    return [
        Example(
            "rolling",
            target=wikitext_detokenize(page),
            words=len(re.split(r"\s+", page)),
            n_bytes=len(page.encode("utf-8")),  # lm-eval's: the page before detokenising
            doc_id=f"{path.name}:{n}",
        )
        for n, page in docs
        if page.strip()
    ]


def load_generic_mc(path: Path) -> list[Example]:
    """`mc=PATH`: JSONL {"query" or "context", "choices", "gold"} (also CSV/TSV with a
    choices column holding a JSON list)."""
    path = check_file(path)

    def make(doc):
        if isinstance(doc.get("choices"), str):
            doc = {**doc, "choices": json.loads(doc["choices"])}
        return _common_mc(doc)

    return build(path, records(path), make)


def load_generic_lm(path: Path) -> list[Example]:
    """`lm=PATH`: JSONL {"text"} (one document a line) or a text file (one document)."""
    path = check_file(path)
    if path.suffix.lower() == ".jsonl":
        return build(
            path,
            read_jsonl(path, EvalInputError),
            lambda d: Example("rolling", target=d["text"], words=len(d["text"].split())),
        )
    text = path.read_text(encoding="utf-8")
    return [Example("rolling", target=text, words=len(text.split()), doc_id=f"{path.name}:1")]
