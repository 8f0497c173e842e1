"""`gptjax plan`: ahead-of-time memory accounting of the real train step on simulated
CPU devices, the mesh search, and the command line."""

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from gptjax import config as config_lib
from gptjax import plan as plan_lib
from gptjax.config import Config, ConfigError, ModelConfig, TrainConfig
from gptjax.model import abstract_model, param_count
from gptjax.sharding import parse_mesh

REPO = Path(__file__).resolve().parent.parent


def tiny(microbatches: int = 2) -> Config:
    model = ModelConfig(vocab_size=256, seq_len=32, n_layer=1, d_model=64, n_head=4)
    train = TrainConfig(batch_size=16, microbatches=microbatches)
    return config_lib.validate(Config(model=model, train=train))


@pytest.fixture(scope="module")
def plans() -> dict:
    """Plans of the tiny config at a few layouts, compiled once for the module."""
    cfg = tiny()
    layouts = {"dp": (4, 2, 1), "fsdp": (1, 8, 1), "tp": (2, 2, 2)}
    return {k: plan_lib.plan(cfg, plan_lib.Layout(*v)) for k, v in layouts.items()}


def test_state_bytes_are_the_shard_sizes_and_what_xla_sees(plans):
    cfg = tiny()
    p = plans["dp"]  # data=4, fsdp=2: every matrix has a d_model ("embed") axis -> fsdp
    _, abstract = abstract_model(cfg.model)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract))
    n = param_count([a for _, a in leaves])
    # The weight matrices (w*) have a d_model ("embed") axis, split over fsdp=2; norms
    # and biases have none and are replicated.
    vectors = sum(math.prod(a.shape) for path, a in leaves if not path[-1].key.startswith("w"))
    assert p.params == 4 * (n - vectors) // 2 + 4 * vectors
    # AdamW: two f32 moments shaped like the parameters, plus int32 step counters.
    assert 0 <= p.opt_state - 2 * p.params <= 16
    # XLA's own count of the step's inputs: state + the int32 batch, per device.
    batch = cfg.train.batch_size // 8 * (cfg.model.seq_len + 1) * 4
    step_and_rng = p.xla["argument"] - batch - p.params - p.opt_state
    assert 0 <= step_and_rng <= 16
    # Donation: the new state reuses the old one's buffers, so it is counted once.
    assert p.xla["alias"] == p.params + p.opt_state + step_and_rng
    assert p.total == p.xla["argument"] + p.xla["output"] - p.xla["alias"] + p.xla["temp"]
    assert p.total == p.params + p.opt_state + p.temporaries


def test_more_fsdp_shards_less_memory_per_device(plans):
    dp, fsdp = plans["dp"], plans["fsdp"]  # same 8 devices, same per-device batch
    assert fsdp.params < dp.params and fsdp.opt_state < dp.opt_state
    assert fsdp.total < dp.total
    tp = plans["tp"]  # tensor=2 splits heads and MLP too
    assert tp.params < dp.params


def test_step_time_from_flops_and_mfu(plans):
    from gptjax.metrics import DEVICES
    from gptjax.model import flops_per_token

    cfg, p = tiny(), plans["fsdp"]
    h100 = DEVICES["NVIDIA H100 80GB HBM3"]
    tokens = cfg.train.batch_size * cfg.model.seq_len
    expect = flops_per_token(cfg.model) * tokens / (8 * h100.peak_flops * 0.4)
    assert p.step_seconds == pytest.approx(expect)
    assert p.fits and p.hbm == h100.hbm_bytes


def test_extrapolation_over_data_replicas_matches_the_real_compile(plans):
    """A mesh too big to simulate is compiled with fewer data replicas and the same
    per-device shapes: here 8 devices compiled as 4 give the 8-device numbers."""
    p = plan_lib.plan(tiny(), plan_lib.Layout(4, 2, 1), max_compile_devices=4)
    assert p.extrapolated and "data=2,fsdp=2,tensor=1" in p.method
    real = plans["dp"]
    assert (p.params, p.opt_state) == (real.params, real.opt_state)
    assert p.total == pytest.approx(real.total, rel=0.02)


