"""Scaling-law sweeps and fits: planted parameters are recovered (approaches 3 and 2);
sweeps follow their shape, LR and FLOP rules; printed commands parse; a half-finished
sweep resumes (tiny real runs); bad results files fail clearly."""

import contextlib
import io
import json
import shlex
import warnings
from pathlib import Path

import numpy as np
import pytest

from gptjax import cli, scaling, sweep
from gptjax import config as config_lib
from gptjax.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "configs" / "quickstart.py")
# Chinchilla's fitted law (Hoffmann et al. 2022, approach 3)
PLANTED = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def chinchilla(n, d, p=PLANTED):
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def write_results(path: Path, n, d, loss, budget=None, flops=None) -> Path:
    rows = [
        {
            "name": f"r{i}",
            "params": float(n[i]),
            "tokens": float(d[i]),
            "val_loss": float(loss[i]),
            "flops": float(flops[i]) if flops is not None else 6.0 * n[i] * d[i],
            "budget": float(budget[i]) if budget is not None else 0.0,
            "status": "done",
        }
        for i in range(len(n))
    ]
    path.write_text(json.dumps({"runs": rows}))
    return path


# ----------------------------------------------------------------------------- fits


def test_approach3_on_data_that_cannot_pin_it_stays_finite(tmp_path):
    """Six noisy tiny runs (3 sizes x 2 token counts, losses not monotone in either):
    an unbounded L-BFGS drifts to a = 817, beta = -14, and exp(a) overflows to an
    infinite A whose predictions are NaN. The fit stays inside scaling.BOUNDS, predicts
    finite losses, and names the parameters that ran into the box."""
    n = np.repeat([1.16e5, 2.32e5, 4.64e5], 2)
    d = np.tile([3.86e5, 7.73e5], 3)
    loss = np.array([5.172, 5.546, 4.604, 4.801, 5.280, 5.015])
    points = scaling.read_results(write_results(tmp_path / "r.json", n, d, loss))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit = scaling.fit_approach3(points)
        predicted = scaling.predict(fit, n, d)
    assert all(np.isfinite(fit[k]) for k in scaling.NAMES)
    assert fit["alpha"] >= 0 and fit["beta"] >= 0
    assert np.isfinite(predicted).all() and np.abs(predicted - loss).max() < 0.5
    assert fit["at_bound"] and set(fit["at_bound"]) <= {"a", "b", "e", "alpha", "beta"}


@pytest.mark.parametrize("noise", [0.0, 0.003])
def test_approach3_recovers_planted_parameters(tmp_path, noise):
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e10, 7), np.geomspace(1e9, 1e12, 7)))
    loss = chinchilla(n, d) * np.exp(noise * np.random.default_rng(0).standard_normal(n.shape))
    points = scaling.read_results(write_results(tmp_path / "r.json", n, d, loss))
    fit = scaling.fit_approach3(points)
    tol = {0.0: 0.01, 0.003: 0.06}[noise]
    assert fit["alpha"] == pytest.approx(PLANTED["alpha"], abs=tol)
    assert fit["beta"] == pytest.approx(PLANTED["beta"], abs=tol)
    assert fit["E"] == pytest.approx(PLANTED["E"], rel=tol)
    if not noise:  # exact data: the amplitudes too (A, B trade off with alpha, beta)
        assert np.log(fit["A"]) == pytest.approx(np.log(PLANTED["A"]), abs=1e-3)
        assert np.log(fit["B"]) == pytest.approx(np.log(PLANTED["B"]), abs=1e-3)
    pred = scaling.predict(fit, n, d)
    assert np.max(np.abs(np.log(pred / chinchilla(n, d)))) < 3 * noise + 1e-4


def isoflop_points(budgets, per_budget=7, span=0.6):
    """Runs on isoFLOP profiles centred on each budget's true optimum (C = 6ND)."""
    p = PLANTED
    g = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / (p["alpha"] + p["beta"]))
    a = p["beta"] / (p["alpha"] + p["beta"])
    n, d, c = [], [], []
    for budget in budgets:
        n_opt = g * (budget / 6) ** a
        for x in np.linspace(-span, span, per_budget):
            n.append(n_opt * 10**x)
            d.append(budget / (6 * n[-1]))
            c.append(budget)
    n, d, c = map(np.array, (n, d, c))
    return n, d, c, a


