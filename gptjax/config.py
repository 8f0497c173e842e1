"""The one typed config tree. Every default lives here.

Config files in configs/ are Python files with a `get_config() -> Config` that
override a few fields; the command line overrides any field with
`--config.section.field=value`. Unknown keys and ill-typed values fail here,
before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Literal, NamedTuple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0: take the tokenizer's vocabulary size
    vocab_multiple: int = 128  # embedding rows padded to a multiple of this (sharding)
    seq_len: int = 256
    n_layer: int = 4
    d_model: int = 256
    n_head: int = 4
    n_kv_head: int = 0  # 0: n_head (MHA); 1: MQA; else GQA
    d_head: int = 0  # 0: d_model // n_head
    d_ff: int = 0  # 0: 4 * d_model
    prenorm: bool = True  # False: GPT-1 post-LN blocks, no final norm
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    position: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    mlp: Literal["gelu", "swiglu"] = "gelu"
    use_bias: bool = True
    tie_embeddings: bool = True
    # Per-layer attention window, cycled over the layers: 0 is dense causal,
    # w > 0 a causal band of w positions. GPT-3 alternates (0, w).
    attention_windows: tuple[int, ...] = (0,)
    dropout: float = 0.0  # embedding and residual dropout
    attn_dropout: float = 0.0
    init_std: float = 0.02
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots_saveable"] = "none"
    # xla: jax.nn.dot_product_attention; cudnn: its GPU flash kernel; blocked: causal
    # attention in query blocks that skip the masked key blocks (faster on CPU).
    attention_impl: Literal["xla", "cudnn", "blocked"] = "xla"
    # False unrolls the layer loop (same weights layout): faster steps on CPU for small
    # models, compile time growing with depth. True (a scan) for anything large.
    scan_layers: bool = True

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_multiple
        return -(-self.vocab_size // m) * m


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    kind: Literal["sentencepiece", "gpt2"] = "sentencepiece"
    # sentencepiece: a .model file; empty trains one on the training corpus.
    # gpt2: a directory holding encoder.json and vocab.bpe.
    path: str = ""
    vocab_size: int = 4096  # only when a sentencepiece model is trained here


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Each source is one of: `builtin:pydoc` (text shipped with CPython), a
    # text file path or glob, a `.jsonl` path or glob (field `text_field`),
    # `tfds:NAME[:SPLIT]` read through tfds.data_source; or alone `prepared:DIR`, the
    # output of `gptjax data prepare` (ArrayRecord shards, read through grain).
    sources: tuple[str, ...] = ("builtin:pydoc",)
    text_field: str = "text"
    val_fraction: float = 0.05  # tail of the token stream held out
    cache_dir: str = ""  # empty: WORKDIR/token_cache
    tfds_data_dir: str = ""  # empty: TFDS's default
    # Training batches are read by this many grain worker processes, each `prefetch`
    # batches ahead; 0 reads them in the training process.
    workers: int = 0
    prefetch: int = 2


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 6e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_steps: int = 0  # 0: train.steps; the LR stays at the floor after it
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    clip_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    batch_size: int = 32  # global sequences per optimizer step
    microbatches: int = 1  # gradient accumulation: batch_size / microbatches per pass
    # Batch-size ramp (GPT-3): start at this many sequences and grow linearly, in
    # whole microbatches, to batch_size over batch_ramp_steps. 0: no ramp.
    batch_ramp_start: int = 0
    batch_ramp_steps: int = 0
    log_every: int = 10
    eval_every: int = 100  # held-out loss, and eval_tasks, every this many steps (and at the end)
    eval_batches: int = 8
    # Few-shot tasks scored at every eval_every from the training parameters, logged as
    # eval/NAME/METRIC (docs/eval.md): each `NAME[=PATH][:K[:LIMIT]]`, the task as
    # `gptjax eval --task` takes it, K demonstrations (default 0), its first LIMIT
    # examples (default all). On the command line: comma-separated.
    eval_tasks: tuple[str, ...] = ()
    peak_flops: float = 0.0  # per device, FLOP/s; 0 looks the device up in the peak table
    sample_tokens: int = 64  # sample printed at the end; 0 disables
    sample_prompt: str = ""
    # A checkpoint (converted, or a training workdir: its latest step) whose parameters
    # start a new run; the optimizer and data start fresh. Its tokenizer is used unless
    # tokenizer.path is set. Ignored when the workdir already has checkpoints (resume).
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices left over
    fsdp: int = 1
    tensor: int = 1
    # TPU slices joined over the data-center network (DCN): the data axis is split
    # slices x (data / slices), slices outermost, so only the gradient reduction
    # crosses DCN; fsdp and tensor stay inside a slice's ICI torus.
    slices: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """jax.distributed: one process per host (or per GPU); process 0 coordinates.

    Each unset field falls back to an environment variable (named beside it), then to
    JAX's auto-detection on Cloud TPU, SLURM and Open MPI (gptjax.distributed).
    """

    # auto: initialise when an address is given or a TPU/SLURM/MPI cluster is detected.
    initialize: Literal["auto", "yes", "no"] = "auto"
    coordinator_address: str = ""  # host:port of process 0; JAX_COORDINATOR_ADDRESS
    num_processes: int = 0  # 0: unset; JAX_NUM_PROCESSES
    process_id: int = -1  # -1: unset; JAX_PROCESS_ID
    local_device_ids: tuple[int, ...] = ()  # devices this process drives; JAX_LOCAL_DEVICE_IDS
    initialization_timeout: int = 300  # seconds to wait for every process to connect
    heartbeat_timeout: int = 100  # seconds of silence before a process counts as dead
    shutdown_timeout: int = 300  # seconds a finished process waits for the others


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()


# ----------------------------------------------------------------------------- fine-tuning

# The fine-tuning tasks (gptjax/finetune_data.py holds their readers and metrics).
TaskName = Literal[
    "sst2", "cola", "mrpc", "qqp", "stsb", "rte", "cb", "snli", "mnli", "race", "storycloze"
]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    name: TaskName = "sst2"
    train: str = ""  # training file (formats: gptjax/finetune_data.py)
    dev: str = ""  # evaluated after every epoch; picks the best epoch
    n_ctx: int = 0  # tokens per sequence, 0: model.seq_len; longer inputs are truncated
    max_train: int = 0  # use only the first N training examples (0: all)
    max_dev: int = 0  # use only the first N dev examples (0: all)


@dataclasses.dataclass(frozen=True)
class FinetuneSection:
    init: Literal["pretrained", "random"] = "pretrained"  # random: the no-pretraining ablation
    # A pretraining workdir (its latest step) or a converted checkpoint; `--init-from`.
    # With init=random it still gives the architecture and tokenizer when set.
    init_from: str = ""
    epochs: int = 3
    batch_size: int = 32
    lm_coef: float = 0.5  # lambda of L3 = L2 + lambda * L1; 0 turns the auxiliary LM loss off
    clf_dropout: float = 0.1  # dropout on the [extract] hidden state, before W_y
    warmup_fraction: float = 0.002  # linear warmup over 0.2% of the steps
    seed: int = 0
    log_every: int = 10
    length_bucket: int = 32  # batches are cut to a multiple of this many tokens


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning config tree; configs/finetune/*.py override it. The paper's
    defaults: lr 6.25e-5, batch 32, 3 epochs, dropout 0.1, weight decay 0.01."""

    task: TaskConfig = TaskConfig()
    finetune: FinetuneSection = FinetuneSection()
    # The architecture comes from the init checkpoint: fields set here (to non-default
    # values) must agree with it, except the runtime ones (RUNTIME_FIELDS). Without an
    # init checkpoint (init=random) this is the model, and `tokenizer` its tokenizer.
    model: ModelConfig = ModelConfig(dropout=0.1, attn_dropout=0.1)
    tokenizer: TokenizerConfig = TokenizerConfig()
    # warmup_steps and decay_steps are derived from finetune.warmup_fraction and epochs.
    optim: OptimConfig = OptimConfig(
        lr=6.25e-5, schedule="linear", warmup_steps=0, min_lr_ratio=0.0, b2=0.999,
        weight_decay=0.01, clip_norm=1.0,
    )  # fmt: skip
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(every_steps=500, keep=2)
    # Several processes (launch/): `gptjax finetune` joins them as `gptjax train` does.
    distributed: DistributedConfig = DistributedConfig()


