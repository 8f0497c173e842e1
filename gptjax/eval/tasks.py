"""Tasks: the table of built-in tasks (name -> loader, primary metric, where few-shot
demonstrations and TFDS data come from) and `resolve_task`, which turns `--task NAME=PATH`,
a TFDS NAME alone, or NAME=DEFINITION.yaml into a Task.

To add a built-in task: write its loader in loaders.py (a path -> list[Example]) and add a
TaskInfo line to TASKS below. Built-in tasks are parsers (code); user tasks are data
(definitions.py).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
from collections.abc import Callable
from pathlib import Path

from gptjax.eval import benchmarks_mc, qa, synthetic
from gptjax.eval.definitions import TaskDefinition
from gptjax.eval.example import KINDS, EvalInputError, Example
from gptjax.eval.loaders import (
    load_arc,
    load_boolq,
    load_cb,
    load_copa,
    load_generic_lm,
    load_generic_mc,
    load_hellaswag,
    load_lambada,
    load_piqa,
    load_rte,
    load_sst2,
    load_storycloze,
    load_wikitext,
    load_winogrande,
)

__all__ = ["KINDS", "TASKS", "EvalInputError", "Example", "Task", "TaskInfo", "resolve_task"]

log = logging.getLogger(__name__)


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


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """One row of TASKS: a built-in task (`--task NAME=PATH`, or NAME alone with `tfds`)."""

    name: str
    load: Callable[[Path], list[Example]]  # a loaders.py function: file -> Examples
    primary: str  # the metric of the table and the plot
    fewshot_siblings: tuple[str, ...] = ()  # training-split files beside the eval file
    tfds: tuple[str, str, str] | None = None  # (dataset, eval split, few-shot split)
    about: str = ""
    # No training split: the GPT-3 paper drew demonstrations from the dev set (LAMBADA,
    # StoryCloze); falling back to the evaluated set itself is warned about loudly.
    dev_pool: bool = False
    # The paper drew demonstrations from the evaluated file itself (synthetic tasks):
    # no warning when that is where they come from.
    self_pool: bool = False


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
        # The GPT-3 paper's other multiple-choice benchmarks (gptjax/eval/benchmarks_mc.py).
        *(TaskInfo(name, benchmarks_mc.load_race, "acc_uncond", ("train.jsonl", f"../train/{level}"), None,
                   f"RACE-{level[0]}: the original per-article JSON (a file, or a directory such "
                   f"as RACE/test/{level}), or ehovy/race or EleutherAI/race rows as JSONL")
          for name, level in (("race", "high"), ("race_middle", "middle"))),
        *(TaskInfo(f"anli_r{r}", benchmarks_mc.load_anli, "acc", ("train.jsonl", f"train_r{r}*.jsonl"),
                   None, f"ANLI round {r} jsonl: anli_v1.0/R{r}/*.jsonl or facebook/anli rows")
          for r in (1, 2, 3)),
        TaskInfo("wic", benchmarks_mc.load_wic, "acc", ("train.jsonl",), None, "SuperGLUE WiC jsonl"),
        TaskInfo("wsc", benchmarks_mc.load_wsc, "acc", ("train.jsonl",), None,
                 "SuperGLUE WSC jsonl (spans fixed as Hugging Face's wsc.fixed)"),
        TaskInfo("multirc", benchmarks_mc.load_multirc, "acc", ("train.jsonl",), None,
                 "SuperGLUE MultiRC jsonl (one example per answer)"),
        TaskInfo("record", benchmarks_mc.load_record, "f1", ("train.jsonl",), None,
                 "SuperGLUE ReCoRD jsonl (one example per query, an option per entity)"),
        TaskInfo("mc", load_generic_mc, "acc", (), None, 'JSONL {"query"/"context", "choices", "gold"}'),
        TaskInfo("lm", load_generic_lm, "bits_per_byte", (), None, 'JSONL {"text"} or a text file'),
        # The GPT-3 paper's synthetic tasks (synthetic.py) and free-form tasks (qa.py).
        *[TaskInfo(n, synthetic.LOADERS[n], "acc", (), None, synthetic.ABOUT, self_pool=True)
          for n in synthetic.ARITHMETIC],
        *[TaskInfo(n, synthetic.LOADERS[n], "exact_match", (), None, synthetic.ABOUT,
                   self_pool=True) for n in synthetic.WORDS],
        TaskInfo("nq_open", qa.load_nq_open, "exact_match",
                 ("NQ-open.train.jsonl", "NQ-open.efficientqa.dev*.jsonl"), None,
                 "NQ-open.dev.jsonl; few-shot from the train or EfficientQA dev file beside it"),
        TaskInfo("triviaqa", qa.load_triviaqa, "exact_match", ("*train*.json", "*train*.jsonl"),
                 None, "TriviaQA JSON (unfiltered-web-dev.json) or rc.nocontext jsonl"),
        TaskInfo("webquestions", qa.load_webquestions, "exact_match",
                 ("webquestions.examples.train.json", "*train*.jsonl"), None,
                 "webquestions.examples.test.json or jsonl {question, answers}"),
        TaskInfo("coqa", qa.load_coqa, "f1", ("coqa-train*.json",), None, "coqa-dev-v1.0.json"),
        TaskInfo("drop", qa.load_drop, "f1", ("drop_dataset_train.json",), None,
                 "drop_dataset_dev.json"),
        TaskInfo("squad2", qa.load_squad2, "f1", ("train-v2.0.json",), None, "dev-v2.0.json"),
        TaskInfo("translation", qa.load_translation, "bleu", (), None,
                 "DIR/NAME.SRC-TGT: plain parallel text NAME.SRC-TGT.SRC / .TGT (fairseq layout)"),
    )
}  # fmt: skip


def known_tasks() -> str:
    return ", ".join(sorted(TASKS)) + " (or NAME=DEFINITION.yaml/.json for a task defined as data)"


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
    """The first file beside `path` matching one of the few-shot split's patterns (a
    directory where `path` is one: RACE/test/high -> ../train/high). A pattern the
    evaluated file matches itself names its own split (e.g. evaluating on
    cloze_test_val*), so it does not point at another split and is skipped."""
    for pattern in patterns:
        if fnmatch.fnmatch(path.name, pattern):
            continue
        for candidate in sorted(path.parent.glob(pattern)):
            same_kind = candidate.is_dir() if path.is_dir() else candidate.is_file()
            if candidate.resolve() != path.resolve() and same_kind:
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
        task = Task(name, examples, definition.primary, source=str(path))
        pool_path = fewshot_from.get(name) or definition.path("fewshot_data")
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
        task.fewshot_warning = "" if info.self_pool else _fallback_warning(info, path, missing)
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