def test_bad_meshes_are_clear_errors():
    with pytest.raises(plan_lib.PlanError, match="does not divide the 8 devices"):
        plan_lib.resolve_layout(parse_mesh("data=3,fsdp=-1"), 8)
    with pytest.raises(plan_lib.PlanError, match="-1 axis: give --devices"):
        plan_lib.resolve_layout(parse_mesh("fsdp=-1"), None)
    with pytest.raises(ConfigError, match="not one of data=N"):
        parse_mesh("pipeline=2")
    assert plan_lib.resolve_layout(parse_mesh("fsdp=-1,tensor=2"), 16) == (plan_lib.Layout(1, 8, 2))
    with pytest.raises(plan_lib.PlanError, match="does not split over data\\*fsdp=16"):
        plan_lib.plan(tiny(), plan_lib.Layout(2, 8, 1))  # microbatch of 8 sequences
    with pytest.raises(plan_lib.PlanError, match="tensor=8 does not divide model.n_head=4"):
        plan_lib.plan(tiny(), plan_lib.Layout(1, 1, 8))
    with pytest.raises(plan_lib.PlanError, match="needs 16 devices but jax has 8"):
        plan_lib.plan(tiny(microbatches=1), plan_lib.Layout(1, 16, 1), max_compile_devices=4096)
    with pytest.raises(plan_lib.PlanError, match="unknown device 'h1000'"):
        plan_lib.plan(tiny(), plan_lib.Layout(1, 8, 1), device="h1000")


def test_search_finds_the_smallest_mesh_that_fits_a_budget(plans):
    """Budget between the 8-device plans and the 1-device state: the search must go past
    the meshes that do not fit, return one that does, and fail below every candidate."""
    cfg = tiny()
    budget = int(plans["fsdp"].total * 1.05)  # fits on 8 devices with fsdp
    kwargs = dict(hbm=budget, usable=1.0, max_devices=8, remats=("none", "full"), log=print)
    best, tried = plan_lib.search(cfg, **kwargs)
    assert best is not None and best.fits and best.total <= budget
    # The budget is below what one device needs: the search had to go past 1 device,
    # and some candidate it compiled was measured over budget.
    assert best.layout.devices > 1
    assert any(not p.fits and p.total > budget for p in tried)
    # Nothing on fewer devices fit, and what was compiled there was measured over budget.
    smaller = [p for p in tried if p.layout.devices < best.layout.devices]
    assert all(not p.fits and p.total > budget for p in smaller)
    assert best.overrides(cfg)[:3] == [
        f"--config.mesh.data={best.layout.data}",
        f"--config.mesh.fsdp={best.layout.fsdp}",
        f"--config.mesh.tensor={best.layout.tensor}",
    ]
    # A budget below the smallest state shard: nothing fits, and nothing is compiled.
    none, tried = plan_lib.search(cfg, **{**kwargs, "hbm": 1024})
    assert none is None and tried == []


def test_cli_plans_with_its_own_device_count():
    """The command sets the simulated device count itself (16 here; the tests run with 8)
    before jax starts, and exits 0 when the plan fits, 2 on a bad mesh."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(REPO)
    base = [
        sys.executable, "-m", "gptjax", "plan", "--config", str(REPO / "configs/quickstart.py"),
        "--config.model.vocab_size=256", "--config.model.n_layer=1", "--config.model.d_model=64",
        "--config.train.batch_size=16", "--device", "v5p",
    ]  # fmt: skip
    out = subprocess.run(
        [*base, "--mesh", "data=2,fsdp=8"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "mesh data=2,fsdp=8,tensor=1 (16 devices)" in out.stdout
    assert "v5p (TPU v5): 95.0 GiB" in out.stdout and "FITS" in out.stdout
    bad = subprocess.run(
        [*base, "--mesh", "data=3,fsdp=-1", "--devices", "16"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "does not divide the 16 devices" in bad.stderr


def test_cli_in_a_process_whose_jax_has_too_few_devices_reruns_fresh(capfd, monkeypatch):
    """Here jax already runs with 8 devices; a 16-device plan re-runs the command in a
    fresh process, which sets its own device count (and reports the bad mesh)."""
    from gptjax import cli

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    argv = ["plan", "--config", str(REPO / "configs/quickstart.py")]
    argv += ["--config.model.vocab_size=256", "--mesh", "data=3,fsdp=-1", "--devices", "16"]
    assert cli.main(argv) == 2
    assert "does not divide the 16 devices" in capfd.readouterr().err
