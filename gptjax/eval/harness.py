"""Run tasks x shots on a model: metrics with standard errors, the paper-style table,
results JSON, a PNG of accuracy versus K, and a per-example samples log.

Results are written after every (task, K) finishes (atomically, so the file is always
whole); a task that fails is recorded with its error and the others still run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

from gptjax import distributed
from gptjax.eval import fewshot, generation, metrics
from gptjax.eval.scoring import EvalModel
from gptjax.eval.tasks import Example, Task
from gptjax.files import json_safe, write_text_atomic

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunOptions:
    shots: tuple[int, ...] = (0,)
    limit: int | None = None
    seed: int = 1234
    max_gen_tokens: int = 64
    num_beams: int = 4  # free-form answers: the paper's beam search (1: greedy, lm-eval's)
    length_penalty: float = 0.6
    output: Path | None = None  # results JSON
    samples: Path | None = None  # per-example JSONL
    plot: Path | None = None  # PNG of the primary metric versus K


# ----------------------------------------------------------------------------- one task


def _fits(model: EvalModel, max_gen_tokens: int):
    def fits(ex: Example) -> bool:
        if ex.kind == "generate":
            return len(model.tokenizer.encode(ex.context)) + max_gen_tokens <= model.n_ctx
        return all(model.request_tokens(c, x) <= model.n_ctx for c, x in ex.requests())

    return fits


def _stat(values) -> dict:
    value, se = values if isinstance(values, tuple) else metrics.mean_stderr(values)
    return {"value": value, "stderr": se}


def _mc_requests(shots: list[fewshot.Shot]):
    """Every option of every question (and its unconditional twin where the task has
    one) -> (requests, each question's span of them)."""
    requests, spans = [], []
    for s in shots:
        ex = s.example
        start = len(requests)
        requests += ex.requests()
        if ex.uncond_context is not None:
            requests += [(ex.uncond_context, x) for _, x in ex.requests()]
        spans.append((start, len(requests)))
    return requests, spans


def _score_mc(model: EvalModel, shots: list[fewshot.Shot]):
    requests, spans = _mc_requests(shots)
    scored = model.loglikelihood(requests)
    per_metric: dict[str, list[float]] = {}
    samples, preds, golds = [], [], []
    for s, (a, b) in zip(shots, spans, strict=True):
        ex, n = s.example, s.example.n_options
        lls = [scored[i][0] for i in range(a, a + n)]
        n_tokens = [scored[i][2] for i in range(a, a + n)]
        n_chars = [len(ex.choices[0 if ex.partial else i]) for i in range(n)]
        uncond = [scored[i][0] for i in range(a + n, b)] if b - a > n else None
        pred = metrics.mc_predictions(lls, n_chars, n_tokens, uncond)
        correct = {k: v == ex.gold for k, v in pred.items()}
        if ex.answers:  # ReCoRD: the chosen entity against every correct one
            chosen = ex.entities[pred["acc"]]
            scores = {"em": metrics.exact_match(chosen, ex.answers),
                      "f1": metrics.f1(chosen, ex.answers)}  # fmt: skip
            correct = {"entity": chosen, "answers": list(ex.answers), **scores}
        else:
            scores = {k: float(v) for k, v in correct.items()}
        for name, value in scores.items():
            per_metric.setdefault(name, []).append(value)
        preds.append(pred["acc"])
        golds.append(int(ex.gold))
        samples.append(
            {
                "loglikelihoods": lls,
                "tokens": n_tokens,
                "uncond_loglikelihoods": uncond,
                "pred": pred,
                "gold": ex.gold,
                "correct": correct,
                "choices": list(ex.choices),
            }  # fmt: skip
        )
    out = {name: _stat(v) for name, v in per_metric.items()}
    if shots[0].example.group:  # MultiRC: SuperGLUE's em per question, f1a over answers
        groups = [s.example.group for s in shots]
        out["em"] = _stat(metrics.all_correct_per_group(groups, preds, golds))
        out["f1a"] = {"value": metrics.binary_f1(preds, golds), "stderr": float("nan")}
    one_label_set = len({s.example.choices for s in shots}) == 1 and not shots[0].example.answers
    if one_label_set and not shots[0].example.partial:
        out["f1_macro"] = {"value": metrics.macro_f1(preds, golds), "stderr": float("nan")}
    return out, samples


def _score_loglik(model: EvalModel, shots: list[fewshot.Shot]):
    scored = model.loglikelihood([s.example.requests()[0] for s in shots])
    lls = [ll for ll, _, _ in scored]
    out = {
        "acc": _stat([float(g) for _, g, _ in scored]),
        "perplexity": _stat(metrics.perplexity(lls)),
    }
    samples = [
        {"loglikelihood": ll, "is_greedy": g, "tokens": n, "target": s.example.target}
        for (ll, g, n), s in zip(scored, shots, strict=True)
    ]
    return out, samples


def _score_rolling(model: EvalModel, shots: list[fewshot.Shot]):
    texts = [s.example.target for s in shots]
    scored = model.rolling(texts)
    lls, tokens = [ll for ll, _ in scored], [n for _, n in scored]
    n_bytes = [
        s.example.n_bytes or len(t.encode("utf-8")) for s, t in zip(shots, texts, strict=True)
    ]
    words = [s.example.words or len(t.split()) for s, t in zip(shots, texts, strict=True)]
    stats = metrics.weighted_perplexities(lls, words, n_bytes, tokens)
    out = {name: _stat(v) for name, v in stats.items()}
    samples = [
        {"loglikelihood": ll, "tokens": n, "bytes": b, "words": w}
        for ll, n, b, w in zip(lls, tokens, n_bytes, words, strict=True)
    ]
    return out, samples


def _score_generate(model: EvalModel, shots: list[fewshot.Shot], opts: RunOptions):
    """Generate every example's answer (rows grouped by stop sequences, each group in
    batches), then score them by the examples' match rule (eval.generation)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, s in enumerate(shots):
        groups.setdefault(s.example.stop, []).append(i)
    outputs: list[str] = [""] * len(shots)
    for stop, idx in groups.items():
        texts = model.generate(
            [shots[i].example.context for i in idx], stop, opts.max_gen_tokens,
            opts.num_beams, opts.length_penalty,
        )  # fmt: skip
        for i, t in zip(idx, texts, strict=True):
            outputs[i] = t
    values, samples = generation.score(
        outputs, [s.example.gold for s in shots], shots[0].example.match
    )
    return {name: _stat(v) for name, v in values.items()}, samples


def _shots(model: EvalModel, task: Task, k: int, opts: RunOptions):
    """The task's examples (up to the limit) and their K-shot prompts (seeded)."""
    examples = task.examples[: opts.limit] if opts.limit else task.examples
    if not examples:
        raise ValueError(f"task {task.name} has no examples")
    shots = fewshot.build(
        examples,
        k,
        pool=task.examples if task.fewshot_pool is None else task.fewshot_pool,
        pool_is_eval_set=task.fewshot_pool is None,
        seed=opts.seed,
        fits=_fits(model, opts.max_gen_tokens),
        name=task.name,
    )
    return examples, shots


def reserve(model: EvalModel, tasks: Sequence[Task], opts: RunOptions) -> None:
    """Plan the scoring shapes of every task at every K together, and start compiling
    them, before the first is scored: the tasks share compiled programs, and on a first
    run the compiles overlap the scoring (gptjax.eval.buckets)."""
    pairs, texts = [], []
    for task in tasks:
        for k in _task_shots(task, opts.shots):
            try:
                _, shots = _shots(model, task, k, opts)
            except Exception:  # reported when the task runs
                continue
            kind = shots[0].example.kind
            if kind == "mc":
                pairs.append(_mc_requests(shots)[0])
            elif kind == "loglik":
                pairs.append([s.example.requests()[0] for s in shots])
            elif kind == "rolling":
                texts.append([s.example.target for s in shots])
    model.reserve(pairs, texts)


def _task_shots(task: Task, shots: Sequence[int]) -> Sequence[int]:
    """The K values a task runs at: perplexity takes no demonstrations, one run."""
    if task.examples and task.examples[0].kind == "rolling":
        return shots[:1]
    return shots


def evaluate_task(
    model: EvalModel, task: Task, k: int, opts: RunOptions
) -> tuple[dict, list[dict]]:
    """One task at K shots -> (result record, per-example samples)."""
    start = time.perf_counter()
    examples, shots = _shots(model, task, k, opts)
    kind = examples[0].kind
    if k and kind != "rolling" and task.fewshot_pool is None and task.fewshot_warning:
        log.warning("%s (K=%d)", task.fewshot_warning, k)
    if kind == "mc":
        stats, samples = _score_mc(model, shots)
    elif kind == "loglik":
        stats, samples = _score_loglik(model, shots)
    elif kind == "rolling":
        stats, samples = _score_rolling(model, shots)
    else:
        stats, samples = _score_generate(model, shots, opts)
    seconds = time.perf_counter() - start
    used = [s.k for s in shots]
    result = {
        "task": task.name,
        "kind": kind,
        "k": k,
        "k_used": min(used),
        "k_used_max": max(used),
        "k_used_mean": sum(used) / len(used),
        "n": len(examples),
        "primary": task.primary,
        "metrics": stats,
        "fewshot_source": task.fewshot_source if k else None,
        "fewshot_warning": (task.fewshot_warning or None) if k and kind != "rolling" else None,
        "source": task.source,
        "decoding": (
            {
                "num_beams": opts.num_beams,
                "length_penalty": opts.length_penalty,
                "max_gen_tokens": opts.max_gen_tokens,
            }
            if kind == "generate"
            else None
        ),  # fmt: skip
        "seconds": round(seconds, 3),
        "examples_per_s": round(len(examples) / seconds, 3) if seconds > 0 else None,
    }
    for s, sample in zip(shots, samples, strict=True):
        ctx = s.example.context
        sample.update(
            task=task.name, k=k, k_used=s.k, doc_id=s.example.doc_id, demo_ids=list(s.demo_ids),
            context=list(ctx) if isinstance(ctx, tuple) else ctx,
        )  # fmt: skip
    return result, samples


# ----------------------------------------------------------------------------- outputs


def _table_metrics(kind: str, primary: str, present=()) -> list[str]:
    if kind == "mc":  # acc, and ReCoRD's / MultiRC's em, f1, f1a where reported
        return [primary] + [m for m in ("acc", "em", "f1", "f1a") if m in present and m != primary]
    return {
        "loglik": ["acc", "perplexity"],
        "rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
        "generate": ["bleu"] if primary == "bleu" else ["exact_match", "f1"],
    }[kind]


def _is_fraction(metric: str) -> bool:
    return metric.startswith("acc") or metric in ("exact_match", "em", "f1", "f1a", "f1_macro")


def _column(k: int) -> str:
    return {0: "Zero-Shot", 1: "One-Shot"}.get(k, f"Few-Shot (K={k})")


def format_table(results: Sequence[dict], shots: Sequence[int]) -> str:
    """Rows per task and metric, a column per K, like the GPT-3 paper's tables."""
    by = {(r["task"], r["k"]): r for r in results if "metrics" in r}
    tasks = list(dict.fromkeys(r["task"] for r in results))
    header = ["Task", "Metric", *[_column(k) for k in shots]]
    rows = []
    for name in tasks:
        any_r = next((r for r in results if r["task"] == name and "metrics" in r), None)
        if any_r is None:
            rows.append([name, "error", *["-" for _ in shots]])
            continue
        for m in _table_metrics(any_r["kind"], any_r["primary"], any_r["metrics"]):
            cells = []
            for k in shots:
                r = by.get((name, k))
                if r is None or m not in r["metrics"]:
                    cells.append("error" if r is None and (name, k) in _errors(results) else "-")
                    continue
                v, se = r["metrics"][m]["value"], r["metrics"][m]["stderr"]
                scale = 100.0 if _is_fraction(m) else 1.0
                cell = f"{v * scale:.1f}" if _is_fraction(m) else f"{v:.3f}"
                if se is not None and math.isfinite(se):
                    cell += f" ± {se * scale:.1f}" if _is_fraction(m) else f" ± {se:.3f}"
                if r["k_used"] != k:
                    cell += f" (K={r['k_used']}" + (
                        f"-{r['k_used_max']})" if r["k_used_max"] != r["k_used"] else ")"
                    )
                cells.append(cell)
            rows.append([name, m, *cells])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    n = {r["task"]: r["n"] for r in results if "n" in r}
    out = [line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]]
    out.append(
        "accuracies in %, ± one standard error; n = " + ", ".join(f"{t} {c}" for t, c in n.items())
    )
    return "\n".join(out)


