"""Train state, the pure train step, and the pretraining loop.

The loop dispatches step N+1 before it waits for step N (never further ahead), and
metrics stay on the device until a log step (or a checkpoint, which first checks that
no loss since the last check was NaN/inf, so the last checkpoint is always a good one).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from gptjax import config as config_lib
from gptjax import data, loop, metrics, model, sharding, xla_cpu
from gptjax.checkpoint import (
    Checkpointer,
    CheckpointError,
    abstract_with_shardings,
    checkpoint_dir,
    load_params,
    read_checkpoint_json,
)
from gptjax.config import Config
from gptjax.distributed import primary_first
from gptjax.loop import NonFiniteLoss, Preempted, PreemptionFlag, Progress
from gptjax.optim import lr_schedule, make_optimizer
from gptjax.tokenizer import tokenizer_from_record
from gptjax.workdir import claim

log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # base dropout key; step and microbatch are folded in


# ----------------------------------------------------------------------------- state


def state_shardings(cfg: Config, mesh, tx):
    """(abstract TrainState, its shardings), derived from eval_shape and the rules table."""
    graphdef, abstract_params = model.abstract_model(cfg.model)
    param_sh = sharding.param_shardings(abstract_params, mesh)
    # The key is made inside eval_shape too: nothing here may touch a device (a plan
    # for a TPU topology traces this on devices that only exist to be compiled for).
    abstract = jax.eval_shape(lambda: _init_state(cfg, tx, jax.random.key_data(jax.random.key(0))))
    return graphdef, abstract, sharding.state_shardings(abstract, param_sh, mesh, tx)


def _init_state(cfg: Config, tx, key_data) -> TrainState:
    params_key, dropout_key = jax.random.split(jax.random.wrap_key_data(key_data))
    params = model.init_params(cfg.model, params_key)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(dropout_key),
    )


def init_state(cfg: Config, mesh, tx, shardings) -> TrainState:
    """Parameters are born sharded: init is jitted with the derived out_shardings."""
    key_data = jax.random.key_data(jax.random.key(cfg.train.seed))
    return jax.jit(lambda k: _init_state(cfg, tx, k), out_shardings=shardings)(key_data)


# ----------------------------------------------------------------------------- step


def lm_loss(graphdef, params, tokens_BxL1, rng=None):
    """Mean next-token cross-entropy over a batch of packed windows [B, L+1]."""
    inputs_BxL, targets_BxL = tokens_BxL1[:, :-1], tokens_BxL1[:, 1:]
    logits_BxLxV = model.apply(graphdef, params, inputs_BxL, rng=rng).astype(jnp.float32)
    if sharding.manual_axes():
        # The target's logit by a one-hot product, not a gather: inside the data-manual
        # shard_map of _reduce_once_over_data, a gather from tensor-split logits aborts
        # XLA's SPMD partitioner (jax 0.10.2); the product is elementwise per shard.
        one_hot_BxLxV = jax.nn.one_hot(targets_BxL, logits_BxLxV.shape[-1], dtype=jnp.float32)
        target_BxL = jnp.sum(logits_BxLxV * one_hot_BxLxV, axis=-1)
        return (jax.nn.logsumexp(logits_BxLxV, axis=-1) - target_BxL).mean()
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
    return losses_BxL.mean()


def make_train_step(cfg: Config, graphdef, tx):
    schedule = lr_schedule(cfg.optim, cfg.train.steps)
    use_dropout = cfg.model.dropout > 0 or cfg.model.attn_dropout > 0

    def train_step(state: TrainState, batch_KxBxL1):
        """One optimizer step over K microbatches (gradient accumulation)."""
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(lambda p, t, r: lm_loss(graphdef, p, t, r))

        def accumulate(params, batch_KxBxL1, rng_key):
            def micro(carry, xs):
                loss_sum, grad_sum = carry
                tokens_BxL1, index = xs
                rng = jax.random.fold_in(rng_key, index) if use_dropout else None
                loss, grads = grad_fn(params, tokens_BxL1, rng)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            k = batch_KxBxL1.shape[0]
            (loss_sum, grad_sum), _ = jax.lax.scan(
                micro, (jnp.zeros((), jnp.float32), zeros), (batch_KxBxL1, jnp.arange(k))
            )
            return loss_sum, grad_sum

        n_micro = batch_KxBxL1.shape[0]
        replicas = _data_replicas()
        if n_micro == 1:  # no accumulation buffers, no loop: measurably faster on CPU
            rng = jax.random.fold_in(step_rng, 0) if use_dropout else None
            loss_sum, grad_sum = grad_fn(state.params, batch_KxBxL1[0], rng)
        elif replicas > 1 and cfg.mesh.slices > 1:
            loss_sum, grad_sum = _reduce_once_over_data(accumulate, replicas)(
                state.params, batch_KxBxL1, step_rng
            )
        else:
            loss_sum, grad_sum = accumulate(state.params, batch_KxBxL1, step_rng)
        loss = loss_sum / n_micro
        grads = jax.tree.map(lambda g: g / n_micro, grad_sum)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        metrics_ = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return new_state, metrics_

    return train_step


def _data_replicas() -> int:
    """The size of the current mesh's data axis (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return (
        1 if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True)).get("data", 1)
    )


