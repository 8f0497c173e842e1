"""XLA:CPU workarounds: exact, effective on CPU, and absent from a portable lowering."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import model, sharding, train, xla_cpu
from gptjax.config import MeshConfig, ModelConfig


def _params(cfg, seed=0):
    graphdef, _ = model.abstract_model(cfg)
    return graphdef, model.init_params(cfg, jax.random.key(seed))


def test_cotangent_barrier_is_exact_and_keeps_backward_fusions_narrow():
    """The residual stream's gradient is computed once per layer on CPU: no XLA loop
    fusion of the backward pass re-adds the gradient terms of all later layers (without
    the barrier the widest fusion of this 8-layer model reads 35 operands)."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 7)) * jnp.logspace(-30, 30, 7)
    g = jax.random.normal(jax.random.key(1), x.shape) * jnp.logspace(30, -30, 7)
    y, vjp = jax.vjp(xla_cpu.cotangent_barrier, x)
    (gx,) = jax.jit(vjp)(g)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(gx, g)

    cfg = ModelConfig(
        vocab_size=128, seq_len=32, n_layer=8, d_model=64, n_head=4,
        scan_layers=False, attention_impl="blocked",
    )  # fmt: skip
    graphdef, params = _params(cfg)
    tokens = jnp.zeros((4, cfg.seq_len), jnp.int32)

    def loss(p):
        return jax.nn.logsumexp(model.apply(graphdef, p, tokens), -1).mean()

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    widths = [m.group(1).count("%") for m in re.finditer(r"fusion\((.*?)\), kind=kLoop", hlo)]
    assert max(widths) < 2 * cfg.n_layer, f"a backward fusion reads {max(widths)} operands"


