"""Meshes: equivalence with one device, derived shardings, the replication check."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import model, sharding, train
from gptjax.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from gptjax.optim import make_optimizer

CFG = Config(
    model=ModelConfig(vocab_size=250, seq_len=32, n_layer=2, d_model=64, n_head=4, n_kv_head=2),
    optim=OptimConfig(lr=3e-3, warmup_steps=2),
    train=TrainConfig(batch_size=16, microbatches=2, steps=6),
)
STEPS = 6


def _losses(mesh_cfg: MeshConfig, devices=None) -> list[float]:
    cfg = dataclasses.replace(CFG, mesh=mesh_cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        graphdef, _, sh = train.state_shardings(cfg, mesh, tx)
        state = train.init_state(cfg, mesh, tx, sh)
        batch_sh = NamedSharding(mesh, P(None, sharding.RULES["batch"], None))
        step = jax.jit(
            train.make_train_step(cfg, graphdef, tx),
            in_shardings=(sh, batch_sh),
            out_shardings=(sh, None),
            donate_argnums=0,
        )
        # One fixed batch, so the loss visibly falls (memorisation) within a few steps.
        batch = jax.device_put(rng.integers(0, 250, (2, 8, 33)).astype(np.int32), batch_sh)
        losses = []
        for _ in range(STEPS):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
    return losses


@pytest.fixture(scope="module")
def single_device_losses():
    return _losses(MeshConfig(1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_mesh_matches_single_device(shape, single_device_losses):
    losses = _losses(MeshConfig(*shape))
    assert single_device_losses[-1] < single_device_losses[0]  # it trained
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape(MeshConfig(-1, 2, 2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(MeshConfig(1, -1, 1), 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="does not divide"):
        sharding.mesh_shape(MeshConfig(-1, 3, 1), 8)
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape(MeshConfig(-1, -1, 1), 8)
    with pytest.raises(ValueError, match="8 are present"):
        sharding.mesh_shape(MeshConfig(2, 2, 1), 8)


def test_shardings_derived_from_logical_axes():
    cfg = CFG.model
    mesh = sharding.make_mesh(MeshConfig(1, 2, 4))
    _, abstract = model.abstract_model(cfg)
    sh = sharding.param_shardings(abstract, mesh)
    assert sh["wte"].spec == P("tensor", "fsdp")
    assert sh["blocks"]["attn"]["wq"].spec == P(None, "fsdp", "tensor", None)
    assert sh["blocks"]["mlp"]["w_out"].spec == P(None, "tensor", "fsdp")
    # kv_heads=2 does not divide tensor=4: that dimension falls back to replicated.
    assert sh["blocks"]["attn"]["wk"].spec == P(None, "fsdp", None, None)
    assert sh["blocks"]["norm1"]["scale"].spec == P(None, None)


def test_replication_check_reports_large_replicated_params():
    # d_model=36 is not divisible by fsdp=8, so "embed" cannot be split anywhere.
    cfg = dataclasses.replace(CFG.model, d_model=36, n_head=4, n_kv_head=0, d_ff=40)
    mesh = sharding.make_mesh(MeshConfig(1, 8, 1))
    _, abstract = model.abstract_model(cfg)
    sh = sharding.param_shardings(abstract, mesh)
    params = jax.tree.map(lambda v: v, {"w": np.zeros((36, 40))})
    found = sharding.check_replication(params, {"w": NamedSharding(mesh, P())}, mesh, min_size=100)
    assert found == [("['w']", 1440)]
    real = sharding.check_replication(
        jax.tree.map(lambda s: np.zeros(s.shape), _pure_shapes(abstract)), sh, mesh, min_size=1000
    )
    assert any("wte" in path for path, _ in real)
    ok = sharding.make_mesh(MeshConfig(8, 1, 1))
    assert sharding.check_replication(params, {"w": NamedSharding(ok, P())}, ok) == []


def _pure_shapes(abstract):
    from flax import nnx

    return nnx.to_pure_dict(abstract)


def test_one_mesh_syntax_and_the_deprecated_alias(caplog):
    """parse_mesh reads data=/fsdp=/tensor= (left out: 1, -1: the rest); the old D,F,T
    form gives the same MeshConfig with a one-line deprecation warning; bad text is a
    ConfigError naming the part; make_mesh from text takes the first devices it needs."""
    from gptjax.config import ConfigError

    assert sharding.parse_mesh("data=2,fsdp=-1") == MeshConfig(2, -1, 1)
    assert sharding.parse_mesh("tensor=4") == MeshConfig(1, 1, 4)
    assert not caplog.records
    assert sharding.parse_mesh("-1,2,1") == MeshConfig(-1, 2, 1)
    assert "deprecated: write --mesh data=-1,fsdp=2,tensor=1" in caplog.text
    for bad, why in [("pipe=2", "not one of data=N"), ("data=x", "needs an integer size")]:
        with pytest.raises(ConfigError, match=why):
            sharding.parse_mesh(bad)
    assert dict(sharding.make_mesh("fsdp=2,tensor=2").shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    assert sharding.make_mesh("data=-1").size == jax.device_count()
    with pytest.raises(ConfigError, match="--mesh 'data=16': mesh"):
        sharding.make_mesh("data=16")
