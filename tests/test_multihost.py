"""Several JAX processes on one machine (launch/local.sh: CPU devices, gloo collectives).

Which losses must be bit-identical, and why:
- 2 processes x 4 devices vs 1 process x 8 devices, same mesh: the same global batches
  land on the same devices (the data position is global, each process reads its rows of
  each global batch) and the collectives are the same gloo ones; the 1-process reference
  therefore also runs under jax.distributed (`local.sh 1`). Without jax.distributed one
  process uses XLA's in-process all-reduce, which sums in another order: measured 1-ulp
  loss differences, so that comparison gets the same tolerance as a mesh change.
- A checkpoint written by 2 processes is bitwise the one written by 1 process, so its
  continuation in 1 process on another mesh is bitwise the continuation of the 1-process
  checkpoint on that mesh. Against the uninterrupted run (another mesh, so other
  reduction orders) it is close, not equal: rtol 1e-5, as in test_train's reshard test.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from processes import free_port, kill_and_check_survivor

from gptjax.checkpoint import Checkpointer, checkpoint_dir, load_params
from gptjax.config import ConfigError, DistributedConfig
from gptjax.data import TokenWindows, eval_batches, train_iterator
from gptjax.distributed import explicit_args, initialize
from gptjax.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "launch" / "local.sh"
KEYS = ("loss", "grad_norm", "lr", "val_loss")  # not the timings
HEARTBEAT = 20  # seconds; a dead process is declared dead after this


def config_flags(sp_model: Path, corpus: Path, token_cache: Path) -> list[str]:
    """A tiny model on Tiny Shakespeare: 8 steps, checkpoints at 4 and 8."""
    fields = {
        "tokenizer.path": sp_model,
        "data.sources": corpus,
        "data.cache_dir": token_cache,
        "model.seq_len": 16,
        "model.n_layer": 1,
        "model.d_model": 32,
        "model.n_head": 2,
        "optim.warmup_steps": 2,
        "optim.decay_steps": 8,
        "train.steps": 8,
        "train.batch_size": 16,
        "train.log_every": 1,
        "train.eval_every": 4,
        "train.eval_batches": 1,
        "train.sample_tokens": 0,
        "checkpoint.every_steps": 4,
    }
    return ["--config", str(REPO / "configs" / "quickstart.py")] + [
        f"--config.{k}={v}" for k, v in fields.items()
    ]


def env(devices: int) -> dict:
    out = dict(os.environ)
    out.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHON=sys.executable,
        JAX_COMPILATION_CACHE_DIR=os.environ.get(
            "GPTJAX_TEST_COMPILE_CACHE", str(REPO / ".jax_cache")
        ),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        out.pop(var, None)
    return out


def run(cmd: list, devices: int, timeout: float = 240) -> str:
    out = subprocess.run(
        [str(c) for c in cmd], env=env(devices), capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def local(n: int, devices: int, workdir: Path, flags: list[str]) -> str:
    return run([LOCAL, n, "train", "--workdir", workdir, *flags], devices)


def single(workdir: Path, flags: list[str]) -> str:
    """One process, 8 devices, no jax.distributed."""
    return run([sys.executable, "-m", "gptjax", "train", "--workdir", workdir, *flags], 8)


def curves(workdir: Path, after: int = 0) -> dict[int, dict]:
    return {
        r["step"]: {k: r[k] for k in r if k in KEYS or k.startswith("eval/")}
        for r in read_metrics(workdir)
        if r["step"] > after
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sp_model, corpus, token_cache, shared_data):
    """The same 8 steps (mesh data=8) as 2 processes x 4 devices and as 1 process x 8,
    scoring a text and 8 HellaSwag questions at steps 4 and 8."""
    root = tmp_path_factory.mktemp("multihost")
    flags = config_flags(sp_model, corpus, token_cache)
    # Evaluation during training: every process scores its rows of each batch (a text's
    # perplexities, so that any difference shows, and 8 HellaSwag questions).
    lm = root / "lm.jsonl"
    text = corpus.read_text()
    lm.write_text("".join(json.dumps({"text": text[i : i + 300]}) + "\n" for i in (0, 3000)))
    hellaswag = shared_data / "hellaswag" / "hellaswag_val_first200.txt"
    two_flags = [*flags, f"--config.train.eval_tasks=hellaswag={hellaswag}:0:8,lm={lm}"]
    out = local(2, 4, root / "two", two_flags)
    assert "[0] gptjax:" in out and "[1] gptjax:" not in out  # process 0 alone reports
    local(1, 8, root / "one", two_flags)
    return root, flags


def test_two_processes_train_like_one(runs):
    root, _ = runs
    two, one = curves(root / "two"), curves(root / "one")
    assert sorted(two) == list(range(1, 9))
    assert [s for s in two if "eval/hellaswag/acc_norm" in two[s]] == [4, 8]
    assert [s for s in two if "eval/lm/bits_per_byte" in two[s]] == [4, 8]
    assert two == one  # bitwise: every loss, gradient norm, learning rate, val loss, eval/*
    assert not (root / "two" / "metrics.jsonl.tmp").exists()
    # Only process 0 writes metrics and TensorBoard events; every process saved its shards.
    assert len(list((root / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert Checkpointer(checkpoint_dir(root / "two")).steps() == [4, 8]
    for step in (4, 8):
        _, params2, _ = load_params(root / "two" / "checkpoints" / str(step))
        _, params1, _ = load_params(root / "one" / "checkpoints" / str(step))
        for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params1), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the saved bits


def test_plain_single_process_is_close(runs, tmp_path):
    """Without jax.distributed (in-process all-reduce) the run differs in the last bits."""
    root, flags = runs
    single(tmp_path, [*flags, "--config.train.steps=4"])
    got, want = curves(tmp_path), curves(root / "two")
    for step, rec in got.items():
        for k, v in rec.items():
            np.testing.assert_allclose(v, want[step][k], rtol=1e-5, err_msg=f"{k} at {step}")


def test_two_process_checkpoint_resumes_in_one_process_on_another_mesh(runs, tmp_path):
    root, flags = runs
    mesh_b = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    for name in ("two", "one"):  # keep only step 4, continue to 8 on mesh B, one process
        shutil.copytree(root / name, tmp_path / name)
        shutil.rmtree(tmp_path / name / "checkpoints" / "8")
        out = single(tmp_path / name, [*flags, *mesh_b])
        assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in out and "steps 4->8" in out
    resumed = curves(tmp_path / "two", after=4)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert resumed == curves(tmp_path / "one", after=4)  # bitwise: same restored bits
    kept = {s: r for s, r in curves(root / "two").items() if s <= 4}
    assert curves(tmp_path / "two") == kept | resumed  # metrics.jsonl: 1-4 kept, 5-8 redone
    uninterrupted = curves(root / "two", after=4)
    for step, rec in resumed.items():  # another mesh: other reduction orders
        for k, v in rec.items():
            np.testing.assert_allclose(v, uninterrupted[step][k], rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_a_dead_process_stops_the_others(runs, tmp_path, victim):
    """SIGKILL one process mid-run (process 0 also hosts the coordination service): the
    other exits on its own (no launcher kills it), non-zero, with a clear error, in
    bounded time. Two ways, both seen: in a collective, gloo's connection to the dead
    process breaks and gptjax exits at once (status 1); otherwise JAX's coordination
    service misses the dead process's heartbeats for distributed.heartbeat_timeout
    seconds (or loses its service) and JAX aborts the process (SIGABRT)."""
    _, flags = runs
    long = ("train.steps", "train.eval_every", "checkpoint.every_steps")  # train steps only
    flags = [*flags, *(f"--config.{k}=100000" for k in long)]
    base = env(4) | {
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
        "JAX_NUM_PROCESSES": "2",
    }
    cmd = [sys.executable, "-m", "gptjax", "train", "--workdir", str(tmp_path), *flags]
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen(
            cmd + [f"--config.distributed.heartbeat_timeout={HEARTBEAT}"],
            env=base | {"JAX_PROCESS_ID": str(i)},
            stdout=subprocess.DEVNULL,
            stderr=logs[i].open("w"),
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 240
        while last_step(tmp_path) < 2:
            assert all(p.poll() is None for p in procs), [f.read_text()[-2000:] for f in logs]
            assert time.monotonic() < deadline, "no step 2 in 240 s"
            time.sleep(0.1)
        kill_and_check_survivor(procs, logs, victim, HEARTBEAT + 40)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def last_step(workdir: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(workdir)), default=0)
    except ValueError:  # a line being written
        return 0


def test_local_sh_stops_everyone_when_one_fails(tmp_path):
    """The launcher alone (a fake interpreter, no JAX): process 1 fails, process 0 would
    run forever; local.sh kills it and exits with process 1's status."""
    fake = tmp_path / "fake_python"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = -c ]; then exec "{sys.executable}" "$@"; fi\n'  # local.sh's free port
        'echo "args $* / $JAX_PROCESS_ID of $JAX_NUM_PROCESSES at $JAX_COORDINATOR_ADDRESS'
        ' / $XLA_FLAGS"\n'
        'if [ "$JAX_PROCESS_ID" = 1 ]; then sleep 1; exit 7; fi\n'
        f'echo $$ > "{tmp_path}/pid0"\n'
        "exec sleep 600\n"
    )
    fake.chmod(0o755)
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e |= {"PYTHON": str(fake), "LOCAL_KILL_GRACE": "2"}
    start = time.monotonic()
    out = subprocess.run(
        [str(LOCAL), "2", "train", "--x"], env=e, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 7, out
    assert time.monotonic() - start < 30
    assert "[1] args -m gptjax train --x / 1 of 2 at 127.0.0.1:" in out.stdout, out.stdout
    assert "--xla_force_host_platform_device_count=4" in out.stdout  # the default
    assert "process 1 failed first: status 7; stopping the others" in out.stderr
    pid0 = int((tmp_path / "pid0").read_text())
    assert not Path(f"/proc/{pid0}").exists()  # process 0 was killed, not left behind


def test_local_sh_blames_a_killed_process_not_the_one_failing_after_it(tmp_path):
    """Process 1 is killed (-9); process 0, whose collectives break, exits 1 as soon as
    process 1 is dead (a zombie): local.sh names process 1 and SIGKILL, exits 137."""
    fake = tmp_path / "fake_python"
    p1 = tmp_path / "pid1"
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = -c ]; then exec "{sys.executable}" "$@"; fi\n'  # local.sh's free port
        f'if [ "$JAX_PROCESS_ID" = 1 ]; then echo $$ > "{p1}"; sleep 0.5; kill -9 $$; fi\n'
        f'while [ ! -s "{p1}" ]; do sleep 0.01; done\n'
        f'p=$(cat "{p1}")\n'
        "while [ -e /proc/$p ] && ! grep -q ') Z' /proc/$p/stat; do :; done\n"
        "exit 1\n"
    )
    fake.chmod(0o755)
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHON": str(fake)}
    out = subprocess.run([str(LOCAL), "2", "train"], env=e, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 137, out
    assert "local.sh: process 1 failed first: status 137 (SIGKILL)" in out.stderr, out.stderr


def test_local_sh_keeps_the_xla_flags_given_and_4_devices_by_default(tmp_path):
    """XLA_FLAGS without a device count keep their flags and still give 4 CPU devices
    per process; an explicit count is kept. PYTHON is a stand-in that, instead of
    `-m gptjax ...`, prints XLA_FLAGS and what jax makes of them."""
    fake = tmp_path / "fake_python"
    probe = 'import os, jax; print("flags", os.environ["XLA_FLAGS"], "/", jax.local_device_count())'
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = -c ]; then exec "{sys.executable}" "$@"; fi\n'  # local.sh's free port
        f"exec \"{sys.executable}\" -c '{probe}'\n"
    )
    fake.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    base |= {"PYTHON": str(fake)}
    other = "--xla_cpu_multi_thread_eigen=false"
    cases = [
        (2, other, f"flags {other} --xla_force_host_platform_device_count=4 / 4"),
        (1, "--xla_force_host_platform_device_count=2", "flags --xla_force_host_platform_device_count=2 / 2"),
    ]  # fmt: skip
    for n, flags, want in cases:
        out = subprocess.run(
            [str(LOCAL), str(n), "train"], env=base | {"XLA_FLAGS": flags},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        lines = sorted(line for line in out.stdout.splitlines() if " flags " in line)
        assert lines == [f"[{i}] {want}" for i in range(n)], out.stdout + out.stderr


def test_coordinates_come_from_the_config_then_the_environment():
    environ = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
        "JAX_LOCAL_DEVICE_IDS": "0,1",
    }
    assert explicit_args(DistributedConfig(num_processes=4, process_id=0), environ) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 0,
        "local_device_ids": [0, 1],
    }
    assert explicit_args(DistributedConfig(), {}) == {}  # left to JAX's cluster detection
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID='one'"):
        explicit_args(DistributedConfig(), {"JAX_PROCESS_ID": "one"})


