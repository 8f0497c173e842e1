"""Scaling-law fits of a sweep's results (Hoffmann et al. 2022, "Chinchilla").

Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted as in the paper: with
a = log A, b = log B, e = log E the prediction is log L = LSE(a - alpha log N,
b - beta log D, e); the Huber loss (delta 1e-3) of the log-loss residuals is minimised
with L-BFGS, started from the best points of the paper's grid of initialisations.

Approach 2: for each isoFLOP budget C, a parabola in log N through the final losses
gives the loss-optimal N_opt(C) (D_opt from the same budget's runs); power laws
N_opt = n0 C^a and D_opt = d0 C^b are fitted across budgets.

Uncertainty: the bootstrap over runs (resample the runs with replacement and refit;
for approach 2 within each budget), reported as standard deviation and 5-95% range.

A few-shot metric against compute (`--metric eval/TASK/METRIC`): gptjax/scaling_metric.py.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gptjax.files import json_safe, save_figure, write_text_atomic

HUBER_DELTA = 1e-3
# Chinchilla's grid of initialisations (appendix D.2).
GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}
NAMES = ("E", "A", "B", "alpha", "beta")
# L-BFGS-B box for theta = (a, b, e, alpha, beta), wide around the grid: with few or
# noisy runs the amplitudes and exponents trade off without limit (a -> inf with alpha),
# and exp(a) would overflow to an infinite A whose predictions are NaN.
BOUNDS = ((-20.0, 60.0), (-20.0, 60.0), (-10.0, 10.0), (0.0, 5.0), (0.0, 5.0))


class ScalingError(ValueError):
    """A results file that cannot be fitted."""


@dataclasses.dataclass(frozen=True)
class Points:
    """The fitted runs: N, D, C (0 when unknown), budget group (0: none), loss."""

    n: np.ndarray
    d: np.ndarray
    c: np.ndarray
    budget: np.ndarray
    loss: np.ndarray
    names: tuple[str, ...]

    def take(self, idx: np.ndarray) -> Points:
        return Points(
            self.n[idx], self.d[idx], self.c[idx], self.budget[idx], self.loss[idx],
            tuple(self.names[i] for i in idx),
        )  # fmt: skip


# ----------------------------------------------------------------------------- reading


def read_rows(path: Path) -> list[dict]:
    """The run rows of a results.json / results.csv (or a sweep directory's results.json)."""
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ScalingError(f"results file not found: {path}")
    text = path.read_text()
    if path.suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows:
            raise ScalingError(f"{path}: no rows (expected a header line and one row per run)")
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScalingError(f"{path}: not valid JSON ({e})") from None
    rows = data.get("runs") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ScalingError(f"{path}: expected a list of runs or an object with a 'runs' list")
    return rows


def read_results(path: str | Path, params: str = "params") -> Points:
    """Finished runs of a results.json / results.csv (or a sweep directory)."""
    path = Path(path)
    rows = read_rows(path)
    need = (params, "tokens", "val_loss")
    if rows:
        missing = [k for k in need if k not in rows[0]]
        if missing:
            raise ScalingError(
                f"{path}: runs lack column(s) {', '.join(missing)}; expected at least "
                f"{', '.join(need)} (as written by `gptjax sweep`)"
            )
    kept = []
    for i, r in enumerate(rows):
        if r.get("val_loss") in (None, "") or r.get("status", "done") not in ("done", ""):
            continue
        try:
            n, d, loss = float(r[params]), float(r["tokens"]), float(r["val_loss"])
            c = float(r.get("flops") or 0.0)
            budget = float(r.get("budget") or 0.0)
        except (TypeError, ValueError, KeyError) as e:
            raise ScalingError(f"{path}: run {i} has a non-numeric value ({e})") from None
        if not (n > 0 and d > 0 and loss > 0 and math.isfinite(loss)):
            continue
        kept.append((n, d, c, budget, loss, str(r.get("name", i))))
    if len(kept) < 5:
        raise ScalingError(
            f"{path}: {len(kept)} finished run(s) with a positive finite val_loss; the "
            "5-parameter fit needs at least 5 (and many more to mean much)"
        )
    n, d, c, b, loss, names = zip(*kept, strict=True)
    return Points(*(np.array(x, dtype=np.float64) for x in (n, d, c, b, loss)), tuple(names))


# ----------------------------------------------------------------------------- approach 3


def _objective(theta: np.ndarray, log_n, log_d, log_l) -> tuple[float, np.ndarray]:
    """Huber loss of log-loss residuals and its gradient; theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    z = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    zmax = z.max(axis=0)
    ez = np.exp(z - zmax)
    lse = zmax + np.log(ez.sum(axis=0))
    w = ez / ez.sum(axis=0)
    r = lse - log_l
    small = np.abs(r) <= HUBER_DELTA
    loss = np.where(small, 0.5 * r * r, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    g = np.where(small, r, HUBER_DELTA * np.sign(r))
    grad = np.array(
        [
            (g * w[0]).sum(),
            (g * w[1]).sum(),
            (g * w[2]).sum(),
            -(g * w[0] * log_n).sum(),
            -(g * w[1] * log_d).sum(),
        ]
    )
    return float(loss), grad


def _grid() -> np.ndarray:
    g = GRID
    return np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])))


def _grid_objective(grid: np.ndarray, log_n, log_d, log_l) -> np.ndarray:
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    t1 = a - alpha * log_n
    t2 = b - beta * log_d
    lse = np.logaddexp(np.logaddexp(t1, t2), np.broadcast_to(e, t1.shape))
    r = np.abs(lse - log_l)
    return np.where(r <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (r - 0.5 * HUBER_DELTA)).sum(1)


def fit_approach3(points: Points, starts: int = 64, extra_inits: Sequence = ()) -> dict:
    """Best L-BFGS fit over the `starts` best grid points (and extra_inits)."""
    from scipy.optimize import minimize

    log_n, log_d, log_l = np.log(points.n), np.log(points.d), np.log(points.loss)
    grid = _grid()
    order = np.argsort(_grid_objective(grid, log_n, log_d, log_l))[:starts]
    inits = [*grid[order], *(np.asarray(x, dtype=np.float64) for x in extra_inits)]
    best = None
    for x0 in inits:
        res = minimize(
            _objective, np.clip(x0, *np.array(BOUNDS).T), args=(log_n, log_d, log_l),
            jac=True, method="L-BFGS-B", bounds=BOUNDS,
            options={"maxiter": 1000, "gtol": 1e-12, "ftol": 1e-15},
        )  # fmt: skip
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return {
        "E": float(np.exp(e)),
        "A": float(np.exp(a)),
        "B": float(np.exp(b)),
        "alpha": float(alpha),
        "beta": float(beta),
        "objective": float(best.fun),
        "theta": [float(v) for v in best.x],
        # parameters the data did not pin down: the fit ran into the BOUNDS box
        "at_bound": [
            name
            for name, v, (lo, hi) in zip(
                ("a", "b", "e", "alpha", "beta"), best.x, BOUNDS, strict=True
            )
            if min(v - lo, hi - v) < 1e-6
        ],
    }


def predict(fit: dict, n, d):
    return fit["E"] + fit["A"] / np.power(n, fit["alpha"]) + fit["B"] / np.power(d, fit["beta"])


def cost_model(points: Points) -> tuple[float, float]:
    """FLOPs per token ~ k0 N^gamma, fitted on the runs (k0=6, gamma=1 under C = 6ND)."""
    ok = points.c > 0
    if ok.sum() < 2:
        return 6.0, 1.0
    per_token = points.c[ok] / points.d[ok]
    if np.allclose(per_token, 6 * points.n[ok], rtol=1e-6):
        return 6.0, 1.0
    gamma, log_k0 = np.polyfit(np.log(points.n[ok]), np.log(per_token), 1)
    return float(np.exp(log_k0)), float(gamma)


def optimum3(fit: dict, budget: float, cost: tuple[float, float]) -> dict:
    """Loss-minimising N and D = C / (k0 N^gamma) under approach 3's L(N, D)."""
    from scipy.optimize import minimize_scalar

    k0, gamma = cost

    def loss_at(log_n):
        n = np.exp(log_n)
        return float(predict(fit, n, budget / (k0 * n**gamma)))

    log_n_max = math.log(budget / k0) / (1 + gamma)  # where D = N
    res = minimize_scalar(loss_at, bounds=(0.0, log_n_max + 10), method="bounded")
    n = float(np.exp(res.x))
    return {"N": n, "D": float(budget / (k0 * n**gamma)), "loss": float(res.fun)}


# ----------------------------------------------------------------------------- approach 2


def isoflop_minima(points: Points) -> list[dict]:
    """Per budget with >= 3 distinct N: the parabola's minimum in log N (if convex)."""
    out = []
    for budget in sorted(set(points.budget[points.budget > 0])):
        sel = points.budget == budget
        x, y = np.log(points.n[sel]), points.loss[sel]
        if len(set(x)) < 3:
            continue
        c2, c1, c0 = np.polyfit(x, y, 2)
        if c2 <= 0:
            out.append({"budget": float(budget), "convex": False})
            continue
        x_opt = -c1 / (2 * c2)
        slope, icpt = np.polyfit(x, np.log(points.d[sel]), 1)  # log D vs log N on this budget
        with np.errstate(over="ignore", under="ignore"):  # a nearly flat profile: inf or 0
            n_opt, d_opt = float(np.exp(x_opt)), float(np.exp(icpt + slope * x_opt))
        out.append(
            {
                "budget": float(budget),
                "convex": True,
                "N": n_opt,
                "D": d_opt,
                "loss": float(c0 + c1 * x_opt + c2 * x_opt**2),
                "inside": bool(x.min() <= x_opt <= x.max()),
                "parabola": [float(c2), float(c1), float(c0)],
            }
        )
    return out


def fit_approach2(points: Points) -> dict | None:
    """Power laws N_opt = n0 C^a and D_opt = d0 C^b through the convex isoFLOP minima."""
    minima = [
        m
        for m in isoflop_minima(points)
        if m["convex"] and 0 < m["N"] < np.inf and 0 < m["D"] < np.inf
    ]
    if len(minima) < 2:
        return None
    log_c = np.log([m["budget"] for m in minima])
    a, log_n0 = np.polyfit(log_c, np.log([m["N"] for m in minima]), 1)
    b, log_d0 = np.polyfit(log_c, np.log([m["D"] for m in minima]), 1)
    with np.errstate(over="ignore"):  # a resample's near-flat parabola: inf, not a warning
        n0, d0 = float(np.exp(log_n0)), float(np.exp(log_d0))
    return {"a": float(a), "n0": n0, "b": float(b), "d0": d0}


# ----------------------------------------------------------------------------- bootstrap


def bootstrap(points: Points, fit3: dict, samples: int, seed: int, budget: float | None) -> dict:
    """Refit on runs resampled with replacement; {quantity: list of values}."""
    rng = np.random.default_rng(seed)
    cost = cost_model(points)
    grid_best = _grid()[
        np.argsort(
            _grid_objective(_grid(), np.log(points.n), np.log(points.d), np.log(points.loss))
        )[:4]
    ]
    draws: dict[str, list[float]] = {}
    groups = [np.flatnonzero(points.budget == c) for c in sorted(set(points.budget))]
    for _ in range(samples):
        idx = rng.integers(0, len(points.loss), len(points.loss))
        if len(set(idx)) < 5:
            continue
        f = fit_approach3(points.take(idx), starts=0, extra_inits=[fit3["theta"], *grid_best])
        for k in NAMES:
            draws.setdefault(k, []).append(f[k])
        if budget:
            o = optimum3(f, budget, cost)
            draws.setdefault("N_opt3", []).append(o["N"])
            draws.setdefault("D_opt3", []).append(o["D"])
        # approach 2: resample within each budget
        idx2 = np.concatenate([rng.choice(g, len(g)) for g in groups])
        f2 = fit_approach2(points.take(idx2))
        if f2 is not None:
            for k in ("a", "b"):
                draws.setdefault(k, []).append(f2[k])
            if budget:  # in logs: a resample's near-flat parabola can give a wild a
                with np.errstate(over="ignore", divide="ignore"):
                    n_opt = np.exp(np.log(f2["n0"]) + f2["a"] * np.log(budget))
                    d_opt = np.exp(np.log(f2["d0"]) + f2["b"] * np.log(budget))
                if np.isfinite(n_opt) and np.isfinite(d_opt):
                    draws.setdefault("N_opt2", []).append(float(n_opt))
                    draws.setdefault("D_opt2", []).append(float(d_opt))
    return draws


def summarize(values: Sequence[float]) -> dict:
    v = np.asarray(values)
    return {
        "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
        "p5": float(np.percentile(v, 5)),
        "p95": float(np.percentile(v, 95)),
        "samples": len(v),
    }


# ----------------------------------------------------------------------------- plots


def plot(points: Points, fit3: dict, fit2: dict | None, cost, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    written = []
    # Approach 3: loss against D for each model size, with the fitted L(N, D).
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = sorted(set(points.n))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
    for n, col in zip(sizes, colors, strict=True):
        sel = points.n == n
        ax.scatter(points.d[sel], points.loss[sel], color=col, label=f"N={n:,.0f}", zorder=3)
        dd = np.geomspace(points.d.min() / 1.5, points.d.max() * 1.5, 100)
        ax.plot(dd, predict(fit3, n, dd), color=col, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("final validation loss")
    ax.set_title(
        f"L = {fit3['E']:.2f} + {fit3['A']:.3g}/N^{fit3['alpha']:.2f} "
        f"+ {fit3['B']:.3g}/D^{fit3['beta']:.2f}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    pred = predict(fit3, points.n, points.d)
    ax2.scatter(points.loss, pred, zorder=3)
    lo, hi = min(points.loss.min(), pred.min()), max(points.loss.max(), pred.max())
    ax2.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax2.set_xlabel("observed loss")
    ax2.set_ylabel("fitted loss")
    ax2.set_title("approach 3: fitted vs observed", fontsize=9)
    ax2.grid(alpha=0.3)
    written.append(save_png(fig, out / "scaling_fit.png"))

    minima = isoflop_minima(points)
    if minima:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        colors = plt.cm.plasma(np.linspace(0, 0.85, len(minima)))
        for m, col in zip(minima, colors, strict=True):
            sel = points.budget == m["budget"]
            ax.scatter(points.n[sel], points.loss[sel], color=col, label=f"C={m['budget']:.2g}")
            if m["convex"]:
                x = np.linspace(
                    np.log(points.n[sel]).min() - 0.3, np.log(points.n[sel]).max() + 0.3
                )
                ax.plot(np.exp(x), np.polyval(m["parabola"], x), color=col, alpha=0.7)
                ax.scatter([m["N"]], [m["loss"]], color=col, marker="*", s=150, edgecolor="k")
        ax.set_xscale("log")
        ax.set_xlabel("parameters N")
        ax.set_ylabel("final validation loss")
        ax.set_title("approach 2: isoFLOP profiles (star: parabola minimum)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
        conv = [m for m in minima if m["convex"]]
        cs = np.array([m["budget"] for m in conv])
        ax2.scatter(cs, [m["N"] for m in conv], label="N_opt (isoFLOP minima)", color="C0")
        ax2.scatter(cs, [m["D"] for m in conv], label="D_opt (isoFLOP minima)", color="C1")
        if fit2 is not None and len(cs):
            cc = np.geomspace(cs.min() / 2, cs.max() * 2, 50)
            ax2.plot(cc, fit2["n0"] * cc ** fit2["a"], color="C0", label=f"N ~ C^{fit2['a']:.2f}")
            ax2.plot(cc, fit2["d0"] * cc ** fit2["b"], color="C1", label=f"D ~ C^{fit2['b']:.2f}")
            opt3 = [optimum3(fit3, c, cost) for c in cc]
            ax2.plot(cc, [o["N"] for o in opt3], "C0:", label="N_opt, approach 3")
            ax2.plot(cc, [o["D"] for o in opt3], "C1:", label="D_opt, approach 3")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        # Budgets within a decade: matplotlib would label every minor tick, overlapping.
        ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax2.set_xlabel("compute C (FLOPs)")
        ax2.set_title("compute-optimal N and D", fontsize=9)
        ax2.legend(fontsize=7)
        ax2.grid(alpha=0.3, which="both")
        written.append(save_png(fig, out / "scaling_isoflop.png"))
    return written


def save_png(fig, path: Path) -> Path:
    """The scaling plots' PNG: laid out tight, written whole (files.save_figure)."""
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)


# ----------------------------------------------------------------------------- command


def default_budget(points: Points) -> tuple[float, str]:
    """(C, where it comes from) when none is given: the largest isoFLOP budget of the
    runs, else the largest run's C; (0, ...) when the runs carry no FLOP counts."""
    if np.any(points.budget > 0):
        return float(points.budget.max()), "the largest isoFLOP budget of the runs"
    if np.any(points.c > 0):
        return float(points.c.max()), "the largest run's C"
    return 0.0, "no run has a FLOP count"


def fit_all(
    points: Points,
    budget: float | None = None,
    samples: int = 200,
    seed: int = 0,
    budget_source: str = "given",
) -> dict:
    fit3 = fit_approach3(points)
    fit2 = fit_approach2(points)
    cost = cost_model(points)
    draws = bootstrap(points, fit3, samples, seed, budget) if samples else {}
    result = {
        "runs": len(points.loss),
        "approach3": fit3,
        "approach2": fit2,
        "isoflop_minima": isoflop_minima(points),
        "cost_model": {"k0": cost[0], "gamma": cost[1]},
        "bootstrap": {k: summarize(v) for k, v in draws.items() if v},
    }
    if budget:
        result["budget"] = {
            "C": budget,
            "source": budget_source,
            "approach3": optimum3(fit3, budget, cost),
        }
        if fit2 is not None:
            result["budget"]["approach2"] = {
                "N": fit2["n0"] * budget ** fit2["a"],
                "D": fit2["d0"] * budget ** fit2["b"],
            }
    return result


def format_report(result: dict) -> str:
    boot = result["bootstrap"]

    def pm(key, value, fmt="{:.4g}"):
        s = fmt.format(value)
        if key in boot:
            b = boot[key]
            s += f" ± {b['std']:.2g}  (5-95%: {b['p5']:.4g} .. {b['p95']:.4g})"
        return s

    f3 = result["approach3"]
    lines = [
        f"{result['runs']} runs",
        "approach 3: L(N, D) = E + A/N^alpha + B/D^beta (Huber on log-loss, L-BFGS)",
        *(f"  {k:<6} = {pm(k, f3[k])}" for k in NAMES),
        f"  implied N_opt ~ C^{f3['beta'] / (f3['alpha'] + f3['beta']):.3f}, "
        f"D_opt ~ C^{f3['alpha'] / (f3['alpha'] + f3['beta']):.3f} (under C ∝ N D)",
    ]
    lines.append("approach 2: isoFLOP minima (parabola in log N)")
    for m in result["isoflop_minima"]:
        if not m["convex"]:
            lines.append(f"  C={m['budget']:.3g}: not convex, skipped")
            continue
        flag = "" if m["inside"] else "  (outside the sampled N: extrapolated)"
        lines.append(
            f"  C={m['budget']:.3g}: N_opt={m['N']:,.0f} D_opt={m['D']:,.0f} loss={m['loss']:.4f}"
            + flag
        )
    f2 = result["approach2"]
    if f2 is None:
        lines.append("  fewer than 2 budgets with a convex profile: no power law")
    else:
        lines.append(f"  N_opt ∝ C^a: a = {pm('a', f2['a'], '{:.3f}')}")
        lines.append(f"  D_opt ∝ C^b: b = {pm('b', f2['b'], '{:.3f}')}")
    if "budget" in result:
        bd = result["budget"]
        o3 = bd["approach3"]
        cm = result["cost_model"]
        given = bd.get("source", "given") == "given"
        source = "" if given else f"{bd['source']}; --budget for another; "
        lines.append(
            f"compute-optimal at C = {bd['C']:.3g} FLOPs "
            f"({source}C = {cm['k0']:.3g} N^{cm['gamma']:.3f} D from the runs):"
        )
        lines.append(
            f"  approach 3: N = {pm('N_opt3', o3['N'], '{:,.0f}')}, "
            f"D = {pm('D_opt3', o3['D'], '{:,.0f}')}, loss {o3['loss']:.4f}"
        )
        if "approach2" in bd:
            o2 = bd["approach2"]
            lines.append(
                f"  approach 2: N = {pm('N_opt2', o2['N'], '{:,.0f}')}, "
                f"D = {pm('D_opt2', o2['D'], '{:,.0f}')}"
            )
    return "\n".join(lines)


def main(
    results: str,
    budget: float | None = None,
    out: str | None = None,
    params: str = "params",
    bootstrap: int = 200,
    seed: int = 0,
) -> dict:
    """`gptjax scaling fit`: fit, print, write fit.json and the PNGs.

    budget None: the compute-optimal N and D are given for default_budget's C."""
    path = Path(results)
    points = read_results(path, params)
    source = "given"
    if budget is None:
        budget, source = default_budget(points)
        if not budget:
            print(f"no compute budget: {source} (--budget C gives one)")
    result = fit_all(points, budget, bootstrap, seed, budget_source=source)
    result["params_column"] = params
    out_dir = Path(out) if out else (path if path.is_dir() else path.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(format_report(result))
    write_text_atomic(
        out_dir / "fit.json", json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n"
    )
    pngs = plot(points, result["approach3"], result["approach2"], cost_model(points), out_dir)
    print(f"wrote {out_dir / 'fit.json'}, " + ", ".join(str(p) for p in pngs))
    return result