# ----------------------------------------------------------------------------- scaling sweeps


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The width -> shape and width -> LR rules, and how compute is counted.

    Defaults here; a base config file may define `get_sweep_config() -> SweepConfig`,
    and the command line overrides any field with --sweep.FIELD=VALUE.
    """

    aspect_ratio: float = 32.0  # d_model / n_layer
    head_dim: int = 32  # d_model must be a multiple; n_head = d_model / head_dim
    # LR scaling with width (one global LR: Adam's update size is per-parameter, so a
    # 1/width rule is the muP-like choice for the hidden matrices, applied to all).
    lr_rule: Literal["constant", "inverse_width", "inverse_sqrt_width"] = "inverse_width"
    base_lr: float = 0.0  # LR at base_width; 0: the base config's optim.lr
    base_width: int = 0  # 0: the base config's model.d_model
    warmup_fraction: float = 0.0  # >0: optim.warmup_steps = fraction * steps; 0 keeps base
    flops_rule: Literal["6N", "model"] = "6N"
    # isoFLOP runs with D/N outside [min, max] tokens per parameter are dropped (0: no bound).
    min_tokens_per_param: float = 0.0
    max_tokens_per_param: float = 0.0
    min_steps: int = 10  # runs with fewer optimizer steps are dropped


class ConfigError(ValueError):
    """A config file, override or value that cannot be used."""


class EvalTaskSpec(NamedTuple):
    """One entry of train.eval_tasks."""

    task: str  # as `gptjax eval --task` takes it: NAME or NAME=PATH
    name: str  # the NAME of eval/NAME/METRIC
    shots: int
    limit: int | None  # None: every example


def parse_eval_task(spec: str) -> EvalTaskSpec:
    """`NAME[=PATH][:K[:LIMIT]]` -> EvalTaskSpec; only trailing `:digits` fields (an
    empty one keeps its default) are K and LIMIT, so a path may hold other colons."""
    parts = spec.split(":")
    numbers = []
    while len(parts) > 1 and len(numbers) < 2 and (parts[-1].isdigit() or parts[-1] == ""):
        numbers.insert(0, parts.pop())
    task = ":".join(parts)
    name = task.partition("=")[0]
    if not name or name != name.strip() or "/" in name:
        raise ConfigError(
            f"train.eval_tasks: {spec!r} is not NAME[=PATH][:K[:LIMIT]] (e.g. "
            "hellaswag=data/hellaswag_val.jsonl:0:500)"
        )
    shots = int(numbers[0]) if numbers and numbers[0] else 0
    limit = int(numbers[1]) if len(numbers) > 1 and numbers[1] else None
    if limit == 0:
        raise ConfigError(f"train.eval_tasks: {spec!r}: LIMIT must be positive")
    return EvalTaskSpec(task, name, shots, limit)


def coerce(text: str, annotation, key: str):
    """Parse a command-line string into the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if text not in choices:
            raise ConfigError(f"{key}: {text!r} is not one of {', '.join(map(str, choices))}")
        return text
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        items = [t for t in text.split(",") if t != ""]
        return tuple(coerce(t.strip(), item_type, key) for t in items)
    if annotation is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {text!r}")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {text!r}") from None
    if annotation is str:
        return text
    raise ConfigError(f"{key}: cannot parse a value of type {annotation}")


