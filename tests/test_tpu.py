"""TPU programs compiled by the real TPU compiler (libtpu, the `tpu` extra) without a TPU:
the train step for v5e:2x2 and for two slices of it, what crosses the slice axis, and
that no XLA:CPU workaround reaches a TPU program."""

import collections
import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from gptjax import config as config_lib
from gptjax import plan, sharding, tpu, xla_cpu
from gptjax.config import Config, MeshConfig, ModelConfig, TrainConfig

pytestmark = pytest.mark.skipif(not tpu.available(), reason=tpu.LIBTPU_MISSING)
REPO = Path(__file__).resolve().parent.parent


def tiny(microbatches: int = 2, **model_kw) -> Config:
    kw = {"n_layer": 2, "d_model": 128, "n_head": 4, **model_kw}
    m = ModelConfig(vocab_size=512, seq_len=64, compute_dtype="bfloat16", **kw)
    return config_lib.validate(
        Config(model=m, train=TrainConfig(batch_size=32, microbatches=microbatches))
    )


def test_v5e_train_step_compiled_by_libtpu_with_exact_state_shards():
    cfg = tiny()
    layout = plan.Layout(1, 4, 1)
    p = tpu.plan_tpu(cfg, layout, "v5e:2x2")
    assert p.compiler.startswith("libtpu ") and p.method == "compiled"
    assert p.device == "TPU v5e (TPU v5 lite)" and p.hbm == 16 * 2**30 and p.fits
    # Parameters and optimizer state are the exact shard sizes of the derived shardings.
    assert (p.params, p.opt_state) == plan.state_bytes(cfg, layout)
    assert "compiled by libtpu" in p.notes[0] and "4 chips" in p.notes[0]
    # Compiled FLOPs, scaled for the loops cost_analysis counts once, agree with the
    # analytic count to within what it leaves out (softmax, norms, optimizer).
    ratio = float(p.notes[1].split("ratio ")[1].split()[0])
    assert 1.0 < ratio < 1.25


def test_two_slices_reduce_gradients_across_dcn_once_per_step():
    cfg = tiny(microbatches=4)
    cfg = dataclasses.replace(cfg, mesh=MeshConfig(data=2, fsdp=4, tensor=1, slices=2))
    devices = tpu.topology_devices("v5e:2x2", 2)
    layout = plan.Layout(2, 4, 1)
    mesh = tpu.tpu_mesh(layout, devices, slices=2)
    assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
    compiled, _ = plan.compile_step(cfg, layout, mesh=mesh)
    found = collections.Counter(tpu.collectives(compiled.as_text(), mesh))
    crossing = {k: n for k, n in found.items() if k[1]}
    # Only all-reduces (the gradient sum and the loss/metrics) cross, none inside the
    # microbatch loop; parameters are gathered within a slice only.
    assert crossing and all(op == "all-reduce" and not loop for op, _, loop in crossing)
    assert any(op == "all-gather" and not crosses for op, crosses, _ in found)


def test_tpu_program_has_none_of_the_cpu_forms():
    cfg = tiny(microbatches=1)
    layout = plan.Layout(1, 4, 1)
    devices = tpu.topology_devices("v5e:2x2")
    compiled, _ = plan.compile_step(cfg, layout, mesh=tpu.tpu_mesh(layout, devices))
    text = compiled.as_text()
    assert xla_cpu.CPU_SCOPE not in text
    # The same step for a CPU mesh (not under portable lowering) carries them, and
    # XLA:CPU's step options: the check above can fail.
    from gptjax import train
    from gptjax.optim import make_optimizer

    mesh = sharding.make_mesh(MeshConfig(1, 4, 1), jax.devices("cpu")[:4])
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    with jax.set_mesh(mesh):
        graphdef, abstract, sh = train.state_shardings(cfg, mesh, tx)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             abstract, sh)  # fmt: skip
        batch_sh = sharding.batch_sharding(mesh, 3, batch_dim=1)
        batch = jax.ShapeDtypeStruct((1, 32, 65), "int32", sharding=batch_sh)
        step = train.jit_step(train.make_train_step(cfg, graphdef, tx), mesh, sh, batch_sh)
        cpu_text = step.lower(state, batch).compile().as_text()
    assert xla_cpu.CPU_SCOPE in cpu_text


