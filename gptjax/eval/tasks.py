"""Tasks: each file format in its original public distribution becomes a list of Examples.

An Example is one of four request kinds (GPT-3 paper section 2.4, lm-eval's output types):

  mc        multiple choice: option i is the continuation `delimiter + choices[i]` of the
            shared `context`; with a tuple of contexts (Winogrande's partial scoring) option
            i is `contexts[i]` followed by the one shared continuation `choices[0]`.
  loglik    loglikelihood of `delimiter + target` given `context` (+ is it greedy): LAMBADA.
  rolling   loglikelihood of the whole `target` text over rolling windows: perplexity, bpb.
  generate  greedy generation from `context` until a stop sequence, against `gold` (text).

Prompts follow lm-evaluation-harness's task definitions (doc_to_text / doc_to_choice), so
that numbers agree with it; the differences are named where they occur. Built-in tasks are
parsers (code); user tasks are data: a JSON/YAML definition of templates over the fields
of a JSONL/CSV/TSV file, substituted with `{field}` and nothing else (never executed).
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("mc", "loglik", "rolling", "generate")


class EvalInputError(ValueError):
    """Bad evaluation input; the message names the file (and line) or the known choices."""


@dataclasses.dataclass(frozen=True)
class Example:
    kind: str
    context: str | tuple[str, ...] = ""
    choices: tuple[str, ...] = ()
    gold: Any = None  # mc: option index; generate: reference text (or a list of them)
    target: str = ""  # loglik: the continuation (no delimiter); rolling: the text
    delimiter: str = " "  # lm-eval's target_delimiter, between context and continuation
    uncond_context: str | None = None  # ARC/OBQA: P(option | "Answer:") for normalisation
    stop: tuple[str, ...] = ("\n\n",)  # generate: stop sequences
    doc_id: str = ""  # "file:line", identifies the example (few-shot never draws itself)
    words: int = 0  # rolling: words of the original text (lm-eval's word_perplexity)

    @property
    def partial(self) -> bool:
        return isinstance(self.context, tuple)

    @property
    def n_options(self) -> int:
        return len(self.context) if self.partial else len(self.choices)

    def option(self, i: int) -> tuple[str, str]:
        """(context, continuation) of multiple-choice option i."""
        if self.partial:
            return self.context[i], self.delimiter + self.choices[0]
        return self.context, self.delimiter + self.choices[i]

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) loglikelihood requests of an mc or loglik example."""
        if self.kind == "mc":
            return [self.option(i) for i in range(self.n_options)]
        if self.kind == "loglik":
            return [(self.context, self.delimiter + self.target)]
        raise ValueError(f"{self.kind} examples have no (context, continuation) requests")

    def with_prefix(self, prefix: str) -> Example:
        """The example with a few-shot prefix before its context(s)."""
        if not prefix:
            return self
        ctx = tuple(prefix + c for c in self.context) if self.partial else prefix + self.context
        return dataclasses.replace(self, context=ctx)

    def demo(self) -> str:
        """The example as a solved few-shot demonstration (context + delimiter + answer)."""
        if self.kind == "mc":
            return "".join(self.option(int(self.gold)))
        if self.kind == "loglik":
            return self.context + self.delimiter + self.target
        if self.kind == "generate":
            gold = self.gold[0] if isinstance(self.gold, (list, tuple)) else self.gold
            return self.context + self.delimiter + str(gold)
        raise ValueError("rolling (perplexity) examples are not used as demonstrations")


# ----------------------------------------------------------------------------- reading


def _jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalInputError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
            if not isinstance(doc, dict):
                raise EvalInputError(
                    f"{path}:{n}: expected a JSON object, got {type(doc).__name__}"
                )
            yield n, doc


def _csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL)
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise EvalInputError(
                    f"{path}:{reader.line_num}: row does not have the header's "
                    f"{len(reader.fieldnames or [])} columns"
                )
            yield reader.line_num, row


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows of a .jsonl, .csv or .tsv file as (line number, dict)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv(path, ",")
    if suffix == ".tsv":
        return _csv(path, "\t")
    return _jsonl(path)


def _check_file(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"task data not found: {path}")
    return path


