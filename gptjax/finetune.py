"""GPT-1 discriminative fine-tuning (Radford et al. 2018, section 3.2).

The pretrained GPT gains three token embeddings ([start], [delim], [extract], drawn
N(0, init_std) like the others) and a linear head W_y on the final hidden state at
[extract], with dropout before it. The objective is L3 = L2 + lm_coef * L1: L2 the task
loss (cross-entropy; squared error for a regression such as STS-B), L1 the language-
modelling loss on the same inputs. That model is gptjax/classifier.py; the task input
transformations and file formats are in gptjax/finetune_data.py.

Pretraining's machinery is reused: the mesh and rules table (sharding.py), the Optax
chain (optim.py; linear warmup over finetune.warmup_fraction of the steps, linear decay
to 0), TrainState, Orbax checkpoints with the data position (checkpoint.py), metrics.jsonl
+ TensorBoard (metrics.py). The dev set is evaluated after every epoch; the best epoch's
parameters are kept in WORKDIR/best and its dev metrics go to WORKDIR/results.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import config as config_lib
from gptjax import loop, metrics, model, sharding, xla_cpu
from gptjax.checkpoint import (
    Checkpointer,
    CheckpointError,
    abstract_with_shardings,
    checkpoint_dir,
    load_params,
    read_checkpoint_json,
)
from gptjax.classifier import (
    HEAD_AXES,
    RUNTIME_FIELDS,
    extend_vocab,
    finetune_loss,
    forward,
    init_head,
    with_specials,
)
from gptjax.config import (
    CheckpointConfig,
    ConfigError,
    FinetuneConfig,
    ModelConfig,
    OptimConfig,
)
from gptjax.files import write_text_atomic
from gptjax.finetune_data import (
    TASKS,
    Encoded,
    ExampleBatches,
    ExampleSource,
    FinetuneDataError,
    Specials,
    TaskSpec,
    batch_at,
    encode,
    majority,
    predictions,
    score,
    trim,
)
from gptjax.loop import PreemptionFlag
from gptjax.optim import lr_schedule, make_optimizer
from gptjax.tokenizer import load_tokenizer, tokenizer_from_record
from gptjax.train import TrainState, jit_step
from gptjax.workdir import claim

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- config


def validate(cfg: FinetuneConfig) -> FinetuneConfig:
    cfg = config_lib.from_dict(config_lib.to_dict(cfg), FinetuneConfig)
    f, t = cfg.finetune, cfg.task
    for name in ("epochs", "batch_size", "log_every", "length_bucket"):
        if getattr(f, name) <= 0:
            raise ConfigError(f"finetune.{name} must be positive")
    if f.lm_coef < 0 or not 0 <= f.clf_dropout < 1 or not 0 <= f.warmup_fraction < 1:
        raise ConfigError("need finetune.lm_coef >= 0, clf_dropout and warmup_fraction in [0, 1)")
    if cfg.optim.warmup_steps or cfg.optim.decay_steps:
        raise ConfigError(
            "optim.warmup_steps/decay_steps are derived here: set finetune.warmup_fraction "
            "and finetune.epochs instead"
        )
    if min(t.n_ctx, t.max_train, t.max_dev) < 0:
        raise ConfigError("task.n_ctx, max_train and max_dev must be >= 0")
    if cfg.checkpoint.every_steps <= 0 or cfg.checkpoint.keep <= 0:
        raise ConfigError("checkpoint.every_steps and checkpoint.keep must be positive")
    return cfg


def load_config(path, overrides=()) -> FinetuneConfig:
    """configs/finetune/X.py's get_config() with `section.field=value` overrides."""
    return validate(config_lib.load(path, overrides, root=FinetuneConfig))


def optimizer_config(cfg: FinetuneConfig, total_steps: int) -> OptimConfig:
    """The optimizer settings of a run of total_steps: warmup over warmup_fraction of
    the steps, then the schedule (linear to lr * min_lr_ratio = 0) over the rest."""
    warmup = round(cfg.finetune.warmup_fraction * total_steps)
    if cfg.finetune.warmup_fraction > 0:
        warmup = max(warmup, 1)
    return dataclasses.replace(cfg.optim, warmup_steps=warmup, decay_steps=total_steps)


# ----------------------------------------------------------------------------- model