def test_without_coordinates_or_cluster_a_run_is_one_process():
    # Here JAX's backend may already be up (other tests): too late to join others either way.
    assert not initialize(DistributedConfig(), environ={})
    assert not initialize(DistributedConfig(initialize="no"), environ={})
    assert jax.process_count() == 1


def as_process(monkeypatch, index: int, count: int) -> None:
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


def test_process_rows_make_up_the_one_process_batches(monkeypatch):
    """Process p's batches are rows [p*b, (p+1)*b) of the one-process global batches
    (epochs crossed included), and the saved position resumes on another process count."""
    src = TokenWindows([np.arange(20 * 4 + 1)], 4, "train", "t")
    whole = train_iterator(src, 6, seed=3)
    want = [next(whole) for _ in range(8)]  # 48 windows: 2.4 epochs of 20
    val = eval_batches(src, 6, 3)
    parts, evals, states = [], [], []
    for p in range(3):
        as_process(monkeypatch, p, 3)
        it = train_iterator(src, 6, seed=3)
        parts.append([next(it) for _ in range(5)])
        states.append(it.get_state())
        evals.append(eval_batches(src, 6, 3))
    for k in range(5):
        np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), want[k])
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([e[k] for e in evals]), val[k])
    assert states[0] == states[1] == states[2]  # one position for the whole run
    as_process(monkeypatch, 0, 1)
    resumed = train_iterator(src, 6, seed=3)
    resumed.set_state(states[0])
    for k in range(5, 8):
        np.testing.assert_array_equal(next(resumed), want[k])