def _build(path: Path, rows, make: Callable[[dict], Example]) -> list[Example]:
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


def _label(doc: dict, names: tuple[str, ...], key: str = "label") -> int:
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


# ----------------------------------------------------------------------------- built-ins


def _hs_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleaning: WikiHow bracket markers and double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: Path) -> list[Example]:
    """Original hellaswag_*.jsonl, or the 6-line text export (llama.cpp's --hellaswag
    format: context, gold 0-3, four endings), or the common mc JSONL."""
    path = _check_file(path)
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
        return Example("mc", query, endings, _label(doc, ("0", "1", "2", "3")))

    return _build(path, _records(path), make)


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
    path = _check_file(path)
    rows = list(_records(path))
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
        return Example("mc", context, (doc["sol1"], doc["sol2"]), _label(doc, ("0", "1")))

    return _build(path, labelled, make)


def load_lambada(path: Path) -> list[Example]:
    """OpenAI's lambada_test.jsonl {"text"} (or plain text, one passage a line, as the
    original release's lambada_{development,test}_plain_text.txt): predict the last word.
    lm-eval's lambada_openai prompt: context and target joined by one space. Few-shot
    demonstrations have the same shape (the GPT-3 paper's fill-in-the-blank few-shot
    format is not implemented; see docs/eval.md)."""
    path = _check_file(path)
    if path.suffix.lower() == ".txt":  # the original release's *_plain_text.txt files
        rows = [
            (n, {"text": t.rstrip("\r")})
            for n, t in enumerate(path.read_text("utf-8").split("\n"), 1)
            if t.strip()
        ]
    else:
        rows = _records(path)

    def make(doc):
        words = doc["text"].split(" ")
        if len(words) < 2:
            raise EvalInputError("a LAMBADA passage needs at least two words")
        return Example("loglik", " ".join(words[:-1]), target=words[-1])

    return _build(path, rows, make)


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
    path = _check_file(path)
    return _build(path, _records(path), _arc_like)


def load_winogrande(path: Path) -> list[Example]:
    """Winogrande jsonl {sentence, option1, option2, answer "1"/"2"}; partial scoring: the
    words after the blank are scored given each filled-in prefix (lm-eval, GPT-3)."""
    path = _check_file(path)

    def make(doc):
        if _is_common(doc):
            sentence, options, gold = (
                doc.get("query", doc.get("context")),
                doc["choices"],
                int(doc["gold"]),
            )
        else:
            sentence, options = doc["sentence"], [doc["option1"], doc["option2"]]
            gold = _label(doc, ("1", "2"), key="answer")
        if "_" not in sentence:
            raise EvalInputError("sentence has no '_' blank")
        i = sentence.index("_")
        contexts = tuple(sentence[:i] + o for o in options)
        return Example("mc", contexts, (sentence[i + 1 :].strip(),), gold)

    return _build(path, _records(path), make)


def load_copa(path: Path) -> list[Example]:
    """SuperGLUE COPA jsonl {premise, choice1, choice2, question cause|effect, label}."""
    path = _check_file(path)

    def lower_first(s: str) -> str:
        return s[:1].lower() + s[1:]

    def make(doc):
        if _is_common(doc):
            return _common_mc(doc)
        connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
        context = doc["premise"].strip()[:-1] + f" {connector}"
        choices = (lower_first(doc["choice1"]), lower_first(doc["choice2"]))
        return Example("mc", context, choices, _label(doc, ("0", "1")))

    return _build(path, _records(path), make)


def load_boolq(path: Path) -> list[Example]:
    """SuperGLUE BoolQ jsonl {question, passage, label true/false}."""
    path = _check_file(path)

    def make(doc):
        if _is_common(doc):
            return _common_mc(doc)
        context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        label = doc.get("label", doc.get("answer"))
        gold = (
            _label({"label": label}, ("False", "True"))
            if not isinstance(label, str)
            else (_label({"label": label.capitalize()}, ("False", "True")))
        )
        return Example("mc", context, ("no", "yes"), gold)

    return _build(path, _records(path), make)


