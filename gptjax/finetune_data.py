"""Fine-tuning data: task files in their public formats -> labelled examples -> the GPT-1
input transformations (Radford et al. 2018, Figure 1) as token arrays; per-task metrics.

  classification  [start] text [extract]
  entailment      [start] premise [delim] hypothesis [extract]
  similarity      [start] a [delim] b [extract]  and  [start] b [delim] a [extract]
  multiple choice [start] context [delim] answer_k [extract]  for each answer k

Every example becomes K sequences (1; 2 for similarity; one per answer), padded to n_ctx,
and the position of each [extract] token. A sequence longer than n_ctx loses tokens from
its longest segment (a multiple-choice context loses its beginning, the text furthest
from the question; other segments lose their end); such examples are counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from gptjax.config import TaskName
from gptjax.data.loader import TrainBatches
from gptjax.eval.metrics import accuracy, binary_f1, macro_f1, matthews, pearson, spearman
from gptjax.rows import Rows, read_jsonl, read_rows, read_tsv

log = logging.getLogger(__name__)

Kind = Literal["classification", "entailment", "similarity", "multiple_choice"]
N_SPECIALS = 3  # start, delim, extract: appended after the pretrained vocabulary
UNLABELLED = -1


class FinetuneDataError(ValueError):
    """A task file that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class TaskExample:
    segments: tuple[str, ...]  # (text,) | (a, b) | (context, answer_1, ..., answer_K)
    label: float  # class or answer index, or a score (regression); -1 when unlabelled
    where: str = ""  # "file:line"


@dataclasses.dataclass(frozen=True)
class Specials:
    """Token ids of the three tokens fine-tuning adds (the last three of the vocabulary)."""

    start: int
    delim: int
    extract: int

    @classmethod
    def for_vocab(cls, vocab_size: int) -> Specials:
        """The special ids of a model whose vocab_size already counts them."""
        return cls(vocab_size - 3, vocab_size - 2, vocab_size - 1)


# ----------------------------------------------------------------------------- reading