def _errors(results):
    return {(r["task"], r["k"]) for r in results if "error" in r}


def plot(results: Sequence[dict], path: Path) -> Path:
    """Primary metric (accuracy-type) versus K, one line per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    tasks = list(dict.fromkeys(r["task"] for r in results if "metrics" in r))
    for name in tasks:
        rs = sorted(
            (r for r in results if r["task"] == name and "metrics" in r), key=lambda r: r["k"]
        )
        m = rs[0]["primary"]
        if not _is_fraction(m):
            continue
        xs = [r["k_used_mean"] for r in rs]
        ys = [100 * r["metrics"][m]["value"] for r in rs]
        es = [100 * (r["metrics"][m]["stderr"] or 0) for r in rs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{name} ({m})")
    ax.set_xscale("symlog", linthresh=1)
    ks = sorted({r["k"] for r in results if "metrics" in r})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (examples in context)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy versus number of in-context examples")
    if ax.lines:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- run


def run(
    model: EvalModel, tasks: Sequence[Task], opts: RunOptions, meta: dict | None = None
) -> dict:
    """Every task at every K. Results (and samples) are written as each one finishes."""
    report = {
        "meta": {**(meta or {}), "n_ctx": model.n_ctx, "seed": opts.seed, "shots": list(opts.shots),
                 "limit": opts.limit, "protocol": "GPT-3 section 2.4; lm-eval request conventions"},
        "results": [],
    }  # fmt: skip
    if opts.samples:
        Path(opts.samples).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.samples).write_text("", encoding="utf-8")

    def save():
        if opts.output:
            write_text_atomic(opts.output, json.dumps(json_safe(report), indent=2) + "\n")

    try:
        reserve(model, tasks, opts)
        for task in tasks:
            for k in _task_shots(task, opts.shots):
                try:
                    result, samples = evaluate_task(model, task, k, opts)
                except Exception as e:  # one bad task must not lose the others' results
                    if distributed.is_multiprocess():  # the processes run in lockstep
                        raise
                    log.exception("task %s K=%d failed", task.name, k)
                    report["results"].append(
                        {"task": task.name, "k": k, "error": f"{type(e).__name__}: {e}"}
                    )
                    save()
                    continue
                report["results"].append(result)
                log.info(
                    "%s K=%d: %s = %.4f (n=%d, %.1f examples/s)",
                    task.name, k, result["primary"],
                    result["metrics"][result["primary"]]["value"], result["n"],
                    result["examples_per_s"] or 0.0,
                )  # fmt: skip
                if opts.samples:
                    with open(opts.samples, "a", encoding="utf-8") as f:
                        for s in samples:
                            f.write(json.dumps(json_safe(s)) + "\n")
                save()
    finally:  # an interrupt still leaves what was finished on disk
        save()
        if opts.plot and any("metrics" in r for r in report["results"]):
            plot(report["results"], opts.plot)
    report["table"] = format_table(report["results"], opts.shots)
    save()
    return report