def load_storycloze(path: Path) -> list[Example]:
    """StoryCloze csv (ROCStories cloze test): InputSentence1-4, RandomFifthSentenceQuiz1/2,
    AnswerRightEnding 1/2."""
    path = _check_file(path)

    def make(doc):
        if _is_common(doc):
            return _common_mc(doc)
        context = " ".join(doc[f"InputSentence{i}"] for i in range(1, 5))
        choices = (doc["RandomFifthSentenceQuiz1"], doc["RandomFifthSentenceQuiz2"])
        return Example("mc", context, choices, _label(doc, ("1", "2"), key="AnswerRightEnding"))

    return _build(path, _records(path), make)


def load_sst2(path: Path) -> list[Example]:
    """SST-2: GLUE tsv (sentence<TAB>label, with header), the sentence-level
    stsa.binary.* files ("<label> <sentence>" per line), or jsonl {sentence, label}."""
    path = _check_file(path)
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".jsonl", ".json", ".csv"):
        rows = _records(path)
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
        context = (
            f"{doc['sentence'].strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:"
        )
        return Example("mc", context, ("negative", "positive"), _label(doc, ("0", "1")))

    return _build(path, rows, make)


def _entailment_loader(names: tuple[str, ...], question: str, choices: tuple[str, ...]):
    def load(path: Path) -> list[Example]:
        path = _check_file(path)

        def make(doc):
            if _is_common(doc):
                return _common_mc(doc)
            premise = doc.get("premise", doc.get("sentence1"))
            hypothesis = doc.get("hypothesis", doc.get("sentence2"))
            if premise is None or hypothesis is None:
                raise EvalInputError("missing field 'premise'/'hypothesis'")
            context = f"{premise}\nQuestion: {hypothesis}{question}\nAnswer:"
            return Example("mc", context, choices, _label(doc, names))

        return _build(path, _records(path), make)

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


def load_wikitext(path: Path) -> list[Example]:
    """WikiText (wiki.*.tokens or raw): one document per top-level ' = Title = ' heading,
    detokenised as lm-eval does; rolling loglikelihood -> word/byte perplexity, bpb.
    Also jsonl {"page"} (lm-eval's wikitext_document_level)."""
    path = _check_file(path)
    if path.suffix.lower() == ".jsonl":
        docs = [(n, d["page"] if "page" in d else d["text"]) for n, d in _jsonl(path)]
    else:
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
    return [
        Example(
            "rolling",
            target=wikitext_detokenize(page),
            words=len(re.split(r"\s+", page)),
            doc_id=f"{path.name}:{n}",
        )
        for n, page in docs
        if page.strip()
    ]


def load_generic_mc(path: Path) -> list[Example]:
    """`mc=PATH`: JSONL {"query" or "context", "choices", "gold"} (also CSV/TSV with a
    choices column holding a JSON list)."""
    path = _check_file(path)

    def make(doc):
        if isinstance(doc.get("choices"), str):
            doc = {**doc, "choices": json.loads(doc["choices"])}
        return _common_mc(doc)

    return _build(path, _records(path), make)


def load_generic_lm(path: Path) -> list[Example]:
    """`lm=PATH`: JSONL {"text"} (one document a line) or a text file (one document)."""
    path = _check_file(path)
    if path.suffix.lower() == ".jsonl":
        return _build(
            path,
            _jsonl(path),
            lambda d: Example("rolling", target=d["text"], words=len(d["text"].split())),
        )
    text = path.read_text(encoding="utf-8")
    return [Example("rolling", target=text, words=len(text.split()), doc_id=f"{path.name}:1")]


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    name: str
    load: Callable[[Path], list[Example]]
    primary: str  # the metric of the table and the plot
    fewshot_siblings: tuple[str, ...] = ()  # training-split files beside the eval file
    tfds: tuple[str, str, str] | None = None  # (dataset, eval split, few-shot split)
    about: str = ""
    # No training split: the GPT-3 paper drew demonstrations from the dev set (LAMBADA,
    # StoryCloze); falling back to the evaluated set itself is warned about loudly.
    dev_pool: bool = False


TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in (
        TaskInfo("lambada", load_lambada, "acc",
                 ("lambada_development*.jsonl", "lambada_development*.txt", "lambada_dev*.jsonl",
                  "lambada_val*.jsonl"),
                 ("lambada", "test", "train"),  # TFDS's "train" is the development text
                 "OpenAI lambada_test.jsonl; few-shot from the development set beside it "
                 "(lambada_development*) or --fewshot-from lambada=DEV, as the paper did",
                 dev_pool=True),
        TaskInfo("hellaswag", load_hellaswag, "acc_norm",
                 ("hellaswag_train.jsonl", "hellaswag_train*.txt"), ("hellaswag", "validation", "train"),
                 "hellaswag_*.jsonl or the 6-line text export"),
        TaskInfo("piqa", load_piqa, "acc_norm", ("train.jsonl",), ("piqa", "validation", "train"),
                 "valid.jsonl + valid-labels.lst"),
        TaskInfo("arc_easy", load_arc, "acc_uncond", ("*Train.jsonl", "train.jsonl"),
                 ("ai2_arc/ARC-Easy", "test", "train"), "ARC-Easy-*.jsonl"),
        TaskInfo("arc_challenge", load_arc, "acc_uncond", ("*Train.jsonl", "train.jsonl"),
                 ("ai2_arc/ARC-Challenge", "test", "train"), "ARC-Challenge-*.jsonl"),
        TaskInfo("openbookqa", load_arc, "acc_uncond", ("train.jsonl",), None, "OpenBookQA jsonl"),
        TaskInfo("winogrande", load_winogrande, "acc", ("train_xl.jsonl", "train.jsonl"),
                 ("winogrande", "validation", "train_xl"), "dev.jsonl {sentence, option1, option2, answer}"),
        TaskInfo("copa", load_copa, "acc", ("train.jsonl",), ("super_glue/copa", "validation", "train"),
                 "SuperGLUE COPA jsonl"),
        TaskInfo("boolq", load_boolq, "acc", ("train.jsonl",), ("super_glue/boolq", "validation", "train"),
                 "SuperGLUE BoolQ jsonl"),
        TaskInfo("storycloze", load_storycloze, "acc", ("cloze_test_val*.csv",),
                 ("story_cloze/2016", "test", "validation"),
                 "StoryCloze csv; few-shot from the validation csv beside it (cloze_test_val*) "
                 "or --fewshot-from storycloze=VAL_CSV, as the paper did", dev_pool=True),
        TaskInfo("sst2", load_sst2, "acc", ("stsa.binary.train", "train.tsv", "train.jsonl"),
                 ("glue/sst2", "validation", "train"), "GLUE dev.tsv or stsa.binary.*"),
        TaskInfo("rte", load_rte, "acc", ("train.jsonl",), ("super_glue/rte", "validation", "train"),
                 "SuperGLUE RTE jsonl"),
        TaskInfo("cb", load_cb, "acc", ("train.jsonl",), ("super_glue/cb", "validation", "train"),
                 "SuperGLUE CB jsonl"),
        TaskInfo("wikitext", load_wikitext, "word_perplexity", (), None,
                 "wiki.{valid,test}.tokens (or raw); rolling perplexity"),
        TaskInfo("mc", load_generic_mc, "acc", (), None, 'JSONL {"query"/"context", "choices", "gold"}'),
        TaskInfo("lm", load_generic_lm, "bits_per_byte", (), None, 'JSONL {"text"} or a text file'),
    )
}  # fmt: skip


def known_tasks() -> str:
    return ", ".join(sorted(TASKS)) + " (or NAME=DEFINITION.yaml/.json for a task defined as data)"


# ----------------------------------------------------------------------------- definitions

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DEF_KEYS = {
    "name", "kind", "data", "fewshot_data", "labels", "context", "choices", "choices_field",
    "gold", "gold_map", "target", "text", "delimiter", "uncond_context", "stop", "primary",
}  # fmt: skip


def _fill(template: str, doc: dict) -> str:
    """`{field}` substitution, nothing more (a definition is data, never code)."""

    def one(m):
        if m.group(1) not in doc:
            raise KeyError(m.group(1))
        return str(doc[m.group(1)])

    return _FIELD.sub(one, template)


