"""Device mesh, THE logical-to-mesh rules table, derived shardings, replication check.

Mesh axes:
- data:   pure data parallelism (batch split, parameters replicated).
- fsdp:   batch split AND parameters/optimizer state split along "embed" (ZeRO-3).
- tensor: Megatron-style split of heads, MLP hidden units and vocabulary.
There is no sequence axis: at GPT-3's 2048 context the activations of one
sequence fit one device, and remat is the cheaper lever; it would earn its place
only for long-context work.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# THE rules table. Logical names used by the model (parameters and activations)
# -> mesh axes. A name without a rule is replicated.
RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    # activations
    "batch": ("data", "fsdp"),
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve the (data, fsdp, tensor) shape; one -1 takes the devices left over.
    A shape that does not fit the devices is a ConfigError (a ValueError)."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if n_devices % known:
        raise ConfigError(f"mesh {sizes} does not divide the {n_devices} devices")
    sizes = [n_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} uses "
            f"{math.prod(sizes)} devices, but {n_devices} are present"
        )
    return tuple(sizes)


def parse_mesh(text: str) -> MeshConfig:
    """THE mesh syntax, `data=2,fsdp=4,tensor=1`: axes left out are 1; one may be -1
    (the devices left over). The old `D,F,T` form is still read, with a warning."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) == 3 and all("=" not in p for p in parts):
        try:
            old = MeshConfig(*(int(p) for p in parts))
        except ValueError:
            pass
        else:
            logging.warning(
                "--mesh %s is deprecated: write --mesh data=%d,fsdp=%d,tensor=%d",
                text, old.data, old.fsdp, old.tensor,
            )  # fmt: skip
            return old
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in sizes:
            raise ConfigError(f"--mesh: {part!r} is not one of data=N, fsdp=N, tensor=N")
        try:
            sizes[key.strip()] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh: {part!r} needs an integer size") from None
    return MeshConfig(**sizes)


def make_mesh(cfg: MeshConfig | str, devices=None) -> Mesh:
    """A Mesh over `devices` (default: all) with the (data, fsdp, tensor) shape of
    `cfg`. Given as text (`--mesh`, parse_mesh) and without devices, it takes the
    first data*fsdp*tensor devices, or all of them when an axis is -1. A shape that
    does not fit is a ConfigError."""
    text = None
    if isinstance(cfg, str):
        text, cfg = cfg, parse_mesh(cfg)
        sizes = (cfg.data, cfg.fsdp, cfg.tensor)
        if devices is None and -1 not in sizes and 0 < math.prod(sizes) <= jax.device_count():
            devices = jax.devices()[: math.prod(sizes)]
    devices = jax.devices() if devices is None else devices
    try:
        shape = mesh_shape(cfg, len(devices))
    except ConfigError as e:
        if text is None:
            raise
        raise ConfigError(f"--mesh {text!r}: {e}") from None
    if cfg.slices != 1:
        return multislice_mesh(shape, cfg.slices, devices)
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def multislice_mesh(shape: tuple[int, int, int], slices: int, devices) -> Mesh:
    """A (data, fsdp, tensor) mesh over `slices` TPU slices: the data axis is
    slices x (data / slices) with the slices outermost, so a data-parallel all-reduce
    is the only collective that crosses the data-center network."""
    from jax.experimental import mesh_utils

    data, fsdp, tensor = shape
    if slices < 1 or data % slices:
        raise ConfigError(f"mesh.slices={slices} must divide the data axis ({data})")
    found = {getattr(d, "slice_index", None) for d in devices}
    if None in found or len(found) != slices:
        raise ConfigError(
            f"mesh.slices={slices} but the devices come from {len(found - {None}) or 1} slice(s)"
        )
    grid = mesh_utils.create_hybrid_device_mesh(
        (data // slices, fsdp, tensor), (slices, 1, 1), devices
    )
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def manual_axes() -> set[str]:
    """The current mesh's axes that a surrounding shard_map is manual over."""
    mesh = jax.sharding.get_abstract_mesh()
    types = zip(mesh.axis_names, getattr(mesh, "axis_types", ()), strict=False)
    return {a for a, t in types if t == jax.sharding.AxisType.Manual}


def logical_to_spec(logical_axes, shape, mesh: Mesh) -> P:
    """PartitionSpec for one array: each dimension gets the mesh axes its logical name
    maps to, as long as they divide the dimension and are not used by another one."""
    if not logical_axes:
        return P()
    # Axes a shard_map is manual over (train: the data axis in gradient accumulation)
    # are not the compiler's to split: they stay out of the constraints.
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()), strict=False))
    used = {a for a, t in types.items() if t == jax.sharding.AxisType.Manual}
    spec = []
    for name, dim in zip(logical_axes, shape, strict=True):
        axes = tuple(a for a in RULES.get(name, ()) if a not in used and mesh.shape[a] > 1)
        # Drop trailing axes until the product divides the dimension.
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def param_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for a tree of nnx Variables (from eval_shape), as a plain dict."""
    from flax import nnx

    def one(var):
        names = var.get_metadata().get("out_sharding") or ()
        return NamedSharding(mesh, logical_to_spec(names, var.get_value().shape, mesh))

    return nnx.to_pure_dict(
        jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    )


def state_shardings(abstract_state, param_sh, mesh: Mesh, tx):
    """Shardings for a train state (a dataclass with step, params, opt_state, rng, from
    eval_shape): the parameters' `param_sh`, the optimizer state's those of the
    parameters it belongs to, the rest replicated."""
    import optax

    replicated = NamedSharding(mesh, P())
    # tree_map_params runs tx.init on placeholders, eagerly (its step counters): traced
    # under eval_shape here, so that it creates no array on the current mesh's devices
    # (a plan for a TPU topology traces this under a mesh of compile-only devices).
    found = []
    jax.eval_shape(
        lambda: found.append(
            optax.tree_map_params(
                tx,
                lambda _, s: s,
                abstract_state.opt_state,
                param_sh,
                transform_non_params=lambda _: replicated,
            )
        )
    )
    opt_sh = found[0]
    return dataclasses.replace(
        abstract_state, step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated
    )


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    spec = [None] * ndim
    spec[batch_dim] = RULES["batch"]
    return NamedSharding(mesh, P(*spec))


def constrain(x, logical_axes):
    """with_sharding_constraint by logical names under the current mesh; a no-op
    outside a mesh context (single-device use, tests of the bare model)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))


def replicated_params(params, shardings, min_size: int = 2**16) -> list[tuple[str, int]]:
    """(path, size) of every parameter with at least min_size elements left fully
    replicated. On an fsdp>1 mesh these are memory the user probably meant to split."""
    found = []
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_s = jax.tree.leaves(shardings)
    for (path, p), s in zip(flat_p, flat_s, strict=True):
        size = int(np.prod(p.shape))
        if size >= min_size and all(a is None for a in s.spec):
            found.append((jax.tree_util.keystr(path), size))
    return found


def check_replication(params, shardings, mesh: Mesh, min_size: int = 2**16) -> list:
    """Warn about large replicated parameters when the mesh asks for fsdp."""
    if mesh.shape["fsdp"] <= 1:
        return []
    found = replicated_params(params, shardings, min_size)
    for path, size in found:
        logging.warning(
            "parameter %s (%d elements) is replicated on every device although fsdp=%d: "
            "no logical axis of it divides the mesh",
            path,
            size,
            mesh.shape["fsdp"],
        )
    return found
