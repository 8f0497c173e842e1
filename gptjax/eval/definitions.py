"""Tasks as data: a JSON or YAML definition of templates over the fields of a
JSONL/CSV/TSV file, substituted with `{field}` and nothing else (never executed), given
to `gptjax eval --task NAME=DEFINITION.yaml`."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from gptjax.eval.example import KINDS, EvalInputError, Example
from gptjax.eval.loaders import build, check_file, records

# The metric a definition reports first unless it sets `primary`.
DEFAULT_PRIMARY = {
    "mc": "acc",
    "loglik": "acc",
    "rolling": "bits_per_byte",
    "generate": "exact_match",
}

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
        path = check_file(path)
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

    @property
    def primary(self) -> str:
        return self.spec.get("primary") or DEFAULT_PRIMARY[self.spec["kind"]]

    def path(self, key: str) -> Path | None:
        """The file named by `key` (data, fewshot_data, labels), relative to the definition."""
        value = self.spec.get(key)
        return None if value is None else (self.source.parent / value)

    def load(self, path: Path | None = None) -> list[Example]:
        path = check_file(path or self.path("data"))
        rows = list(records(path))
        labels_path = self.path("labels") if path == self.path("data") else None
        if labels_path is not None:
            labels = check_file(labels_path).read_text(encoding="utf-8").split()
            if len(labels) != len(rows):
                raise EvalInputError(
                    f"{labels_path} has {len(labels)} labels, {path} {len(rows)} rows"
                )
            rows = [(n, {**d, "label": lab}) for (n, d), lab in zip(rows, labels, strict=True)]
        return build(path, rows, self._make)

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