def _check_file(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FinetuneDataError(f"task data not found: {path}")
    return path


def _rows(path: Path) -> Rows:
    """Rows of a .jsonl, .csv or GLUE-style .tsv (tabs split, quotes are text) file."""
    return read_rows(path, FinetuneDataError, quoted_tsv=False)


def _text(doc: dict, *keys: str) -> str:
    """The first present field of `keys`, which must not be empty."""
    for key in keys:
        if key in doc and doc[key] is not None:
            value = str(doc[key]).strip()
            if not value:
                raise FinetuneDataError(f"empty field {key!r}")
            return value
    raise FinetuneDataError(f"missing field {' / '.join(repr(k) for k in keys)}")


def _class(doc: dict, key: str, names: tuple[str, ...], labelled: bool) -> int:
    """A class index from one of `names`, or an index (int or numeric string)."""
    value = doc.get(key)
    if value is None or value == "":
        if labelled:
            raise FinetuneDataError(f"no label in field {key!r} (an unlabelled test split?)")
        return UNLABELLED
    if isinstance(value, str) and value.strip() in names:
        return names.index(value.strip())
    try:
        index = int(value)
    except (TypeError, ValueError):
        index = -1
    if isinstance(value, bool) or not 0 <= index < len(names):
        raise FinetuneDataError(f"unknown label {value!r} in field {key!r}; known: {list(names)}")
    return index


def _score(doc: dict, key: str, labelled: bool) -> float:
    value = doc.get(key)
    if value is None or value == "":
        if labelled:
            raise FinetuneDataError(f"no score in field {key!r}")
        return float(UNLABELLED)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise FinetuneDataError(f"score {value!r} in field {key!r} is not a number") from None


def _build(path: Path, rows, make: Callable[[dict], TaskExample | None]) -> list[TaskExample]:
    out = []
    for n, doc in rows:
        try:
            ex = make(doc)
        except FinetuneDataError as e:
            raise FinetuneDataError(f"{path}:{n}: {e}") from None
        if ex is not None:
            out.append(dataclasses.replace(ex, where=f"{path.name}:{n}"))
    if not out:
        raise FinetuneDataError(f"{path}: no examples")
    return out


# ----------------------------------------------------------------------------- tasks


def _load_sst2(path: Path, labels, labelled: bool) -> list[TaskExample]:
    """GLUE tsv (sentence<TAB>label, header) or stsa.binary.* ('<label> <sentence>')."""
    if path.suffix.lower() in (".tsv", ".jsonl", ".csv"):
        rows = _rows(path)
    else:
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if line.strip():
                label, _, sentence = line.strip().partition(" ")
                rows.append((n, {"label": label, "sentence": sentence}))

    def make(doc):
        return TaskExample((_text(doc, "sentence"),), _class(doc, "label", labels, labelled))

    return _build(path, rows, make)


def _load_cola(path: Path, labels, labelled: bool) -> list[TaskExample]:
    """GLUE CoLA tsv: train/dev have no header (source, label, mark, sentence)."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().rstrip("\r\n").split("\t")
    headerless = len(first) == 4 and first[1] in ("0", "1")
    columns = ("source", "label", "mark", "sentence") if headerless else None
    rows = read_tsv(path, columns, FinetuneDataError)

    def make(doc):
        return TaskExample((_text(doc, "sentence"),), _class(doc, "label", labels, labelled))

    return _build(path, rows, make)


def _pair_loader(first: tuple[str, ...], second: tuple[str, ...], label_keys: tuple[str, ...]):
    """Sentence-pair formats: GLUE tsv (MRPC, QQP, STS-B), SuperGLUE jsonl (RTE, CB),
    SNLI/MultiNLI jsonl (examples without a gold label, '-', are skipped)."""

    def load(path: Path, labels, labelled: bool) -> list[TaskExample]:
        skipped = 0

        def make(doc):
            nonlocal skipped
            key = next((k for k in label_keys if k in doc), label_keys[0])
            if doc.get(key) == "-":  # SNLI/MNLI: annotators did not agree
                skipped += 1
                return None
            a, b = _text(doc, *first), _text(doc, *second)
            if not labels:
                return TaskExample((a, b), _score(doc, key, labelled))
            return TaskExample((a, b), _class(doc, key, labels, labelled))

        out = _build(path, _rows(path), make)
        if skipped:
            log.info("%s: skipped %d examples without a gold label ('-')", path, skipped)
        return out

    return load


_PAIR = _pair_loader(
    ("premise", "sentence1", "#1 String", "question1"),
    ("hypothesis", "sentence2", "#2 String", "question2"),
    ("label", "gold_label", "Quality", "is_duplicate", "score"),
)


def _race_docs(path: Path) -> Iterator[tuple[str, dict]]:
    """RACE: the original release (a directory of .txt files, one JSON article each
    with questions/options/answers lists) or JSONL, one article or one question a line."""
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FinetuneDataError(f"{path}: no RACE .txt files")
        for file in files:
            try:
                yield file.name, json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise FinetuneDataError(f"{file}: malformed JSON ({e.msg})") from None
    else:
        for n, doc in read_jsonl(path, FinetuneDataError):
            yield f"{path.name}:{n}", doc


def _load_race(path: Path, labels, labelled: bool) -> list[TaskExample]:
    out = []
    for where, doc in _race_docs(path):
        try:
            article = _text(doc, "article")
            if "questions" in doc:
                answers = doc.get("answers") or [""] * len(doc["questions"])
                if not len(doc["questions"]) == len(doc["options"]) == len(answers):
                    raise FinetuneDataError("questions, options and answers differ in length")
                items = zip(doc["questions"], doc["options"], answers, strict=True)
            else:
                items = [(doc.get("question"), doc.get("options"), doc.get("answer"))]
            for question, options, answer in items:
                if not isinstance(options, list) or len(options) != len(labels):
                    raise FinetuneDataError(f"expected {len(labels)} options, got {options!r}")
                opts = tuple(_text({"option": o}, "option") for o in options)
                label = _class({"answer": answer}, "answer", labels, labelled)
                context = f"{article} {str(question or '').strip()}".strip()
                out.append(TaskExample((context, *opts), label, where))
        except FinetuneDataError as e:
            raise FinetuneDataError(f"{path} ({where}): {e}") from None
    if not out:
        raise FinetuneDataError(f"{path}: no examples")
    return out


def _load_storycloze(path: Path, labels, labelled: bool) -> list[TaskExample]:
    """StoryCloze csv/tsv: InputSentence1-4, RandomFifthSentenceQuiz1/2, AnswerRightEnding."""

    def make(doc):
        context = " ".join(_text(doc, f"InputSentence{i}") for i in range(1, 5))
        endings = (_text(doc, "RandomFifthSentenceQuiz1"), _text(doc, "RandomFifthSentenceQuiz2"))
        return TaskExample((context, *endings), _class(doc, "AnswerRightEnding", labels, labelled))

    return _build(path, _rows(path), make)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Kind
    labels: tuple[str, ...]  # class names, answer letters; () for a regression (STS-B)
    load: Callable[[Path, tuple[str, ...], bool], list[TaskExample]]
    metrics: tuple[str, ...]  # the first is the one that picks the best epoch
    score_scale: float = 1.0  # regression: targets are divided by this for the loss

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def n_outputs(self) -> int:
        """Width of W_y: one score per class, or one per sequence (answer, regression)."""
        return 1 if self.regression or self.kind == "multiple_choice" else len(self.labels)

    def read(self, path: str | Path, labelled: bool = True) -> list[TaskExample]:
        return self.load(_check_file(Path(path)), self.labels, labelled)


_NLI = ("entailment", "neutral", "contradiction")
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("sst2", "classification", ("0", "1"), _load_sst2, ("accuracy",)),
        TaskSpec("cola", "classification", ("0", "1"), _load_cola, ("matthews", "accuracy")),
        TaskSpec("mrpc", "similarity", ("0", "1"), _PAIR, ("f1", "accuracy")),
        TaskSpec("qqp", "similarity", ("0", "1"), _PAIR, ("f1", "accuracy")),
        TaskSpec("stsb", "similarity", (), _PAIR, ("pearson", "spearman"), score_scale=5.0),
        TaskSpec("rte", "entailment", ("entailment", "not_entailment"), _PAIR, ("accuracy",)),
        TaskSpec("cb", "entailment", ("entailment", "contradiction", "neutral"), _PAIR,
                 ("accuracy", "macro_f1")),
        TaskSpec("snli", "entailment", _NLI, _PAIR, ("accuracy",)),
        TaskSpec("mnli", "entailment", _NLI, _PAIR, ("accuracy",)),
        TaskSpec("race", "multiple_choice", ("A", "B", "C", "D"), _load_race, ("accuracy",)),
        TaskSpec("storycloze", "multiple_choice", ("1", "2"), _load_storycloze, ("accuracy",)),
    )
}  # fmt: skip
assert set(TASKS) == set(TaskName.__args__)


# ----------------------------------------------------------------------------- layout


def _fit(lengths: list[int], budget: int) -> list[int]:
    """The lengths after shortening the longest segment (the first of equals), one token
    at a time, until the total fits the budget (>= 0), computed without that loop.

    The loop caps every segment at a level: it passes through "all capped at T + 1",
    T the highest level whose cap fits, then takes one more token from each of the
    first r segments at T + 1 (in order), r the tokens still over the budget."""
    lengths = list(lengths)
    if sum(lengths) <= budget:
        return lengths

    def capped(level: int) -> int:
        return sum(min(n, level) for n in lengths)

    lo, hi = 0, max(lengths)  # capped(lo) <= budget < capped(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if capped(mid) <= budget else (lo, mid)
    over = capped(lo + 1) - budget  # tokens to take from the segments at level lo + 1
    out = []
    for n in lengths:
        if n > lo:
            n = lo + 1 if over <= 0 else lo
            over -= 1
        out.append(n)
    return out


def layout(
    kind: str, segments: Sequence[Sequence[int]], sp: Specials, n_ctx: int
) -> tuple[list[list[int]], bool]:
    """The token sequences of one example (GPT-1 Figure 1) and whether any was truncated."""
    segments = [list(s) for s in segments]
    if kind == "classification":
        pairs, n_special = [(segments[0],)], 2
    elif kind == "entailment":
        pairs, n_special = [(segments[0], segments[1])], 3
    elif kind == "similarity":
        pairs, n_special = [(segments[0], segments[1]), (segments[1], segments[0])], 3
    elif kind == "multiple_choice":
        pairs, n_special = [(segments[0], answer) for answer in segments[1:]], 3
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    if n_ctx <= n_special + 1:
        raise FinetuneDataError(f"n_ctx={n_ctx} leaves no room for text")
    sequences, truncated = [], False
    for parts in pairs:
        lengths = _fit([len(p) for p in parts], n_ctx - n_special)
        if lengths != [len(p) for p in parts]:
            truncated = True
            # A multiple-choice context keeps its end (the question); the rest their start.
            cut = [
                p[len(p) - n :] if kind == "multiple_choice" and i == 0 else p[:n]
                for i, (p, n) in enumerate(zip(parts, lengths, strict=True))
            ]
            parts = tuple(cut)
        seq = [sp.start, *parts[0]]
        if len(parts) == 2:
            seq += [sp.delim, *parts[1]]
        sequences.append([*seq, sp.extract])
    return sequences, truncated


@dataclasses.dataclass
class Encoded:
    """One split as token sequences, ready for batching."""

    task: str
    sequences: list[list[list[int]]]  # [example][k] -> ids
    labels: np.ndarray  # [N] float32 (class indices are exact)
    n_ctx: int
    truncated: int  # examples that lost tokens
    wheres: list[str]

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def k(self) -> int:
        return len(self.sequences[0])


def encode(
    spec: TaskSpec,
    examples: Sequence[TaskExample],
    tokenizer,
    sp: Specials,
    n_ctx: int,
    split: str = "",
) -> Encoded:
    """Tokenise each segment once and lay the examples out; logs the truncation count."""
    segments = [s for ex in examples for s in ex.segments]
    ids = iter(tokenizer.encode_batch(segments))
    sequences, truncated = [], 0
    for ex in examples:
        seqs, cut = layout(spec.kind, [next(ids) for _ in ex.segments], sp, n_ctx)
        sequences.append(seqs)
        truncated += cut
    if truncated:
        log.warning(
            "%s %s: %d of %d examples are longer than n_ctx=%d tokens; their longest "
            "segment was truncated",
            spec.name,
            split,
            truncated,
            len(examples),
            n_ctx,
        )
    labels = np.asarray([ex.label for ex in examples], np.float32)
    return Encoded(spec.name, sequences, labels, n_ctx, truncated, [ex.where for ex in examples])


class ExampleSource:
    """A grain RandomAccessDataSource over an Encoded split: records of
    tokens [K, n_ctx] int32 (padded with 0), extract [K] int32 (the [extract] positions),
    label () float32. repr() carries a digest so a resume onto other data fails loudly."""

    def __init__(self, data: Encoded, name: str):
        self.data, self.name = data, name
        h = hashlib.sha256()
        for seqs in data.sequences:
            for s in seqs:
                h.update(np.asarray(s, np.int32).tobytes() + b"|")
        h.update(data.labels.tobytes())
        self.tag = h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i) -> dict:
        seqs = self.data.sequences[int(i)]
        tokens = np.zeros((len(seqs), self.data.n_ctx), np.int32)
        for k, s in enumerate(seqs):
            tokens[k, : len(s)] = s
        extract = np.asarray([len(s) - 1 for s in seqs], np.int32)
        return {"tokens": tokens, "extract": extract, "label": self.data.labels[int(i)]}

    def __repr__(self) -> str:
        return f"ExampleSource(task={self.data.task!r}, split={self.name!r}, tag={self.tag!r})"


def _stack(records: Sequence[dict]) -> dict:
    return {k: np.stack([r[k] for r in records]) for k in records[0]}


def batch_at(source: ExampleSource, indices: Sequence[int]) -> dict:
    return _stack([source[i] for i in indices])


class ExampleBatches(TrainBatches):
    """Endless shuffled training batches of ExampleSource records (dicts of arrays):
    pretraining's TrainBatches (this process's rows of each global batch, a new order
    each epoch, a resumable position), stacking dict records.

    bucket > 0: each batch is cut as `trim` cuts it, to the longest sequence of the
    whole global batch, so that every process's rows have the same length."""

    def __init__(self, source: ExampleSource, global_batch: int, seed: int, bucket: int = 0):
        super().__init__(source, global_batch, seed)
        self.bucket = bucket

    def __next__(self) -> dict:
        first = self.position
        start = first + self.first_row
        batch = _stack([self._stream[start + j] for j in range(self.rows)])
        self.position += self.global_batch
        if not self.bucket:
            return batch
        longest = None  # one process: its rows are the global batch
        if self.rows != self.global_batch:
            longest = max(
                int(self._stream[first + j]["extract"].max()) + 1 for j in range(self.global_batch)
            )
        return trim(batch, self.bucket, longest)


