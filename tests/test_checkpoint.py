"""Every reader of checkpoints (generate, eval, convert, train.init_from, finetune's init,
predict) falls back past torn steps to the newest intact one, naming each torn step and
file; with nothing intact it is one line and status 2. Healthy reads say nothing."""

import dataclasses
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from gptjax import cli, train
from gptjax import finetune as ft
from gptjax.checkpoint import load_params
from gptjax.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TokenizerConfig,
    TrainConfig,
)
from gptjax.generate import load as load_for_generation

REPO = Path(__file__).resolve().parent.parent


def tear(workdir: Path) -> dict[int, str]:
    """Tear steps 8, 6 and 4 of a workdir three ways; returns the file each one names."""
    steps = workdir / "checkpoints"
    config = steps / "8" / "config" / "metadata"  # a config record cut short
    config.write_text(config.read_text()[:10])
    (steps / "6" / "state" / "_METADATA").write_text("")  # the arrays' index emptied
    arrays = [f for f in (steps / "4" / "state").rglob("*") if f.is_file() and "d" in f.parent.name]
    assert arrays
    for f in arrays:  # the arrays' data truncated
        f.write_bytes(b"")
    return {8: f"{steps}/8/config/metadata", 6: f"{steps}/6/state/_METADATA", 4: f"{steps}/4/state"}


@pytest.fixture(scope="module")
def torn(tmp_path_factory, corpus, sp_model, token_cache):
    """(a workdir whose steps 8, 6, 4 are torn and step 2 intact, the named files)."""
    cfg = Config(
        model=ModelConfig(seq_len=32, n_layer=1, d_model=32, n_head=2),
        tokenizer=TokenizerConfig(path=str(sp_model)),
        data=DataConfig(sources=(str(corpus),), cache_dir=str(token_cache)),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        train=TrainConfig(steps=8, batch_size=8, log_every=2, eval_batches=1, sample_tokens=0),
        checkpoint=CheckpointConfig(every_steps=2, keep=4, async_save=False),
        mesh=MeshConfig(data=-1),
    )
    workdir = tmp_path_factory.mktemp("torn")
    train.train(cfg, workdir)
    return workdir, tear(workdir)


def assert_warned(caplog, named: dict[int, str]) -> None:
    for step, file in named.items():
        assert f"checkpoint step {step} is torn ({file}" in caplog.text, caplog.text
    assert "using step 2 of" in caplog.text


def same_tree(a, b) -> None:
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_generate_falls_back_to_the_newest_intact_step(torn, capsys, caplog):
    workdir, named = torn
    args = ["--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--format", "ids"]
    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(workdir / "checkpoints/2"), *args]) == 0
    want = capsys.readouterr().out
    assert "_CHECKPOINT_METADATA" not in caplog.text  # a healthy read says nothing
    assert cli.main(["generate", "--checkpoint", str(workdir), *args]) == 0
    assert capsys.readouterr().out == want
    assert_warned(caplog, named)


def test_eval_convert_and_init_from_read_the_newest_intact_step(torn, tmp_path, caplog):
    workdir, named = torn
    _, want, _ = load_params(workdir / "checkpoints" / "2")
    assert "_CHECKPOINT_METADATA" not in caplog.text
    # generate.load is what gptjax eval (EvalModel.load) and lm-eval's adapter call.
    same_tree(load_for_generation(workdir).params, want)
    assert_warned(caplog, named)
    caplog.clear()
    out = tmp_path / "hf"
    argv = ["convert", "--to", "hf-gpt2", "--input", str(workdir), "--output", str(out)]
    assert cli.main(argv) == 0
    from safetensors.numpy import load_file

    wte = load_file(out / "model.safetensors")["transformer.wte.weight"]
    np.testing.assert_array_equal(wte, np.asarray(want["wte"], np.float32)[: len(wte)])
    assert_warned(caplog, named)
    # train.init_from with lr 0: the new run's parameters are step 2's.
    caplog.clear()
    sp = load_for_generation(workdir).tokenizer
    cfg = Config(
        model=ModelConfig(seq_len=32, n_layer=1, d_model=32, n_head=2, vocab_size=sp.vocab_size),
        data=DataConfig(sources=(str(REPO / "README.md"),), cache_dir=str(tmp_path / "tc")),
        optim=OptimConfig(lr=0.0, warmup_steps=1),
        train=TrainConfig(
            steps=1, batch_size=8, eval_batches=1, sample_tokens=0, init_from=str(workdir)
        ),  # fmt: skip
        mesh=MeshConfig(data=-1),
    )
    train.train(cfg, tmp_path / "init")
    assert_warned(caplog, named)
    _, got, _ = load_params(tmp_path / "init")
    same_tree(got, want)


def test_finetune_init_falls_back_and_predict_with_nothing_intact_is_one_line(
    torn, shared_data, tmp_path, capsys, caplog
):
    workdir, named = torn
    cfg = ft.load_config(REPO / "configs" / "finetune" / "sst2.py")
    cfg = dataclasses.replace(
        cfg,
        task=dataclasses.replace(cfg.task, train=str(shared_data / "sst2" / "stsa.binary.train"),
                                 dev=str(shared_data / "sst2" / "glue_sst2_dev.tsv"),
                                 max_train=16, max_dev=16),
        finetune=dataclasses.replace(cfg.finetune, init_from=str(workdir), batch_size=16,
                                     epochs=1, length_bucket=32),
    )  # fmt: skip
    ft.finetune(cfg, tmp_path / "ft")
    assert_warned(caplog, named)
    # predict reads the best epoch's checkpoint (kept alone): torn, nothing is left.
    best = next((tmp_path / "ft" / "best" / "checkpoints").glob("[0-9]*"))
    (best / "config" / "metadata").write_text("{")
    capsys.readouterr()
    argv = ["predict", "--checkpoint", str(tmp_path / "ft"), "--task",
            f"sst2={shared_data / 'sst2' / 'glue_sst2_dev.tsv'}", "--output", str(tmp_path / "p")]  # fmt: skip
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gptjax:")]
    assert err == [
        f"gptjax: no intact checkpoint in {tmp_path / 'ft' / 'best'}: step {best.name}: "
        f"{best}/config/metadata: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)"
    ], err
    assert not (tmp_path / "p").exists()


def test_nothing_intact_is_one_line_and_status_2(torn, tmp_path, capsys):
    workdir, named = torn
    copy = tmp_path / "w"
    shutil.copytree(workdir / "checkpoints", copy / "checkpoints")
    (copy / "checkpoints" / "2" / "tokenizer" / "metadata").write_text('{"kind": ')
    capsys.readouterr()
    argv = ["--prompt-ids", "1", "--max-new-tokens", "2", "--format", "ids"]
    rc = cli.main(["generate", "--checkpoint", str(copy), *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("gptjax:")]
    assert len(lines) == 1 and lines[0].startswith(f"gptjax: no intact checkpoint in {copy}: ")
    for step in (8, 6, 4, 2):
        assert f"step {step}: {copy}/checkpoints/{step}/" in lines[0]