@dataclasses.dataclass(frozen=True)
class TaskDefinition:
    """A user task as data, from a JSON or YAML file:

    kind: mc | loglik | rolling | generate
    data: path of a .jsonl/.csv/.tsv file (relative to the definition file)
    fewshot_data: optional training split in the same layout
    labels: optional aligned labels file (one gold per line)
    context: "Question: {goal}\\nAnswer:"     # templates over the row's fields
    choices: ["{sol1}", "{sol2}"]  or  choices_field: endings
    gold: "{label}"   (+ gold_map: {entailment: 0, ...}, or a choice's text)
    target: "{answer}"                  # loglik / generate
    text: "{text}"                      # rolling
    delimiter: " "   uncond_context: "Answer:"   stop: ["\\n"]   primary: acc
    """

    spec: dict
    source: Path

    @classmethod
    def read(cls, path: Path) -> TaskDefinition:
        path = _check_file(path)
        raw = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                spec = yaml.safe_load(raw)
            else:
                spec = json.loads(raw)
        except Exception as e:  # yaml / json errors carry the position in their text
            raise EvalInputError(f"{path}: not a valid task definition: {e}") from None
        if not isinstance(spec, dict):
            raise EvalInputError(f"{path}: a task definition must be a mapping")
        unknown = set(spec) - _DEF_KEYS
        if unknown:
            raise EvalInputError(
                f"{path}: unknown keys {sorted(unknown)}; known: {sorted(_DEF_KEYS)}"
            )
        if spec.get("kind") not in KINDS:
            raise EvalInputError(f"{path}: 'kind' must be one of {list(KINDS)}")
        if "data" not in spec:
            raise EvalInputError(f"{path}: 'data' (the examples file) is required")
        return cls(spec, path)

    def _path(self, key: str) -> Path | None:
        value = self.spec.get(key)
        return None if value is None else (self.source.parent / value)

    def load(self, path: Path | None = None) -> list[Example]:
        path = _check_file(path or self._path("data"))
        rows = list(_records(path))
        labels_path = self._path("labels") if path == self._path("data") else None
        if labels_path is not None:
            labels = _check_file(labels_path).read_text(encoding="utf-8").split()
            if len(labels) != len(rows):
                raise EvalInputError(
                    f"{labels_path} has {len(labels)} labels, {path} {len(rows)} rows"
                )
            rows = [(n, {**d, "label": lab}) for (n, d), lab in zip(rows, labels, strict=True)]
        return _build(path, rows, self._make)

    def _make(self, doc: dict) -> Example:
        s, kind = self.spec, self.spec["kind"]
        common = dict(delimiter=s.get("delimiter", " "))
        if kind == "rolling":
            text = _fill(s.get("text", "{text}"), doc)
            return Example("rolling", target=text, words=len(text.split()))
        context = _fill(s.get("context", "{context}"), doc)
        if kind == "loglik":
            return Example(
                "loglik", context, target=_fill(s.get("target", "{target}"), doc), **common
            )
        if kind == "generate":
            stop = tuple(s.get("stop", ("\n\n",)))
            return Example(
                "generate",
                context,
                gold=_fill(s.get("target", "{answer}"), doc),
                stop=stop,
                **common,
            )
        if "choices_field" in s:
            choices = doc[s["choices_field"]]
            choices = json.loads(choices) if isinstance(choices, str) else choices
        else:
            choices = [_fill(c, doc) for c in s.get("choices", [])]
        if not choices:
            raise EvalInputError("no choices")
        gold_text = _fill(s.get("gold", "{gold}"), doc)
        gold_map = s.get("gold_map") or {}
        if gold_text in gold_map:
            gold = int(gold_map[gold_text])
        elif gold_text.lstrip("-").isdigit():
            gold = int(gold_text)
        elif gold_text in choices:
            gold = list(choices).index(gold_text)
        else:
            raise EvalInputError(
                f"gold {gold_text!r} is neither an index, a gold_map key nor a choice"
            )
        if not 0 <= gold < len(choices):
            raise EvalInputError(f"gold {gold} is out of range for {len(choices)} choices")
        return Example(
            "mc",
            context,
            tuple(map(str, choices)),
            gold,
            uncond_context=s.get("uncond_context"),
            **common,
        )


