"""Generation requests in evaluation: stop tokens, answer matching, scores.

A free-form example is generated from its context (greedy, or the paper's beam search),
cut at its first stop sequence and scored by its `match` rule:

  squad    exact match and token F1 after SQuAD's normalisation (lower case, no
           punctuation, no articles, single spaces), best over the references
  lm_eval  lm-eval's exact_match for nq_open / triviaqa (its `regexes_to_ignore` of
           articles, ignore_case, ignore_punctuation) after stripping whitespace; F1 as squad
  case_punct  lm-eval's triviaqa exact_match: ignore_case and ignore_punctuation only
  exact    the stripped generation equals a stripped reference (word scrambling, 3.9.2)
  bleu     corpus BLEU of the stripped generations (sacrebleu, as lm-eval and the papers)

Rows of a batch stop on the device as soon as they emit EOS or a token whose text holds a
stop sequence (`stop_token_ids`); a stop sequence spread over several tokens is cut from
the text afterwards, so the text equals lm-eval's either way.
"""

from __future__ import annotations

from collections.abc import Sequence

from gptjax.eval import metrics

_TOKEN_TEXTS: dict[str, list[str]] = {}  # tokenizer digest -> text of each id


def stop_token_ids(tokenizer, until: Sequence[str], vocab_size: int) -> tuple[int, ...]:
    """EOS, then every id (below vocab_size) whose own text contains a stop sequence."""
    key = tokenizer.digest
    if key not in _TOKEN_TEXTS:  # decoded once per tokenizer: ~50k short decodes
        _TOKEN_TEXTS[key] = [tokenizer.decode([i]) for i in range(vocab_size)]
    texts = _TOKEN_TEXTS[key]
    stops = [s for s in until if s]
    ids = [i for i, t in enumerate(texts) if i != tokenizer.eos_id and any(s in t for s in stops)]
    return (tokenizer.eos_id, *ids)


def score(outputs: Sequence[str], golds: Sequence, match: str) -> tuple[dict, list[dict]]:
    """({metric: per-example values or a (value, stderr) pair}, per-example records)."""
    if match == "bleu":
        refs = [[g] if isinstance(g, str) else list(g) for g in golds]
        hyps = [o.strip() for o in outputs]
        value = metrics.corpus_bleu(hyps, refs)
        samples = [{"generation": o, "gold": g} for o, g in zip(outputs, golds, strict=True)]
        return {"bleu": (value, float("nan"))}, samples
    if match == "squad":
        em = [metrics.exact_match(o, g) for o, g in zip(outputs, golds, strict=True)]
    elif match == "lm_eval":
        em = [
            metrics.exact_match_lm_eval(o.strip(), g) for o, g in zip(outputs, golds, strict=True)
        ]
    elif match == "case_punct":
        em = [
            metrics.exact_match_lm_eval(o.strip(), g, articles=False)
            for o, g in zip(outputs, golds, strict=True)
        ]
    elif match == "exact":
        em = [metrics.exact_match_strict(o, g) for o, g in zip(outputs, golds, strict=True)]
    else:
        raise ValueError(f"unknown answer match {match!r}")
    f1 = [metrics.f1(o, g) for o, g in zip(outputs, golds, strict=True)]
    samples = [
        {"generation": o, "gold": g, "exact_match": e, "f1": f}
        for o, g, e, f in zip(outputs, golds, em, f1, strict=True)
    ]
    return {"exact_match": em, "f1": f1}, samples
