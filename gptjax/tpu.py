"""Ahead-of-time compiles for TPU slices with libtpu, on a machine without a TPU.

libtpu (the `tpu` extra) compiles for any TPU topology from its description, the way
MaxText's train_compile checks a job before the hardware is rented: the devices of
`jax.experimental.topologies.get_topology_desc` carry real device kinds and torus
coordinates but cannot run anything, so everything traced for them is abstract (the
train state comes from eval_shape, keys included). Eager work stays on the CPU
(JAX_PLATFORMS=cpu).

Topologies are named as libtpu names them, generation:chips-per-axis. Cloud TPU slice
names map to them as: v4-N (N TensorCores) = v4 with N/2 chips, e.g. v4-128 = v4:4x4x4;
v5litepod-N = v5e with N chips, e.g. v5litepod-256 = v5e:16x16; v5p-N (N TensorCores) =
v5p with N/2 chips, e.g. v5p-2048 = v5p:8x8x16; v6e-N = v6e with N chips, e.g. v6e-256
= v6e:16x16. A v4 or v5p device is one chip (megacore), as on the real hardware.

The memory is libtpu's own buffer assignment of the SPMD program for one chip (no
extrapolation: it compiles for thousands of chips). cost_analysis() counts the body of
a loop once (the microbatch scan, the scan over layers), so the compiled FLOPs of a step
come from two extra compiles of one microbatch with the layers unrolled, one and two
layer groups deep: their difference is one group's FLOPs, scaled to every group and
microbatch (the optimizer update, a few FLOPs per parameter, is counted once per
microbatch: negligible next to 6 N per token).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
import time

from gptjax import libtpu_env, metrics, model, plan, sharding
from gptjax.config import Config, ConfigError, MeshConfig

# libtpu generation -> (chip config, slice shapes offered, smallest first). The shapes
# are the Cloud TPU slice shapes `--search` walks through.
GENERATIONS = {
    "v4": ("megacore", ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8",
                        "8x8x8", "8x8x12", "8x8x16", "8x16x16")),
    "v5e": ("default", ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
    "v5p": ("default", ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8",
                        "8x8x8", "8x8x16", "8x16x16", "16x16x16")),
    "v6e": ("default", ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
}  # fmt: skip
LIBTPU_MISSING = "libtpu is not installed: pip install -e '.[tpu]'"


def available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def libtpu_version() -> str:
    return importlib.metadata.version("libtpu")


def parse_topology(text: str) -> tuple[str, str]:
    """(generation, shape) of `v5p:8x8x16`; a bare generation (`v5p`) has shape ''."""
    gen, _, shape = text.strip().lower().partition(":")
    if gen not in GENERATIONS:
        raise plan.PlanError(
            f"--tpu {text!r}: the generation must be one of {', '.join(GENERATIONS)} "
            f"(e.g. v5p:8x8x16, v5e:16x16)"
        )
    dims = 3 if GENERATIONS[gen][1][0].count("x") == 2 else 2
    if shape and not re.fullmatch(r"\d+" + r"x\d+" * (dims - 1), shape):
        raise plan.PlanError(
            f"--tpu {text!r}: {gen} takes {dims} chip counts, e.g. {gen}:{GENERATIONS[gen][1][1]}"
        )
    return gen, shape


def chips(shape: str) -> int:
    return math.prod(int(x) for x in shape.split("x"))


@functools.cache
def topology_devices(topology: str, slices: int = 1) -> tuple:
    """The devices of `slices` slices of `topology` (each with device_kind, coords and,
    for several slices, slice_index), to compile for."""
    if not available():
        raise plan.PlanError(LIBTPU_MISSING)
    gen, shape = parse_topology(topology)
    if not shape:
        raise plan.PlanError(
            f"--tpu {topology!r}: give a shape, e.g. {gen}:{GENERATIONS[gen][1][2]}"
        )
    libtpu_env.quiet()
    from jax.experimental import topologies

    dims = [int(x) for x in shape.split("x")] + [1]
    bounds = tuple(min(b, d) for b, d in zip((2, 2, 1), dims, strict=False))
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=f"{gen}:{shape}",
            chip_config_name=GENERATIONS[gen][0],
            chips_per_host_bounds=bounds,
            num_slices=slices,
        )
    except Exception as e:  # libtpu's own message says what it refused
        raise plan.PlanError(f"libtpu refused topology {topology} x {slices}: {e}") from None
    return tuple(desc.devices)


def tpu_mesh(layout: plan.Layout, devices, slices: int = 1):
    """sharding.make_mesh on topology devices: axes mapped onto the torus, the data axis
    across slices; a PlanError where the torus cannot take the shape."""
    cfg = MeshConfig(data=layout.data, fsdp=layout.fsdp, tensor=layout.tensor, slices=slices)
    try:
        return sharding.make_mesh(cfg, list(devices))
    except (ValueError, NotImplementedError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise plan.PlanError(f"mesh {layout} does not map onto the TPU torus: {first}") from None


def mesh_fits_torus(layout: plan.Layout, devices, slices: int = 1) -> bool:
    try:
        tpu_mesh(layout, devices, slices)
    except (plan.PlanError, ConfigError):
        return False
    return True


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0))


def step_flops(cfg: Config, layout: plan.Layout, mesh) -> float:
    """Compiled FLOPs of one optimizer step over all chips (remat recomputation
    included): one microbatch unrolled one and two layer groups deep (module docstring)."""
    m, t = cfg.model, cfg.train
    period = len(m.attention_windows)
    if m.n_layer % period:
        period = m.n_layer  # one group: the whole stack
    groups = m.n_layer // period
    micro = t.batch_size // t.microbatches

    def compiled_flops(n_groups: int) -> float:
        c = dataclasses.replace(
            cfg,
            model=dataclasses.replace(m, n_layer=n_groups * period, scan_layers=False),
            train=dataclasses.replace(t, microbatches=1, batch_size=micro, batch_ramp_start=0),
        )
        return _flops(plan.compile_step(c, layout, mesh=mesh)[0])

    one = compiled_flops(1)
    per_group = compiled_flops(2) - one if groups > 1 else 0.0
    return (one + (groups - 1) * per_group) * t.microbatches * layout.devices


_OVER_HBM = re.compile(r"memory required for HLO temporaries \(([\d.]+)([KMGT])\)")


def _over_hbm(error: Exception, cfg: Config, layout: plan.Layout, mesh) -> dict:
    """libtpu fails a compile whose temporaries exceed the chip's HBM (RESOURCE_EXHAUSTED,
    naming the bytes it needed): that plan does not fit; its sizes, the temporaries from
    the message (a lower bound of the total, with the state's exact shard sizes)."""
    m = _OVER_HBM.search(str(error))
    if m is None:
        raise error
    temp = int(float(m[1]) * 2 ** (10 * " KMGT".index(m[2])))
    state = plan.state_bytes(cfg, layout)
    return {"params": state[0], "opt_state": state[1], "state": sum(state), "temp": temp}


def flops_note(cfg: Config, compiled_total: float, analytic: float) -> str:
    return (
        f"  FLOPs per step: compiled {compiled_total:.4g}, analytic {analytic:.4g} "
        f"(model.flops_per_token, what MFU counts): ratio {compiled_total / analytic:.3f}"
        f"{' (remat recomputes the forward pass)' if cfg.model.remat != 'none' else ''}"
    )


def plan_tpu(
    cfg: Config,
    layout: plan.Layout,
    topology: str,
    *,
    slices: int = 1,
    mfu: float = 0.4,
    usable: float = plan.DEFAULT_USABLE,
    flops: bool = True,
) -> plan.Plan:
    """Compile cfg's train step with libtpu for `slices` slices of `topology` on
    `layout` and account its per-chip memory and time (flops: also the compiled FLOPs,
    two more compiles)."""
    devices = topology_devices(topology, slices)
    if layout.devices != len(devices):
        raise plan.PlanError(
            f"mesh {layout} has {layout.devices} devices but {topology}"
            f"{f' x {slices} slices' if slices > 1 else ''} has {len(devices)} chips"
        )
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, slices=slices))
    t = cfg.train
    microbatch = t.batch_size // t.microbatches
    plan.check_layout(cfg, layout, microbatch)
    mesh = tpu_mesh(layout, devices, slices)
    start = time.perf_counter()
    try:
        compiled, sizes = plan.compile_step(cfg, layout, mesh=mesh)
    except Exception as e:  # noqa: BLE001 - libtpu refuses a program that exceeds HBM
        compiled, sizes = None, _over_hbm(e, cfg, layout, mesh)
    seconds = time.perf_counter() - start
    if compiled is None:
        flops = False
        xla = {"argument": 0, "output": 0, "alias": 0, "temp": sizes["temp"]}
        total = sizes["state"] + sizes["temp"]
    else:
        xla = plan.xla_fields(compiled)
        total = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
    kind = devices[0].device_kind
    device = metrics.device_info(kind)
    tokens = t.batch_size * cfg.model.seq_len
    analytic = model.flops_per_token(cfg.model) * tokens
    gen = parse_topology(topology)[0]
    verb = "compiled by" if compiled is not None else "refused (temporaries over HBM) by"
    notes = [
        f"  {verb} libtpu {libtpu_version()} for TPU {gen}, {len(devices)} chips "
        f"({topology}{f' x {slices} slices over DCN' if slices > 1 else ''}; device_kind "
        f"{kind!r})"
    ]
    if flops:
        notes.append(flops_note(cfg, step_flops(cfg, layout, mesh), analytic))
    return plan.Plan(
        layout=layout,
        remat=cfg.model.remat,
        microbatch=microbatch,
        microbatches=t.microbatches,
        params=sizes["params"],
        opt_state=sizes["opt_state"],
        temporaries=total - sizes["params"] - sizes["opt_state"],
        total=total,
        xla=xla,
        method="compiled" if compiled is not None else "over HBM: libtpu refused the compile",
        compile_seconds=seconds,
        device=f"TPU {gen} ({kind})",
        hbm=device.hbm_bytes,
        usable=usable,
        step_seconds=analytic / (layout.devices * device.peak_flops * mfu),
        tokens_per_step=tokens,
        mfu=mfu,
        compiler=f"libtpu {libtpu_version()}",
        notes=tuple(notes),
        slices=slices,
    )


