"""The GPT-3 paper's synthetic tasks (section 3.9), on the files OpenAI published with it
({"context", "completion"} jsonl), and their results in the paper's Table 3.9 / 3.10 layout.

Arithmetic (3.9.1) and sum of digits follow lm-eval's `arithmetic_*` tasks exactly: the
context is normalised (strip, "\\n\\n" -> "\\n", "Q:" -> "Question:", "A:" -> "Answer:"),
the completion is scored as its loglikelihood with no delimiter, and `acc` is whether it
is the greedy continuation. Word scrambling (3.9.2) generates the answer: contexts and
completions as published, demonstrations concatenated with no separator (each context
starts with its own newline), greedy or beam generation until a newline, exact match of
the stripped word. K-shot demonstrations come from the same file, never the example.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gptjax.eval.example import EvalInputError, Example
from gptjax.eval.loaders import build, check_file, records

# name -> (file in the published data, column of Table 3.9 / 3.10)
ARITHMETIC = {
    "arithmetic_2da": ("two_digit_addition.jsonl", "2D+"),
    "arithmetic_2ds": ("two_digit_subtraction.jsonl", "2D-"),
    "arithmetic_3da": ("three_digit_addition.jsonl", "3D+"),
    "arithmetic_3ds": ("three_digit_subtraction.jsonl", "3D-"),
    "arithmetic_4da": ("four_digit_addition.jsonl", "4D+"),
    "arithmetic_4ds": ("four_digit_subtraction.jsonl", "4D-"),
    "arithmetic_5da": ("five_digit_addition.jsonl", "5D+"),
    "arithmetic_5ds": ("five_digit_subtraction.jsonl", "5D-"),
    "arithmetic_2dm": ("two_digit_multiplication.jsonl", "2Dx"),
    "arithmetic_1dc": ("single_digit_three_ops.jsonl", "1DC"),
    "sum_of_digits": ("sum_of_digits.jsonl", "SD"),
}
WORDS = {
    "cycle_letters": ("cycle_letters_in_word.jsonl", "CL"),
    "anagrams1": ("mid_word_1_anagrams.jsonl", "A1"),
    "anagrams2": ("mid_word_2_anagrams.jsonl", "A2"),
    "random_insertion": ("random_insertion_in_word.jsonl", "RI"),
    "reversed_words": ("reversed_words.jsonl", "RW"),
}
ABOUT = "the GPT-3 paper's published jsonl (a file, or the folder holding it)"


def normalize_arithmetic(context: str) -> str:
    """lm-eval's arithmetic process_docs."""
    context = context.strip().replace("\n\n", "\n")
    return context.replace("Q:", "Question:").replace("A:", "Answer:")


def _resolve(path: Path, name: str) -> Path:
    path = Path(path)
    if path.is_dir():
        return path / {**ARITHMETIC, **WORDS}[name][0]
    return path


def _loader(name: str):
    def load(path: Path) -> list[Example]:
        path = check_file(_resolve(path, name))

        def make(doc):
            context, completion = doc["context"], doc["completion"]
            if not isinstance(context, str) or not isinstance(completion, str):
                raise EvalInputError("'context' and 'completion' must be strings")
            if name in ARITHMETIC:
                return Example(
                    "loglik", normalize_arithmetic(context), target=completion, delimiter=""
                )
            return Example(
                "generate", context, gold=completion, delimiter="", stop=("\n",),
                match="exact", fewshot_delimiter="",
            )  # fmt: skip

        return build(path, records(path), make)

    load.__doc__ = f"{name}: {ABOUT}"
    return load


LOADERS = {name: _loader(name) for name in {**ARITHMETIC, **WORDS}}


def paper_tables(results: Sequence[dict], model: str = "model") -> str:
    """Table 3.9 (arithmetic, acc) and Table 3.10 (word scrambling, exact match) rows for
    the synthetic tasks among `results`, one row per K, in %; "" when there are none."""
    out = []
    for title, columns, metric in (
        ("Table 3.9 layout (arithmetic, acc %)", ARITHMETIC, "acc"),
        ("Table 3.10 layout (word scrambling, exact match %)", WORDS, "exact_match"),
    ):
        have = [r for r in results if r.get("task") in columns and "metrics" in r]
        if not have:
            continue
        names = [n for n in columns if any(r["task"] == n for r in have)]
        header = ["Setting", *[columns[n][1] for n in names]]
        rows = []
        for k in sorted({r["k"] for r in have}):
            label = {0: "Zero-Shot", 1: "One-Shot"}.get(k, f"Few-Shot (K={k})")
            cells = []
            for n in names:
                r = next((r for r in have if r["task"] == n and r["k"] == k), None)
                cells.append("-" if r is None else f"{100 * r['metrics'][metric]['value']:.1f}")
            rows.append([f"{model} {label}", *cells])
        widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
        out.append(title)
        for row in (header, ["-" * w for w in widths], *rows):
            out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(out)
