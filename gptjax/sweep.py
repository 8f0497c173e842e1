"""Scaling-law sweeps: generate the runs, train them (or print their commands), collect.

A sweep is a base config file plus a rule (SweepConfig) that turns a width into a
model shape and a learning rate, and a token count into training steps:

    n_layer = max(1, round(d_model / aspect_ratio)),  n_head = d_model / head_dim
    lr = base_lr * (base_width / d_model) ** p        (p = 0, 1 or 1/2 by lr_rule)
    steps = round(D / (batch_size * seq_len))

Grid mode trains every width on every token count; isoFLOP mode, for each budget C,
trains every width on D = C / (6 N) tokens (flops_rule="6N", N the non-embedding
parameters) or D = C / flops_per_token (flops_rule="model": LM head and attention
included). Each run is one ordinary `gptjax train` workdir under OUT/runs/NAME, so an
interrupted run resumes from its checkpoint and a finished one (its metrics.jsonl
holds the final step's val_loss) is skipped. Results go to OUT/results.{csv,json}.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import io
import json
import logging
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from gptjax import config as config_lib
from gptjax.config import Config, ConfigError, SweepConfig
from gptjax.files import write_text_atomic

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a sweep: its config overrides and its accounting."""

    name: str
    overrides: tuple[str, ...]  # "section.field=value", applied after the base file
    n_layer: int
    d_model: int
    n_head: int
    lr: float
    steps: int
    tokens: int  # D: tokens actually trained on (steps x batch tokens)
    params: int  # N: non-embedding parameters
    params_total: int
    flops: float  # C by the sweep's flops_rule
    budget: float  # the isoFLOP budget this run belongs to; 0 in grid mode


@dataclasses.dataclass(frozen=True)
class Sweep:
    config_path: str
    base_overrides: tuple[str, ...]
    out: Path
    rule: SweepConfig
    runs: tuple[Run, ...]

    def workdir(self, run: Run) -> Path:
        return self.out / "runs" / run.name

    def command(self, run: Run) -> list[str]:
        """`gptjax train ...` for one run: the base overrides, then the run's."""
        flags = [f"--config.{o}" for o in (*self.base_overrides, *run.overrides)]
        return [
            "gptjax", "train", "--config", self.config_path,
            "--workdir", str(self.workdir(run)), *flags,
        ]  # fmt: skip

    def config(self, run: Run) -> Config:
        return config_lib.load(self.config_path, [*self.base_overrides, *run.overrides])


# ----------------------------------------------------------------------------- parsing

_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}


def parse_quantity(text: str) -> float:
    """'500k', '2.5M', '1e12', '3B' -> float."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([kmgbt]?)\s*", text.lower())
    if not m:
        raise ConfigError(f"not a number: {text!r} (examples: 500k, 2.5M, 1e12)")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def parse_list(text: str, integer: bool = False) -> list:
    values = [parse_quantity(t) for t in text.split(",") if t.strip()]
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"expected a comma-separated list of positive numbers, got {text!r}")
    if integer:
        if any(v != int(v) for v in values):
            raise ConfigError(f"expected whole numbers, got {text!r}")
        values = [int(v) for v in values]
    return values


def _fmt(x: float) -> str:
    """Short filesystem-safe number: 1500000 -> 1.5M, 3e12 -> 3e12."""
    if x >= 1e9:
        mant, exp = f"{x:.2e}".split("e")
        return f"{float(mant):g}e{int(exp)}"
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:g}"


def sweep_overrides(rule: SweepConfig, items: Sequence[str]) -> SweepConfig:
    """Apply 'field=value' strings to a SweepConfig (typed, unknown fields fail)."""
    types_ = typing.get_type_hints(SweepConfig)
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--sweep.{item}: expected --sweep.FIELD=VALUE")
        if key not in types_:
            raise ConfigError(f"unknown sweep key {key!r}: fields are {', '.join(types_)}")
        value = config_lib.coerce(text, types_[key], f"sweep.{key}")
        rule = dataclasses.replace(rule, **{key: value})
    return rule


def load_sweep_config(config_path: str | Path, items: Sequence[str] = ()) -> SweepConfig:
    """SweepConfig from the base file's optional get_sweep_config(), then overrides."""
    path = Path(config_path)
    rule = SweepConfig()
    if path.is_file():
        spec = importlib.util.spec_from_file_location(f"gptjax_sweep_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        get = getattr(module, "get_sweep_config", None)
        if get is not None:
            rule = get()
            if not isinstance(rule, SweepConfig):
                raise ConfigError(f"{path}: get_sweep_config() did not return a SweepConfig")
    return sweep_overrides(rule, items)


# ----------------------------------------------------------------------------- planning


def shape_for_width(rule: SweepConfig, d_model: int) -> tuple[int, int]:
    """(n_layer, n_head) for a width, by the fixed aspect ratio and head size."""
    if d_model % rule.head_dim:
        raise ConfigError(f"width {d_model} is not a multiple of head_dim={rule.head_dim}")
    return max(1, round(d_model / rule.aspect_ratio)), d_model // rule.head_dim


def lr_for_width(rule: SweepConfig, base: Config, d_model: int) -> float:
    base_lr = rule.base_lr or base.optim.lr
    base_width = rule.base_width or base.model.d_model
    power = {"constant": 0.0, "inverse_width": 1.0, "inverse_sqrt_width": 0.5}[rule.lr_rule]
    return base_lr * (base_width / d_model) ** power


def _model_overrides(base: Config, d_model: int, n_layer: int, n_head: int) -> list[str]:
    m = base.model
    out = [f"model.d_model={d_model}", f"model.n_layer={n_layer}", f"model.n_head={n_head}"]
    out.append("model.d_head=0")
    # Keep the base's FFN ratio (0 means 4 x d_model already).
    out.append(f"model.d_ff={0 if not m.d_ff else round(m.d_ff * d_model / m.d_model)}")
    return out


def _accounting(cfg: Config) -> tuple[int, int, float]:
    """(non-embedding params, total params, training FLOPs per token)."""
    from flax import nnx

    from gptjax import model

    _, state = model.abstract_model(cfg.model)
    total = model.param_count(nnx.to_pure_dict(state))
    return model.non_embedding_params(cfg.model), total, model.flops_per_token(cfg.model)


def _with_vocab(cfg: Config, vocab_size: int) -> Config:
    if cfg.model.vocab_size:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))