def check_architecture(given: ModelConfig, stored: ModelConfig, where: str) -> None:
    """Fail when the config sets an architecture field the init checkpoint contradicts."""
    default = ModelConfig()
    diffs = [
        f"model.{f.name}: checkpoint {getattr(stored, f.name)!r} vs config "
        f"{getattr(given, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in RUNTIME_FIELDS
        and getattr(given, f.name) != getattr(default, f.name)
        and getattr(given, f.name) != getattr(stored, f.name)
    ]
    if diffs:
        raise CheckpointError(
            f"init checkpoint {where} has another architecture than the config: " + "; ".join(diffs)
        )


def make_finetune_step(cfg: FinetuneConfig, model_cfg: ModelConfig, spec, graphdef, tx, schedule):
    f = cfg.finetune
    use_dropout = model_cfg.dropout > 0 or model_cfg.attn_dropout > 0 or f.clf_dropout > 0

    def finetune_step(state: TrainState, batch):
        rng = None
        if use_dropout:
            rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            return finetune_loss(
                graphdef, params, batch, spec, lm_coef=f.lm_coef, clf_dropout=f.clf_dropout,
                rng=rng,
            )  # fmt: skip

        (loss, (clf, lm)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
        )
        return new_state, {
            "loss": loss, "clf_loss": clf, "lm_loss": lm,
            "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
        }  # fmt: skip

    return finetune_step


# ----------------------------------------------------------------------------- state


def _fresh_state(model_cfg, spec, tx, key_data, base_params=None, base_cfg=None) -> TrainState:
    key_model, key_head, key_dropout = jax.random.split(jax.random.wrap_key_data(key_data), 3)
    if base_params is None:
        params_model = model.init_params(model_cfg, key_model)
    else:
        params_model = extend_vocab(base_params, base_cfg, key_model)
    params = {"model": params_model, "head": init_head(key_head, model_cfg, spec.n_outputs)}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(key_dropout),
    )


def state_shardings(model_cfg: ModelConfig, spec: TaskSpec, mesh, tx):
    """(graphdef, abstract TrainState, its shardings): the model's from the rules table,
    W_y's from HEAD_AXES, the optimizer state's from its parameters'."""
    graphdef, abstract_model = model.abstract_model(model_cfg)
    key_data = jax.random.key_data(jax.random.key(0))
    abstract = jax.eval_shape(lambda k: _fresh_state(model_cfg, spec, tx, k), key_data)
    head_sh = {
        name: NamedSharding(mesh, sharding.logical_to_spec(HEAD_AXES[name], x.shape, mesh))
        for name, x in abstract.params["head"].items()
    }
    param_sh = {"model": sharding.param_shardings(abstract_model, mesh), "head": head_sh}
    return graphdef, abstract, sharding.state_shardings(abstract, param_sh, mesh, tx)


def _init_source(cfg: FinetuneConfig):
    """(tokenizer, pretrained ModelConfig or None): from the init checkpoint, else from
    the config (a random init needs model and tokenizer there)."""
    f = cfg.finetune
    if not f.init_from:
        if f.init == "pretrained":
            raise ConfigError(
                "give --init-from CKPT_DIR (a pretraining workdir or converted checkpoint), "
                "or --config.finetune.init=random for the no-pretraining ablation"
            )
        if not cfg.tokenizer.path:
            raise ConfigError("a random init without --init-from needs tokenizer.path")
        tokenizer = load_tokenizer(cfg.tokenizer)
        m = cfg.model
        base = dataclasses.replace(m, vocab_size=m.vocab_size or tokenizer.vocab_size)
        return tokenizer, base
    stored, record = read_checkpoint_json(f.init_from)
    try:
        base = config_lib.from_dict(stored).model
    except ConfigError as e:
        raise CheckpointError(
            f"{f.init_from} is not a pretraining or converted gptjax checkpoint ({e})"
        ) from None
    check_architecture(cfg.model, base, f.init_from)
    if record:
        tokenizer = tokenizer_from_record(record)
    elif cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        raise CheckpointError(f"{f.init_from} holds no tokenizer: set tokenizer.path")
    if tokenizer.vocab_size > base.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} ids but the model {base.vocab_size}"
        )
    return tokenizer, base