def test_torus_refuses_a_mesh_and_plan_says_so():
    devices = tpu.topology_devices("v5e:4x4")
    assert tpu.mesh_fits_torus(plan.Layout(1, 4, 4), devices)
    with pytest.raises(plan.PlanError, match="v5e:4x4 has 16 chips"):
        tpu.plan_tpu(tiny(), plan.Layout(1, 8, 1), "v5e:4x4")


def test_cli_plan_tpu_exit_status_and_lines(tmp_path):
    cmd = [sys.executable, "-m", "gptjax", "plan", "--config", "configs/gpt2/124m.py",
           "--config.model.n_layer=2", "--config.model.d_model=128", "--config.model.n_head=4",
           "--config.model.seq_len=64", "--config.train.batch_size=16",
           "--config.train.microbatches=1", "--mesh", "fsdp=4", "--tpu", "v5e:2x2"]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "compiled by libtpu" in out.stdout and "FITS" in out.stdout
    assert "TPU_ACCELERATOR_TYPE" not in out.stderr + out.stdout  # libtpu kept quiet
    bad = subprocess.run([*cmd[:-1], "v9x:2x2"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "generation must be one of" in bad.stderr


@pytest.mark.parametrize("topology", ["v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_topology_device_kinds_have_peaks(topology):
    """The device kinds libtpu's topologies report are keys of the MFU peak table."""
    from gptjax import metrics

    kind = tpu.topology_devices(topology)[0].device_kind
    assert metrics.peak_for_kind(kind) and metrics.device_info(kind).hbm_bytes


def test_tpu_scoring_program_holds_the_weights_once():
    """GPT-3's alternating dense/banded layers: off the CPU the scoring program slices
    each layer's weights inside the layer loop. Split into one stacked array per window
    before the loop (the XLA:CPU form), libtpu copied them: a 175B evaluation's
    temporaries held a second 40 GiB of weights per chip of 8."""
    from gptjax import inference_plan

    cfg = tiny(n_layer=8, d_model=2048, n_head=8, attention_windows=(0, 16))
    layout = plan.Layout(1, 1, 4)
    mesh = tpu.tpu_mesh(layout, tpu.topology_devices("v5e:2x2"))
    ev = inference_plan.plan_step(cfg, "eval", mesh, 8, 16 * 2**30, 0.9)
    assert ev.xla["temp"] < 0.25 * ev.params  # the split form: 0.51


def test_eval_and_decode_programs_compile_for_tpu():
    from gptjax import inference_plan

    cfg = tiny()
    layout = plan.Layout(1, 4, 1)
    mesh = tpu.tpu_mesh(layout, tpu.topology_devices("v5e:2x2"))
    hbm = 16 * 2**30
    ev = inference_plan.plan_step(cfg, "eval", mesh, 32, hbm, 0.9)
    params_bf16 = sum(plan.state_bytes(cfg, layout)[:1]) // 2  # f32 parameters -> bf16
    assert ev.fits and ev.params == params_bf16 and ev.xla["temp"] > 0
    for step, batch in (("eval", 32), ("decode", 8)):  # none of the XLA:CPU forms
        compiled, _, _ = inference_plan.compile_step(cfg, step, mesh, batch)
        assert xla_cpu.CPU_SCOPE not in compiled.as_text()
    dec = inference_plan.plan_step(cfg, "decode", mesh, 8, hbm, 0.9)
    m = cfg.model
    cache = 2 * m.n_layer * (8 // 4) * m.kv_heads * m.seq_len * m.head_dim * 2  # K and V, bf16
    assert dec.xla["argument"] >= params_bf16 + cache
    assert dec.xla["alias"] >= cache  # the cache is donated: updated in place
