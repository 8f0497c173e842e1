"""Few-shot evaluation during training (train.eval_tasks): logged at every eval step from
the in-memory parameters, equal to a separate `gptjax eval` of that step's checkpoint;
a bad task spec is one line and exit 2; a sweep's few-shot metric is fitted against
compute (`gptjax scaling fit --metric`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptjax import cli, sweep, train
from gptjax import config as config_lib
from gptjax.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    SweepConfig,
    TokenizerConfig,
    TrainConfig,
)
from gptjax.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "configs" / "quickstart.py")


def tiny(corpus, sp_model, token_cache, eval_tasks) -> Config:
    return config_lib.validate(
        Config(
            # float32 parameters, bfloat16 compute: evaluation casts them as the
            # checkpoint read of a separate `gptjax eval` does
            model=ModelConfig(
                seq_len=64, n_layer=2, d_model=32, n_head=4, compute_dtype="bfloat16"
            ),
            tokenizer=TokenizerConfig(kind="sentencepiece", path=str(sp_model)),
            data=DataConfig(sources=(str(corpus),), cache_dir=str(token_cache)),
            optim=OptimConfig(lr=1e-2, warmup_steps=1),
            train=TrainConfig(
                steps=4,
                batch_size=8,
                log_every=1,
                eval_every=2,
                eval_batches=1,
                sample_tokens=0,
                eval_tasks=tuple(eval_tasks),
            ),  # fmt: skip
            checkpoint=CheckpointConfig(every_steps=2, keep=3, async_save=False),
        )
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, sp_model, token_cache, shared_data):
    """Four steps scoring HellaSwag (0-shot), PIQA (1-shot) and a text's bits per byte
    at steps 2 and 4, a checkpoint at each."""
    tmp = tmp_path_factory.mktemp("evaltrain")
    text = corpus.read_text()
    lm = tmp / "lm.jsonl"
    lm.write_text("".join(json.dumps({"text": text[i : i + 400]}) + "\n" for i in (0, 5000, 9000)))
    hellaswag = f"hellaswag={shared_data / 'hellaswag' / 'hellaswag_val_first200.txt'}"
    piqa = f"piqa={shared_data / 'piqa' / 'valid_first200.jsonl'}"
    specs = {"hellaswag": (hellaswag, 0), "piqa": (piqa, 1), "lm": (f"lm={lm}", 0)}
    cfg = tiny(corpus, sp_model, token_cache, [f"{hellaswag}:0:8", f"{piqa}:1:8", f"lm={lm}"])
    workdir = tmp / "run"
    train.train(cfg, workdir)
    return workdir, specs


def test_metrics_are_logged_at_every_eval_step_and_plotted(trained):
    workdir, _ = trained
    records = read_metrics(workdir)
    at = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in records}
    assert [s for s, values in at.items() if values] == [2, 4]
    assert {"eval/hellaswag/acc", "eval/hellaswag/acc_norm", "eval/piqa/acc",
            "eval/lm/bits_per_byte"} <= set(at[4])  # fmt: skip
    assert all(0.0 <= at[4][k] <= 1.0 for k in at[4] if "/acc" in k)
    # the parameters evaluated are the step's: training moved them
    assert at[2]["eval/lm/bits_per_byte"] != at[4]["eval/lm/bits_per_byte"]
    assert (workdir / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert (workdir / "loss.png").is_file()


def test_scores_equal_a_separate_eval_of_the_checkpoint(trained, tmp_path, capsys):
    workdir, specs = trained
    logged = {r["step"]: r for r in read_metrics(workdir)}
    for step in (2, 4):
        for name, (task, k) in specs.items():
            out = tmp_path / f"{name}_{step}.json"
            rc = cli.main([
                "eval", "--checkpoint", str(workdir / "checkpoints" / str(step)),
                "--task", task, "--shots", str(k), "--limit", "8", "--output", str(out),
            ])  # fmt: skip
            assert rc == 0
            (result,) = json.loads(out.read_text())["results"]
            separate = {m: s["value"] for m, s in result["metrics"].items()}
            during = {
                k.split("/")[2]: v for k, v in logged[step].items() if k.startswith(f"eval/{name}/")
            }
            assert during == separate, (name, step)
    capsys.readouterr()


def test_a_bad_task_spec_is_one_line_and_exit_2(tmp_path, corpus, sp_model, token_cache):
    def gptjax_train(spec):
        return subprocess.run(
            [sys.executable, "-m", "gptjax", "train", "--config", QUICKSTART,
             "--workdir", str(tmp_path / "run"), f"--config.train.eval_tasks={spec}",
             f"--config.data.sources={corpus}", f"--config.tokenizer.path={sp_model}"],
            capture_output=True, text=True, cwd=REPO,
            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
        )  # fmt: skip

    bad = gptjax_train("hellaswag=x.txt:0:0")  # LIMIT 0: refused as the config loads
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "gptjax: config error: train.eval_tasks: 'hellaswag=x.txt:0:0': LIMIT must be positive"
    ]
    missing = gptjax_train(f"piqa={tmp_path / 'nothing.jsonl'}")  # before any data work
    assert missing.returncode == 2
    (line,) = missing.stderr.strip().splitlines()
    assert line.startswith("gptjax: train.eval_tasks: 'piqa=") and "nothing.jsonl" in line
    assert not (tmp_path / "run").exists()

    cfg = tiny(corpus, sp_model, token_cache, [])
    for specs, why in (
        (["hellaswag=a:1", "hellaswag=b:2"], "more than once"),
        (["=x"], "not NAME"),
    ):
        with pytest.raises(ConfigError, match=why):
            config_lib.validate(config_lib.override(cfg, "train.eval_tasks", ",".join(specs)))
    with pytest.raises(ConfigError, match="unknown task 'nosuch'"):
        train.train(config_lib.override(cfg, "train.eval_tasks", "nosuch=x.jsonl"), tmp_path / "r")


def test_scaling_fit_of_a_fewshot_metric_recovers_the_planted_law(tmp_path, capsys):
    """A sweep whose runs logged eval/hellaswag/acc = 1 - (E + A / C^alpha): `gptjax
    sweep --collect` puts the metric in the results, `gptjax scaling fit --metric` finds
    E, A and alpha again."""
    rule = SweepConfig(head_dim=16, min_steps=1)
    base = ["model.seq_len=32", "train.batch_size=8"]
    s = sweep.plan(QUICKSTART, base, rule, [16, 32, 48, 64], tmp_path / "sweep",
                   tokens=[2e5, 1e6], vocab_size=512)  # fmt: skip
    planted = {"E": 0.35, "A": 40.0, "alpha": 0.12}
    for run in s.runs:
        acc = 1 - (planted["E"] + planted["A"] / run.flops ** planted["alpha"])
        record = {"step": run.steps, "loss": 3.0, "val_loss": 3.1, "eval/hellaswag/acc": acc}
        s.workdir(run).mkdir(parents=True)
        (s.workdir(run) / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    rows = sweep.write_results(s)
    assert all("eval/hellaswag/acc" in r for r in rows)
    assert "eval/hellaswag/acc" in (s.out / "results.csv").read_text().splitlines()[0]

    argv = ["scaling", "fit", str(s.out), "--metric", "eval/hellaswag/acc", "--budget", "1e15",
            "--bootstrap", "8"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 - acc = E + A / C^alpha" in printed and "at C = 1e+15" in printed
    fit = json.loads((s.out / "fit_eval_hellaswag_acc.json").read_text())
    assert fit["runs"] == 8
    for k, v in planted.items():
        assert fit["fit"][k] == pytest.approx(v, rel=0.02), k
    expected = 1 - (planted["E"] + planted["A"] / 1e15 ** planted["alpha"])
    assert fit["budget"]["eval/hellaswag/acc"] == pytest.approx(expected, abs=1e-3)
    assert (s.out / "eval_hellaswag_acc.png").read_bytes()[:4] == b"\x89PNG"

    # a metric the runs did not log, and one whose direction is unknown
    assert cli.main(["scaling", "fit", str(s.out), "--metric", "eval/piqa/acc"]) == 2
    assert "no run has 'eval/piqa/acc'" in capsys.readouterr().err
    assert cli.main(["scaling", "fit", str(s.out), "--metric", "eval/x/bogus"]) == 2
    assert "which way is better is unknown" in capsys.readouterr().err
    assert np.isfinite(fit["bootstrap"]["alpha"]["std"])
