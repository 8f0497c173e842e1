"""`gptjax plan --step eval|decode`: the memory of the evaluation and decoding programs,
compiled ahead of time with abstract inputs on any mesh (gptjax.tpu: a TPU topology's).

eval is the scoring program of `gptjax eval` (eval.score_program.make_score_fn): R rows of
n_ctx tokens of packed requests through the model, the LM head applied to the scored
positions in blocks over vocabulary chunks, parameters in the compute dtype (as
evaluation loads them); the shape is the same whatever the requests.

decode is one KV-cache decode step of generate.py's loop (model.GPT.decode of one token
per row) over a cache of n_ctx slots, the cache donated as the loop carries it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import model, plan, sharding, xla_cpu
from gptjax.config import Config


@dataclasses.dataclass(frozen=True)
class StepPlan:
    step: str
    shape: str  # what one call computes
    params: int  # bytes per device
    total: int
    xla: dict
    hbm: int
    usable: float

    @property
    def fits(self) -> bool:
        return self.total <= self.usable * self.hbm


def _struct(shape, dtype, mesh, logical) -> jax.ShapeDtypeStruct:
    spec = sharding.logical_to_spec(logical, shape, mesh)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def abstract_params(cfg: Config, mesh):
    """(graphdef, parameters as ShapeDtypeStructs in the compute dtype with their
    derived shardings)."""
    graphdef, abstract = model.abstract_model(cfg.model)
    shardings = sharding.param_shardings(abstract, mesh)
    dtype = jnp.dtype(cfg.model.compute_dtype)
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s),
        nnx.to_pure_dict(abstract),
        shardings,
    )
    return graphdef, params


def eval_program(cfg: Config, mesh, batch: int):
    """(jitted scoring function, its abstract arguments, description)."""
    from gptjax.eval import buckets, score_program

    m = cfg.model
    graphdef, params = abstract_params(cfg, mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    r, s = buckets.row_bucket(batch, shards), m.seq_len
    shapes = score_program.input_shapes(r, s, shards)
    c = score_program.vocab_chunks(m.padded_vocab, mesh.shape["tensor"])
    dt = jnp.dtype(m.compute_dtype)
    head = _struct((c, m.d_model, m.padded_vocab // c), dt, mesh, (None, "embed", "vocab"))

    def rows(*shape):
        return _struct(shape, jnp.int32, mesh, ("batch",) + (None,) * (len(shape) - 1))

    # every input but the last, the scalar count of head blocks, is split by rows
    args = (params, head, *(rows(*shape) for shape in shapes[:-1]))
    args += (jax.ShapeDtypeStruct(shapes[-1], jnp.int32),)
    shape = (
        f"{r} rows x {s} tokens of packed requests, {shapes[4][0]} scored positions, LM head in "
        f"{c} vocabulary chunk(s), parameters in {m.compute_dtype}"
    )
    return jax.jit(score_program.make_score_fn(graphdef, m)), args, shape


def decode_program(cfg: Config, mesh, batch: int):
    """(jitted one-token decode step, its abstract arguments, description)."""
    m = cfg.model
    graphdef, params = abstract_params(cfg, mesh)
    dt = jnp.dtype(m.compute_dtype)
    s = m.seq_len
    kv = _struct((batch, m.kv_heads, s, m.head_dim), dt, mesh, ("batch", "kv_heads", None, None))
    cache = model.KVCache(
        (kv,) * m.n_layer,
        (kv,) * m.n_layer,
        jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P())),
        _struct((batch, s), jnp.bool_, mesh, ("batch", None)),
        fresh=False,
    )
    head = _struct((m.d_model, m.padded_vocab), dt, mesh, ("embed", "vocab"))
    if not m.tie_embeddings:
        head = None
    tokens = _struct((batch, 1), jnp.int32, mesh, ("batch", None))

    def step(params, head_DxV, cache, tokens_Bx1, positions_Bx1):
        return nnx.merge(graphdef, params).decode(tokens_Bx1, positions_Bx1, cache, head_DxV)

    shape = f"{batch} sequences x 1 token, a KV cache of {s} slots in {m.compute_dtype}"
    return jax.jit(step, donate_argnums=2), (params, head, cache, tokens, tokens), shape


def compile_step(cfg: Config, step: str, mesh, batch: int):
    """(compiled eval or decode program on `mesh`, its abstract arguments, description)."""
    program = {"eval": eval_program, "decode": decode_program}[step]
    if batch % (mesh.shape["data"] * mesh.shape["fsdp"]) and step == "decode":
        raise plan.PlanError(
            f"--batch {batch} does not split over data*fsdp="
            f"{mesh.shape['data'] * mesh.shape['fsdp']}"
        )
    # The target's program, not the XLA:CPU forms (gptjax.xla_cpu), as plan.compile_step.
    with jax.set_mesh(mesh), xla_cpu.portable_lowering():
        fn, args, shape = program(cfg, mesh, batch)
        return fn.lower(*args).compile(), args, shape


def plan_step(cfg: Config, step: str, mesh, batch: int, hbm: int, usable: float) -> StepPlan:
    """Compile the eval or decode program on `mesh` and account its per-device memory."""
    compiled, args, shape = compile_step(cfg, step, mesh, batch)
    xla = plan.xla_fields(compiled)
    params = plan.shard_bytes(args[0], jax.tree.map(lambda a: a.sharding, args[0]))
    total = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
    return StepPlan(step, shape, params, total, xla, hbm, usable)


def format_step_plan(p: StepPlan, layout, notes=()) -> str:
    gib = 2**30
    return "\n".join(
        [
            f"{p.step} step on mesh {layout} ({layout.devices} devices): {p.shape}",
            f"  parameters           {p.params / gib:8.2f} GiB",
            f"  everything else      {(p.total - p.params) / gib:8.2f} GiB  ("
            f"{'KV cache, ' if p.step == 'decode' else ''}activations, logits, inputs)",
            f"  total per device     {p.total / gib:8.2f} GiB",
            f"  {p.hbm / gib:.1f} GiB per device, plan budget {p.usable * p.hbm / gib:.1f} GiB "
            f"({p.usable:.0%}): {'FITS' if p.fits else 'DOES NOT FIT'}",
            f"  memory_analysis per device: argument {p.xla['argument']:,} output "
            f"{p.xla['output']:,} alias {p.xla['alias']:,} temp {p.xla['temp']:,} bytes",
            *notes,
        ]
    )