def plan(
    config_path: str,
    base_overrides: Sequence[str],
    rule: SweepConfig,
    widths: Sequence[int],
    out: str | Path,
    *,
    tokens: Sequence[float] = (),
    budgets: Sequence[float] = (),
    vocab_size: int = 0,
) -> Sweep:
    """The runs of a grid (widths x tokens) or isoFLOP (widths x budgets) sweep.

    vocab_size is the tokenizer's (used when the base config leaves model.vocab_size 0)
    for parameter and FLOP counts.
    """
    if bool(tokens) == bool(budgets):
        raise ConfigError("give either --tokens (grid sweep) or --isoflop (budgets), not both")
    if not widths:
        raise ConfigError("no model sizes: give --sizes (d_model values)")
    base = config_lib.load(config_path, base_overrides)
    if not base.model.vocab_size and not vocab_size:
        raise ConfigError("the vocabulary size is unknown: set model.vocab_size or a tokenizer")
    tokens_per_step = base.train.batch_size * base.model.seq_len
    if base.train.batch_ramp_start:
        raise ConfigError("sweeps count tokens as steps x batch: use a base without batch ramp")
    runs = []
    for d_model in sorted(set(widths)):
        n_layer, n_head = shape_for_width(rule, d_model)
        lr = lr_for_width(rule, base, d_model)
        shape = _model_overrides(base, d_model, n_layer, n_head)
        cfg = config_lib.load(config_path, [*base_overrides, *shape])
        n, n_total, flops_tok = _accounting(_with_vocab(cfg, vocab_size))
        per_token = 6.0 * n if rule.flops_rule == "6N" else flops_tok
        targets = [(d, 0.0) for d in tokens] + [(c / per_token, c) for c in budgets]
        for want_tokens, budget in targets:
            steps = max(1, round(want_tokens / tokens_per_step))
            d = steps * tokens_per_step
            tpp = d / n
            if steps < rule.min_steps:
                log.info(
                    "d_model=%d on %d tokens: %d steps < min_steps, dropped", d_model, d, steps
                )
                continue
            if budget and (
                (rule.min_tokens_per_param and tpp < rule.min_tokens_per_param)
                or (rule.max_tokens_per_param and tpp > rule.max_tokens_per_param)
            ):
                continue
            name = (f"C{_fmt(budget)}_" if budget else "") + f"d{d_model}_L{n_layer}_D{_fmt(d)}"
            run_overrides = [*shape, f"optim.lr={lr:.6g}", f"train.steps={steps}"]
            if rule.warmup_fraction:
                run_overrides.append(f"optim.warmup_steps={round(rule.warmup_fraction * steps)}")
            runs.append(
                Run(
                    name=name,
                    overrides=tuple(run_overrides),
                    n_layer=n_layer,
                    d_model=d_model,
                    n_head=n_head,
                    lr=float(f"{lr:.6g}"),
                    steps=steps,
                    tokens=d,
                    params=n,
                    params_total=n_total,
                    flops=per_token * d,
                    budget=budget,
                )
            )
    if not runs:
        raise ConfigError("the sweep has no runs left (see min_steps and tokens-per-param bounds)")
    runs.sort(key=lambda r: (r.budget, r.tokens if not r.budget else 0, r.d_model))
    sweep = Sweep(config_path, tuple(base_overrides), Path(out), rule, tuple(runs))
    for run in runs:  # every run's config must load: unknown keys and bad shapes fail now
        sweep.config(run)
    return sweep