def test_approach2_recovers_planted_exponents(tmp_path):
    n, d, c, a_true = isoflop_points(np.geomspace(1e18, 1e22, 5))
    points = scaling.read_results(write_results(tmp_path / "r.json", n, d, chinchilla(n, d), c))
    minima = scaling.isoflop_minima(points)
    assert len(minima) == 5 and all(m["convex"] and m["inside"] for m in minima)
    fit2 = scaling.fit_approach2(points)
    assert fit2["a"] == pytest.approx(a_true, abs=0.02)
    assert fit2["b"] == pytest.approx(1 - a_true, abs=0.02)
    # and approach 3 on the same runs finds the same compute-optimal N
    fit3 = scaling.fit_approach3(points)
    opt = scaling.optimum3(fit3, 1e20, scaling.cost_model(points))
    assert opt["N"] == pytest.approx(fit2["n0"] * 1e20 ** fit2["a"], rel=0.15)
    assert opt["N"] * opt["D"] * 6 == pytest.approx(1e20, rel=1e-6)


def test_fit_command_prints_uncertainty_and_draws(tmp_path, capsys):
    n, d, c, _ = isoflop_points([1e18, 1e19, 1e20], per_budget=5)
    loss = chinchilla(n, d) * np.exp(0.002 * np.random.default_rng(1).standard_normal(n.shape))
    results = write_results(tmp_path / "results.json", n, d, loss, c)
    argv = ["scaling", "fit", str(results), "--budget", "1e21", "--bootstrap", "8"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "±" in out and "compute-optimal at C = 1e+21" in out
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["bootstrap"]["alpha"]["samples"] >= 6
    assert fit["budget"]["approach3"]["N"] > 0 and fit["approach2"]["a"] > 0
    for png in ("scaling_fit.png", "scaling_isoflop.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*.tmp"))  # written to temporary names, renamed


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity, which are not JSON."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_fit_defaults_the_budget_and_writes_strict_json(tmp_path, capsys):
    """Without --budget the compute-optimal N and D are for the largest isoFLOP budget
    (grid runs: the largest run's C), and the command says so; a bootstrap of one
    sample has no std: null in fit.json, not NaN."""
    n, d, c, _ = isoflop_points([1e18, 1e19, 1e20], per_budget=5)
    results = write_results(tmp_path / "results.json", n, d, chinchilla(n, d), c)
    assert cli.main(["scaling", "fit", str(results), "--bootstrap", "1"]) == 0
    out = capsys.readouterr().out
    assert "compute-optimal at C = 1e+20 FLOPs (the largest isoFLOP budget of the runs" in out
    fit = strict_json((tmp_path / "fit.json").read_text())
    assert fit["budget"]["C"] == 1e20 and fit["budget"]["approach3"]["N"] > 0
    assert fit["budget"]["source"] == "the largest isoFLOP budget of the runs"
    assert fit["bootstrap"]["alpha"]["samples"] == 1 and fit["bootstrap"]["alpha"]["std"] is None

    # Grid runs only: the largest run's C.
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e9, 3), np.geomspace(1e9, 1e11, 3)))
    grid = scaling.read_results(write_results(tmp_path / "grid.json", n, d, chinchilla(n, d)))
    assert scaling.default_budget(grid) == (6 * 1e9 * 1e11, "the largest run's C")