def _initial_state(cfg: FinetuneConfig, model_cfg, base_cfg, spec, tx, state_sh, mesh):
    key_data = jax.random.key_data(jax.random.key(cfg.finetune.seed))
    if cfg.finetune.init == "random":
        fn = lambda k: _fresh_state(model_cfg, spec, tx, k)  # noqa: E731
        return jax.jit(fn, out_shardings=state_sh)(key_data)
    _, base_abstract = model.abstract_model(base_cfg)
    target = abstract_with_shardings(
        nnx.to_pure_dict(base_abstract), sharding.param_shardings(base_abstract, mesh)
    )
    try:
        _, base_params, _ = load_params(cfg.finetune.init_from, target)
    except Exception as e:  # stored shapes disagree with the stored config, a damaged file
        raise CheckpointError(
            f"cannot read {cfg.finetune.init_from} as the model its config describes: {e}"
        ) from e
    fn = lambda p, k: _fresh_state(model_cfg, spec, tx, k, p, base_cfg)  # noqa: E731
    return jax.jit(fn, out_shardings=state_sh)(base_params, key_data)


# ----------------------------------------------------------------------------- data


def _load_split(cfg, spec, which: str, tokenizer, sp, n_ctx, labelled=True) -> Encoded:
    path, limit = getattr(cfg.task, which), getattr(cfg.task, f"max_{which}")
    if not path:
        raise ConfigError(f"task.{which} is empty: give the {which} file")
    examples = spec.read(path, labelled)
    return encode(spec, examples[:limit] if limit else examples, tokenizer, sp, n_ctx, which)


def _outputs(fn, params, source: ExampleSource, batch_size: int, bucket: int, put) -> np.ndarray:
    """fn(params, batch) over the whole source in order (the last batch padded)."""
    outs = []
    for start in range(0, len(source), batch_size):
        idx = list(range(start, min(start + batch_size, len(source))))
        n = len(idx)
        batch = trim(batch_at(source, idx + [idx[-1]] * (batch_size - n)), bucket)
        outs.append(np.asarray(jax.device_get(fn(params, put(batch))))[:n])
    return np.concatenate(outs)


# ----------------------------------------------------------------------------- loop


def finetune(cfg: FinetuneConfig, workdir, stop_after: int | None = None) -> dict:
    """Fine-tune (or resume) in workdir; returns the results also written to
    WORKDIR/results.json. stop_after: checkpoint and raise Preempted after that step
    (as SIGTERM does), e.g. to time-box a run."""
    cfg = validate(cfg)
    with claim(workdir, "finetune"):
        return _finetune(cfg, Path(workdir), stop_after)