def trim(batch: dict, bucket: int, longest: int | None = None) -> dict:
    """Cut the padding columns of a batch to the longest sequence (or to `longest`
    tokens), rounded up to a multiple of `bucket` (so only a few shapes are ever
    compiled)."""
    n_ctx = batch["tokens"].shape[-1]
    if longest is None:
        longest = int(batch["extract"].max()) + 1
    length = min(n_ctx, bucket * math.ceil(longest / bucket))
    return {**batch, "tokens": batch["tokens"][..., :length]}


# ----------------------------------------------------------------------------- metrics


def predictions(spec: TaskSpec, outputs: np.ndarray) -> np.ndarray:
    """Class / answer index per example, or the predicted score (regression)."""
    if spec.regression:
        return outputs * spec.score_scale
    return outputs.argmax(-1)


# (predictions, golds) -> value; macro F1 averages over the classes present in gold.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": binary_f1,
    "macro_f1": lambda p, g: macro_f1(p, g, classes=np.unique(g)),
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def score(spec: TaskSpec, preds: np.ndarray, golds: np.ndarray) -> dict[str, float]:
    """The task's metrics, by name."""
    if not spec.regression:
        preds, golds = preds.astype(np.int64), golds.astype(np.int64)
    return {name: METRICS[name](preds, golds) for name in spec.metrics}


def majority(spec: TaskSpec, train_labels: np.ndarray, dev_labels: np.ndarray) -> dict:
    """The task's metrics for always predicting the most frequent training class."""
    if spec.regression:
        return {}
    values, counts = np.unique(train_labels.astype(np.int64), return_counts=True)
    preds = np.full(len(dev_labels), values[counts.argmax()])
    return score(spec, preds, dev_labels)
