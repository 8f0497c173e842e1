"""`gptjax eval` as several JAX processes (launch/local.sh: CPU devices, gloo), and the
weights it reads: in the scoring dtype, each process only its shards.

Both sides of the bitwise comparison run under jax.distributed (`local.sh 1` for the
one-process reference), as in test_multihost: the same mesh, the same requests in the
same batches, the same collectives.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from processes import free_port, kill_and_check_survivor

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "launch" / "local.sh"


@pytest.fixture(scope="module")
def ckpt(gpt2_checkpoint):
    return gpt2_checkpoint(seq_len=64, n_layer=2)


def env(devices: int) -> dict:
    out = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    }
    return out | {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }


def eval_args(ckpt, data: Path, out: Path) -> list[str]:
    return [
        "eval", "--checkpoint", str(ckpt),
        "--task", f"hellaswag={data / 'hellaswag' / 'hellaswag_val_first200.txt'}",
        "--task", f"piqa={data / 'piqa' / 'valid_first200.jsonl'}",
        "--limit", "12", "--shots", "0,1", "--batch-size", "8", "--mesh", "data=2,fsdp=2,tensor=2",
        "--output", str(out / "results.json"), "--log-samples", str(out / "samples.jsonl"),
    ]  # fmt: skip


def test_two_processes_score_like_one(ckpt, shared_data, tmp_path):
    """2 processes x 4 devices and 1 process x 8, mesh data=2,fsdp=2,tensor=2 (parameters sharded over
    both processes): every loglikelihood bitwise equal; only process 0 writes."""
    logs = {}
    for n in (2, 1):
        out = tmp_path / f"p{n}"
        cmd = [str(LOCAL), str(n), *eval_args(ckpt, shared_data, out)]
        run = subprocess.run(cmd, env=env(8 // n), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        logs[n] = run.stdout
    assert "[0] wrote" in logs[2] and "[1] wrote" not in logs[2]
    assert "[1] hellaswag" not in logs[2]  # the table: process 0 alone prints it

    def samples(n):
        lines = (tmp_path / f"p{n}" / "samples.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    two, one = samples(2), samples(1)
    assert len(two) == 2 * 2 * 12
    assert [s["loglikelihoods"] for s in two] == [s["loglikelihoods"] for s in one]
    assert two == one
    results = [json.loads((tmp_path / f"p{n}" / "results.json").read_text()) for n in (2, 1)]
    assert results[0]["meta"]["processes"] == 2 and results[1]["meta"]["processes"] == 1
    timings = ("seconds", "examples_per_s")
    for a, b in zip(results[0]["results"], results[1]["results"], strict=True):
        assert {k: v for k, v in a.items() if k not in timings} == {
            k: v for k, v in b.items() if k not in timings
        }


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_a_dead_process_ends_the_evaluation(ckpt, shared_data, tmp_path, victim):
    """SIGKILL one process while both score (after the first task's result): the other
    leaves on its own, non-zero, with one line naming the failure, in seconds when it
    is in a collective with the dead one (the coordination service's heartbeat, 100 s
    by default, catches a process waiting elsewhere)."""
    base = env(4) | {
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}",
        "JAX_NUM_PROCESSES": "2",
    }
    args = eval_args(ckpt, shared_data, tmp_path)
    args[args.index("--limit") + 1] = "24"
    args[args.index("--shots") + 1] = "0,1,2,3,4,5"
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gptjax", *args],
            env=base | {"JAX_PROCESS_ID": str(i)},
            stdout=subprocess.DEVNULL,
            stderr=logs[i].open("w"),
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 480
        while "hellaswag K=0:" not in logs[0].read_text():
            assert all(p.poll() is None for p in procs), [f.read_text()[-2000:] for f in logs]
            assert time.monotonic() < deadline, "no first result in 480 s"
            time.sleep(0.1)
        kill_and_check_survivor(procs, logs, victim, 140)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_weights_read_in_the_scoring_dtype_onto_their_shardings(ckpt):
    """--dtype bfloat16 reads a float32 checkpoint straight into bfloat16 arrays on the
    mesh shardings; the scores move by little (docs/eval.md gives the measured drift)."""
    from gptjax.config import MeshConfig
    from gptjax.eval.scoring import EvalModel
    from gptjax.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    f32 = EvalModel.load(ckpt, mesh=mesh, batch_size=8)
    bf16 = EvalModel.load(ckpt, mesh=mesh, batch_size=8, dtype="bfloat16")
    assert f32.cfg.compute_dtype == "float32"  # default: the checkpoint's compute dtype
    assert bf16.cfg.compute_dtype == bf16.cfg.param_dtype == "bfloat16"
    for a, b in zip(
        jax.tree.leaves(f32.scorer.params), jax.tree.leaves(bf16.scorer.params), strict=True
    ):
        assert a.dtype == np.float32 and b.dtype == jax.numpy.bfloat16
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a).astype(jax.numpy.bfloat16), np.asarray(b))
    pairs = [("The cat sat on the", " mat"), ("One, two,", " three")]
    got = [ll for ll, _, _ in bf16.loglikelihood(pairs)]
    want = [ll for ll, _, _ in f32.loglikelihood(pairs)]
    assert got != want
    np.testing.assert_allclose(got, want, rtol=0.02)


def test_compile_cache_on_by_default_in_the_user_cache_dir(ckpt, shared_data, tmp_path):
    """A fresh `gptjax eval` keeps its compiled programs in $XDG_CACHE_HOME/gptjax/jax,
    a second run finds them there; --no-compile-cache keeps none."""
    from gptjax.eval.compile_cache import compile_cache_dir

    assert compile_cache_dir({"HOME": "/h"}) == Path("/h/.cache/gptjax/jax")
    args = [
        sys.executable, "-m", "gptjax", "eval", "--checkpoint", str(ckpt),
        "--task", f"piqa={shared_data / 'piqa' / 'valid_first200.jsonl'}", "--limit", "2",
    ]  # fmt: skip
    base = env(1)
    base.pop("JAX_COMPILATION_CACHE_DIR", None)
    for off in (False, True):
        home = tmp_path / ("off" if off else "on")
        cmd = args + ["--no-compile-cache"] * off
        out = subprocess.run(
            cmd, env=base | {"XDG_CACHE_HOME": str(home)}, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        cache = home / "gptjax" / "jax"
        if off:
            assert not cache.exists()
        else:
            entries = sorted(p.name for p in cache.iterdir())
            assert entries, "nothing cached"


ADAPTER = """
import json, sys
from lm_eval.api.instance import Instance
from gptjax.eval.lm_eval_adapter import GptjaxLM
from gptjax.eval import loaders

ckpt, data, out = sys.argv[1:4]
lm = GptjaxLM(checkpoint=ckpt, batch_size=8, mesh="data=2,fsdp=2,tensor=2")
examples = loaders.load_hellaswag(data + "/hellaswag/hellaswag_val_first200.txt")[:10]
pairs = [r for ex in examples for r in ex.requests()]
lls = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
text = open(data + "/tinyshakespeare/input.txt").read()[:600]
[rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
if lm.is_writer:
    json.dump({"loglikelihood": lls, "rolling": rolling}, open(out, "w"))
"""


def test_lm_eval_adapter_two_processes_score_like_one(ckpt, shared_data, tmp_path):
    """lm-eval's model "gptjax" under jax.distributed: the same script in 2 processes x 4
    devices scores every request bitwise as 1 process x 8 (mesh data=2,fsdp=2,tensor=2,
    parameters sharded over both processes); only process 0 writes."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    port = free_port()
    outs = {}
    for n in (2, 1):
        procs = []
        for i in range(n):
            out = tmp_path / f"adapter_{n}_{i}.json"
            e = env(8 // n) | {"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
            if n > 1:
                e |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                      "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(i)}  # fmt: skip
            cmd = [sys.executable, "-c", ADAPTER, str(ckpt), str(shared_data), str(out)]
            procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))  # fmt: skip
        for p in procs:
            log = p.communicate(timeout=600)[0]
            assert p.returncode == 0, log[-3000:]
        outs[n] = [tmp_path / f"adapter_{n}_{i}.json" for i in range(n)]
    assert outs[2][0].exists() and not outs[2][1].exists()  # process 0 alone writes
    two, one = (json.loads(outs[n][0].read_text()) for n in (2, 1))
    assert len(two["loglikelihood"]) == 40
    assert two == one