def _finetune(cfg: FinetuneConfig, workdir: Path, stop_after: int | None) -> dict:
    spec, f = TASKS[cfg.task.name], cfg.finetune
    primary = jax.process_index() == 0
    # No checkpoints/ until the data is ready: a run that fails before leaves none.
    ckdir = checkpoint_dir(workdir)
    ckpt = Checkpointer(ckdir, cfg.checkpoint) if ckdir.is_dir() else None
    resuming = bool(ckpt and ckpt.steps())
    base_cfg = None
    if resuming:  # the run's own model (vocabulary included) and tokenizer
        _, stored, record = ckpt.read_latest_json()
        model_cfg = config_lib.from_dict(stored, FinetuneConfig).model
        tokenizer = tokenizer_from_record(record)
    else:
        tokenizer, base_cfg = _init_source(cfg)
        model_cfg = with_specials(base_cfg, cfg.model)
    run_cfg = dataclasses.replace(cfg, model=model_cfg)
    n_ctx = cfg.task.n_ctx or model_cfg.seq_len
    if n_ctx > model_cfg.seq_len:
        raise ConfigError(f"task.n_ctx={n_ctx} exceeds the model's seq_len={model_cfg.seq_len}")
    sp = Specials.for_vocab(model_cfg.vocab_size)
    train_data = _load_split(cfg, spec, "train", tokenizer, sp, n_ctx)
    dev_data = _load_split(cfg, spec, "dev", tokenizer, sp, n_ctx)
    ckpt = ckpt or Checkpointer(ckdir, cfg.checkpoint)

    mesh = sharding.make_mesh(cfg.mesh)  # a ConfigError when it does not fit the devices
    n_proc, shards = jax.process_count(), mesh.shape["data"] * mesh.shape["fsdp"]
    if f.batch_size % shards or f.batch_size % n_proc:
        raise ConfigError(
            f"finetune.batch_size={f.batch_size} does not split over data*fsdp={shards} "
            f"and {n_proc} processes"
        )
    steps_per_epoch = len(train_data) // f.batch_size
    if not steps_per_epoch:
        raise FinetuneDataError(
            f"{len(train_data)} training examples make no batch of {f.batch_size}"
        )
    total = f.epochs * steps_per_epoch
    opt_cfg = optimizer_config(cfg, total)
    tx, schedule = make_optimizer(opt_cfg, total), lr_schedule(opt_cfg, total)
    primary_metric = spec.metrics[0]

    with jax.set_mesh(mesh):
        graphdef, abstract, state_sh = state_shardings(model_cfg, spec, mesh, tx)
        batch_sh = {
            "tokens": sharding.batch_sharding(mesh, 3),
            "extract": sharding.batch_sharding(mesh, 2),
            "label": sharding.batch_sharding(mesh, 1),
        }
        train_iter = ExampleBatches(
            ExampleSource(train_data, "train"), f.batch_size, f.seed, bucket=f.length_bucket
        )
        if resuming:
            start, state, _, _ = ckpt.restore(
                abstract_with_shardings(abstract, state_sh),
                train_iter,
                model_config=config_lib.to_dict(run_cfg)["model"],
            )
            log.info("resumed from step %d in %s", start, ckpt.directory)
        else:
            state, start = _initial_state(cfg, model_cfg, base_cfg, spec, tx, state_sh, mesh), 0
        step_fn = jit_step(
            make_finetune_step(cfg, model_cfg, spec, graphdef, tx, schedule),
            mesh,
            state_sh,
            batch_sh,
        )
        eval_fn = jax.jit(
            lambda p, b: forward(graphdef, p, b["tokens"], b["extract"], spec)[0],
            in_shardings=(state_sh.params, batch_sh),
            out_shardings=NamedSharding(mesh, P()),
        )
        dev_source = ExampleSource(dev_data, "dev")

        def evaluate(params) -> dict:
            put = lambda b: jax.device_put(b, batch_sh)  # noqa: E731
            outs = _outputs(eval_fn, params, dev_source, f.batch_size, f.length_bucket, put)
            return score(spec, predictions(spec, outs), dev_data.labels)

        if primary:
            print(
                f"gptjax finetune {spec.name}: {model.param_count(state.params) / 1e6:.2f}M "
                f"parameters, {len(train_data)} train / {len(dev_data)} dev examples, "
                f"n_ctx {n_ctx}, steps {start}->{total} ({steps_per_epoch} per epoch)",
                flush=True,
            )
        writer = metrics.MetricsWriter(workdir, start, enabled=primary)
        history = [r for r in metrics.read_metrics(workdir) if "epoch" in r and r["step"] <= start]
        best_ckpt = Checkpointer(
            checkpoint_dir(workdir / "best"), CheckpointConfig(keep=1, async_save=False)
        )
        best_file = workdir / "best" / "metrics.json"
        best = json.loads(best_file.read_text()) if resuming and best_file.exists() else None
        pending: list = []
        last_time, last_step = time.perf_counter(), start

        def save(step: int) -> None:
            # Not a state whose loss went NaN/inf since the last log record.
            loop.check_finite(pending, lambda s, loss: f"non-finite loss at step {s}; stopping")
            ckpt.save(step, state, train_iter, config_lib.to_dict(run_cfg), tokenizer.to_record())

        with PreemptionFlag() as sigterm:
            try:
                for step in range(start, total):
                    local = next(train_iter)  # cut to the global batch's longest sequence
                    batch = {
                        k: jax.make_array_from_process_local_data(batch_sh[k], v)
                        for k, v in local.items()
                    }
                    state, m = step_fn(state, batch)
                    ckpt.check_saved()  # a failed background save stops the run here
                    pending.append((step + 1, m))
                    xla_cpu.throttle(pending)
                    done = step + 1
                    epoch_end = done % steps_per_epoch == 0
                    if done % f.log_every == 0 or epoch_end:
                        got = [
                            m
                            for _, m in loop.drain(
                                pending,
                                lambda s, loss, done=done: (
                                    f"non-finite loss by step {done}; stopping"
                                ),
                            )
                        ]
                        now = time.perf_counter()
                        record = {k: float(np.mean([x[k] for x in got])) for k in got[0]}
                        record["lr"] = float(got[-1]["lr"])
                        record["examples_per_sec"] = (
                            (done - last_step) * f.batch_size / max(now - last_time, 1e-9)
                        )
                        last_time, last_step = now, done
                        writer.write(done, record)
                    if epoch_end:
                        dev = evaluate(state.params)
                        entry = {
                            "epoch": done // steps_per_epoch,
                            **{f"dev_{k}": v for k, v in dev.items()},
                        }
                        writer.write(done, entry)
                        history.append({"step": done, **entry})
                        shown = ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "epoch")
                        if primary:
                            print(f"epoch {entry['epoch']} (step {done}): {shown}", flush=True)
                        if best is None or dev[primary_metric] > best[f"dev_{primary_metric}"]:
                            best_ckpt.save(
                                done, {"params": state.params}, None,
                                config_lib.to_dict(run_cfg), tokenizer.to_record(),
                            )  # fmt: skip
                            best_ckpt.wait()
                            best = {"step": done, **entry}
                            if primary:
                                write_text_atomic(best_file, json.dumps(best, indent=2))
                    saved = loop.checkpoint_due(done, cfg.checkpoint.every_steps, last=epoch_end)
                    if saved:
                        save(done)
                    loop.stop_if_preempted(
                        sigterm, done, saved=saved, save=save, ckpt=ckpt, why="stopped",
                        stop_after=stop_after,
                    )  # fmt: skip
                ckpt.wait()
            finally:
                writer.close()
                ckpt.close()
                best_ckpt.close()

    epochs = [{k: int(v) if k in ("step", "epoch") else v for k, v in r.items()} for r in history]
    results = {
        "task": spec.name,
        "init": f.init,
        "init_from": f.init_from,
        "lm_coef": f.lm_coef,
        **{k: v for k, v in best.items() if k.startswith("dev_")},
        "best_epoch": int(best["epoch"]),
        "best_step": int(best["step"]),
        "final": {k: v for k, v in epochs[-1].items() if k.startswith("dev_")},
        "epochs": epochs,
        **{f"majority_dev_{k}": v for k, v in majority(spec, train_data.labels, dev_data.labels).items()},
        "n_train": len(train_data),
        "n_dev": len(dev_data),
        "n_ctx": n_ctx,
        "truncated_train": train_data.truncated,
        "truncated_dev": dev_data.truncated,
        "steps": total,
        "params": model.param_count(state.params),
    }  # fmt: skip
    if primary:
        write_text_atomic(workdir / "results.json", json.dumps(results, indent=2))
    return results