# ----------------------------------------------------------------------------- resolution


@dataclasses.dataclass
class Task:
    """A task ready to run: its examples and where few-shot demonstrations come from."""

    name: str
    examples: list[Example]
    primary: str
    fewshot_pool: list[Example] | None = None  # None: draw from `examples` (never itself)
    fewshot_source: str = ""
    source: str = ""
    fewshot_warning: str = ""  # logged when K > 0 draws from the evaluated set itself


def _tfds_records(dataset: str, split: str, data_dir: str | None) -> list[dict]:
    """A prepared TFDS dataset's records as plain dicts (bytes -> str), through
    tfds.data_source (array_record, no TensorFlow, no download)."""
    import numpy as np

    from gptjax.data.sources import DataError, open_tfds

    try:
        source = open_tfds(dataset, split, data_dir)
    except DataError as e:
        raise EvalInputError(f"{e} Or give the task's data as NAME=PATH.") from None

    def plain(x):
        if isinstance(x, bytes):
            return x.decode("utf-8")
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, np.ndarray):
            return [plain(v) for v in x.tolist()] if x.ndim else plain(x.item())
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, np.generic):
            return x.item()
        return x

    return [plain(source[i]) for i in range(len(source))]


def _from_tfds_record(name: str, doc: dict) -> dict:
    """TFDS feature layouts -> the original files' layouts the loaders parse."""
    if name == "hellaswag":
        return {"activity_label": doc["activity_label"], "ctx": doc["context"],
                "endings": doc["endings"], "label": doc["label"]}  # fmt: skip
    if name.startswith("arc"):
        letters = "ABCDE"
        return {"question": doc["question"],
                "choices": {"text": doc["choices"]["text"],
                            "label": [letters[i] for i in doc["choices"]["label"]]},
                "answerKey": letters[doc["answerKey"]]}  # fmt: skip
    if name == "winogrande":
        return {**doc, "answer": str(int(doc["label"]) + 1)}
    if name == "storycloze":
        sentences = {f"InputSentence{i + 1}": "" for i in range(4)}
        sentences["InputSentence1"] = doc["context"]  # TFDS joined the four sentences
        return {**sentences, "RandomFifthSentenceQuiz1": doc["endings"][0],
                "RandomFifthSentenceQuiz2": doc["endings"][1],
                "AnswerRightEnding": str(doc["label"])}  # fmt: skip
    if name == "lambada":  # each passage is a line of the release's text file, "\n" kept
        return {"text": doc["passage"].rstrip("\r\n")}
    return doc


def _load_tfds(info: TaskInfo, split: str, data_dir: str | None, tmp_dir: Path) -> list[Example]:
    dataset = info.tfds[0]
    records = [_from_tfds_record(info.name, r) for r in _tfds_records(dataset, split, data_dir)]
    path = tmp_dir / f"{info.name}_{split}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    examples = info.load(path)
    if info.name == "storycloze":  # the joined context gained three separator spaces
        examples = [dataclasses.replace(e, context=e.context.rstrip()) for e in examples]
    return [
        dataclasses.replace(e, doc_id=f"tfds:{dataset}/{split}:{i}") for i, e in enumerate(examples)
    ]


def _sibling(path: Path, patterns: tuple[str, ...]) -> Path | None:
    """The first file beside `path` matching one of the few-shot split's patterns. A
    pattern the evaluated file matches itself names its own split (e.g. evaluating on
    cloze_test_val*), so it does not point at another split and is skipped."""
    for pattern in patterns:
        if fnmatch.fnmatch(path.name, pattern):
            continue
        for candidate in sorted(path.parent.glob(pattern)):
            if candidate.resolve() != path.resolve() and candidate.is_file():
                return candidate
    return None


def parse_task_arg(arg: str) -> tuple[str, str | None]:
    name, sep, path = arg.partition("=")
    if not name:
        raise EvalInputError(f"--task {arg!r}: expected NAME=PATH or NAME")
    return name, (path if sep else None)