def search_tpu(
    cfg: Config,
    topology: str,
    *,
    slices: int = 1,
    mfu: float = 0.4,
    usable: float = plan.DEFAULT_USABLE,
    max_tensor: int = 16,
    remats: tuple[str, ...] = plan.REMATS,
    log=print,
    flops: bool = True,
) -> tuple[plan.Plan | None, list[plan.Plan]]:
    """plan.search over the slice shapes of topology's generation, smallest first, up to
    topology's (all of them for a bare generation), keeping only meshes the torus takes.
    With flops, the chosen plan is compiled twice more for its FLOPs (step_flops)."""
    gen, shape = parse_topology(topology)
    shapes = GENERATIONS[gen][1]
    if shape:
        shapes = [s for s in shapes if chips(s) <= chips(shape)]
        if shape not in shapes:
            shapes.append(shape)
    by_count = {}
    for s in shapes:
        by_count.setdefault(chips(s) * slices, f"{gen}:{s}")
    hbm = metrics.device_info(topology_devices(by_count[min(by_count)], slices)[0].device_kind)

    def plan_fn(c: Config, layout: plan.Layout) -> plan.Plan:
        return plan_tpu(
            c, layout, by_count[layout.devices], slices=slices, mfu=mfu, usable=usable,
            flops=False,
        )  # fmt: skip

    def layout_ok(layout: plan.Layout) -> bool:
        devices = topology_devices(by_count[layout.devices], slices)
        return mesh_fits_torus(layout, devices, slices)

    best, tried = plan.search(
        cfg,
        usable=usable,
        hbm=hbm.hbm_bytes,
        max_tensor=max_tensor,
        remats=remats,
        log=log,
        device_counts=sorted(by_count),
        plan_fn=plan_fn,
        layout_ok=layout_ok,
        min_data=slices,
    )
    if best is not None and flops:
        c = plan.with_plan_settings(cfg, best.remat, best.microbatches)
        devices = topology_devices(by_count[best.layout.devices], slices)
        total = step_flops(c, best.layout, tpu_mesh(best.layout, devices, slices))
        analytic = model.flops_per_token(c.model) * best.tokens_per_step
        best = dataclasses.replace(best, notes=(*best.notes, flops_note(c, total, analytic)))
    return best, tried


