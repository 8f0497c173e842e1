"""Memory and step-time planning: compile the real train step ahead of time on simulated
CPU devices, with abstract arrays, and read the per-device memory XLA assigns it.

Nothing is allocated: the train state and batch are jax.ShapeDtypeStructs carrying the
shardings the trainer derives (train.state_shardings, the batch sharding of train.train),
and the step is train.make_train_step under jax.jit with the same in/out shardings and
donation. XLA's buffer assignment for one device of the SPMD program gives

    argument (state + batch) + output (new state + metrics) - alias (donated state)
    + temp (activations, gradients, accumulators, collective buffers)

which is the step's peak per-device footprint. The parameter and optimizer-state lines
are the exact shard sizes of the state; everything else in the total is "temporaries".

Limits, said where they are printed too:
- XLA:CPU makes its own fusion and scheduling decisions, so the temporaries are those
  of the CPU compile, an estimate of what XLA:GPU/TPU assign (those fuse more, e.g. the
  attention, and may use less).
- XLA:CPU simulates at most about MAX_CPU_DEVICES devices. Beyond that the step is
  compiled on a smaller mesh with the same per-device shapes where that is possible
  (fewer data replicas, the microbatch shrunk with them: per-device memory depends only
  on shard shapes); when fsdp x tensor alone exceeds the limit, fsdp is shrunk too and
  the temporaries come from that compile (an upper bound: gradient and optimizer
  temporaries are sharded less), while parameters and optimizer state are still the
  exact shard sizes at the requested mesh. Such rows are labelled extrapolated.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp

from gptjax import metrics, model, sharding, train, xla_cpu
from gptjax.config import Config, MeshConfig
from gptjax.optim import make_optimizer

GIB = 2**30
MAX_CPU_DEVICES = 2048  # about what XLA:CPU accepts as simulated devices
REMATS = ("none", "dots_saveable", "full")  # cheapest compute first
DEFAULT_USABLE = 0.9  # fraction of HBM a plan may use: runtime, fragmentation, CPU-vs-GPU


class PlanError(ValueError):
    """A mesh, device or config that cannot be planned."""


@dataclasses.dataclass(frozen=True)
class Layout:
    data: int
    fsdp: int
    tensor: int

    @property
    def devices(self) -> int:
        return self.data * self.fsdp * self.tensor

    def __str__(self) -> str:
        return f"data={self.data},fsdp={self.fsdp},tensor={self.tensor}"


@dataclasses.dataclass(frozen=True)
class Plan:
    layout: Layout
    remat: str
    microbatch: int  # sequences per forward/backward pass (global)
    microbatches: int
    params: int  # bytes per device
    opt_state: int
    temporaries: int  # everything else: activations, gradients, accumulators, batch
    total: int
    xla: dict  # the compiled memory_analysis fields, bytes per device
    method: str  # "compiled", or how it was extrapolated
    compile_seconds: float
    device: str
    hbm: int  # bytes per device
    usable: float
    step_seconds: float
    tokens_per_step: int
    mfu: float
    compiler: str = "XLA:CPU"  # or "libtpu X.Y.Z" (gptjax.tpu)
    notes: tuple[str, ...] = ()  # extra report lines (gptjax.tpu: compiled FLOPs)
    slices: int = 1  # TPU slices the data axis spans (mesh.slices)

    @property
    def extrapolated(self) -> bool:
        return self.method != "compiled"

    @property
    def fits(self) -> bool:
        return self.total <= self.usable * self.hbm

    def overrides(self, cfg: Config) -> list[str]:
        """The --config flags that make a training run use this plan."""
        out = [
            f"--config.mesh.data={self.layout.data}",
            f"--config.mesh.fsdp={self.layout.fsdp}",
            f"--config.mesh.tensor={self.layout.tensor}",
        ]
        if self.slices != cfg.mesh.slices:
            out.append(f"--config.mesh.slices={self.slices}")
        if self.remat != cfg.model.remat:
            out.append(f"--config.model.remat={self.remat}")
        if self.microbatches != cfg.train.microbatches:
            out.append(f"--config.train.microbatches={self.microbatches}")
            start = cfg.train.batch_ramp_start
            if start and start % self.microbatch:
                # a ramp grows in whole microbatches: start at one (or more) of them
                new = -(-start // self.microbatch) * self.microbatch
                out.append(f"--config.train.batch_ramp_start={new}")
        return out


# ----------------------------------------------------------------------------- devices


def device_spec(name: str) -> tuple[str, float, int]:
    """(name, peak bf16 FLOP/s, HBM bytes) of a device named like `h100` or `v5p` (or by
    its device_kind, `TPU v5`)."""
    d = metrics.device_info(name)
    if d is None or not d.hbm_bytes:
        raise PlanError(f"unknown device {name!r}: known are {', '.join(metrics.ALIASES)}")
    kind = metrics.ALIASES.get(name.lower().strip(), name)
    return (f"{name} ({kind})" if kind != name else name), d.peak_flops, d.hbm_bytes


def cpu_devices() -> list:
    return jax.devices("cpu")


def compile_devices(mesh: MeshConfig | None, devices: int | None) -> int:
    """Simulated CPU devices a plan compiles on: `devices` when given, else the mesh's
    (-1 axes count 1); at most MAX_CPU_DEVICES (plan() extrapolates beyond)."""
    if devices:
        n = devices
    else:
        n = math.prod(max(1, s) for s in (mesh.data, mesh.fsdp, mesh.tensor))
    return max(1, min(n, MAX_CPU_DEVICES))


def with_cpu_devices(n: int, argv: list[str]) -> int | None:
    """Ask XLA:CPU for n simulated devices, which it reads when jax starts its backends.
    When jax has started with fewer, `gptjax ARGV` re-runs in a fresh process: returns
    its exit status; None when this process can plan."""
    import os
    import subprocess
    import sys

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # SPMD warnings, one per candidate
    if len(cpu_devices()) >= n:
        return None
    return subprocess.run([sys.executable, "-m", "gptjax", *argv]).returncode


# ----------------------------------------------------------------------------- layouts


def resolve_layout(mesh: MeshConfig, devices: int | None) -> Layout:
    """A concrete layout; -1 axes need the device count."""
    sizes = (mesh.data, mesh.fsdp, mesh.tensor)
    if devices is None:
        if -1 in sizes:
            raise PlanError(f"mesh {sizes} has a -1 axis: give --devices N")
        devices = math.prod(sizes)
    try:
        return Layout(*sharding.mesh_shape(mesh, devices))
    except ValueError as e:
        raise PlanError(str(e)) from None


def check_layout(cfg: Config, layout: Layout, microbatch: int) -> None:
    """The trainer's own constraints, said before anything is compiled."""
    shards = layout.data * layout.fsdp
    if microbatch % shards:
        raise PlanError(
            f"a microbatch of {microbatch} sequences does not split over data*fsdp={shards} "
            f"(mesh {layout}); raise the microbatch (fewer train.microbatches) or shrink "
            f"data*fsdp"
        )
    m, t = cfg.model, layout.tensor
    for what, size in (("n_head", m.n_head), ("n_kv_head", m.kv_heads), ("d_ff", m.ffn_dim)):
        if size % t:
            raise PlanError(f"tensor={t} does not divide model.{what}={size}")