# ----------------------------------------------------------------------------- predict


def predict(checkpoint, task: str, output, batch_size: int = 32) -> dict:
    """Predictions of a fine-tuned checkpoint (a finetune workdir: its best epoch) for
    `task` = NAME=PATH, one JSON object a line in `output`. Returns a summary, with the
    task's metrics when the file is labelled."""
    name, _, path = task.partition("=")
    if name not in TASKS or not path:
        raise ConfigError(f"--task must be NAME=PATH with NAME one of {', '.join(TASKS)}")
    checkpoint = Path(checkpoint)
    if (checkpoint / "best").is_dir():
        checkpoint = checkpoint / "best"
    try:
        cfg = config_lib.from_dict(read_checkpoint_json(checkpoint)[0], FinetuneConfig)
    except ConfigError as e:
        raise CheckpointError(f"{checkpoint} is not a fine-tuned checkpoint ({e})") from None
    if cfg.task.name != name:
        raise ConfigError(f"{checkpoint} was fine-tuned on {cfg.task.name}, not {name}")
    spec = TASKS[name]
    _, params, record = load_params(checkpoint)
    tokenizer = tokenizer_from_record(record)
    n_ctx = cfg.task.n_ctx or cfg.model.seq_len
    sp = Specials.for_vocab(cfg.model.vocab_size)
    data = encode(spec, spec.read(path, labelled=False), tokenizer, sp, n_ctx, "predict")
    graphdef, _ = model.abstract_model(cfg.model)
    fn = jax.jit(lambda p, b: forward(graphdef, p, b["tokens"], b["extract"], spec)[0])
    source = ExampleSource(data, "predict")
    outs = _outputs(fn, params, source, batch_size, cfg.finetune.length_bucket, lambda b: b)
    preds = predictions(spec, outs)
    lines = []
    for i, (out, pred) in enumerate(zip(outs, preds, strict=True)):
        row = {"index": i, "where": data.wheres[i]}
        if spec.regression:
            row["prediction"] = float(pred)
        else:
            row["prediction"] = spec.labels[int(pred)]
            row["probabilities"] = [round(float(p), 6) for p in jax.nn.softmax(out)]
        if data.labels[i] != -1:
            label = data.labels[i]
            row["label"] = float(label) if spec.regression else spec.labels[int(label)]
        lines.append(json.dumps(row))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, "".join(line + "\n" for line in lines))
    summary = {"task": name, "examples": len(data), "truncated": data.truncated}
    if np.all(data.labels != -1):
        summary.update(score(spec, preds, data.labels))
    return summary