def cli_plan(args, cfg: Config) -> int:
    """`gptjax plan --tpu TOPOLOGY [--slices N] [--search]`: exit 0 fits, 1 does not, 2 error."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # eager work on the CPU; compiles for TPU
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    say = functools.partial(print, flush=True)
    try:
        parse_topology(args.tpu)
        if not available():
            raise plan.PlanError(LIBTPU_MISSING)
        if cfg.model.vocab_size <= 0:
            raise plan.PlanError("set model.vocab_size (--config.model.vocab_size=N)")
        if args.slices < 1:
            raise plan.PlanError(f"--slices {args.slices}: must be at least 1")
        if args.search:
            say(f"searching for the smallest {args.tpu} slice that fits (x {args.slices}):")
            best, _ = search_tpu(
                cfg, args.tpu, slices=args.slices, mfu=args.mfu, usable=args.usable,
                max_tensor=args.max_tensor, log=say,
            )  # fmt: skip
            if best is None:
                say(f"gptjax: no slice up to {args.tpu} fits")
                return 1
            say(plan.format_plan(best, cfg))
            return 0
        gen, shape = parse_topology(args.tpu)
        if not shape:
            raise plan.PlanError(f"--tpu {args.tpu}: give a shape (e.g. {gen}:2x2) or --search")
        n = chips(shape) * args.slices
        if args.mesh:
            layout = plan.resolve_layout(sharding.parse_mesh(args.mesh), n)
        else:  # the config's mesh is one slice's; the slices multiply its data axis
            one = plan.resolve_layout(cfg.mesh, chips(shape))
            layout = plan.Layout(one.data * args.slices, one.fsdp, one.tensor)
        if args.step != "train":
            return _cli_step(args, cfg, layout)
        cfg = _splittable(cfg, layout, say)
        p = plan_tpu(cfg, layout, args.tpu, slices=args.slices, mfu=args.mfu, usable=args.usable)
    except (plan.PlanError, ConfigError) as e:
        print(f"gptjax: {e}", file=sys.stderr)
        return 2
    say(plan.format_plan(p, cfg))
    return 0 if p.fits else 1


# ----------------------------------------------------------------------------- HLO

_COLLECTIVE = re.compile(
    r"=\s.*?\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\(.*?replica_groups=(\{\{[\d,{}]*\}\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)"
)
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?([%\w.,\s-]+)")


def _groups(text: str) -> list[list[int]]:
    """replica_groups as lists: `{{0,1},{2,3}}` or the iota form `[2,4]<=[4,2]T(1,0)`."""
    import numpy as np

    if text.startswith("{"):
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", text)]
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    shape, dims = [int(x) for x in m[1].split(",")], [int(x) for x in m[2].split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m[3]:
        ids = ids.transpose([int(x) for x in m[3].split(",")])
    return ids.reshape(shape).tolist()


def collectives(hlo: str, mesh) -> list[tuple[str, bool, bool]]:
    """(op, crosses slices, inside a loop) of every collective in a compiled module's HLO
    text. libtpu compiles the program of one slice: collectives over the slice's chips
    have replica_groups (a group crosses slices if its devices, positions in the mesh,
    come from several), the data-center network transfers are `send`s to the Megascale
    runtime (one per transfer, its type e.g. ALL_REDUCE). A loop is any computation
    reachable from a while body."""
    flat = list(mesh.devices.flat)
    slice_of = [getattr(d, "slice_index", 0) for d in flat]
    ops, calls, name = {}, {}, None
    loops: set[str] = set()
    for line in hlo.splitlines():
        head = re.match(r"(?:ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head[1]
            ops[name], calls[name] = [], set()
            continue
        if name is None:
            continue
        for ref in _CALLS.findall(line):
            calls[name].update(r.strip().lstrip("%") for r in ref.split(",") if r.strip())
        body = re.search(r"\bwhile\(.*\bbody=%?([\w.-]+)", line)
        if body:
            loops.add(body[1])
        dcn = re.search(r"\bsend\(.*_xla_megascale_transfer_type=\"(\w+)\"", line)
        if dcn:  # libtpu compiles one slice's program; DCN transfers are Megascale sends
            ops[name].append((dcn[1].lower().replace("_", "-"), True))
            continue
        m = _COLLECTIVE.search(line)
        if m:
            crosses = any(len({slice_of[i] for i in g}) > 1 for g in _groups(m[2]))
            ops[name].append((m[1], crosses))
    in_loop, todo = set(), list(loops)
    while todo:
        c = todo.pop()
        if c not in in_loop:
            in_loop.add(c)
            todo.extend(calls.get(c, ()))
    return [(op, crosses, c in in_loop) for c, found in ops.items() for op, crosses in found]


def _splittable(cfg: Config, layout: plan.Layout, say) -> Config:
    """cfg, with fewer microbatches where its microbatch does not split over the mesh's
    batch shards (a pod has more chips than a GPT-3 config's 16-sequence microbatch),
    said in one line; the memory is then that of the larger microbatch."""
    t, shards = cfg.train, layout.data * layout.fsdp
    micro = t.batch_size // t.microbatches
    if micro % shards == 0:
        return cfg
    for k in range(t.microbatches, 0, -1):
        if t.batch_size % k == 0 and (t.batch_size // k) % shards == 0:
            say(f"(train.microbatches {t.microbatches} -> {k}: a {micro}-sequence microbatch "
                f"does not split over data*fsdp={shards})")  # fmt: skip
            return plan.with_plan_settings(cfg, cfg.model.remat, k)
    return cfg  # check_layout says why


def _cli_step(args, cfg: Config, layout: plan.Layout) -> int:
    """`--step eval|decode` on a TPU topology (gptjax.inference_plan)."""
    from gptjax import inference_plan

    devices = topology_devices(args.tpu, args.slices)
    if layout.devices != len(devices):
        raise plan.PlanError(
            f"mesh {layout} has {layout.devices} devices, {args.tpu} {len(devices)}"
        )
    mesh = tpu_mesh(layout, devices, args.slices)
    device = metrics.device_info(devices[0].device_kind)
    note = (
        f"  compiled by libtpu {libtpu_version()} for TPU {parse_topology(args.tpu)[0]}, "
        f"{len(devices)} chips ({args.tpu})"
    )
    try:
        p = inference_plan.plan_step(
            cfg, args.step, mesh, args.batch, device.hbm_bytes, args.usable
        )
    except Exception as e:  # noqa: BLE001 - libtpu refuses a program that exceeds HBM
        m = _OVER_HBM.search(str(e))
        if m is None:
            raise
        print(f"{args.step} step on mesh {layout}: DOES NOT FIT: libtpu needs {m[1]}{m[2]}B "
              f"of temporaries per chip, more than its HBM\n{note}", flush=True)  # fmt: skip
        return 1
    print(inference_plan.format_step_plan(p, layout, [note]), flush=True)
    return 0 if p.fits else 1