def _reduce_once_over_data(accumulate, replicas: int):
    """accumulate(params, batch, rng) -> (loss sum, gradient sum), run per data replica
    (manual over the data axis, automatic over fsdp/tensor) and summed over the replicas
    once, after the microbatch loop. Left to itself XLA reduces the gradients over the
    data axis in every microbatch; across TPU slices that reduction crosses the
    data-center network, so it must run once per step (tests/test_tpu.py counts it).
    Used on multi-slice meshes (mesh.slices > 1) only: within a slice the per-microbatch
    reduction rides the fast ICI torus, and the manual axis needs XLA workarounds (the
    gathers in model.GPT.embed and lm_loss)."""

    def local(params, batch_KxBxL1, rng_key):
        rng_key = jax.random.fold_in(rng_key, jax.lax.axis_index("data"))
        loss_sum, grad_sum = accumulate(params, batch_KxBxL1, rng_key)
        mean = lambda x: jax.lax.psum(x, "data") / replicas  # noqa: E731
        return mean(loss_sum), jax.tree.map(mean, grad_sum)

    return jax.shard_map(
        local,
        in_specs=(P(), P(None, "data"), P()),
        out_specs=(P(), P()),
        axis_names={"data"},
        check_vma=False,
    )


def jit_step(step_fn, mesh, state_sh, batch_sh):
    """step_fn(state, batch) -> (state, metrics) under jax.jit: sharded, the state
    donated, and compiled with xla_cpu.step_compiler_options(mesh)."""
    return jax.jit(
        step_fn,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, None),
        donate_argnums=0,
        compiler_options=xla_cpu.step_compiler_options(mesh),
    )


def make_eval_step(graphdef):
    def eval_step(params, tokens_BxL1):
        return lm_loss(graphdef, params, tokens_BxL1)

    return eval_step


def microbatches_at(cfg: Config, step: int) -> int:
    """Microbatches in optimizer step `step`: constant, or ramped linearly (GPT-3)."""
    t = cfg.train
    if not t.batch_ramp_start or step >= t.batch_ramp_steps:
        return t.microbatches
    micro = t.batch_size // t.microbatches
    start = t.batch_ramp_start // micro
    return min(t.microbatches, start + (t.microbatches - start) * step // t.batch_ramp_steps)


# ----------------------------------------------------------------------------- loop


def resolve_vocab(cfg: Config, vocab_size: int) -> Config:
    m = cfg.model
    if m.vocab_size == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(m, vocab_size=vocab_size))
    if m.vocab_size < vocab_size:
        raise config_lib.ConfigError(
            f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's {vocab_size}"
        )
    return cfg


def _init_params(path: str, abstract_params, shardings) -> dict:
    """train.init_from's parameters, placed on the run's shardings; another model shape
    is a CheckpointError naming the parameters."""
    target = abstract_with_shardings(abstract_params, shardings)
    try:
        _, params, _ = load_params(path, target)
    except CheckpointError as e:
        raise CheckpointError(f"train.init_from={path}: {e}") from None
    return params


def _global_batch(local_KxBxL1: np.ndarray, batch_sh) -> jax.Array:
    return jax.make_array_from_process_local_data(batch_sh, local_KxBxL1)


def train(cfg: Config, workdir: str | Path) -> dict:
    """Pretrain (or resume) in workdir, which this run owns meanwhile (a second run
    there is a WorkdirError). Returns a summary dict."""
    # A prepared directory brings its own tokenizer.
    if cfg.tokenizer.kind == "gpt2" and not cfg.tokenizer.path and not data.prepared_dir(cfg.data):
        raise config_lib.ConfigError(
            "tokenizer.kind=gpt2 needs tokenizer.path: a directory holding encoder.json and "
            "vocab.bpe (--config.tokenizer.path=DIR)"
        )
    sharding.mesh_shape(cfg.mesh, jax.device_count())  # before any data work: fail at once
    eval_tasks = None
    if cfg.train.eval_tasks:  # read once, here: a bad task fails before any data work
        from gptjax.eval.in_training import load_tasks

        eval_tasks = load_tasks(cfg.train.eval_tasks, cfg.data.tfds_data_dir)
    with claim(workdir, "train"):
        return _train(cfg, Path(workdir), eval_tasks)