def shared_overrides(config_path: str, base_overrides: Sequence[str], out: Path) -> list[str]:
    """One tokenizer and one token cache for all runs, under OUT, unless the base sets them.

    Trains the SentencePiece model once (here) when the base would train one per run.
    """
    from gptjax import data

    cfg = config_lib.load(config_path, base_overrides)
    extra = []
    if not cfg.data.cache_dir:
        extra.append(f"data.cache_dir={out / 'token_cache'}")
    if not cfg.tokenizer.path:
        if cfg.tokenizer.kind != "sentencepiece":
            raise ConfigError("tokenizer.kind=gpt2 needs tokenizer.path")
        out.mkdir(parents=True, exist_ok=True)
        data.get_tokenizer(cfg, out)  # trains OUT/tokenizer.model the first time
        extra.append(f"tokenizer.path={out / 'tokenizer.model'}")
    return extra


def tokenizer_vocab(config_path: str, overrides: Sequence[str]) -> int:
    from gptjax.tokenizer import load_tokenizer

    cfg = config_lib.load(config_path, overrides)
    return load_tokenizer(cfg.tokenizer).vocab_size


# ----------------------------------------------------------------------------- running

RUN_RECORD = "sweep_run.json"


def _check_record(sweep: Sweep, run: Run) -> None:
    """A workdir belongs to one run spec; reusing OUT for a different sweep is an error."""
    path = sweep.workdir(run) / RUN_RECORD
    spec = {"config": sweep.config_path, "overrides": [*sweep.base_overrides, *run.overrides]}
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"{path} is damaged ({e}); delete it if that run directory belongs to this "
                f"sweep's {run.name} (or delete the run directory, or use another --out)"
            ) from None
        if stored != spec:
            raise ConfigError(
                f"{path.parent} holds a run with other settings than this sweep's {run.name}; "
                "use another --out (or delete that run directory)"
            )
        return
    write_text_atomic(path, json.dumps(spec, indent=2) + "\n")


def result_of(sweep: Sweep, run: Run) -> dict | None:
    """The run's final val_loss, and its few-shot metrics (eval/TASK/METRIC, from
    train.eval_tasks), from its metrics.jsonl; None if it has not finished."""
    from gptjax.metrics import read_metrics

    workdir = sweep.workdir(run)
    status = workdir / "diverged"
    if status.is_file():
        return {"val_loss": float("nan"), "status": "diverged"}
    final = [r for r in read_metrics(workdir) if r.get("step") == run.steps and "val_loss" in r]
    if not final:
        return None
    fewshot = {k: v for k, v in final[-1].items() if k.startswith("eval/")}
    return {"val_loss": float(final[-1]["val_loss"]), "status": "done", **fewshot}


def run_all(sweep: Sweep) -> list[dict]:
    """Train the unfinished runs one after another in this process, then collect.

    Finished runs are skipped; an interrupted run resumes from its checkpoint. A run
    whose loss goes non-finite is recorded as diverged and the sweep goes on.
    """
    from gptjax import train
    from gptjax.workdir import claim

    with claim(sweep.out, "sweep"):  # one sweep at a time in its directory
        for i, run in enumerate(sweep.runs):
            _check_record(sweep, run)
            if result_of(sweep, run) is not None:
                print(f"[{i + 1}/{len(sweep.runs)}] {run.name}: finished, skipped", flush=True)
                continue
            command = " ".join(sweep.command(run))
            print(f"[{i + 1}/{len(sweep.runs)}] {run.name}: {command}", flush=True)
            try:
                train.train(sweep.config(run), sweep.workdir(run))
            except train.NonFiniteLoss as e:
                print(f"{run.name}: diverged ({e})", flush=True)
                write_text_atomic(sweep.workdir(run) / "diverged", str(e) + "\n")
            write_results(sweep)
        return write_results(sweep)


