"""Every XLA:CPU workaround in one place (the why, with measurements: docs/xla_cpu.md).

The model calls `project` and `cotangent_barrier`; off CPU (or under
`portable_lowering`, as `gptjax plan` traces) they are plain `tensordot` and the
identity, so no custom VJP, divide or reshape of this module reaches a GPU/TPU program.
Training steps compile with `step_compiler_options`; host loops call `throttle`.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp

_portable = False  # set by portable_lowering()


@contextlib.contextmanager
def portable_lowering():
    """Trace as for GPU/TPU even on a CPU backend: `gptjax plan` compiles for simulated
    CPU devices but reports the memory of the target's program."""
    global _portable
    previous, _portable = _portable, True
    try:
        yield
    finally:
        _portable = previous


def portable() -> bool:
    """Whether portable_lowering() is active."""
    return _portable


def cpu_lowering() -> bool:
    """Whether to emit the XLA:CPU-specific forms (decided at trace time)."""
    return not _portable and jax.default_backend() == "cpu"


# The CPU forms below run under this name scope, so that their ops are named in HLO
# metadata: tests/test_tpu.py checks that a TPU program has none.
CPU_SCOPE = "xla_cpu_workaround"


def no_fold(a):
    """a / (1 + 0 * a): equal to a for finite values, and a divide is an op XLA:CPU
    neither duplicates into its consumers' fusions nor folds into a neighbouring dot."""
    return a / (1 + 0 * a)


@jax.custom_vjp
def _barrier(x):
    return x


def _barrier_fwd(x):
    return x, None


def _barrier_bwd(_, g):
    with jax.named_scope(CPU_SCOPE):
        return (no_fold(g),)


_barrier.defvjp(_barrier_fwd, _barrier_bwd)


def cotangent_barrier(x):
    """Identity whose cotangent XLA:CPU computes once instead of once per later layer
    (docs/xla_cpu.md#cotangent-barrier); the plain identity off CPU."""
    return _barrier(x) if cpu_lowering() else x


def project(x, w, n_in: int = 1):
    """Contract the last n_in axes of x with the first n_in axes of w (a dense layer).

    On CPU one 2-D matmul with a row-major weight gradient (`matmul`); elsewhere the
    plain dot_general, whose layouts GPU/TPU compilers choose well."""
    if not cpu_lowering():
        return jnp.tensordot(x, w, n_in)
    lead, out = x.shape[: x.ndim - n_in], w.shape[n_in:]
    size_in = math.prod(w.shape[:n_in])
    with jax.named_scope(CPU_SCOPE):
        y = matmul(x.reshape(-1, size_in), w.reshape(size_in, -1))
    return y.reshape(*lead, *out)


@jax.custom_vjp
def matmul(x_TxI, w_IxO):
    """x @ w whose weight gradient is a row-major matmul over tokens
    (docs/xla_cpu.md#row-major-weight-gradient)."""
    return x_TxI @ w_IxO


def _matmul_fwd(x_TxI, w_IxO):
    return x_TxI @ w_IxO, (x_TxI, w_IxO)


def _matmul_bwd(res, g_TxO):
    # dW = x^T g contracts the tokens, the major axis of both operands: materialise the
    # smaller operand transposed (kept by no_fold) so the matmul runs on its fast path.
    x_TxI, w_IxO = res
    with jax.named_scope(CPU_SCOPE):
        dx_TxI = jax.lax.dot_general(g_TxO, w_IxO, (((1,), (1,)), ((), ())))
        if x_TxI.shape[1] <= w_IxO.shape[1]:
            dw_IxO = no_fold(x_TxI.T) @ g_TxO
        else:
            dw_IxO = no_fold(no_fold(g_TxO.T) @ x_TxI).T
    return dx_TxI, dw_IxO.astype(w_IxO.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# XLA:CPU options for training steps: oneDNN matmuls, YNNPACK reductions (~4-7% faster
# steps on the train bench; docs/xla_cpu.md#step-compile-options). Not for evaluation or
# decoding. jaxlib 0.10's persistent compilation cache cannot serialize a oneDNN fusion,
# so with the cache on steps use the cacheable variant (Eigen matmuls, 2-7% slower).
CPU_CACHEABLE_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
CPU_STEP_OPTIONS = {
    **CPU_CACHEABLE_STEP_OPTIONS,
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


def cpu_step_options() -> dict:
    """CPU_STEP_OPTIONS, or CPU_CACHEABLE_STEP_OPTIONS when JAX's persistent
    compilation cache is on (a cache directory is configured)."""
    cache_on = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
    return CPU_CACHEABLE_STEP_OPTIONS if cache_on else CPU_STEP_OPTIONS


def step_compiler_options(mesh) -> dict | None:
    """compiler_options for a training step's jit on `mesh`: cpu_step_options() on a
    CPU mesh, None elsewhere and under portable_lowering (a GPU/TPU step)."""
    if mesh.devices.flat[0].platform == "cpu" and not _portable:
        return cpu_step_options()
    return None


def throttle(outputs: list, in_flight: int = 2) -> None:
    """Wait for what was dispatched before the last `in_flight` entries of `outputs`.

    Loops that queue work ahead of the host (train steps, scoring batches) call it after
    each dispatch: XLA:CPU's simulated devices deadlock in a collective when dozens of
    multi-device executions are queued (docs/xla_cpu.md#throttle); on any device a queue
    of two loses nothing."""
    if len(outputs) > in_flight:
        jax.block_until_ready(outputs[-in_flight - 1])