@contextlib.contextmanager
def training_under_local_sh(workdir: Path, flags: list[str], log: Path):
    """local.sh 2 training for ever (its output in `log`, in its own process group),
    yielded once it has logged step 2; killed on the way out if still running."""
    long = ("train.steps", "train.eval_every", "checkpoint.every_steps")
    cmd = [str(LOCAL), "2", "train", "--workdir", str(workdir), *flags]
    cmd += [f"--config.{k}=100000" for k in long]
    proc = subprocess.Popen(cmd, env=env(4) | {"LOCAL_KILL_GRACE": "5"}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while last_step(workdir) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no step 2 in 240 s"
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_local_sh_blames_the_first_process_to_die(tmp_path, sp_model, corpus, token_cache):
    """kill -9 of process 1: local.sh names process 1 and SIGKILL and exits 137; the
    survivor, whose collectives fail, prints one line and no traceback."""
    log = tmp_path / "local.log"
    flags = config_flags(sp_model, corpus, token_cache)
    with training_under_local_sh(tmp_path / "w", flags, log) as proc:
        pids = re.findall(r"local.sh: process \d of 2: pid (\d+)", log.read_text())
        os.kill(int(pids[1]), signal.SIGKILL)
        proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 137, out[-3000:]
    assert "local.sh: process 1 failed first: status 137 (SIGKILL); stopping the others" in out
    survivor = [line for line in out.splitlines() if line.startswith("[0] ")]
    assert not any("Traceback" in line for line in survivor), out[-3000:]
    assert len([line for line in survivor if line.startswith("[0] gptjax: process")]) <= 1


def test_sigterm_to_local_sh_saves_one_step_on_every_process(
    tmp_path, sp_model, corpus, token_cache
):
    """SIGTERM (a scheduler's preemption notice) to launch/local.sh 2: every process
    stops at the same step and saves it (launch/README.md, Preemption), status 143."""
    log = tmp_path / "local.log"
    flags = config_flags(sp_model, corpus, token_cache)
    with training_under_local_sh(tmp_path / "w", flags, log) as proc:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=200)
    out = log.read_text()
    assert proc.returncode == 143, out[-3000:]
    steps = Checkpointer(checkpoint_dir(tmp_path / "w")).steps()
    assert len(steps) == 1, out[-3000:]
    for i in range(2):  # each process reports the same step, saved
        assert f"[{i}] gptjax: SIGTERM at step {steps[0]}: checkpoint saved" in out, out[-3000:]
    # Both processes wrote their part: the step restores in one process.
    _, params, _ = load_params(tmp_path / "w")
    assert jax.tree.leaves(params)
