"""Optimizer: decay mask, schedule, gradient accumulation, batch ramp; light imports."""

import dataclasses
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import model, sharding, train
from gptjax.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from gptjax.optim import decay_mask, lr_schedule, make_optimizer

CFG = Config(
    model=ModelConfig(
        vocab_size=64, seq_len=16, n_layer=2, d_model=32, n_head=4, tie_embeddings=False
    ),
    optim=OptimConfig(lr=1e-3, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1),
    train=TrainConfig(steps=200, batch_size=8),
)


def test_decay_mask_spares_biases_norms_and_embeddings():
    params = model.init_params(CFG.model, jax.random.key(0))
    mask = decay_mask(params)
    assert mask["blocks"]["attn"]["wq"] and mask["blocks"]["mlp"]["w_out"] and mask["lm_head"]
    assert not mask["blocks"]["attn"]["bq"] and not mask["blocks"]["mlp"]["b_in"]
    assert not mask["blocks"]["norm1"]["scale"] and not mask["norm_f"]["bias"]
    assert not mask["wte"] and not mask["wpe"]
    assert decay_mask(params, decay_embeddings=True)["wte"]


def test_schedule_warmup_cosine_floor():
    lr = lr_schedule(CFG.optim, CFG.train.steps)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5e-3)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(0.55e-3, rel=1e-4)  # halfway down the cosine
    assert float(lr(110)) == pytest.approx(1e-4)
    assert float(lr(190)) == pytest.approx(1e-4)  # stays at the floor after decay_steps


def _run_step(cfg, batch_KxBxL1):
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    with jax.set_mesh(mesh):
        graphdef, _, sh = train.state_shardings(cfg, mesh, tx)
        state = train.init_state(cfg, mesh, tx, sh)
        batch_sh = NamedSharding(mesh, P())
        step = jax.jit(train.make_train_step(cfg, graphdef, tx), in_shardings=(sh, batch_sh))
        new_state, metrics = step(state, batch_KxBxL1)
    return new_state, metrics


def test_gradient_accumulation_equals_the_full_batch():
    tokens = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
    one, m1 = _run_step(CFG, tokens[None])
    accumulated = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, microbatches=4))
    four, m4 = _run_step(accumulated, tokens.reshape(4, 2, 17))
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), one.params, four.params)


def test_batch_ramp_grows_in_whole_microbatches():
    cfg = dataclasses.replace(
        CFG,
        train=dataclasses.replace(
            CFG.train, batch_size=64, microbatches=8, batch_ramp_start=16, batch_ramp_steps=12
        ),
    )
    counts = [train.microbatches_at(cfg, s) for s in range(14)]
    assert counts[0] == 2 and counts[-1] == 8 and counts[12] == 8
    assert counts == sorted(counts)
    assert train.microbatches_at(CFG, 0) == 1


def test_importing_gptjax_does_not_import_reference_libraries():
    code = (
        "import sys, gptjax, gptjax.train, gptjax.cli, gptjax.generate, gptjax.convert;"
        "bad = [m for m in ('torch', 'transformers', 'lm_eval', 'tensorflow') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
