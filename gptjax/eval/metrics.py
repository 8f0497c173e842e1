"""Metric functions, the one home for them (evaluation and fine-tuning): multiple-choice
accuracy (plain and normalised), classification scores (accuracy, F1, macro F1,
Matthews, Pearson, Spearman), perplexities, bits per byte, EM / F1, with standard errors.

Multiple choice (per example, from the options' loglikelihoods):
  acc             argmax of the summed loglikelihood
  acc_norm        argmax of loglikelihood / characters of the option (lm-eval's acc_norm)
  acc_norm_token  argmax of loglikelihood / tokens of the option (GPT-3's per-token norm)
  acc_uncond      argmax of log P(option | context) - log P(option | "Answer:") (GPT-3's
                  normalisation for ARC, OpenBookQA and RACE; where the task sets it)
  em, f1          ReCoRD: the acc-chosen entity against the answers (exact_match, f1)
  em, f1a         MultiRC: every answer of a question right; F1 over all answers
Standard errors of means are the sample standard deviation / sqrt(n), as lm-eval's
mean_stderr; a perplexity's is the delta method, ppl * stderr(mean NLL) (lm-eval uses
a bootstrap).
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

import numpy as np


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def argmax(values: Sequence[float]) -> int:
    return int(np.argmax(np.asarray(values, np.float64)))


def mc_predictions(
    lls: Sequence[float],
    n_chars: Sequence[int],
    n_tokens: Sequence[int],
    uncond_lls: Sequence[float] | None = None,
) -> dict[str, int]:
    """The predicted option under each normalisation."""
    lls = np.asarray(lls, np.float64)
    pred = {
        "acc": argmax(lls),
        "acc_norm": argmax(lls / np.maximum(np.asarray(n_chars, np.float64), 1)),
        "acc_norm_token": argmax(lls / np.maximum(np.asarray(n_tokens, np.float64), 1)),
    }
    if uncond_lls is not None:
        pred["acc_uncond"] = argmax(lls - np.asarray(uncond_lls, np.float64))
    return pred


# ----------------------------------------------------------------------------- classes


def accuracy(preds: np.ndarray, golds: np.ndarray) -> float:
    return float(np.mean(np.asarray(preds) == np.asarray(golds)))


def binary_f1(preds: np.ndarray, golds: np.ndarray, positive: int = 1) -> float:
    """F1 of the class `positive` (GLUE's MRPC / QQP F1)."""
    preds, golds = np.asarray(preds), np.asarray(golds)
    tp = float(np.sum((preds == positive) & (golds == positive)))
    fp = float(np.sum((preds == positive) & (golds != positive)))
    fn = float(np.sum((preds != positive) & (golds == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def macro_f1(preds: Sequence[int], golds: Sequence[int], classes=None) -> float:
    """Mean per-class F1 over `classes`; by default every class in golds or preds
    (scikit-learn's average="macro", as lm-eval's CB)."""
    preds, golds = np.asarray(preds), np.asarray(golds)
    if classes is None:
        classes = np.union1d(golds, preds)
    scores = [binary_f1(preds, golds, c) for c in classes]
    return float(np.mean(scores)) if scores else float("nan")


def matthews(preds: np.ndarray, golds: np.ndarray) -> float:
    """Matthews correlation of binary predictions (GLUE's CoLA)."""
    preds, golds = np.asarray(preds), np.asarray(golds)
    tp = float(np.sum((preds == 1) & (golds == 1)))
    tn = float(np.sum((preds == 0) & (golds == 0)))
    fp = float(np.sum((preds == 1) & (golds == 0)))
    fn = float(np.sum((preds == 0) & (golds == 1)))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if den == 0 else (tp * tn - fp * fn) / den


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return 0.0 if den == 0 else float((x * y).sum()) / den


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r of the ranks, ties given their mean rank."""
    return pearson(_ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64)))


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x))
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def all_correct_per_group(
    groups: Sequence[str], preds: Sequence[int], golds: Sequence[int]
) -> list[float]:
    """1.0 for each group (MultiRC: a question) whose every item is right (SuperGLUE's
    MultiRC em, lm-eval 0.3's acc_all), in order of first appearance."""
    right: dict[str, bool] = {}
    for g, p, t in zip(groups, preds, golds, strict=True):
        right[g] = right.get(g, True) and p == t
    return [float(v) for v in right.values()]


# ----------------------------------------------------------------------------- likelihoods


def perplexity(lls: Sequence[float]) -> tuple[float, float]:
    """exp(mean NLL) over examples (lm-eval's `perplexity` aggregation, LAMBADA)."""
    nll, se = mean_stderr([-x for x in lls])
    ppl = math.exp(nll)
    return ppl, ppl * se


def weighted_perplexities(
    lls: Sequence[float], words: Sequence[int], n_bytes: Sequence[int], tokens: Sequence[int]
) -> dict[str, tuple[float, float]]:
    """word / byte / token perplexity and bits per byte of a corpus (weighted by length,
    lm-eval's weighted_perplexity). stderr: delta method over documents (ratio estimator)."""
    lls = np.asarray(lls, np.float64)
    out = {}
    for name, units in (("word", words), ("byte", n_bytes), ("token", tokens)):
        u = np.asarray(units, np.float64)
        rate = float(-lls.sum() / u.sum())
        se = _ratio_stderr(-lls, u)
        out[f"{name}_perplexity"] = (math.exp(rate), math.exp(rate) * se)
        if name == "byte":
            out["bits_per_byte"] = (rate / math.log(2), se / math.log(2))
    return out


def _ratio_stderr(num: np.ndarray, den: np.ndarray) -> float:
    n = len(num)
    if n < 2:
        return float("nan")
    r = num.sum() / den.sum()
    resid = num - r * den
    return float(math.sqrt(n / (n - 1) * np.sum(resid**2)) / den.sum())


# ----------------------------------------------------------------------------- text


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    refs = [references] if isinstance(references, str) else list(references)
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in refs))


def f1(prediction: str, references: str | Sequence[str]) -> float:
    """Token-overlap F1 (SQuAD), the best over the references."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = normalize_answer(prediction).split()
    best = 0.0
    for r in refs:
        gold = normalize_answer(r).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            p, rec = common / len(pred), common / len(gold)
            best = max(best, 2 * p * rec / (p + rec))
    return best


# lm-eval's nq_open / triviaqa exact_match: `regexes_to_ignore` (articles before a space,
# case-sensitive forms), then ignore_case and ignore_punctuation; no whitespace collapse.
_LM_EVAL_ARTICLES = re.compile(r"\b(?:The |the |An |A |The |a |an )")


def _lm_eval_normalize(s: str, articles: bool) -> str:
    s = (_LM_EVAL_ARTICLES.sub("", s) if articles else s).lower()
    return s.translate(str.maketrans("", "", string.punctuation))


def exact_match_lm_eval(
    prediction: str, references: str | Sequence[str], articles: bool = True
) -> float:
    """lm-eval's exact_match (ignore_case, ignore_punctuation, and with `articles` its
    nq_open regexes_to_ignore), true for any reference (its multiple_target rule)."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = _lm_eval_normalize(prediction, articles)
    return float(any(pred == _lm_eval_normalize(r, articles) for r in refs))


def exact_match_strict(prediction: str, references: str | Sequence[str]) -> float:
    """The stripped prediction equals a stripped reference, character for character."""
    refs = [references] if isinstance(references, str) else list(references)
    return float(any(prediction.strip() == r.strip() for r in refs))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacreBLEU's corpus BLEU (0-100) with its defaults (13a tokenisation), the score
    lm-eval and the GPT-3 paper report; references[i] are hypothesis i's references."""
    try:
        import sacrebleu
    except ImportError:  # a runtime dependency; this names the package if it is missing
        raise ImportError("BLEU needs sacrebleu: pip install sacrebleu") from None
    n_refs = max(len(r) for r in references)
    streams = [[r[j] if j < len(r) else "" for r in references] for j in range(n_refs)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)