def with_plan_settings(cfg: Config, remat: str, microbatches: int) -> Config:
    """cfg with remat and microbatch count replaced (the batch ramp is dropped: it only
    runs steps with fewer microbatches, which need no more memory than the full one)."""
    t = dataclasses.replace(cfg.train, microbatches=microbatches, batch_ramp_start=0)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat), train=t)


# ----------------------------------------------------------------------------- bytes


def _abstract_mesh(layout: Layout):
    return jax.sharding.AbstractMesh(
        (layout.data, layout.fsdp, layout.tensor),
        sharding.MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(sharding.MESH_AXES),
    )


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of a tree of arrays with these shardings."""
    leaves, sh = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    return sum(
        math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
        for a, s in zip(leaves, sh, strict=True)
    )


def state_bytes(cfg: Config, layout: Layout) -> tuple[int, int]:
    """(parameter, optimizer-state) bytes per device at a layout, from the trainer's own
    derived shardings on an abstract mesh (no devices needed, any size)."""
    mesh = _abstract_mesh(layout)
    _, abstract, sh = train.state_shardings(cfg, mesh, make_optimizer(cfg.optim, cfg.train.steps))
    return shard_bytes(abstract.params, sh.params), shard_bytes(abstract.opt_state, sh.opt_state)


def _batch_bytes(cfg: Config, layout: Layout) -> int:
    """Per-device bytes of the int32 token batch [microbatches, microbatch, seq_len + 1]."""
    return cfg.train.batch_size // (layout.data * layout.fsdp) * (cfg.model.seq_len + 1) * 4


def compile_step(cfg: Config, layout: Layout, devices=None, mesh=None):
    """Lower and compile the real train step for `layout` on CPU devices (or on `mesh`,
    e.g. of TPU topology devices) with abstract inputs. Returns (compiled,
    {"params", "opt_state", "state"} bytes per device)."""
    if mesh is None:
        devices = cpu_devices() if devices is None else devices
        if layout.devices > len(devices):
            raise PlanError(
                f"mesh {layout} needs {layout.devices} devices but jax has {len(devices)} "
                f"CPU devices; run `gptjax plan` in a fresh process (it sets "
                f"--xla_force_host_platform_device_count before jax starts)"
            )
        mesh_cfg = MeshConfig(data=layout.data, fsdp=layout.fsdp, tensor=layout.tensor)
        mesh = sharding.make_mesh(mesh_cfg, devices[: layout.devices])
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    t = cfg.train
    with jax.set_mesh(mesh):
        graphdef, abstract, state_sh = train.state_shardings(cfg, mesh, tx)
        state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
        )
        batch_sh = sharding.batch_sharding(mesh, 3, batch_dim=1)
        batch = jax.ShapeDtypeStruct(
            (t.microbatches, t.batch_size // t.microbatches, cfg.model.seq_len + 1),
            jnp.int32,
            sharding=batch_sh,
        )
        with xla_cpu.portable_lowering():  # the target's program, not the CPU forms
            step = train.jit_step(
                train.make_train_step(cfg, graphdef, tx), mesh, state_sh, batch_sh
            )
            compiled = step.lower(state, batch).compile()
    sizes = {
        "params": shard_bytes(abstract.params, state_sh.params),
        "opt_state": shard_bytes(abstract.opt_state, state_sh.opt_state),
        "state": shard_bytes(abstract, state_sh),
    }
    return compiled, sizes


def xla_fields(compiled) -> dict:
    ma = compiled.memory_analysis()
    names = ("argument", "output", "alias", "temp")
    return {n: int(getattr(ma, f"{n}_size_in_bytes")) for n in names}


def _smallest_factor(n: int) -> int:
    return next(p for p in range(2, n + 1) if n % p == 0)


def compile_layout(layout: Layout, microbatch: int, limit: int) -> tuple[Layout, int]:
    """A layout of at most `limit` devices to compile in place of `layout`, and its
    microbatch, keeping the per-device batch. Data replicas go first (per-device shapes
    stay the same), down to two while that suffices, so that the compile keeps the
    gradient all-reduce and its buffers (their size per device does not depend on how
    many devices take part); then fsdp shards (parameter shards grow, so temporaries
    are overestimated)."""
    sizes = {"data": layout.data, "fsdp": layout.fsdp}
    for axis, floor in (("data", 2), ("data", 1), ("fsdp", 2), ("fsdp", 1)):
        while (
            sizes["data"] * sizes["fsdp"] * layout.tensor > limit
            and sizes[axis] > floor
            and sizes[axis] // _smallest_factor(sizes[axis]) >= floor
        ):
            sizes[axis] //= _smallest_factor(sizes[axis])
    small = Layout(sizes["data"], sizes["fsdp"], layout.tensor)
    if small.devices > limit:
        raise PlanError(f"mesh {layout} cannot be shrunk to the {limit} devices XLA:CPU simulates")
    per_device = microbatch // (layout.data * layout.fsdp)
    return small, per_device * small.data * small.fsdp


# ----------------------------------------------------------------------------- plan


def plan(
    cfg: Config,
    layout: Layout,
    *,
    device: str = "h100",
    mfu: float = 0.4,
    usable: float = DEFAULT_USABLE,
    hbm: int | None = None,
    max_compile_devices: int = MAX_CPU_DEVICES,
) -> Plan:
    """Compile cfg's train step for `layout` and account its per-device memory and time
    (hbm: a memory size in bytes in place of the device's)."""
    name, peak, device_hbm = device_spec(device)
    hbm = device_hbm if hbm is None else hbm
    t = cfg.train
    microbatch = t.batch_size // t.microbatches
    check_layout(cfg, layout, microbatch)
    small, small_micro = compile_layout(layout, microbatch, max_compile_devices)
    compile_cfg = cfg
    if small != layout:
        compile_cfg = with_plan_settings(cfg, cfg.model.remat, t.batch_size // small_micro)
    start = time.perf_counter()
    compiled, sizes = compile_step(compile_cfg, small)
    seconds = time.perf_counter() - start
    xla = xla_fields(compiled)
    # Peak per device: inputs + outputs not aliased to (donated) inputs + temporaries.
    total = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
    params, opt = sizes["params"], sizes["opt_state"]
    if small != layout:  # swap the compiled layout's state and batch for the requested one
        params, opt = state_bytes(cfg, layout)
        big_state = params + opt + sizes["state"] - sizes["params"] - sizes["opt_state"]
        total += big_state - sizes["state"]
        total += _batch_bytes(cfg, layout) - _batch_bytes(compile_cfg, small)
    tokens = t.batch_size * cfg.model.seq_len
    step_s = model.flops_per_token(cfg.model) * tokens / (layout.devices * peak * mfu)
    if small == layout:
        method = "compiled"
    elif small.fsdp == layout.fsdp:
        method = f"extrapolated from {small} (same per-device shapes)"
    else:
        method = f"extrapolated from {small} (temporaries: upper bound)"
    return Plan(
        layout=layout,
        remat=cfg.model.remat,
        microbatch=microbatch,
        microbatches=t.microbatches,
        params=params,
        opt_state=opt,
        temporaries=total - params - opt,
        total=total,
        xla=xla,
        method=method,
        compile_seconds=seconds,
        device=name,
        hbm=hbm,
        usable=usable,
        step_seconds=step_s,
        tokens_per_step=tokens,
        mfu=mfu,
    )


# ----------------------------------------------------------------------------- search


def tensor_options(cfg: Config, n: int, max_tensor: int) -> list[int]:
    m = cfg.model
    return [
        t
        for t in range(1, min(n, max_tensor) + 1)
        if n % t == 0 and all(x % t == 0 for x in (m.n_head, m.kv_heads, m.ffn_dim))
    ]


def microbatch_options(cfg: Config, shards: int) -> list[int]:
    """Microbatch sizes (sequences) for data*fsdp = shards, largest first: the config's
    microbatch (or `shards` sequences, if that is more) halved down to one sequence per
    device, keeping those that are multiples of shards and divide the batch."""
    t = cfg.train
    m, out = max(t.batch_size // t.microbatches, shards), []
    while m >= shards:
        if m % shards == 0 and t.batch_size % m == 0:
            out.append(m)
        m //= 2
    return out


def largest_fitting(micros: list[int], known: dict, attempt) -> Plan | None:
    """The plan of the largest microbatch in `micros` (largest first) that fits, compiling
    few: the largest, then the smallest (if even it does not fit, none does), then the
    one a straight line through those two totals predicts, walking up or down from it.
    Assumes memory grows with the microbatch."""
    plans = dict(known)

    def get(m: int) -> Plan:
        if m not in plans:
            plans[m] = attempt(m)
        return plans[m]

    if get(micros[0]).fits:
        return plans[micros[0]]
    if len(micros) == 1 or not get(micros[-1]).fits:
        return None
    hi, lo = plans[micros[0]], plans[micros[-1]]
    budget = lo.usable * lo.hbm
    slope = (hi.total - lo.total) / (micros[0] - micros[-1])
    guess = next(
        (i for i, m in enumerate(micros) if lo.total + slope * (m - micros[-1]) <= budget),
        len(micros) - 1,
    )
    i = guess
    if get(micros[i]).fits:  # walk up while the next larger one fits
        while i > 0 and get(micros[i - 1]).fits:
            i -= 1
    else:  # walk down to the first that fits (the smallest does)
        while not get(micros[i]).fits:
            i += 1
    return plans[micros[i]]


def search(
    cfg: Config,
    *,
    device: str = "h100",
    mfu: float = 0.4,
    usable: float = DEFAULT_USABLE,
    hbm: int | None = None,
    max_devices: int = 4096,
    max_tensor: int = 8,
    remats: tuple[str, ...] = REMATS,
    max_compile_devices: int = MAX_CPU_DEVICES,
    log=print,
    device_counts=None,
    plan_fn=None,
    layout_ok=lambda layout: True,
    min_data: int = 1,
) -> tuple[Plan | None, list[Plan]]:
    """The smallest mesh (fewest devices) on which cfg's step fits `device`, with the
    cheapest remat and the largest microbatch that fit there; and every plan compiled.

    Device counts are powers of two from the bound the exact state size sets. At each,
    tensor parallelism is tried from 1 up (it costs communication in every layer), with
    data=1 and fsdp taking the rest: the data axis only replicates state, so it never
    lowers memory. The most frugal setting (remat full, one sequence per device) is
    compiled first; if even it does not fit, that (devices, tensor) is skipped. Then,
    per remat level, largest_fitting picks the largest microbatch that fits. Memory is
    assumed to fall monotonically with more remat and smaller microbatches. Once a
    fit is found, fsdp is traded for data parallelism while the plan still fits (data
    parallelism gathers no parameters, which with gradient accumulation every
    microbatch would).

    The TPU path (gptjax.tpu) passes its own device_counts (slice sizes), plan_fn
    (cfg, layout) -> Plan, layout_ok (the torus accepts the mesh) and min_data (the
    number of slices: the data axis spans them)."""
    if hbm is None:
        hbm = device_spec(device)[2]
    budget = usable * hbm
    tried: list[Plan] = []

    def attempt(layout: Layout, remat: str, microbatch: int) -> Plan:
        c = with_plan_settings(cfg, remat, cfg.train.batch_size // microbatch)
        if plan_fn is not None:
            p = plan_fn(c, layout)
        else:
            p = plan(
                c,
                layout,
                device=device,
                mfu=mfu,
                usable=usable,
                hbm=hbm,
                max_compile_devices=max_compile_devices,
            )
        tried.append(p)
        log(
            f"  {str(layout):28s} remat={remat:13s} microbatch={microbatch:<5d} "
            f"total {_size(p.total)}  {'fits' if p.fits else 'does not fit'}"
            f"  ({p.compile_seconds:.0f}s compile{', ' + p.method if p.extrapolated else ''})"
        )
        return p

    def state_fits(layout: Layout) -> bool:
        params, opt = state_bytes(cfg, layout)
        return params + opt <= budget

    counts = device_counts or [2**i for i in range(max_devices.bit_length()) if 2**i <= max_devices]
    for n in counts:
        for t in tensor_options(cfg, n // min_data, max_tensor):
            layout = Layout(min_data, n // (min_data * t), t)
            micros = microbatch_options(cfg, layout.data * layout.fsdp)
            if not micros or not state_fits(layout) or not layout_ok(layout):
                continue
            frugal = attempt(layout, remats[-1], micros[-1])
            if not frugal.fits:
                continue
            best = frugal
            for remat in remats:  # cheapest compute first, then the largest microbatch
                known = {micros[-1]: frugal} if remat == remats[-1] else {}
                found = largest_fitting(
                    micros, known, lambda m, r=remat, lay=layout: attempt(lay, r, m)
                )
                if found is not None:
                    best = found
                    break
            # Trade fsdp for data parallelism while the state still fits.
            data = 2
            while layout.fsdp % data == 0:
                wider = Layout(min_data * data, layout.fsdp // data, t)
                if best.microbatch % (wider.data * wider.fsdp) or not state_fits(wider):
                    break
                if not layout_ok(wider):
                    break
                p = attempt(wider, best.remat, best.microbatch)
                if not p.fits:
                    break
                best, data = p, data * 2
            return best, tried
    return None, tried


# ----------------------------------------------------------------------------- report


def _size(b: int) -> str:
    return f"{b / GIB:8.2f} GiB" if b >= GIB / 100 else f"{b / 2**20:8.2f} MiB"


def format_plan(p: Plan, cfg: Config) -> str:
    gib = _size
    budget = p.usable * p.hbm
    lines = [
        f"mesh {p.layout} ({p.layout.devices} devices), remat={p.remat}, "
        f"microbatch {p.microbatch} sequences x {p.microbatches}",
        f"  parameters           {gib(p.params)}",
        f"  optimizer state      {gib(p.opt_state)}",
        f"  temporaries          {gib(p.temporaries)}  (activations, gradients, "
        f"accumulators, batch)",
        f"  total per device     {gib(p.total)}",
        f"  {p.device}: {p.hbm / GIB:.1f} GiB, plan budget {budget / GIB:.1f} GiB "
        f"({p.usable:.0%}): {'FITS' if p.fits else 'DOES NOT FIT'}",
        f"  step time at {p.mfu:.0%} MFU: {p.step_seconds:.3g} s "
        f"({p.tokens_per_step:,} tokens/step, "
        f"{p.tokens_per_step / p.step_seconds / p.layout.devices:,.0f} tokens/s/device)",
        f"  {p.method}; {p.compiler} compile {p.compile_seconds:.1f} s; memory_analysis per "
        f"device: argument {p.xla['argument']:,} output {p.xla['output']:,} alias "
        f"{p.xla['alias']:,} temp {p.xla['temp']:,} bytes",
        *p.notes,
        "  train with: " + " ".join(p.overrides(cfg)),
    ]
    if p.compiler == "XLA:CPU":
        lines.append(
            f"  (temporaries are XLA:CPU's buffer assignment, an estimate for GPU/TPU; XLA:CPU "
            f"simulates at most ~{MAX_CPU_DEVICES} devices, larger meshes are extrapolated: "
            f"docs/scaling.md)"
        )
    return "\n".join(lines)
