"""A sweep's few-shot metric against training compute: `gptjax scaling fit --metric`.

Each finished run contributes its final-step value of the metric (a results column:
`gptjax sweep` collects every eval/TASK/METRIC that train.eval_tasks logged) and its
training compute C (the `flops` column). What is fitted is the metric's error,

    err(C) = E + A / C^alpha

a power law in compute that saturates at E, the error more compute does not remove.
err is 1 - metric for an accuracy-type metric (acc*, exact_match, em, f1*; BLEU / 100),
the metric itself for a lower-is-better one (perplexities, bits_per_byte, losses). As
approach 3 of gptjax.scaling: the Huber loss (delta 1e-3) of the log-error residuals,
minimised with L-BFGS from the best points of a grid of starts; the bootstrap over runs
gives the uncertainty. A fit through runs near chance level says little: at small
compute accuracies sit at chance and the power law only describes the climb after it.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from gptjax.files import json_safe, write_text_atomic
from gptjax.scaling import HUBER_DELTA, ScalingError, read_rows, save_png, summarize

NAMES = ("E", "A", "alpha")
# L-BFGS-B box for theta = (a, e, alpha): a = log A, e = log E.
BOUNDS = ((-30.0, 60.0), (-12.0, 12.0), (0.0, 3.0))
_LOWER = ("perplexity", "bits_per_byte", "loss")
_FRACTIONS = ("exact_match", "em", "f1", "f1a", "f1_macro")


def error_of(metric: str):
    """value -> the error that is fitted, and the label of what it is, for `metric`."""
    last = metric.rsplit("/", 1)[-1]
    if last.endswith(_LOWER):
        return (lambda v: v), last
    if last.startswith("acc") or last in _FRACTIONS:
        return (lambda v: 1.0 - v), f"1 - {last}"
    if last == "bleu":
        return (lambda v: 1.0 - v / 100.0), "1 - bleu/100"
    raise ScalingError(
        f"--metric {metric}: not an accuracy-type (acc*, exact_match, em, f1*, bleu) nor a "
        f"lower-is-better metric ({', '.join(_LOWER)}): which way is better is unknown"
    )


def read_points(path: str | Path, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """(C, metric value, N, names) of the finished runs that logged `metric`."""
    path = Path(path)
    rows = read_rows(path)
    if rows and "flops" not in rows[0]:
        raise ScalingError(f"{path}: runs lack the flops column (C), as `gptjax sweep` writes")
    if not any(r.get(metric) not in (None, "") for r in rows):
        logged = sorted({k for r in rows for k in r if k.startswith("eval/")})
        raise ScalingError(
            f"{path}: no run has {metric!r}"
            + (f"; the runs have: {', '.join(logged)}" if logged else
               "; train.eval_tasks of the sweep's config logs eval/TASK/METRIC "
               "(collected again by `gptjax sweep ... --collect`)")
        )  # fmt: skip
    error, _ = error_of(metric)
    kept = []
    for i, r in enumerate(rows):
        if r.get(metric) in (None, "") or r.get("status", "done") not in ("done", ""):
            continue
        try:
            c, value = float(r["flops"] or 0.0), float(r[metric])
            n = float(r.get("params") or 0.0)
        except (TypeError, ValueError) as e:
            raise ScalingError(f"{path}: run {i} has a non-numeric value ({e})") from None
        if c > 0 and math.isfinite(value) and error(value) > 0:
            kept.append((c, value, n, str(r.get("name", i))))
    if len(kept) < 4:
        raise ScalingError(
            f"{path}: {len(kept)} finished run(s) with {metric} and a FLOP count; the "
            "3-parameter fit needs at least 4"
        )
    c, value, n, names = zip(*kept, strict=True)
    return np.array(c), np.array(value), np.array(n), list(names)


def _objective(theta, log_c, log_err):
    """Huber loss of log-error residuals and its gradient; theta = (a, e, alpha)."""
    a, e, alpha = theta
    t1, t2 = a - alpha * log_c, np.full_like(log_c, e)
    lse = np.logaddexp(t1, t2)
    w1, w2 = np.exp(t1 - lse), np.exp(t2 - lse)
    r = lse - log_err
    small = np.abs(r) <= HUBER_DELTA
    loss = np.where(small, 0.5 * r * r, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    g = np.where(small, r, HUBER_DELTA * np.sign(r))
    return float(loss), np.array([(g * w1).sum(), (g * w2).sum(), -(g * w1 * log_c).sum()])


def _starts(log_c, log_err) -> list[np.ndarray]:
    """A grid over E (below the smallest error) and alpha, each with the A that puts the
    power law through the runs on average."""
    err = np.exp(log_err)
    starts = []
    for frac, alpha in itertools.product((0.0, 0.5, 0.9, 0.99), (0.02, 0.05, 0.1, 0.2, 0.5, 1)):
        floor = frac * err.min()
        a = float(np.mean(np.log(np.maximum(err - floor, 1e-12 * err.max())) + alpha * log_c))
        starts.append(np.array([a, math.log(max(floor, 1e-5)), alpha]))
    return starts


def fit(c: np.ndarray, err: np.ndarray, starts: int = 8, extra_inits=()) -> dict:
    """err(C) = E + A / C^alpha: the best L-BFGS fit from the `starts` best grid points."""
    from scipy.optimize import minimize

    log_c, log_err = np.log(c), np.log(err)
    grid = _starts(log_c, log_err)
    order = np.argsort([_objective(x, log_c, log_err)[0] for x in grid])[:starts]
    best = None
    for x0 in [*(grid[i] for i in order), *(np.asarray(x) for x in extra_inits)]:
        res = minimize(
            _objective, np.clip(x0, *np.array(BOUNDS).T), args=(log_c, log_err), jac=True,
            method="L-BFGS-B", bounds=BOUNDS, options={"maxiter": 1000, "gtol": 1e-12},
        )  # fmt: skip
        if best is None or res.fun < best.fun:
            best = res
    a, e, alpha = best.x
    return {
        "E": float(np.exp(e)), "A": float(np.exp(a)), "alpha": float(alpha),
        "objective": float(best.fun), "theta": [float(v) for v in best.x],
        "at_bound": [k for k, v, (lo, hi) in zip(("a", "e", "alpha"), best.x, BOUNDS, strict=True)
                     if min(v - lo, hi - v) < 1e-6],
    }  # fmt: skip


def predict(f: dict, c):
    """The fitted error at compute c."""
    return f["E"] + f["A"] / np.power(c, f["alpha"])


def bootstrap(c, err, f: dict, samples: int, seed: int) -> dict[str, list[float]]:
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(samples):
        idx = rng.integers(0, len(c), len(c))
        if len(set(idx)) < 4:
            continue
        g = fit(c[idx], err[idx], starts=2, extra_inits=[f["theta"]])
        for k in NAMES:
            draws.setdefault(k, []).append(g[k])
    return draws


def plot(c, value, n, f: dict, metric: str, to_value, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = sorted(set(n))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(sizes), 1)))
    for size, col in zip(sizes, colors, strict=True):
        sel = n == size
        label = f"N={size:,.0f}" if size else None
        ax.scatter(c[sel], value[sel], color=col, label=label, zorder=3)
    cc = np.geomspace(c.min() / 2, c.max() * 2, 100)
    ax.plot(cc, to_value(predict(f, cc)), "k-", alpha=0.7, label="fit")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(metric)
    ax.set_title(f"err = {f['E']:.3g} + {f['A']:.3g} / C^{f['alpha']:.3f}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_png(fig, out)


def main(
    results: str, metric: str, budget: float | None = None, out: str | None = None,
    bootstrap_samples: int = 200, seed: int = 0,
) -> dict:  # fmt: skip
    """Fit, print, and write fit_<metric>.json and <metric>.png ('/' as '_')."""
    path = Path(results)
    error, label = error_of(metric)
    c, value, n, names = read_points(path, metric)
    err = np.array([error(v) for v in value])
    f = fit(c, err)
    draws = bootstrap(c, err, f, bootstrap_samples, seed) if bootstrap_samples else {}
    # error_of is its own inverse (v -> 1 - v, 1 - v/100 -> 100 (1 - e), v -> v):
    to_value = (lambda e: 100.0 * (1.0 - e)) if label == "1 - bleu/100" else error
    result = {
        "metric": metric, "fitted": f"{label} = E + A / C^alpha", "runs": len(c),
        "names": names, "fit": f, "bootstrap": {k: summarize(v) for k, v in draws.items()},
    }  # fmt: skip
    if budget:
        result["budget"] = {"C": budget, metric: float(to_value(predict(f, budget)))}
    out_dir = Path(out) if out else (path if path.is_dir() else path.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = metric.replace("/", "_")
    print(format_report(result))
    write_text_atomic(
        out_dir / f"fit_{slug}.json",
        json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n",
    )
    png = plot(c, value, n, f, metric, to_value, out_dir / f"{slug}.png")
    print(f"wrote {out_dir / f'fit_{slug}.json'}, {png}")
    return result


def format_report(result: dict) -> str:
    f, boot = result["fit"], result["bootstrap"]

    def pm(key):
        s = f"{f[key]:.4g}"
        if key in boot:
            b = boot[key]
            s += f" ± {b['std']:.2g}  (5-95%: {b['p5']:.4g} .. {b['p95']:.4g})"
        return s

    lines = [
        f"{result['runs']} runs: {result['metric']} against training compute C",
        f"  {result['fitted']} (Huber on log-error, L-BFGS)",
        *(f"  {k:<6} = {pm(k)}" for k in NAMES),
    ]
    if f["at_bound"]:
        lines.append(f"  not pinned down by the runs (at the search bound): {f['at_bound']}")
    if "budget" in result:
        b = result["budget"]
        lines.append(f"at C = {b['C']:.3g} FLOPs: {result['metric']} = {b[result['metric']]:.4g}")
    return "\n".join(lines)