def print_commands(sweep: Sweep, stream=None) -> None:
    import shlex

    stream = stream or sys.stdout
    for run in sweep.runs:
        _check_record(sweep, run)
        print(shlex.join(sweep.command(run)), file=stream)


# ----------------------------------------------------------------------------- results

COLUMNS = (
    "name", "n_layer", "d_model", "n_head", "lr", "steps", "params", "params_total",
    "tokens", "flops", "budget", "val_loss", "status",
)  # fmt: skip


def collect(sweep: Sweep) -> list[dict]:
    rows = []
    for run in sweep.runs:
        row = {k: v for k, v in dataclasses.asdict(run).items() if k in COLUMNS}
        result = result_of(sweep, run) or {"val_loss": None, "status": "pending"}
        rows.append({**row, **result})
    return rows


def write_results(sweep: Sweep) -> list[dict]:
    """OUT/results.json and OUT/results.csv: one row per run, pending ones included."""
    rows = collect(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": sweep.config_path,
        "overrides": list(sweep.base_overrides),
        "sweep": dataclasses.asdict(sweep.rule),
        "columns": {
            "params": "N, non-embedding parameters",
            "params_total": "all parameters (padded embedding included)",
            "tokens": "D, training tokens",
            "flops": f"C, training FLOPs by flops_rule={sweep.rule.flops_rule}",
            "budget": "isoFLOP budget the run belongs to (0: grid run)",
            "val_loss": "final validation loss (nats/token)",
            "eval/TASK/METRIC": "few-shot metric at the final step (train.eval_tasks)",
        },
        "runs": rows,
    }
    write_text_atomic(sweep.out / "results.json", json.dumps(meta, indent=2) + "\n")
    columns = (*COLUMNS, *sorted({k for r in rows for k in r if k.startswith("eval/")}))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    write_text_atomic(sweep.out / "results.csv", table.getvalue())
    return rows


def format_table(rows: Sequence[dict]) -> str:
    head = (
        f"{'name':<28} {'L':>2} {'d':>4} {'N':>9} {'N_tot':>9} {'D':>9} {'C':>9} {'lr':>8} val_loss"
    )
    lines = [head]
    for r in rows:
        loss = "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        lines.append(
            f"{r['name']:<28} {r['n_layer']:>2} {r['d_model']:>4} {r['params']:>9,} "
            f"{r['params_total']:>9,} {r['tokens']:>9,} {r['flops']:>9.3g} {r['lr']:>8.3g} {loss}"
        )
    return "\n".join(lines)


def format_plan(sweep: Sweep) -> str:
    rows = [{**dataclasses.asdict(r), "val_loss": None} for r in sweep.runs]
    return format_table(rows)


def single_process(cfg: Config) -> None:
    """Refuse to be one of several processes (coordinates from the config or the
    environment, as launch/local.sh gives them): each process would run the whole sweep
    alone, all at once in the same directories. A sweep's runs go multi-process as its
    printed `gptjax train` commands, each started with a launcher."""
    from gptjax.distributed import explicit_args

    n = explicit_args(cfg.distributed).get("num_processes", 1)
    if n > 1:
        raise ConfigError(
            f"gptjax sweep runs as a single process, not as one of {n}: give --print-commands "
            "and start each `gptjax train` command with a launcher (launch/README.md)"
        )


def make(
    config_path: str,
    base_overrides: Sequence[str],
    sweep_items: Sequence[str],
    sizes: str,
    out: str | Path,
    *,
    tokens: str = "",
    isoflop: str = "",
) -> Sweep:
    """The sweep of the command line: rule, shared tokenizer/cache, then the plan."""
    out = Path(out)
    rule = load_sweep_config(config_path, sweep_items)
    single_process(config_lib.load(config_path, base_overrides))  # and fail on bad overrides
    base_overrides = [*base_overrides, *shared_overrides(config_path, base_overrides, out)]
    cfg = config_lib.load(config_path, base_overrides)
    vocab = cfg.model.vocab_size or tokenizer_vocab(config_path, base_overrides)
    return plan(
        config_path,
        base_overrides,
        rule,
        parse_list(sizes, integer=True) if sizes else [],
        out,
        tokens=parse_list(tokens) if tokens else (),
        budgets=parse_list(isoflop) if isoflop else (),
        vocab_size=vocab,
    )
