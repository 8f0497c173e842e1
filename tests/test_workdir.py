"""One run owns a workdir: a second train/finetune/sweep there exits 2 naming the holder,
a dead holder's lock is gone, a read-only workdir is one line before any work."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptjax import cli
from gptjax.metrics import read_metrics
from gptjax.workdir import LOCK, claim

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "configs" / "quickstart.py")


def tiny_flags(sp_model: Path, corpus: Path, token_cache: Path, **extra) -> list[str]:
    fields = {
        "tokenizer.path": sp_model,
        "data.sources": corpus,
        "data.cache_dir": token_cache,
        "model.seq_len": 16,
        "model.n_layer": 1,
        "model.d_model": 32,
        "model.n_head": 2,
        "train.batch_size": 8,
        "train.log_every": 1,
        "train.eval_batches": 1,
        "train.sample_tokens": 0,
        **extra,
    }
    return ["--config", QUICKSTART, *(f"--config.{k}={v}" for k, v in fields.items())]


def env() -> dict:
    out = dict(os.environ)
    out |= {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": os.environ.get(
            "GPTJAX_TEST_COMPILE_CACHE", str(REPO / ".jax_cache")
        ),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    return out


def gptjax_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("gptjax:")]


def test_a_second_trainer_in_the_workdir_exits_2_naming_the_holder(
    tmp_path, sp_model, corpus, token_cache
):
    """Two real trainers, one workdir: the second exits 2 at once with one line naming the
    first's pid and host, and writes nothing; once the first is killed (-9) its lock is
    gone with it."""
    workdir = tmp_path / "w"
    long = {"train.steps": 100000, "train.eval_every": 100000, "checkpoint.every_steps": 100000}
    cmd = [sys.executable, "-m", "gptjax", "train", "--workdir", str(workdir)]
    cmd += tiny_flags(sp_model, corpus, token_cache, **long)
    first = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (workdir / "metrics.jsonl").exists() or not read_metrics(workdir):
            assert first.poll() is None, "the first run ended"
            assert time.monotonic() < deadline, "the first run made no step in 240 s"
            time.sleep(0.1)
        try:
            second = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("the second run did not stop: it trained in the first run's workdir")
        assert second.returncode == 2, second.stderr[-3000:]
        host = socket.gethostname()
        assert gptjax_lines(second.stderr) == [
            f"gptjax: workdir {workdir} is in use by another run: pid {first.pid} on host "
            f"{host} (gptjax train since " + gptjax_lines(second.stderr)[0].split(" since ")[1]
        ], second.stderr
        assert "Traceback" not in second.stderr
        steps = [r["step"] for r in read_metrics(workdir)]
        assert steps == sorted(set(steps))  # one writer
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with claim(workdir, "test"):  # the dead holder's lock went with it
        assert json.loads((workdir / LOCK).read_text())["pid"] == os.getpid()


def test_finetune_and_sweep_workdirs_are_locked(tmp_path, sp_model, capsys):
    """A held workdir stops `finetune` and `sweep --run` before they do anything."""
    ft, sw = tmp_path / "ft", tmp_path / "sw"
    with claim(ft, "train"), claim(sw, "train"):
        capsys.readouterr()
        argv = ["finetune", "--config", str(REPO / "configs/finetune/sst2.py")]
        argv += ["--workdir", str(ft), "--init-from", str(tmp_path / "missing")]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"workdir {ft} is in use by another run: pid {os.getpid()}" in err, err
        argv = ["sweep", "--config", QUICKSTART, "--sizes", "32", "--tokens", "2e4"]
        argv += ["--out", str(sw), "--run", f"--config.tokenizer.path={sp_model}"]
        argv += ["--config.train.batch_size=8", "--config.train.sample_tokens=0"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"workdir {sw} is in use by another run: pid {os.getpid()}" in err, err
        assert not list(sw.glob("runs/*/checkpoints"))


@contextlib.contextmanager
def read_only_dir(path: Path):
    """A directory that cannot be written: a read-only tmpfs where this user may mount
    (root ignores permissions), else mode 555."""
    path.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)])
        if done.returncode:
            pytest.skip("root, but cannot mount a read-only tmpfs here")
        try:
            yield path
        finally:
            subprocess.run(["umount", str(path)], check=True)
        return
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


def test_read_only_workdir_is_one_line_before_any_work(tmp_path, sp_model, capsys):
    """A missing data source would be a DataError: the read-only workdir is found first."""
    flags = tiny_flags(sp_model, tmp_path / "no_such_corpus.txt", tmp_path / "cache")
    with read_only_dir(tmp_path / "ro") as ro:
        for workdir in (ro, ro / "run"):  # the directory itself, or one to create in it
            capsys.readouterr()
            assert cli.main(["train", "--workdir", str(workdir), *flags]) == 2
            err = capsys.readouterr().err
            assert gptjax_lines(err) == [
                f"gptjax: workdir {workdir} is not writable: Read-only file system"
                if os.geteuid() == 0
                else f"gptjax: workdir {workdir} is not writable: Permission denied"
            ], err
    assert not (tmp_path / "cache").exists()


def test_a_held_workdir_stops_every_process_of_a_multi_process_run(
    tmp_path, sp_model, corpus, token_cache
):
    """launch/local.sh 2: process 0 finds the lock held, and both processes exit 2."""
    workdir = tmp_path / "w"
    e = env() | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHON": sys.executable}
    cmd = [str(REPO / "launch" / "local.sh"), "2", "train", "--workdir", str(workdir)]
    with claim(workdir, "train"):
        out = subprocess.run(cmd + tiny_flags(sp_model, corpus, token_cache), env=e,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert f"[0] gptjax: workdir {workdir} is in use by another run: pid {os.getpid()}" in text
    assert f"[1] gptjax: workdir {workdir} cannot be used (process 0 says why)" in text
