"""Example: one evaluation item, as one of four request kinds (GPT-3 paper section 2.4,
lm-eval's output types):

  mc        multiple choice: option i is the continuation `delimiter + choices[i]` of the
            shared `context`; with a tuple of contexts (Winogrande's partial scoring) option
            i is `contexts[i]` followed by the one shared continuation `choices[0]`.
  loglik    loglikelihood of `delimiter + target` given `context` (+ is it greedy): LAMBADA.
  rolling   loglikelihood of the whole `target` text over rolling windows: perplexity, bpb.
  generate  generation (greedy or beam search) from `context` until a stop sequence,
            scored against `gold` (text, or a list of them) by its `match` rule.
"""

from __future__ import annotations

import dataclasses
from typing import Any

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
    uncond_context: str | None = None  # ARC/OBQA/RACE: P(option | "Answer:") normalises
    stop: tuple[str, ...] = ("\n\n",)  # generate: stop sequences
    doc_id: str = ""  # "file:line", identifies the example (few-shot never draws itself)
    words: int = 0  # rolling: words of the original text (lm-eval's word_perplexity)
    n_bytes: int = 0  # rolling: UTF-8 bytes of the original text (lm-eval's byte_perplexity)
    group: str = ""  # MultiRC: the question an answer belongs to (em per question, f1a)
    entities: tuple[str, ...] = ()  # ReCoRD: the entity each option fills in
    answers: tuple[str, ...] = ()  # ReCoRD: the correct entities (em / f1 of the chosen one)
    match: str = "squad"  # generate: answer matching, see gptjax.eval.generation
    description: str = ""  # before the demonstrations (lm-eval's description)
    fewshot_delimiter: str = "\n\n"  # after each demonstration

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