def test_bad_results_files_fail_clearly(tmp_path, capsys):
    with pytest.raises(scaling.ScalingError, match="not found"):
        scaling.read_results(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(scaling.ScalingError, match="not valid JSON"):
        scaling.read_results(bad)
    bad.write_text(json.dumps({"runs": [{"name": "x", "tokens": 1, "val_loss": 3.0}]}))
    with pytest.raises(scaling.ScalingError, match="lack column.*params"):
        scaling.read_results(bad)
    n = np.array([1e6, 2e6, 4e6])
    with pytest.raises(scaling.ScalingError, match="at least 5"):
        scaling.read_results(write_results(bad, n, n, [3.0, 2.9, 2.8]))
    csv_ = tmp_path / "r.csv"
    csv_.write_text("name,params,tokens,val_loss\na,1e6,abc,3.0\n")
    with pytest.raises(scaling.ScalingError, match="non-numeric"):
        scaling.read_results(csv_)
    assert cli.main(["scaling", "fit", str(bad), "--bootstrap", "0"]) == 2
    assert "at least 5" in capsys.readouterr().err


# ----------------------------------------------------------------------------- sweep plans

RULE = sweep.SweepConfig(
    aspect_ratio=32.0,
    head_dim=16,
    lr_rule="inverse_width",
    base_lr=4e-3,
    base_width=64,
    min_steps=1,
)
BASE = ["model.vocab_size=512", "train.batch_size=8", "model.seq_len=64"]


def test_grid_sweep_follows_shape_and_lr_rules(tmp_path):
    s = sweep.plan(QUICKSTART, BASE, RULE, [32, 64, 96, 128], tmp_path, tokens=[1e5, 4e5])
    assert len(s.runs) == 8
    for run in s.runs:
        cfg = s.config(run)  # the overrides load and validate
        m = cfg.model
        assert (m.d_model, m.n_layer, m.n_head) == (run.d_model, run.n_layer, run.n_head)
        assert m.n_layer == max(1, round(m.d_model / 32)) and m.head_dim == 16
        assert cfg.optim.lr == pytest.approx(4e-3 * 64 / m.d_model, rel=1e-5)
        assert run.tokens == cfg.train.steps * 8 * 64
        assert run.flops == pytest.approx(6 * run.params * run.tokens)
    sqrt = sweep.sweep_overrides(RULE, ["lr_rule=inverse_sqrt_width"])
    (run,) = sweep.plan(QUICKSTART, BASE, sqrt, [256], tmp_path, tokens=[1e5]).runs
    assert run.lr == pytest.approx(4e-3 * (64 / 256) ** 0.5, rel=1e-5)
    with pytest.raises(ConfigError, match="multiple of head_dim"):
        sweep.plan(QUICKSTART, BASE, RULE, [40], tmp_path, tokens=[1e5])
    with pytest.raises(ConfigError, match="unknown sweep key"):
        sweep.sweep_overrides(RULE, ["aspect=3"])


@pytest.mark.parametrize("flops_rule", ["6N", "model"])
def test_isoflop_runs_spend_the_budget(tmp_path, flops_rule):
    rule = sweep.sweep_overrides(RULE, [f"flops_rule={flops_rule}", "max_tokens_per_param=1000"])
    budgets = [1e12, 1e13]
    s = sweep.plan(QUICKSTART, BASE, rule, [32, 64, 128, 256], tmp_path, budgets=budgets)
    step_tokens = 8 * 64
    for c in budgets:
        runs = [r for r in s.runs if r.budget == c]
        assert len({r.d_model for r in runs}) >= 3
        for r in runs:
            if flops_rule == "6N":
                assert abs(6 * r.params * r.tokens - c) <= 6 * r.params * step_tokens / 2
            assert r.flops == pytest.approx(c, rel=step_tokens / r.tokens)
            assert r.tokens / r.params <= 1000
    assert any(r.tokens / r.params > 1000 for r in sweep.plan(
        QUICKSTART, BASE, RULE, [32], tmp_path, budgets=[1e13]).runs)  # fmt: skip


def test_printed_commands_are_valid_for_the_cli(tmp_path, sp_model):
    argv = [
        "sweep", "--config", QUICKSTART, "--sizes", "32,64", "--tokens", "1e5,2e5",
        "--out", str(tmp_path / "sw"), "--print-commands", "--sweep.head_dim=16",
        f"--config.tokenizer.path={sp_model}", "--config.train.batch_size=8",
    ]  # fmt: skip
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(argv) == 0
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 4
    parser = cli.build_parser()
    for line in lines:
        words = shlex.split(line)
        assert words[:2] == ["gptjax", "train"]
        args, extra = parser.parse_known_args(words[1:])
        overrides = cli._split_overrides(extra, parser)
        cfg = config_lib.load(args.config, overrides)  # unknown keys would raise here
        assert cfg.tokenizer.path == str(sp_model) and cfg.model.head_dim == 16
        assert Path(args.workdir).parent == tmp_path / "sw" / "runs"
    results = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert [r["status"] for r in results["runs"]] == ["pending"] * 4
    records = sorted((tmp_path / "sw" / "runs").glob("*/sweep_run.json"))
    assert len(records) == 4 and not list((tmp_path / "sw").rglob(".*.tmp"))
    # A damaged run record (say, cut short) is a clear error, not a JSON traceback.
    records[0].write_text('{"config": "x", "overr')
    with pytest.raises(ConfigError, match="sweep_run.json is damaged"):
        overrides = [f"tokenizer.path={sp_model}", "train.batch_size=8"]
        s = sweep.make(QUICKSTART, overrides, ["head_dim=16"], "32,64", tmp_path / "sw",
                       tokens="1e5,2e5")  # fmt: skip
        sweep.print_commands(s, io.StringIO())


def test_sweep_errors_exit_2_with_the_message(tmp_path, capsys, monkeypatch):
    """A missing tokenizer file, and a sweep started as one of several processes (each
    would run the whole sweep): status 2 and a message, no traceback."""
    base = ["sweep", "--config", QUICKSTART, "--sizes", "32", "--tokens", "1e5",
            "--out", str(tmp_path / "sw"), "--print-commands"]  # fmt: skip
    missing = tmp_path / "missing.model"
    assert cli.main([*base, f"--config.tokenizer.path={missing}"]) == 2
    assert "no such SentencePiece model file" in capsys.readouterr().err
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    assert cli.main([*base[:-1], "--run"]) == 2
    assert "runs as a single process, not as one of 2" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_bootstrap_survives_a_nearly_flat_isoflop_profile():
    """A nearly flat (but convex) isoFLOP profile puts its parabola's minimum absurdly far
    away (exp overflows): such minima are left out of the power law, the bootstrap goes
    on, and every approach-2 value it keeps is finite."""
    n = np.array([1e4, 3e4, 1e5] * 3)
    x = np.log(n[:3]) - np.log(3e4)
    budget = np.repeat([1e12, 1e13, 1e14], 3)
    d = budget / (6 * n)
    flat = 3.3 - 0.01 * x + 1e-9 * x**2
    loss = np.concatenate([4.0 + 0.05 * x**2, 3.6 + 0.05 * (x - 0.5) ** 2, flat])
    points = scaling.Points(n, d, 6 * n * d, budget, loss, tuple(map(str, range(9))))
    assert scaling.isoflop_minima(points)[2]["N"] == np.inf
    fit3 = scaling.fit_approach3(points, starts=4)
    draws = scaling.bootstrap(points, fit3, 30, 0, 1e15)
    assert draws["a"] and draws["N_opt2"], "no approach-2 draw at all"
    for key in ("a", "b", "N_opt2", "D_opt2"):
        assert all(np.isfinite(v) for v in draws[key]), key


def test_a_real_isoflop_sweep_resumes_then_fits_and_draws(
    tmp_path, corpus, sp_model, token_cache, capsys
):
    """Six real runs (two isoFLOP budgets x three widths) on the shared corpus, one of
    them interrupted at its checkpoint first: the sweep resumes it, a second pass skips
    every finished run, and `gptjax scaling fit` on the results fits and draws."""
    import dataclasses

    from gptjax import train

    base = [
        f"data.sources={corpus}", f"tokenizer.path={sp_model}", f"data.cache_dir={token_cache}",
        "model.seq_len=32", "train.batch_size=8", "train.eval_batches=2", "train.log_every=50",
        "train.sample_tokens=0", "optim.warmup_steps=2", "checkpoint.async_save=false",
    ]  # fmt: skip
    rule = sweep.sweep_overrides(RULE, ["min_steps=1"])
    out = tmp_path / "sweep"
    s = sweep.plan(QUICKSTART, base, rule, [16, 32, 48], out, budgets=[3e8, 1e9], vocab_size=512)
    assert len(s.runs) == 6 and len({r.d_model for r in s.runs}) == 3
    # interrupt one run: 5 of its steps, checkpointed at step 5
    cut = max(s.runs, key=lambda r: r.steps)
    cfg = s.config(cut)
    train.train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=5)),
                s.workdir(cut))  # fmt: skip
    assert sweep.result_of(s, cut) is None

    rows = sweep.run_all(s)
    out_text = capsys.readouterr().out
    assert [r["status"] for r in rows] == ["done"] * 6
    assert f"steps 5->{cut.steps}" in out_text  # resumed, not restarted
    assert all(np.isfinite(r["val_loss"]) and r["val_loss"] < np.log(512) for r in rows)
    final = s.workdir(s.runs[0]) / "metrics.jsonl"
    stamp = final.stat().st_mtime_ns

    rows_again = sweep.run_all(s)
    assert capsys.readouterr().out.count("finished, skipped") == 6
    assert final.stat().st_mtime_ns == stamp
    assert [r["val_loss"] for r in rows_again] == [r["val_loss"] for r in rows]
    csv_rows = (out / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("name,n_layer,d_model") and len(csv_rows) == 7
    # a different sweep in the same directory is refused, not mixed in
    other = sweep.plan(
        QUICKSTART, [*base, "optim.lr=1e-4"], sweep.sweep_overrides(rule, ["lr_rule=constant"]),
        [16], out, budgets=[3e8], vocab_size=512,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="other settings"):
        sweep.run_all(other)

    assert cli.main(["scaling", "fit", str(out / "results.json"), "--bootstrap", "4"]) == 0
    report = capsys.readouterr().out
    assert "alpha" in report and "compute-optimal" in report
    fit = strict_json((out / "fit.json").read_text())
    assert fit["runs"] == 6 and len(fit["isoflop_minima"]) == 2
    assert fit["approach3"]["E"] > 0 and fit["budget"]["approach3"]["N"] > 0
    for png in ("scaling_fit.png", "scaling_isoflop.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