def test_cpu_projection_matches_einsum_and_avoids_transposed_operand_dots():
    """xla_cpu.project's CPU backward gives the einsum's gradients, and no matmul of it
    contracts the major axis of its left operand (Eigen's slow path, which plain
    autodiff of a dense layer produces for the weight gradient on XLA:CPU)."""
    key_x, key_w, key_g = jax.random.split(jax.random.key(0), 3)
    for d_in, d_out in [(48, 160), (160, 48)]:  # the smaller side is transposed
        x = jax.random.normal(key_x, (4, 64, d_in))
        w = jax.random.normal(key_w, (d_in, d_out))
        g = jax.random.normal(key_g, (4, 64, d_out))
        y, vjp = jax.vjp(xla_cpu.project, x, w)
        y_ref, vjp_ref = jax.vjp(lambda a, b: jnp.einsum("bli,io->blo", a, b), x, w)
        np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-5)
        for got, want in zip(jax.jit(vjp)(g), vjp_ref(g), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

        def contracting(fn, x=x, w=w):
            hlo = jax.jit(jax.grad(fn, argnums=1)).lower(x, w).compile().as_text()
            return re.findall(r" dot\(.*?lhs_contracting_dims=\{(\d)\}", hlo)

        assert contracting(lambda a, b: xla_cpu.project(a, b).sum()) == ["1"]
        einsum_dims = contracting(lambda a, b: jnp.einsum("bli,io->blo", a, b).sum())
        assert einsum_dims == ["0"]  # what the check above guards against


def test_portable_lowering_traces_no_cpu_forms():
    """Under portable_lowering (gptjax plan) the backward is plain autodiff: the CPU
    forms' divides (the cotangent barrier, xla_cpu.no_fold) and 2-D reshapes are gone."""
    cfg = ModelConfig(vocab_size=128, seq_len=16, n_layer=2, d_model=32, n_head=2)
    graphdef, params = _params(cfg)
    tokens = jnp.zeros((2, cfg.seq_len), jnp.int32)

    def count_ops():
        loss = lambda p: model.apply(graphdef, p, tokens).mean()  # noqa: E731
        text = str(jax.make_jaxpr(jax.grad(loss))(params))
        return [len(re.findall(rf"= {op}\b", text)) for op in ("div", "reshape")]

    cpu_divs, cpu_reshapes = count_ops()
    with xla_cpu.portable_lowering():
        divs, reshapes = count_ops()
    # in the scanned layer body: 1 barrier + 1 or 2 _no_fold for each of 4 projections
    assert cpu_divs - divs >= 5
    assert cpu_reshapes > reshapes


def test_train_steps_compile_with_the_cpu_options():
    """jit_step compiles with xla_cpu.cpu_step_options() on a CPU mesh: no matmul in a
    YNNPACK fusion (where a plain jax.jit puts it); oneDNN matmuls only while the
    persistent compilation cache is off (it cannot store them); the same numbers."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from gptjax import sharding

    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    replicated = NamedSharding(mesh, P())

    def step(state_NxN, batch_NxN):
        return state_NxN @ batch_NxN, {"sum": (state_NxN @ batch_NxN).sum()}

    def fused_dots(jitted, kind):
        hlo = jitted.lower(x, x).compile().as_text()
        fused_dot = re.compile(rf'op_name="[^"]*dot_general".*__{kind}_fusion')
        return [line for line in hlo.splitlines() if fused_dot.search(line)]

    x = np.random.default_rng(0).standard_normal((256, 256), np.float32)
    assert jax.config.jax_compilation_cache_dir  # conftest turns the cache on
    cached = train.jit_step(step, mesh, replicated, replicated)
    assert fused_dots(cached, "ynn") == [] and fused_dots(cached, "onednn") == []
    assert fused_dots(jax.jit(step), "ynn")

    cache_dir = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert xla_cpu.cpu_step_options() == xla_cpu.CPU_STEP_OPTIONS
        uncached = train.jit_step(step, mesh, replicated, replicated)
        # JAX still writes to the cache it opened: this is the write that fails, and
        # the reason for the cacheable options (drop them once jaxlib can store these).
        with pytest.warns(UserWarning, match="ToProto is not implemented.*onednn"):
            assert fused_dots(uncached, "onednn")
        assert fused_dots(uncached, "ynn") == []
    finally:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    assert xla_cpu.cpu_step_options() == xla_cpu.CPU_CACHEABLE_STEP_OPTIONS
    np.testing.assert_allclose(uncached(x, x)[0], cached(x, x)[0], rtol=1e-5, atol=1e-4)


def test_throttle_keeps_a_long_dispatch_loop_out_of_a_collective_deadlock():
    """300 steps with a gradient all-reduce over 8 simulated devices, dispatched ahead of
    the host as the training loop does: with xla_cpu.throttle they run. Without it
    (every step queued) XLA:CPU deadlocks in the all-reduce once a few dozen are queued
    and aborts the process (measured: 16 queued ran, 32 hung)."""
    import jax.numpy as jnp

    mesh = sharding.make_mesh(MeshConfig(data=8))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    w = jax.device_put(np.full((256, 256), 1e-3, np.float32), replicated)

    @jax.jit
    def step(w, x):
        g = jax.grad(lambda w: jnp.tanh(x @ w).sum())(w)  # an all-reduce over "data"
        return w - 1e-3 * g, g.sum()

    rng = np.random.default_rng(0)
    outputs = []
    for _ in range(300):
        x = jax.make_array_from_process_local_data(rows, rng.random((64, 256), np.float32))
        w, total = step(w, x)
        outputs.append(total)
        xla_cpu.throttle(outputs)
    assert np.isfinite(float(outputs[-1]))


def test_a_portable_train_step_traces_none_of_the_workarounds():
    """What a GPU/TPU backend (and gptjax plan) traces: the training loss holds no custom
    VJP (cotangent barrier, row-major matmul) and the step gets no CPU compiler options;
    the CPU trace of the same loss holds them (one barrier and four projections in the
    layer body)."""
    cfg = ModelConfig(vocab_size=128, seq_len=16, n_layer=2, d_model=32, n_head=2,
                      scan_layers=False)  # fmt: skip
    graphdef, params = _params(cfg)
    tokens = jnp.zeros((2, cfg.seq_len + 1), jnp.int32)
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])

    def custom_vjps():
        text = str(jax.make_jaxpr(lambda p: train.lm_loss(graphdef, p, tokens))(params))
        return text.count("custom_vjp_call")

    assert custom_vjps() == 5
    assert xla_cpu.step_compiler_options(mesh) == xla_cpu.cpu_step_options()
    with xla_cpu.portable_lowering():
        assert custom_vjps() == 0
        assert xla_cpu.step_compiler_options(mesh) is None