def resolve_task(
    arg: str,
    fewshot_from: dict[str, str] | None = None,
    tfds_data_dir: str | None = None,
    tmp_dir: Path | None = None,
) -> Task:
    """`NAME=PATH` (or a TFDS NAME alone) -> Task. Unknown names list the known ones."""
    import tempfile

    name, path = parse_task_arg(arg)
    fewshot_from = fewshot_from or {}
    definition = None
    missing = ""  # why there is no few-shot split, when there is none
    if path and Path(path).suffix.lower() in (".yaml", ".yml", ".json") and name not in TASKS:
        definition = TaskDefinition.read(Path(path))
    elif name not in TASKS:
        raise EvalInputError(f"unknown task {name!r}; known tasks: {known_tasks()}")

    if definition is not None:
        examples = definition.load()
        primary = definition.spec.get("primary") or {
            "mc": "acc", "loglik": "acc", "rolling": "bits_per_byte", "generate": "exact_match"
        }[definition.spec["kind"]]  # fmt: skip
        task = Task(name, examples, primary, source=str(path))
        pool_path = fewshot_from.get(name) or definition._path("fewshot_data")
        if pool_path:
            task.fewshot_pool = definition.load(Path(pool_path))
            task.fewshot_source = str(pool_path)
        else:
            task.fewshot_source = f"{path} (the example itself excluded)"
            task.fewshot_warning = (
                f"{name}: few-shot demonstrations are drawn from the EVALUATION SET ITSELF "
                f"(each example excluded): {path} has no fewshot_data; give it one or "
                f"--fewshot-from {name}=FILE"
            )
        return task

    info = TASKS[name]
    if path is None:
        if info.tfds is None:
            raise EvalInputError(
                f"task {name!r} needs a data file: --task {name}=PATH ({info.about}); "
                f"TFDS tasks usable by name alone: "
                + ", ".join(sorted(n for n, t in TASKS.items() if t.tfds))
            )
        tmp = Path(tmp_dir or tempfile.mkdtemp(prefix="gptjax_eval_tfds_"))
        dataset, split, fs_split = info.tfds
        task = Task(
            name,
            _load_tfds(info, split, tfds_data_dir, tmp),
            info.primary,
            source=f"tfds:{dataset}/{split}",
        )
        if name not in fewshot_from:
            try:
                task.fewshot_pool = _load_tfds(info, fs_split, tfds_data_dir, tmp)
                task.fewshot_source = f"tfds:{dataset}/{fs_split}"
            except EvalInputError as e:
                missing = f"TFDS split {dataset}/{fs_split} could not be read: {e}"
    else:
        task = Task(name, info.load(Path(path)), info.primary, source=str(path))
        if name not in fewshot_from:
            sibling = _sibling(Path(path), info.fewshot_siblings)
            if sibling is not None:
                task.fewshot_pool = info.load(sibling)
                task.fewshot_source = str(sibling)
    if name in fewshot_from:
        task.fewshot_pool = info.load(Path(fewshot_from[name]))
        task.fewshot_source = fewshot_from[name]
    if task.fewshot_pool is None:
        task.fewshot_source = f"{task.source} (the example itself excluded)"
        task.fewshot_warning = _fallback_warning(info, path, missing)
    elif task.fewshot_source:
        log.info("%s: few-shot demonstrations from %s", name, task.fewshot_source)
    return task


def _fallback_warning(info: TaskInfo, path: str | None, missing: str = "") -> str:
    """What to say when demonstrations come from the evaluated set itself."""
    if missing:
        where = missing
    elif info.fewshot_siblings:
        where = "no " + " / ".join(info.fewshot_siblings) + f" beside {path}"
    else:
        where = "no training split is known for this format"
    split = "development/validation" if info.dev_pool else "training"
    msg = (
        f"{info.name}: few-shot demonstrations are drawn from the EVALUATION SET ITSELF "
        f"(each example excluded), not from a {split} split ({where})"
    )
    if info.dev_pool:
        msg += f"; the GPT-3 paper drew {info.name}'s demonstrations from its {split} set"
    return msg + f"; give --fewshot-from {info.name}=FILE to draw them from another file"