def _train(cfg: Config, workdir: Path, eval_tasks=None) -> dict:
    primary = jax.process_index() == 0
    # No checkpoints/ until the data is ready: a run that fails before leaves none.
    ckdir = checkpoint_dir(workdir)
    ckpt = Checkpointer(ckdir, cfg.checkpoint) if ckdir.is_dir() else None
    resuming = bool(ckpt and ckpt.steps())
    if cfg.train.init_from and not resuming:
        try:  # a missing or unreadable one fails before any data work
            read_checkpoint_json(cfg.train.init_from)
        except CheckpointError as e:
            raise CheckpointError(f"train.init_from={cfg.train.init_from}: {e}") from None

    # The tokenizer of a resumed run is the one its checkpoint recorded.
    # Process 0 trains the tokenizer and builds the token cache before the others read
    # them (on a shared filesystem; with local disks each process builds its own copy).
    # Orbax's restore is a collective: every process reads the record together, not
    # process 0 inside primary_first while the others wait at its barrier.
    record = ckpt.read_latest_json()[2] if resuming else None
    with primary_first("gptjax_tokenizer_and_cache"):
        if resuming:
            tokenizer = tokenizer_from_record(record)
        elif (
            cfg.train.init_from
            and not cfg.tokenizer.path
            and (record := read_checkpoint_json(cfg.train.init_from)[1])
        ):
            tokenizer = tokenizer_from_record(record)
        else:
            tokenizer = data.get_tokenizer(cfg, workdir)
        cfg = resolve_vocab(cfg, tokenizer.vocab_size)
        train_src, val_src = data.load_splits(cfg, tokenizer, workdir)
    ckpt = ckpt or Checkpointer(ckdir, cfg.checkpoint)

    mesh = sharding.make_mesh(cfg.mesh)
    t = cfg.train
    n_proc = jax.process_count()
    micro_global = t.batch_size // t.microbatches
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro_global % n_batch_shards or micro_global % n_proc:
        raise config_lib.ConfigError(
            f"microbatch of {micro_global} sequences does not split over data*fsdp="
            f"{n_batch_shards} and {n_proc} processes"
        )
    tx = make_optimizer(cfg.optim, t.steps)

    with jax.set_mesh(mesh):
        graphdef, abstract, state_sh = state_shardings(cfg, mesh, tx)
        batch_sh = sharding.batch_sharding(mesh, 3, batch_dim=1)  # [K, B, L+1]
        eval_sh = sharding.batch_sharding(mesh, 2)
        train_iter = data.train_iterator(
            train_src, micro_global, t.seed, cfg.data.workers, cfg.data.prefetch
        )

        if resuming:
            start_step, state, _, _ = ckpt.restore(
                abstract_with_shardings(abstract, state_sh),
                train_iter,
                model_config=config_lib.to_dict(cfg)["model"],
            )
            log.info("resumed from step %d in %s", start_step, ckpt.directory)
        else:
            state, start_step = init_state(cfg, mesh, tx, state_sh), 0
            if t.init_from:
                # Adam's moments start at zero whatever the parameters: only these change.
                state = state.replace(
                    params=_init_params(t.init_from, abstract.params, state_sh.params)
                )
                log.info("initialised the parameters from %s", t.init_from)
        sharding.check_replication(state.params, state_sh.params, mesh)

        step_fn = jit_step(make_train_step(cfg, graphdef, tx), mesh, state_sh, batch_sh)
        eval_fn = jax.jit(make_eval_step(graphdef), in_shardings=(state_sh.params, eval_sh))
        val_batches = [
            _global_batch(b, eval_sh)
            for b in data.eval_batches(val_src, micro_global, t.eval_batches)
        ]

        def evaluate(params) -> float:
            losses = []
            for b in val_batches:
                losses.append(eval_fn(params, b))
                xla_cpu.throttle(losses)
            return float(np.mean(jax.device_get(losses)))

        fewshot = None  # train.eval_tasks, scored on these parameters and this mesh
        if eval_tasks:
            from gptjax.eval.in_training import TrainingEval

            fewshot = TrainingEval(eval_tasks, cfg.model, tokenizer, mesh)

        n_params = model.param_count(state.params)
        flops_tok = model.flops_per_token(cfg.model)
        peak = metrics.peak_flops_total(t.peak_flops)
        if primary:
            print(
                f"gptjax: {n_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, "
                f"{len(train_src)} train / {len(val_src)} val windows of {cfg.model.seq_len + 1} "
                f"tokens, steps {start_step}->{t.steps}",
                flush=True,
            )
        writer = metrics.MetricsWriter(workdir, start_step, enabled=primary)

        pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet read
        # Read at a checkpoint, not yet logged; on resume, the losses of a window that
        # SIGTERM cut short, so the next record averages the steps an uninterrupted run's does.
        flush_held = [(start_step, {"loss": x}) for x in writer.partial_window(start_step)]

        def flush_pending() -> list[tuple[int, dict]]:
            return loop.drain(
                pending,
                lambda s, loss: (
                    f"loss is {loss} at step {s}; stopping. The last checkpoint "
                    f"(step {ckpt.steps()[-1] if ckpt.steps() else 'none'}) is from before it"
                ),
            )

        def save(step: int) -> None:
            flush_held.extend(flush_pending())
            ckpt.save(
                step,
                state,
                train_iter,
                config_lib.to_dict(cfg),
                tokenizer.to_record(),
            )

        progress = Progress(start_step, t.steps, primary)
        last_time, last_step = time.perf_counter(), start_step
        val_loss = None
        with PreemptionFlag() as sigterm:
            try:
                for step in range(start_step, t.steps):
                    k = microbatches_at(cfg, step)
                    local = np.stack([next(train_iter) for _ in range(k)])
                    state, m = step_fn(state, _global_batch(local, batch_sh))
                    ckpt.check_saved()  # a failed background save stops the run here
                    pending.append((step + 1, m))
                    xla_cpu.throttle(pending)  # step N+1 queued before step N waited for
                    done = step + 1
                    evaluating = done % t.eval_every == 0 or done == t.steps
                    if done % t.log_every == 0 or evaluating:
                        got = flush_held + flush_pending()
                        flush_held.clear()
                        now = time.perf_counter()
                        tokens = sum(
                            microbatches_at(cfg, s) * micro_global * cfg.model.seq_len
                            for s in range(last_step, done)
                        )
                        tps = tokens / max(now - last_time, 1e-9)
                        last_time, last_step = now, done
                        record = {
                            "loss": float(np.mean([float(x["loss"]) for _, x in got])),
                            "lr": float(got[-1][1]["lr"]),
                            "grad_norm": float(got[-1][1]["grad_norm"]),
                            "tokens_per_sec": tps,
                            "mfu": metrics.mfu(tps, flops_tok, peak),
                        }
                        if evaluating:
                            val_loss = evaluate(state.params)
                            record["val_loss"] = val_loss
                            record["val_ppl"] = math.exp(min(val_loss, 50.0))
                            if fewshot is not None:
                                record.update(fewshot(state.params))
                            last_time = time.perf_counter()  # the next window: steps only
                        writer.write(done, record)
                        progress.update(done, record)
                    saved = loop.checkpoint_due(
                        done, cfg.checkpoint.every_steps, last=done == t.steps
                    )
                    if saved:
                        save(done)
                    loop.stop_if_preempted(
                        sigterm, done, saved=saved, save=save, ckpt=ckpt, why="SIGTERM",
                        # the steps since the last record: a partial window, for the resume
                        on_stop=lambda s: writer.write_partial(
                            s, [float(x["loss"]) for _, x in flush_held]
                        ),
                    )  # fmt: skip
                ckpt.wait()
            finally:
                progress.close()
                writer.close()
                ckpt.close()

    summary = {
        "step": t.steps,
        "resumed_from": start_step,
        "val_loss": val_loss,
        "params": n_params,
    }
    if primary:
        metrics.plot_loss(workdir)
        metrics.plot_eval(workdir)
    # Every process samples: the parameters are sharded over all of them.
    if t.sample_tokens:
        from gptjax.generate import sample_text

        text = sample_text(
            graphdef,
            state.params,
            tokenizer,
            cfg.model,
            t.sample_prompt,
            t.sample_tokens,
            t.seed,
        )
        summary["sample"] = text
        if primary:
            print(f"--- sample ---\n{t.sample_prompt}{text}\n--------------", flush=True)
    return summary


__all__ = [
    "TrainState",
    "train",
    "make_train_step",
    "init_state",
    "state_shardings",
    "lm_loss",
    "CheckpointError",
    "NonFiniteLoss",
    "Preempted",
]