def _check_type(value, annotation, key: str):
    """Check a Python value from a config file or JSON against a field's type."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{key}: {value!r} is not one of {typing.get_args(annotation)}")
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{key}: expected a sequence, got {value!r}")
        (item_type, _) = typing.get_args(annotation)
        return tuple(_check_type(v, item_type, key) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected bool, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def override(cfg: Config, key: str, text: str) -> Config:
    """Return cfg with the dotted `key` set from its command-line string."""
    section, _, field = key.partition(".")
    sections = _field_types(type(cfg))
    if section not in sections or not field:
        raise ConfigError(f"unknown config key {key!r}: sections are {', '.join(sections)}")
    sub = getattr(cfg, section)
    fields = _field_types(type(sub))
    if field not in fields:
        raise ConfigError(f"unknown config key {key!r}: {section} has {', '.join(fields)}")
    value = coerce(text, fields[field], key)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(sub, **{field: value})})


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, root: type = Config):
    """Rebuild a Config (or another root of sections, e.g. the fine-tuning config)
    from to_dict's output, checking every key and type."""
    sections = {}
    for name, cls in _field_types(root).items():
        given = dict(d.get(name, {}))
        types_ = _field_types(cls)
        unknown = set(given) - set(types_)
        if unknown:
            raise ConfigError(f"unknown config keys in {name}: {sorted(unknown)}")
        sections[name] = cls(
            **{k: _check_type(v, types_[k], f"{name}.{k}") for k, v in given.items()}
        )
    unknown = set(d) - set(sections)
    if unknown:
        raise ConfigError(f"unknown config sections: {sorted(unknown)}")
    return root(**sections)


def validate(cfg: Config) -> Config:
    """Re-check every field's type (config files may set anything) and the invariants."""
    cfg = from_dict(to_dict(cfg))
    m, t = cfg.model, cfg.train
    if m.d_head == 0 and m.d_model % m.n_head:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by n_head={m.n_head}")
    if m.n_head % m.kv_heads:
        raise ConfigError(f"model.n_head={m.n_head} is not a multiple of n_kv_head={m.kv_heads}")
    if m.position == "rope" and m.head_dim % 2:
        raise ConfigError("rope needs an even head dimension")
    if not m.attention_windows or m.n_layer % len(m.attention_windows):
        raise ConfigError(
            f"model.n_layer={m.n_layer} must be a multiple of the attention_windows "
            f"period {len(m.attention_windows)}"
        )
    if t.batch_size % t.microbatches:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by microbatches={t.microbatches}"
        )
    if t.batch_ramp_start:
        if t.batch_ramp_start % (t.batch_size // t.microbatches):
            raise ConfigError("train.batch_ramp_start must be a whole number of microbatches")
        if not 0 < t.batch_ramp_start <= t.batch_size or t.batch_ramp_steps <= 0:
            raise ConfigError(
                "a batch ramp needs 0 < train.batch_ramp_start <= train.batch_size and "
                "train.batch_ramp_steps > 0"
            )
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError("data.val_fraction must be in [0, 1)")
    if cfg.data.workers < 0 or cfg.data.prefetch < 1:
        raise ConfigError("data.workers must be >= 0 and data.prefetch >= 1")
    if cfg.mesh.slices < 1:
        raise ConfigError(f"mesh.slices={cfg.mesh.slices} must be at least 1")
    for name in ("steps", "batch_size", "log_every", "eval_every", "eval_batches"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be positive")
    if cfg.checkpoint.every_steps <= 0 or cfg.checkpoint.keep <= 0:
        raise ConfigError("checkpoint.every_steps and checkpoint.keep must be positive")
    names = [parse_eval_task(s).name for s in t.eval_tasks]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(
            f"train.eval_tasks names {', '.join(twice)} more than once: each task's metrics "
            "are logged as eval/NAME/METRIC, so a task may appear once"
        )
    return cfg


def load(path: str | Path, overrides: typing.Sequence[str] = (), root: type = Config):
    """Load configs/X.py's get_config() and apply `a.b=value` overrides. With another
    `root` (a dataclass of sections), only its types are checked: its owner validates."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"gptjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is the user's to fix: say which
        raise ConfigError(f"error while loading {path}: {e!r}") from e
    if not isinstance(getattr(module, "get_config", None), types.FunctionType):
        raise ConfigError(f"{path} defines no get_config() function")
    cfg = module.get_config()
    if not isinstance(cfg, root):
        raise ConfigError(
            f"{path}: get_config() returned {type(cfg).__name__}, not {root.__name__}"
        )
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        cfg = override(cfg, key, text)
    return validate(cfg) if root is Config else from_dict(to_dict(cfg), root)


def dumps(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
